"""fastvq.LFQ and fastvq.lfq_entropy against the literal formula: the codes enumerated with
itertools, the softmax of ``-beta ||z - c||^2`` over all ``2^d`` of them as an N x 2^d fp64
matrix, the entropies and their autograd gradients in fp64."""

import itertools
import math

import pytest
import torch
from memory_helpers import step_peak_rss_mib

import fastvq
from fastvq import LFQ
from fastvq.lfq_entropy import clamped_sample_entropy, codebook_entropy, per_sample_entropy

pytestmark = pytest.mark.usefixtures("one_thread")


def all_codes(d, s, spherical=False):
    """(2^d, d) fp64, row k the code of index k (first channel the highest bit)."""
    c = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=d)), dtype=torch.float64) * s
    return c / c.norm(dim=-1, keepdim=True) * s if spherical else c


def literal(z, codes, beta, eps=None):
    """z (C, N, d) fp64 -> (per-sample, codebook) entropies (C,), the N x 2^d matrix built."""
    logits = -beta * ((z[..., None, :] - codes) ** 2).sum(-1)  # (C, N, K)
    p = logits.softmax(-1)
    logp = logits.log_softmax(-1) if eps is None else p.clamp(min=eps).log()
    hs = -(p * logp).sum(-1).mean(-1)
    pbar = p.mean(1)
    logpbar = pbar.log() if eps is None else pbar.clamp(min=eps).log()
    return hs, -(pbar * logpbar).sum(-1)


