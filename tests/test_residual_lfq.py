"""fastvq.ResidualLFQ and GroupedResidualLFQ: the stack against a literal loop written out in
fp64 (codes, indices, per-depth entropy and commitment losses over all 2^d codes, input
gradients), quantize dropout (index -1, replay under checkpointing), masks, exact decoding in
every dtype, the grouped form and bad arguments."""

import itertools
import math

import pytest
import torch
from memory_helpers import step_peak_rss_mib
from torch.utils.checkpoint import checkpoint

from fastvq import GroupedResidualLFQ, ResidualLFQ

pytestmark = pytest.mark.usefixtures("one_thread")


def _entropy(p):
    return -(p * p.clamp_min(1e-300).log()).sum(-1)


def literal(m, x, beta, w_e, w_c, gamma, spherical=False, clamp=None):
    """The stack written out in fp64: project_in, per depth the soft clamp v 2^-i, the sphere,
    codes +-s 2^-i, indices from the bits, the entropies over all 2^d codes, the commitment."""
    d, q = m.codebook_dim, m.num_quantizers
    proj = isinstance(m.project_in, torch.nn.Linear)
    w_in = m.project_in.weight.double() if proj else None
    z = x.double() @ w_in.T + m.project_in.bias.double() if proj else x.double()
    z = z.reshape(-1, d)
    bits = torch.tensor(list(itertools.product([0, 1], repeat=d)), dtype=torch.float64)
    weights = 2.0 ** torch.arange(d - 1, -1, -1, dtype=torch.float64)
    residual, total, idx, losses = z, 0.0, [], []
    for i in range(q):
        s = 2.0**-i
        r = residual if clamp is None else torch.tanh(residual / (clamp * s)) * clamp * s
        if spherical:
            r = r / r.norm(dim=-1, keepdim=True) * s
        c = torch.where(r > 0, s, -s)
        cb = bits * 2 * s - s
        if spherical:
            c = c / c.norm(dim=-1, keepdim=True) * s
            cb = cb / cb.norm(dim=-1, keepdim=True) * s
        idx.append(((r > 0).double() * weights).sum(-1).long())
        p = torch.softmax(-beta * torch.cdist(r, cb).square(), dim=-1)  # (N, 2^d)
        h_s, h_c = _entropy(p).mean(), _entropy(p.mean(0))
        commit = (r - c.detach()).square().mean()
        losses.append(w_e * (h_s - gamma * h_c) + w_c * commit)
        qd = c + (r - r.detach())  # straight through
        total = total + qd
        residual = residual - qd.detach()
    out = total
    if proj:
        out = total @ m.project_out.weight.double().T + m.project_out.bias.double()
    return out.reshape(*x.shape[:-1], -1), torch.stack(idx, -1), torch.stack(losses)


