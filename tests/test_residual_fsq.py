"""fastvq.ResidualFSQ and GroupedResidualFSQ: the stack's arithmetic against a literal loop over
FSQ layers, quantize dropout (index -1, replay under checkpointing), masks, exact decoding in
every dtype, the grouped form."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from fastvq import FSQ, GroupedResidualFSQ, ResidualFSQ

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def literal(x, levels, q):
    """The stack written out: soft clamp, r / levels^-i through a hard-clamped symmetric FSQ."""
    lv = torch.tensor(levels, dtype=torch.float32)
    c = 1 + 1 / (lv - 1)
    r = (x.float() / c).tanh() * c
    fsq = FSQ(levels, preserve_symmetry=True, hard_clamp=True)
    total, idx = 0.0, []
    for i in range(q):
        s = lv**-i
        out, ind, _ = fsq(r / s)
        total = total + out * s
        r = r - (out * s).detach()
        idx.append(ind)
    return total, torch.stack(idx, -1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_the_literal_stack_and_decodes_exactly(dtype):
    torch.manual_seed(0)
    levels = [8, 5, 5, 3]
    rfsq = ResidualFSQ(levels, 4)
    x = torch.randn(3, 19, 4).to(dtype).requires_grad_()
    q, idx, loss = rfsq(x)
    want_q, want_idx = literal(x, levels, 4)
    assert q.dtype == dtype and idx.dtype == torch.int64 and idx.shape == (3, 19, 4)
    assert torch.equal(idx, want_idx) and torch.equal(q, want_q.to(dtype)) and float(loss) == 0
    assert torch.equal(rfsq.codes_from_indices(idx, dtype=dtype), q)
    g = torch.randn(q.shape).to(dtype).float()  # exact in x's dtype: one gradient path
    (grad,) = torch.autograd.grad((q.float() * g).sum(), x)
    (want,) = torch.autograd.grad((want_q * g).sum(), x)
    assert torch.equal(grad, want)


def test_error_shrinks_with_depth():
    torch.manual_seed(1)
    x = torch.rand(500, 3) * 1.6 - 0.8
    target = (x / 1.25).tanh() * 1.25  # the stack quantizes the soft-clamped input
    errs = [
        float((ResidualFSQ([5, 5, 5], q)(x).quantized - target).square().mean()) for q in (1, 2, 3)
    ]
    assert errs[0] > 10 * errs[1] > 100 * errs[2]


def test_quantize_dropout_and_replay():
    torch.manual_seed(2)
    rfsq = ResidualFSQ([5, 5, 5], 6, dim=8, quantize_dropout=True, quantize_dropout_multiple_of=2)
    x = torch.randn(4, 8, requires_grad=True)
    seen = set()
    for _ in range(12):
        q, idx, loss, losses = rfsq(x, return_losses=True)
        n = rfsq.last_num_active
        seen.add(n)
        assert n % 2 == 0 and (idx[:, n:] == -1).all() and (idx[:, :n] >= 0).all()
        assert losses.shape == (6,) and float(loss) == 0
        assert torch.equal(rfsq.eval()(x, num_active=n).quantized, q)
        rfsq.train()
    assert len(seen) > 1
    for _ in range(3):  # the recomputation in backward replays its forward's draw
        out = checkpoint(lambda t: rfsq(t).quantized, x, use_reentrant=False)
        n = rfsq.last_num_active
        (g2,) = torch.autograd.grad(out.square().sum(), x)
        (g1,) = torch.autograd.grad(rfsq(x, num_active=n).quantized.square().sum(), x)
        assert torch.equal(g1, g2)
    rfsq.eval()
    q, idx, _ = rfsq(x, num_active=2)
    assert torch.equal(rfsq.codes_from_indices(idx), q) and (idx[:, 2:] == -1).all()


def test_mask_and_stats():
    torch.manual_seed(4)
    rfsq = ResidualFSQ([5, 4], 3, dim=6)
    x = torch.randn(5, 7, 6)
    mask = torch.rand(5, 7) > 0.3
    x[~mask] = float("nan")
    x.requires_grad_()
    q, idx, loss, stats = rfsq(x, mask=mask, return_stats=True)
    q.square().sum().backward()
    assert torch.isfinite(q).all() and (x.grad[~mask] == 0).all()
    assert all(torch.isfinite(p.grad).all() for p in rfsq.parameters())
    assert len(stats) == 3 and all(float(s.counts.sum()) == float(mask.sum()) for s in stats)


def test_channel_first_empty_and_grouped():
    torch.manual_seed(5)
    a = ResidualFSQ([7, 5], 2, dim=4)
    b = ResidualFSQ([7, 5], 2, dim=4, channel_first=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 4, 3, 5)
    qa, ia, _ = a(x.movedim(1, -1))
    qb, ib, _ = b(x)
    assert torch.equal(qb, qa.movedim(-1, 1)) and torch.equal(ib, ia)
    assert a(torch.randn(0, 4)).indices.shape == (0, 2)
    g = GroupedResidualFSQ([7, 5], 3, dim=8, groups=2, channel_first=True)
    xg = torch.randn(2, 8, 6)
    q, idx, loss, losses = g(xg, return_losses=True)
    assert idx.shape == (2, 6, 2, 3) and losses.shape == (2, 3) and q.shape == xg.shape
    for k, rfsq in enumerate(g.rvqs):
        qk, ik, _ = rfsq(xg[:, 4 * k : 4 * k + 4].movedim(1, -1))
        assert torch.equal(ik, idx[..., k, :]) and torch.equal(
            qk.movedim(-1, 1), q[:, 4 * k : 4 * k + 4]
        )
    g.eval()
    q, idx, _ = g(xg)
    assert torch.equal(g.codes_from_indices(idx), q)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(levels=[5, 5], num_quantizers=0), "num_quantizers"),
        (dict(levels=[5, 5], num_quantizers=2, dim=0), "dim"),
        (dict(levels=[5, 5], num_quantizers=2, quantize_dropout_cutoff_index=2), "cutoff"),
        (dict(levels=[5, 5], num_quantizers=2, num_codebooks=2), "num_codebooks"),
        (dict(levels=[5, 1], num_quantizers=2), "levels"),
        (dict(levels=[5], num_quantizers=2, soft_clamp_input_value=-1.0), "soft_clamp"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        ResidualFSQ(**kwargs)


def test_bad_indices_and_inputs():
    rfsq = ResidualFSQ([5, 5], 2)
    with pytest.raises(ValueError, match="num_quantizers=2"):
        rfsq.codes_from_indices(torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="indices must lie"):
        rfsq.codes_from_indices(torch.full((3, 2), 25))
    with pytest.raises(ValueError, match="num_active"):
        rfsq(torch.randn(3, 2), num_active=3)
    with pytest.raises(ValueError, match="groups"):
        GroupedResidualFSQ([5], 2, dim=3, groups=2)


def test_vqp_front_end_forward_active_checks_num_active():
    """The vqp front end's ``forward_active``: 0 or more than Q depths is a ValueError naming
    the argument (0 crashed with an IndexError, Q + 1 ran every depth silently); None runs all."""
    from fastvq.compat.vqp import ResidualFSQ as VqpResidualFSQ

    rfsq = VqpResidualFSQ(dim=8, levels=[5, 4], num_quantizers=3).eval()
    x = torch.randn(2, 5, 8)
    for bad in (0, 4, 1.5):
        with pytest.raises(ValueError, match="num_active"):
            rfsq.forward_active(x, False, bad)
    out, idx = rfsq.forward_active(x, False, None)
    ref, ref_idx = rfsq.forward_active(x, False, 3)
    assert torch.equal(out, ref) and torch.equal(idx, ref_idx)
    _, idx = rfsq.forward_active(x, False, 2)
    assert (idx[..., 2] == -1).all() and (idx[..., :2] >= 0).all()