@pytest.mark.parametrize("eps", [None, 1e-2])
@pytest.mark.parametrize("chunk", [1, 3, 7, 32, None])
@pytest.mark.parametrize("d, n", [(5, 9), (3, 1), (6, 40)])
def test_entropies_equal_the_literal_formula(d, n, chunk, eps):
    torch.manual_seed(d * 100 + n)
    beta, s = 2.5, 0.7
    z = torch.randn(2, n, d, dtype=torch.float64)
    zl = z.clone().requires_grad_()
    hs, hc = literal(zl, all_codes(d, s), beta, eps)
    w1, w2 = torch.randn(2, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    (gl,) = torch.autograd.grad((hs * w1).sum() + (hc * w2).sum(), zl)
    zo = z.clone().requires_grad_()
    u = 4 * beta * s * zo
    if eps is None:
        hs2 = per_sample_entropy(u)
    else:
        hs2 = clamped_sample_entropy(u, math.log(eps), chunk)
    hc2 = codebook_entropy(u, chunk, None if eps is None else math.log(eps))
    (go,) = torch.autograd.grad((hs2 * w1).sum() + (hc2 * w2).sum(), zo)
    assert hs2.dtype == hc2.dtype == torch.float64
    torch.testing.assert_close(hs2, hs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(hc2, hc, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(go, gl, rtol=1e-9, atol=1e-10)


def test_entropy_fp32_sharp_logits_and_empty():
    """beta = 100 (vqp's default): finite, fp32, close to fp64; an empty batch gives 0."""
    torch.manual_seed(1)
    u = 400 * torch.randn(1, 64, 8)
    h32 = codebook_entropy(u, 5)
    h64 = codebook_entropy(u.double(), 5)
    assert h32.dtype == torch.float32 and torch.isfinite(h32).all()
    torch.testing.assert_close(h32.double(), h64, rtol=1e-5, atol=1e-5)
    empty = torch.zeros(2, 0, 4, requires_grad=True)
    assert codebook_entropy(empty).tolist() == [0.0, 0.0]
    assert per_sample_entropy(empty).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("scale", [1e2, 1e4, 1e5, 1e7])
def test_entropy_fp32_large_inputs_stays_within_its_range(scale):
    """Inputs far from zero (an encoder without a commitment term drifts there): the fp32 terms
    equal fp64 and the codebook entropy stays in [0, log 2^d]. The form ``a + u . b`` cancelled
    here (10.49 nats of a 6.93 maximum at 1e4, -4e26 at 1e5)."""
    torch.manual_seed(3)
    u = 400 * scale * torch.randn(1, 3136, 10)
    h64 = codebook_entropy(u.double(), 256)
    for chunk in (None, 256):
        h32 = codebook_entropy(u, chunk)
        assert 0.0 <= h32.item() <= 10 * math.log(2) + 1e-4
        torch.testing.assert_close(h32.double(), h64, rtol=1e-5, atol=1e-5)
    hs32, hs64 = per_sample_entropy(u), per_sample_entropy(u.double())
    assert (hs32 >= 0).all()
    torch.testing.assert_close(hs32.double(), hs64, rtol=1e-5, atol=1e-6)
    hc32 = clamped_sample_entropy(u, math.log(1e-5), 128)
    torch.testing.assert_close(hc32.double(), clamped_sample_entropy(u.double(), math.log(1e-5)),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    # gradients stay finite where every bit is saturated
    ur = u.clone().requires_grad_()
    (codebook_entropy(ur, 256) + per_sample_entropy(ur)).sum().backward()
    assert torch.isfinite(ur.grad).all()


def test_entropy_errors_name_the_argument():
    with pytest.raises(ValueError, match="chunk"):
        codebook_entropy(torch.randn(1, 3, 2), 0)
    with pytest.raises(ValueError, match="u must be"):
        codebook_entropy(torch.randn(3, 2))


# --- the layer ---------------------------------------------------------------------------------


def layer_oracle(x, layer, beta, mask=None):
    """The layer's loss in fp64 from the literal formula (no projections): rows -> codes."""
    c, d, s = layer.num_codebooks, layer.codebook_dim, layer.codebook_scale
    z = x.reshape(-1, c, d).to(torch.float64)
    if mask is not None:
        z = z[mask.reshape(-1)]
    if layer.spherical:
        z = z / z.norm(dim=-1, keepdim=True) * s
    codes = all_codes(d, s, layer.spherical)
    hs, hc = literal(z.transpose(0, 1), codes, beta, layer.prob_floor)
    nearest = codes[((z[..., None, :] - codes) ** 2).sum(-1).argmin(-1)]
    commit = ((z - nearest) ** 2).mean()
    ent = hs.mean() - layer.diversity_gamma * hc.mean()
    return layer.entropy_loss_weight * ent + layer.commitment_loss_weight * commit, nearest


@pytest.mark.parametrize(
    "opts",
    [
        dict(codebook_size=32),
        dict(codebook_size=16, num_codebooks=2, codebook_scale=0.5, commitment_loss_weight=0.3),
        dict(codebook_size=64, spherical=True, diversity_gamma=0.5, entropy_chunk=5),
        dict(codebook_size=8, prob_floor=1e-3, entropy_chunk=3, commitment_loss_weight=1.0),
    ],
)
@pytest.mark.parametrize("masked", [False, True])
def test_layer_equals_the_literal_formula(opts, masked):
    torch.manual_seed(0)
    q = LFQ(**opts, entropy_loss_weight=0.7, inv_temperature=3.0)
    x = torch.randn(3, 11, q.dim, dtype=torch.float32)
    mask = torch.rand(3, 11) > 0.3 if masked else None
    xr = x.clone().requires_grad_()
    out = q(xr, mask)
    assert out.indices.dtype == torch.int64
    xl = x.double().requires_grad_()
    want, nearest = layer_oracle(xl, q, 3.0, mask)
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-6)
    (gl,) = torch.autograd.grad(want, xl)
    (go,) = torch.autograd.grad(out.loss, xr)
    torch.testing.assert_close(go.double(), gl, rtol=1e-4, atol=1e-6)
    rows = out.quantized.reshape(-1, q.num_codebooks, q.codebook_dim)
    sel = slice(None) if mask is None else mask.reshape(-1)
    torch.testing.assert_close(rows[sel].double(), nearest, rtol=1e-6, atol=1e-7)
    decoded = q.codes_from_indices(out.indices)
    assert torch.equal(decoded.reshape(rows.shape)[sel], rows[sel].detach())


def test_straight_through_mask_and_stats():
    torch.manual_seed(0)
    q = LFQ(codebook_size=16, entropy_loss_weight=0.0, commitment_loss_weight=0.5)
    x = torch.randn(2, 5, 4)
    x[0, 1] = float("nan")
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 1] = False
    x.requires_grad_()
    out = q(x, mask, return_stats=True, return_loss_breakdown=True)
    g = torch.randn_like(out.quantized)
    (gx,) = torch.autograd.grad((out.quantized * g).sum(), x)
    assert torch.equal(gx[mask], g[mask]) and (gx[0, 1] == 0).all()
    assert out.stats.counts.shape == (1, 16) and out.stats.counts.sum() == 9
    assert out.breakdown.commitment > 0 and out.loss == 0.5 * out.breakdown.commitment
    q.eval()
    ev = q(x, mask, return_loss_breakdown=True)
    assert ev.loss == 0 and ev.breakdown.codebook_entropy == 0
    assert torch.equal(ev.quantized.detach(), q.codes_from_indices(ev.indices))


def test_layouts_projections_autocast_and_large_indices():
    torch.manual_seed(0)
    q = LFQ(dim=24, codebook_size=2**10, num_codebooks=2, channel_first=True).eval()
    x = torch.randn(2, 24, 3, 5)
    out = q(x)
    assert out.quantized.shape == x.shape and out.indices.shape == (2, 3, 5, 2)
    assert torch.equal(out.quantized, q.codes_from_indices(out.indices))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lo = q(x)
        decoded = q.codes_from_indices(lo.indices, dtype=torch.bfloat16)
    assert lo.quantized.dtype == torch.bfloat16
    assert torch.equal(decoded, lo.quantized)
    big = LFQ(codebook_size=2**40).eval()  # indices past fp32/bf16 exact integers
    z = torch.randn(50, 40, dtype=torch.bfloat16)
    bits = (z.float() > 0).long()
    want = sum(bits[:, i] << (39 - i) for i in range(40))
    assert torch.equal(big(z).indices, want)
    assert torch.equal(big.codes_from_indices(want, dtype=torch.bfloat16), big(z).quantized)


def test_frac_per_sample_entropy_and_empty_batch():
    torch.manual_seed(0)
    q = LFQ(codebook_size=16, frac_per_sample_entropy=0.5, entropy_chunk=3)
    x = torch.randn(20, 4, requires_grad=True)
    torch.manual_seed(5)
    a = q(x).loss
    torch.manual_seed(5)
    assert torch.equal(q(x).loss, a)  # the draw replays from torch's RNG
    a.backward()
    empty = q(torch.zeros(0, 4, requires_grad=True))
    assert empty.indices.shape == (0,) and empty.loss == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "dim or codebook_size"),
        (dict(codebook_size=12), "codebook_size"),
        (dict(dim=4, frac_per_sample_entropy=0.0), "frac_per_sample_entropy"),
        (dict(dim=4, soft_clamp_input_value=0.5), "soft_clamp_input_value"),
        (dict(dim=4, prob_floor=1.0), "prob_floor"),
        (dict(dim=4, entropy_chunk=0), "entropy_chunk"),
        (dict(dim=4, inv_temperature=-1.0), "inv_temperature"),
        (dict(dim=4, num_codebooks=0), "num_codebooks"),
        (dict(dim=4, projections=False, num_codebooks=2), "projections"),
        (dict(dim=4, nope=1), "nope"),
    ],
)
def test_bad_options_name_the_argument(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        LFQ(**kwargs)


def test_bad_input_and_indices():
    q = LFQ(codebook_size=16)
    with pytest.raises(ValueError, match="dim"):
        q(torch.randn(3, 5))
    with pytest.raises(ValueError, match="indices must lie"):
        q.codes_from_indices(torch.tensor([16]))
    with pytest.raises(ValueError, match="inv_temperature"):
        q(torch.randn(3, 4), inv_temperature=0.0)
    assert fastvq.LFQ is LFQ


def test_memory_large_codebook_stays_flat():
    """K = 2^14, N = 2048, entropy loss on, forward + backward: peak RSS growth under half of
    one N x K fp32 matrix (128 MiB). The 2^18 measurement: docs/lfq.md."""
    setup = (
        "torch.manual_seed(0)\n"
        "q = fastvq.LFQ(codebook_size=2**14)\n"
        "q(torch.randn(8, 14, requires_grad=True)).loss.backward()  # warm up first-call allocs\n"
        "x = torch.randn(2048, 14, requires_grad=True)\n"
    )
    step = "out = q(x)\n(out.quantized.square().mean() + out.loss).backward()\n"
    growth_mib = step_peak_rss_mib(setup, step)
    assert growth_mib < 64, f"peak RSS growth {growth_mib:.0f} MiB"