@pytest.mark.parametrize(
    "kw",
    [
        dict(codebook_size=16, num_quantizers=3),
        dict(codebook_size=32, num_quantizers=4, dim=9, commitment_loss_weight=0.5),
        dict(codebook_size=8, num_quantizers=2, soft_clamp_input_value=1.5, diversity_gamma=0.5),
        dict(codebook_size=16, num_quantizers=3, spherical=True, commitment_loss_weight=0.25),
    ],
    ids=["plain", "projected", "clamped", "spherical"],
)
def test_matches_the_literal_fp64_stack(kw):
    torch.manual_seed(0)
    kw = dict(kw)
    beta, w_e = 3.0, 0.1
    m = ResidualLFQ(**kw, inv_temperature=beta, entropy_chunk=5)  # ragged chunks of codes
    x = (torch.randn(2, 13, m.dim) * 0.7).requires_grad_()
    q, idx, loss, losses = m(x, return_losses=True)
    xd = x.detach().double().requires_grad_()
    want_q, want_idx, want_losses = literal(
        m, xd, beta, w_e, kw.get("commitment_loss_weight", 0.0), kw.get("diversity_gamma", 1.0),
        kw.get("spherical", False), kw.get("soft_clamp_input_value"),
    )  # fmt: skip
    assert idx.dtype == torch.int64 and torch.equal(idx, want_idx.reshape(idx.shape))
    torch.testing.assert_close(q.double(), want_q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses.double(), want_losses, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        float(loss.detach()), float(want_losses.sum().detach()), rtol=1e-4, atol=1e-6
    )
    g = torch.randn(q.shape)
    (grad,) = torch.autograd.grad((q * g).sum() + loss, x)
    (want,) = torch.autograd.grad((want_q * g.double()).sum() + want_losses.sum(), xd)
    torch.testing.assert_close(grad.double(), want, rtol=1e-3, atol=1e-5)
    assert [layer.codebook_scale for layer in m.layers] == [2.0**-i for i in range(len(m.layers))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spherical", [False, True])
def test_codes_from_indices_is_exact(dtype, spherical):
    torch.manual_seed(1)
    m = ResidualLFQ(2**10, 4, dim=12, spherical=spherical).eval()
    x = torch.randn(3, 11, 12).to(dtype)
    q, idx, loss = m(x)
    assert q.dtype == dtype and float(loss) == 0 and idx.shape == (3, 11, 4)
    assert int(idx.max()) >= 256  # past bf16's exact integers
    assert torch.equal(m.codes_from_indices(idx, dtype=dtype), q)
    codes = m.depth_codes(idx)
    assert codes.shape == (3, 11, 4, 10)
    assert torch.equal(codes[..., 1, :].abs().amax(), torch.tensor(0.5 / math.sqrt(10) if
                       spherical else 0.5))  # fmt: skip


def test_quantize_dropout_and_replay():
    torch.manual_seed(2)
    m = ResidualLFQ(16, 6, dim=8, quantize_dropout=True, quantize_dropout_multiple_of=2)
    x = torch.randn(4, 8, requires_grad=True)
    seen = set()
    for _ in range(12):
        q, idx, loss, losses = m(x, return_losses=True)
        n = m.last_num_active
        seen.add(n)
        assert n % 2 == 0 and (idx[:, n:] == -1).all() and (idx[:, :n] >= 0).all()
        assert (losses[n:] == 0).all() and (losses[:n] != 0).all()
        torch.testing.assert_close(loss, losses.sum())
        assert torch.equal(m.eval()(x, num_active=n).quantized, q)
        m.train()
    assert len(seen) > 1
    for _ in range(3):  # the recomputation in backward replays its forward's draw
        out = checkpoint(lambda t: m(t).quantized, x, use_reentrant=False)
        n = m.last_num_active
        (g2,) = torch.autograd.grad(out.square().sum(), x)
        (g1,) = torch.autograd.grad(m(x, num_active=n).quantized.square().sum(), x)
        assert torch.equal(g1, g2)
    m.eval()
    q, idx, _ = m(x, num_active=2)
    assert torch.equal(m.codes_from_indices(idx), q) and (idx[:, 2:] == -1).all()


def test_mask_excludes_rows_from_losses_stats_and_gradients():
    torch.manual_seed(4)
    m = ResidualLFQ(16, 3, dim=6, commitment_loss_weight=0.5)
    x = torch.randn(5, 7, 6)
    mask = torch.rand(5, 7) > 0.3
    real = x[mask].clone()
    x[~mask] = float("nan")
    x.requires_grad_()
    q, idx, loss, losses, stats = m(x, mask=mask, return_losses=True, return_stats=True)
    (q.square().sum() + loss).backward()
    assert torch.isfinite(q).all() and (x.grad[~mask] == 0).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    assert len(stats) == 3 and all(float(s.counts.sum()) == float(mask.sum()) for s in stats)
    q2, idx2, _, losses2 = m(real, return_losses=True)  # the real rows alone: the same losses
    assert torch.equal(idx[mask], idx2)
    torch.testing.assert_close(losses, losses2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q[mask], q2)


def test_channel_first_inv_temperature_and_empty():
    torch.manual_seed(5)
    a = ResidualLFQ(8, 2, dim=4)
    b = ResidualLFQ(8, 2, dim=4, channel_first=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 4, 3, 5)
    qa, ia, la = a(x.movedim(1, -1), inv_temperature=7.0)
    qb, ib, lb = b(x, inv_temperature=7.0)
    assert torch.equal(qb, qa.movedim(-1, 1)) and torch.equal(ib, ia) and torch.equal(la, lb)
    assert not torch.equal(a(x.movedim(1, -1)).loss, la)  # the override reaches every depth
    out = a(torch.randn(0, 4, requires_grad=True))
    assert out.indices.shape == (0, 2) and out.quantized.shape == (0, 4)
    assert list(a.state_dict()) == ["project_in.weight", "project_in.bias", "project_out.weight",
                                    "project_out.bias"]  # fmt: skip


def test_grouped_form():
    torch.manual_seed(6)
    g = GroupedResidualLFQ(16, 3, dim=8, groups=2, channel_first=True, quantize_dropout=True)
    xg = torch.randn(2, 8, 6)
    q, idx, loss, losses = g(xg, return_losses=True)
    n = g.rvqs[0].last_num_active
    assert idx.shape == (2, 6, 2, 3) and losses.shape == (2, 3) and q.shape == xg.shape
    assert (idx[..., n:] == -1).all() and (idx[..., :n] >= 0).all()
    torch.testing.assert_close(loss, losses.sum(-1).mean())
    for k, rvq in enumerate(g.rvqs):
        qk, ik, lk = rvq(xg[:, 4 * k : 4 * k + 4].movedim(1, -1), num_active=n)
        assert torch.equal(ik, idx[..., k, :])
        assert torch.equal(qk.movedim(-1, 1), q[:, 4 * k : 4 * k + 4])
        torch.testing.assert_close(lk, losses[k].sum())
    g.eval()
    q, idx, _ = g(xg)
    assert torch.equal(g.codes_from_indices(idx), q)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(codebook_size=16, num_quantizers=0), "num_quantizers"),
        (dict(codebook_size=12, num_quantizers=2), "codebook_size"),
        (dict(codebook_size=16, num_quantizers=2, dim=0), "dim"),
        (dict(codebook_size=16, num_quantizers=2, quantize_dropout_cutoff_index=2), "cutoff"),
        (dict(codebook_size=16, num_quantizers=2, num_codebooks=2), "num_codebooks"),
        (dict(codebook_size=16, num_quantizers=2, codebook_scale=0.0), "codebook_scale"),
        (dict(codebook_size=16, num_quantizers=2, soft_clamp_input_value=0.5), "soft_clamp"),
        (dict(codebook_size=16, num_quantizers=2, entropy_chunk=0), "entropy_chunk"),
        (dict(codebook_size=16, num_quantizers=2, bogus=1), "bogus"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        ResidualLFQ(**kwargs)


def test_bad_indices_and_inputs():
    m = ResidualLFQ(16, 2)
    with pytest.raises(ValueError, match="num_quantizers=2"):
        m.codes_from_indices(torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="indices must lie"):
        m.codes_from_indices(torch.full((3, 2), 16))
    with pytest.raises(TypeError, match="indices"):
        m.codes_from_indices(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="num_active"):
        m(torch.randn(3, 4), num_active=3)
    with pytest.raises(ValueError, match="inv_temperature"):
        m.train()(torch.randn(3, 4), inv_temperature=0.0)
    with pytest.raises(ValueError, match="dim"):
        m(torch.randn(3, 5))
    with pytest.raises(ValueError, match="groups"):
        GroupedResidualLFQ(16, 2, dim=3, groups=2)


def test_memory_large_codebook_stays_flat():
    """K = 2^14 per depth, 3 depths, N = 1024, the entropy losses on, forward + backward: peak
    RSS growth under one N x K fp32 matrix of one depth (64 MiB); each depth's entropies run in
    chunks of codes, and the stack adds only (N, d) tensors per depth."""
    setup = (
        "torch.set_num_threads(1)\n"
        "torch.manual_seed(0)\n"
        "q = fastvq.ResidualLFQ(2**14, 3, dim=32)\n"
        "q(torch.randn(8, 32, requires_grad=True)).loss.backward()  # warm up first-call allocs\n"
        "x = torch.randn(1024, 32, requires_grad=True)\n"
    )
    step = "out = q(x)\n(out.quantized.square().mean() + out.loss).backward()\n"
    growth_mib = step_peak_rss_mib(setup, step)
    assert growth_mib < 32, f"peak RSS growth {growth_mib:.0f} MiB (one N x K of a depth: 64)"


def test_autocast_projections_and_fp32_depths():
    """Under autocast the projections run in bf16 and the depths in fp32: the indices are the
    fp32 stack's on the bf16 projection, and decoding under autocast gives the output back."""
    torch.manual_seed(7)
    m = ResidualLFQ(64, 3, dim=10).eval()
    x = torch.randn(4, 9, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, idx, _ = m(x)
        back = m.codes_from_indices(idx)
        z = m.project_in(x)
    assert q.dtype == back.dtype == torch.bfloat16 and torch.equal(back, q)
    plain = ResidualLFQ(64, 3)  # the same depths without projections, on the bf16 rows
    assert torch.equal(plain.eval()(z.float()).indices, idx)


def test_per_depth_loss_breakdown():
    """Each depth's unweighted entropy and commitment terms, (Q,) each, recombine into its loss;
    a dropped depth's are 0; eval gives zeros."""
    torch.manual_seed(8)
    w_e, w_c, gamma = 0.2, 0.5, 0.7
    m = ResidualLFQ(32, 4, dim=7, entropy_loss_weight=w_e, commitment_loss_weight=w_c,
                    diversity_gamma=gamma)  # fmt: skip
    x = torch.randn(3, 11, 7)
    out = m(x, return_loss_breakdown=True, num_active=3)
    bd = out.breakdown
    assert out.stats is None and all(t.shape == (4,) and not t.requires_grad for t in bd)
    want = w_e * (bd.per_sample_entropy - gamma * bd.codebook_entropy) + w_c * bd.commitment
    torch.testing.assert_close(want, out.losses.detach())
    assert (bd.per_sample_entropy[3:] == 0).all() and (bd.codebook_entropy[:3] > 0).all()
    plain = m(x, return_losses=True, num_active=3)
    assert torch.equal(plain.losses, out.losses) and torch.equal(plain.quantized, out.quantized)
    m.eval()
    assert all((t == 0).all() for t in m(x, return_loss_breakdown=True).breakdown)
