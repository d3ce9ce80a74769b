"""Reliability, round 3 (library), items 2 and 3: the residual stacks follow the layer's mask
contract (NaN/Inf padding in masked rows), and quantize dropout under activation checkpointing
replays each call's own draw (two checkpointed calls before one backward, both reentrant modes,
any order of recomputation)."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from fastvq import GroupedResidualVQ, ResidualVQ, VectorQuantizer

PLAIN = dict(kmeans_init=False, dead_code_steps=0, backend="torch")

ROUTES = {
    "greedy": (ResidualVQ, {}),
    "shared": (ResidualVQ, dict(shared_codebook=True)),
    "beam": (ResidualVQ, dict(beam_size=3)),
    "greedy_grad": (ResidualVQ, dict(ema=False)),
    "shared_grad": (ResidualVQ, dict(shared_codebook=True, ema=False)),
    "beam_grad": (ResidualVQ, dict(beam_size=2, ema=False)),
    "dropout": (ResidualVQ, dict(quantize_dropout=True)),
    "grouped": (GroupedResidualVQ, dict(groups=2)),
    "grouped_shared": (GroupedResidualVQ, dict(groups=2, shared_codebook=True)),
    "grouped_beam": (GroupedResidualVQ, dict(groups=2, beam_size=2)),
    "rotation": (ResidualVQ, dict(rotation_trick=True, ema=False)),
}


def _build(route, **extra):
    cls, kw = ROUTES[route]
    return cls(8, 16, 3, dead_code_steps=2, **kw, **extra, backend="torch")


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("pad", [float("nan"), float("inf")])
def test_masked_padding_follows_the_layer_contract(route, pad):
    """A masked row, whatever it holds: the output is its codes (finite, decodable), a loss
    masked by multiplication and the input gradient are finite, its gradient is 0, and the
    outputs, losses, gradients and state equal a run with the padding set to 0."""
    torch.manual_seed(1)
    x = torch.randn(3, 7, 8)
    mask = torch.rand(3, 7) > 0.35
    target = torch.randn(3, 7, 8)
    results = []
    for fill in (pad, 0.0):
        torch.manual_seed(2)
        m = _build(route).train()
        xi = torch.where(mask[..., None], x, fill).requires_grad_(True)
        outs = []
        for _ in range(2):  # k-means init, then a step from the initialised codes
            torch.manual_seed(3)
            q, idx, loss = m(xi, mask)
            total = ((q - target).square() * mask[..., None]).sum() + loss
            xi.grad = None
            total.backward()
            outs.append((q.detach(), idx, loss.detach(), total.detach(), xi.grad.clone()))
        results.append((outs, {k: v.clone() for k, v in m.state_dict().items()}, m))
    (outs, state, m), (outs0, state0, _) = results
    for (q, idx, loss, total, grad), (q0, idx0, loss0, total0, grad0) in zip(
        outs, outs0, strict=True
    ):
        assert torch.isfinite(q).all(), "a masked row's output must be its codes"
        assert torch.isfinite(total) and torch.isfinite(grad).all()
        assert torch.all(grad[~mask] == 0)
        torch.testing.assert_close(q[mask], q0[mask], rtol=0, atol=0)
        assert torch.equal(idx[mask], idx0[mask])
        torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=0)
        torch.testing.assert_close(total, total0, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad, grad0, rtol=1e-6, atol=1e-7)
    # the masked rows' output decodes from their indices
    m.eval()
    with torch.no_grad():
        q, idx, _ = m(torch.where(mask[..., None], x, pad), mask)
        assert torch.equal(m.codes_from_indices(idx)[~mask], q[~mask])
    for key in state:
        torch.testing.assert_close(state[key], state0[key], rtol=0, atol=0, equal_nan=True)


def test_stack_output_on_masked_rows_is_the_sum_of_codes_like_the_layer():
    """One depth: the stack's masked rows output exactly what the layer outputs there."""
    torch.manual_seed(4)
    x = torch.randn(10, 8)
    mask = torch.rand(10) > 0.5
    x[~mask] = float("nan")
    rvq = ResidualVQ(8, 16, 1, **PLAIN)
    vq = VectorQuantizer(8, 16, **PLAIN)
    vq.load_codebook(rvq.layers[0].get_codebook().detach())
    assert torch.equal(rvq(x, mask).quantized, vq(x, mask).quantized)


# --- item 3: quantize dropout under activation checkpointing --------------------------------------


def _pair(cls, **kw):
    kw = dict(dict(quantize_dropout=True, ema=False, **PLAIN), **kw)
    if cls is GroupedResidualVQ:
        a, b = cls(8, 8, 4, groups=2, **kw), cls(8, 8, 4, groups=2, **kw)
    else:
        a, b = cls(8, 8, 4, **kw), cls(8, 8, 4, **kw)
    b.load_state_dict(a.state_dict())
    return a, b


def _loss(out, target):
    quantized, _, loss = out  # reentrant checkpoint returns a plain tuple
    return (quantized - target).square().sum() + loss


@pytest.mark.parametrize("cls", [ResidualVQ, GroupedResidualVQ])
@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("order", ["one_backward", "first_then_second", "second_then_first"])
def test_two_checkpointed_calls_replay_their_own_draws(cls, reentrant, order):
    """Two checkpointed calls of one stack (different inputs, different draws) before their
    backward: indices, input and codebook gradients equal an uncheckpointed twin's, whatever
    order the recomputations run in; both generators advance alike."""
    torch.manual_seed(0)
    a, b = _pair(cls)
    xs = [torch.randn(6, 8) for _ in range(2)]
    target = torch.randn(6, 8)
    differed = False
    for step in range(6):
        xa = [x.clone().requires_grad_(True) for x in xs]
        xb = [x.clone().requires_grad_(True) for x in xs]
        outs_a = [checkpoint(a, x, use_reentrant=reentrant) for x in xa]
        outs_b = [b(x) for x in xb]
        la = [_loss(o, target) for o in outs_a]
        lb = [_loss(o, target) for o in outs_b]
        if order == "one_backward":
            (la[0] + la[1]).backward()
        else:
            first = 0 if order == "first_then_second" else 1
            la[first].backward()
            la[1 - first].backward()
        (lb[0] + lb[1]).backward()
        kept = [int((o.indices >= 0).sum(-1).flatten()[0]) for o in outs_b]
        differed |= kept[0] != kept[1]
        for oa, ob in zip(outs_a, outs_b, strict=True):
            assert torch.equal(oa[1], ob[1])
        for ga, gb in zip(xa, xb, strict=True):
            assert torch.equal(ga.grad, gb.grad), f"step {step}: input gradient differs"
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            assert (pa.grad is None) == (pb.grad is None)
            if pa.grad is not None:
                assert torch.equal(pa.grad, pb.grad)
                pa.grad = pb.grad = None
    assert differed, "the two calls never drew different depths: the test would mean nothing"
    ga, gb = (m.random_streams.get("quantize-dropout", "cpu") for m in (a, b))
    assert torch.equal(ga.get_state(), gb.get_state())  # one draw per call, none per recompute


def test_replayed_draws_do_not_depend_on_the_global_rng():
    """The draw is the seeded stream's: two stacks with the same seed draw the same depths
    whatever the global RNG holds (as on two ranks seeded differently)."""
    a, b = (ResidualVQ(4, 8, 4, quantize_dropout=True, **PLAIN) for _ in range(2))
    x = torch.randn(5, 4)
    got = []
    for m, seed in ((a, 1), (b, 2)):
        torch.manual_seed(seed)
        got.append([int((m(x).indices[0] >= 0).sum()) for _ in range(30)])
    assert got[0] == got[1] and len(set(got[0])) > 1


def test_recomputation_without_rng_preservation_raises():
    """Without the RNG state the recomputation cannot find its call's draw: a clear error, not
    a silently different depth count."""
    a, _ = _pair(ResidualVQ)
    x = torch.randn(6, 8, requires_grad=True)
    out = checkpoint(a, x, use_reentrant=False, preserve_rng_state=False)
    torch.randn(3)  # the global RNG moved on: the recomputation reads another key
    with pytest.raises(RuntimeError, match="preserve_rng_state"):
        _loss(out, torch.zeros(6, 8)).backward()


def test_dropout_draws_resume_with_the_run_rng_state():
    """The replayable draw still comes from the seeded stream the run's resume state keeps."""
    from fastvq.train import rng_state, set_rng_state

    a, b = (ResidualVQ(4, 8, 4, quantize_dropout=True, **PLAIN) for _ in range(2))
    x = torch.randn(5, 4)
    for _ in range(3):
        a(x)
    set_rng_state(b, rng_state(a))
    assert [int((a(x).indices[0] >= 0).sum()) for _ in range(20)] == [
        int((b(x).indices[0] >= 0).sum()) for _ in range(20)
    ]
