"""sample_codes and topk_codes against literal full-matrix references (fp64) and vqp."""

from __future__ import annotations

import math

import pytest
import torch

import fastvq
from fastvq import sampling
from fastvq.sampling import sample_codes, topk_codes

try:
    from vector_quantize_pytorch import vector_quantize_pytorch as vqp
except ImportError:  # vqp is optional: the tests against it skip
    vqp = None


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ref_sorted(z: torch.Tensor, codes: torch.Tensor):
    """fp64 squared distances of the (cast) inputs, sorted ascending with ties to the lowest index
    (a stable sort of the full N x K matrix)."""
    d = (z.double()[:, None, :] - codes.double()[None, :, :]).square().sum(-1)
    return d.sort(dim=1, stable=True)


def _vqp_logits64(z, codes):
    """vqp's logits, literally: -sqrt(clamp(||z - c||^2, 1e-8)) over the full N x K matrix."""
    d2 = (z.double()[:, None, :] - codes.double()[None, :, :]).square().sum(-1)
    return -d2.clamp(min=1e-8).sqrt()


# --- topk_codes ---------------------------------------------------------------------------------


def _assert_topk(z, codes, dist, idx, ref_v, ref_i):
    """Our (dist, idx) against the fp64 reference: every index lands on a code whose fp64 distance
    is the reference's at that rank, the distances agree, and the indices are identical wherever
    the reference's neighbouring ranks are not within fp32 rounding of each other (there fp32 may
    order a near-tie either way)."""
    full = (z.double()[:, None, :] - codes.double()[None, :, :]).square().sum(-1)
    torch.testing.assert_close(full.gather(1, idx), ref_v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dist.double(), ref_v, rtol=1e-5, atol=1e-6)
    tol = 2e-6 * (1 + ref_v)
    pad = torch.full_like(ref_v[:, :1], math.inf)
    gap_lo = torch.cat([pad, ref_v.diff(dim=1)], 1)
    gap_hi = torch.cat([ref_v.diff(dim=1), pad], 1)
    clear = (gap_lo > tol) & (gap_hi > tol)
    assert clear.float().mean() > 0.95
    assert (idx[clear] == ref_i[clear]).all()


@pytest.mark.parametrize("n", [1, 63])
@pytest.mark.parametrize("num_codes", [1, 2, 17, 1000])
@pytest.mark.parametrize("chunk", [7, 64, 4096])
def test_topk_matches_full_fp64(n, num_codes, chunk):
    g = _gen(n * 7919 + num_codes)
    z = torch.randn(n, 5, generator=g)
    codes = torch.randn(num_codes, 5, generator=g)
    ref_v, ref_i = _ref_sorted(z, codes)
    for k in sorted({1, min(3, num_codes), num_codes}):
        dist, idx = topk_codes(z, codes, k, chunk=chunk)
        assert dist.dtype == torch.float32 and idx.dtype == torch.int64
        assert dist.shape == idx.shape == (n, k)
        _assert_topk(z, codes, dist, idx, ref_v[:, :k], ref_i[:, :k])
        assert (dist[:, 1:] >= dist[:, :-1]).all()


def test_topk_ties_to_lowest_index():
    # Codes repeated three times: every distance occurs three times, and the k nearest must list
    # each group's copies in ascending index order, wherever the chunk boundaries fall.
    g = _gen(1)
    base = torch.randn(11, 4, generator=g)
    codes = torch.cat([base, base, base])  # code j, j + 11 and j + 22 are equal
    z = torch.randn(20, 4, generator=g)
    ref_v, ref_i = _ref_sorted(z, codes)
    for chunk in (1, 4, 10, 33):
        dist, idx = topk_codes(z, codes, 33, chunk=chunk)
        torch.testing.assert_close(idx, ref_i, rtol=0, atol=0)
        torch.testing.assert_close(dist.double(), ref_v, rtol=1e-5, atol=1e-6)
        # sanity of the reference itself: each equal triple in ascending order
        assert (idx.view(20, 11, 3).diff(dim=2) == 11).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_topk_half_inputs(dtype):
    g = _gen(2)
    z = torch.randn(40, 8, generator=g).to(dtype)
    codes = torch.randn(50, 8, generator=g).to(dtype)
    ref_v, ref_i = _ref_sorted(z, codes)  # the reference sees the same rounded values
    dist, idx = topk_codes(z, codes, 6, chunk=7)
    torch.testing.assert_close(idx, ref_i[:, :6], rtol=0, atol=0)
    torch.testing.assert_close(dist.double(), ref_v[:, :6], rtol=1e-5, atol=1e-5)


@pytest.mark.extras  # the vqp half runs only with vector_quantize_pytorch
def test_topk_k1_is_search_and_vqp_topk():
    g = _gen(3)
    z = torch.randn(63, 6, generator=g)
    codes = torch.randn(300, 6, generator=g)
    dist, idx = topk_codes(z, codes, 1, chunk=37)
    ind, _, err = fastvq.search(z, codes)
    torch.testing.assert_close(idx[:, 0], ind, rtol=0, atol=0)
    torch.testing.assert_close(dist[:, 0], err)
    if vqp is not None:  # vqp's topk: gumbel_sample(logits = -cdist, topk=k), deterministic
        logits = -vqp.cdist(z[None], codes[None])[0]
        ind, _ = vqp.gumbel_sample(logits, topk=5, training=False)
        torch.testing.assert_close(topk_codes(z, codes, 5, chunk=37)[1], ind, rtol=0, atol=0)


def test_topk_nonfinite_code_ranks_last():
    codes = torch.randn(10, 3, generator=_gen(4))
    codes[2, 1] = float("nan")
    z = torch.randn(5, 3, generator=_gen(5))
    dist, idx = topk_codes(z, codes, 10, chunk=3)
    assert (idx[:, -1] == 2).all() and dist[:, -1].isnan().all()
    assert torch.isfinite(dist[:, :-1]).all()


def test_topk_empty_and_errors():
    codes = torch.randn(4, 3)
    dist, idx = topk_codes(torch.empty(0, 3), codes, 2)
    assert dist.shape == idx.shape == (0, 2) and idx.dtype == torch.int64
    z = torch.randn(2, 3)
    with pytest.raises(ValueError, match="k must be in"):
        topk_codes(z, codes, 5)
    with pytest.raises(ValueError, match="k must be in"):
        topk_codes(z, codes, 0)
    with pytest.raises(TypeError, match="k must be an int"):
        topk_codes(z, codes, 1.0)
    with pytest.raises(ValueError, match="chunk must be"):
        topk_codes(z, codes, 1, chunk=0)
    with pytest.raises(TypeError, match="z must be float32"):
        topk_codes(z.double(), codes, 1)
    with pytest.raises(TypeError, match="codes must be float32"):
        topk_codes(z, codes.long(), 1)
    with pytest.raises(ValueError, match="z must have shape"):
        topk_codes(z[None], codes, 1)
    with pytest.raises(ValueError, match="codes' D"):
        topk_codes(torch.randn(2, 4), codes, 1)
    with pytest.raises(ValueError, match="codes must hold"):
        topk_codes(z, codes[:0], 1)


# --- sample_codes -------------------------------------------------------------------------------


def test_gumbel_noise_moments():
    # The hashed noise of 2^18 (row, code) pairs: Gumbel mean (Euler's gamma) and variance pi^2/6
    # (tolerances about 5 standard errors); the hash's bits are uniform (each set half the time).
    rows = sampling._row_keys(0, 512, 12345, torch.device("cpu"))[:, None]
    cols = sampling._mix32(torch.arange(512) ^ 678)
    h = sampling._mix32(rows ^ cols)
    bits = ((h[..., None] >> torch.arange(32)) & 1).double().mean(dim=(0, 1))
    assert (bits - 0.5).abs().max() < 0.005
    g = sampling._gumbel_from_bits(h).double()
    assert abs(g.mean().item() - 0.5772156649) < 0.0125
    assert abs(g.var().item() - math.pi**2 / 6) < 0.035
    assert torch.isfinite(g).all()


def _lowbias32(x: int) -> int:
    """Wellons' lowbias32 on Python integers (exact, no overflow): the oracle of the int32 hash."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@pytest.mark.parametrize("n", [1, 7, 1000, 4099])
def test_hash_words_equal_python_integers(n):
    # The int32 words wrap in two's complement and shift logically: every word equals the exact
    # integer hash, in vectorised lanes and in the tail alike (odd lengths), from int64 and int32.
    words = torch.randint(0, 1 << 32, (n,), generator=_gen(n), dtype=torch.int64)
    words[0] = 0xFFFFFFFF
    want = torch.tensor([_lowbias32(w) for w in words.tolist()], dtype=torch.int64)
    assert torch.equal(sampling._mix32(words), want)
    as_int32 = sampling._mix32(words.to(torch.int32))
    assert as_int32.dtype == torch.int32
    assert torch.equal(as_int32.to(torch.int64) & 0xFFFFFFFF, want)


def test_sampling_buffers_do_not_grow_with_n_or_k(monkeypatch):
    # The tile buffers are allocated once per call, sized by TILE_ELEMS alone.
    sizes = []
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        sizes.append(out.numel())
        return out

    g = _gen(18)
    z = torch.randn(3000, 4, generator=g)
    codes = torch.randn(5000, 4, generator=g)
    monkeypatch.setattr(torch, "empty", empty)
    sample_codes(z, codes, temperature=1.0, generator=_gen(0))
    monkeypatch.undo()
    assert sizes and max(sizes) <= sampling.TILE_ELEMS


def test_sample_chunk_independent_and_seeded():
    g = _gen(6)
    z = torch.randn(63, 5, generator=g)
    codes = torch.randn(100, 5, generator=g)
    runs = [sample_codes(z, codes, temperature=0.3, generator=_gen(9), chunk=c) for c in (1, 7, 64)]
    for r in runs[1:]:
        torch.testing.assert_close(r, runs[0], rtol=0, atol=0)
    other = sample_codes(z, codes, temperature=0.3, generator=_gen(10), chunk=7)
    assert (other != runs[0]).any()
    # the generator advances: a second call draws a new seed
    gen = _gen(9)
    first = sample_codes(z, codes, temperature=0.3, generator=gen)
    torch.testing.assert_close(first, runs[0], rtol=0, atol=0)
    assert (sample_codes(z, codes, temperature=0.3, generator=gen) != first).any()


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected).square() / expected).sum())


@pytest.mark.parametrize("cosine", [False, True])
def test_sample_distribution_matches_softmax(cosine):
    # Three distinct rows, each repeated 30000 times, K = 6: the empirical code frequencies of
    # each row against softmax(vqp logits / t). chi^2 with 5 degrees of freedom: 25 is p ~ 1e-4.
    g = _gen(7)
    base = torch.randn(3, 4, generator=g)
    codes = torch.randn(6, 4, generator=g) * 0.5
    if cosine:
        base = torch.nn.functional.normalize(base, dim=1)
        codes = torch.nn.functional.normalize(codes, dim=1)
    reps = 30000
    z = base.repeat_interleave(reps, dim=0)
    t = 0.7
    idx = sample_codes(z, codes, temperature=t, generator=_gen(8), chunk=4, cosine=cosine)
    logits = base.double() @ codes.double().t() if cosine else _vqp_logits64(base, codes)
    probs = (logits / t).softmax(dim=1)
    for r in range(3):
        counts = torch.bincount(idx[r * reps : (r + 1) * reps], minlength=6).double()
        assert _chi2(counts, probs[r]) < 25.0, (counts, probs[r] * reps)


@pytest.mark.extras
def test_sample_distribution_like_vqp_gumbel_sample():
    # vqp's own gumbel_sample on the same logits, as a second empirical distribution: the two
    # frequency vectors agree (two-sample chi^2, 5 degrees of freedom).
    if vqp is None:
        pytest.skip("vector_quantize_pytorch not installed")
    g = _gen(11)
    base = torch.randn(1, 4, generator=g)
    codes = torch.randn(6, 4, generator=g) * 0.5
    reps = 40000
    z = base.expand(reps, -1).contiguous()
    torch.manual_seed(0)
    logits = -vqp.cdist(z[None], codes[None])[0]
    theirs, _ = vqp.gumbel_sample(logits, temperature=0.5, stochastic=True, training=True)
    ours = sample_codes(z, codes, temperature=0.5, generator=_gen(12), chunk=5)
    a = torch.bincount(ours, minlength=6).double()
    b = torch.bincount(theirs, minlength=6).double()
    keep = (a + b) > 0
    chi2 = float(((a - b)[keep].square() / (a + b)[keep]).sum())
    assert chi2 < 25.0, (a, b)


def test_sample_temperature_zero_is_search():
    g = _gen(13)
    z = torch.randn(63, 6, generator=g)
    codes = torch.randn(257, 6, generator=g)
    ind = fastvq.search(z, codes)[0]
    torch.testing.assert_close(sample_codes(z, codes, temperature=0.0), ind, rtol=0, atol=0)
    # a tiny temperature: logit gaps / t dwarf the noise, so sampling is the argmin too
    cold = sample_codes(z, codes, temperature=1e-7, generator=_gen(1), chunk=10)
    torch.testing.assert_close(cold, ind, rtol=0, atol=0)
    # cosine at t = 0: the argmax of z.c, ties to the lowest index
    zc = torch.nn.functional.normalize(z, dim=1)
    cc = torch.nn.functional.normalize(torch.cat([codes, codes]), dim=1)
    ref = (zc.double() @ cc.double().t()).argmax(dim=1)
    got = sample_codes(zc, cc, temperature=0.0, cosine=True, chunk=100)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert (got < 257).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sample_half_inputs_cold(dtype):
    g = _gen(14)
    z = torch.randn(30, 8, generator=g).to(dtype)
    codes = torch.randn(40, 8, generator=g).to(dtype)
    ref = _ref_sorted(z, codes)[1][:, 0]
    got = sample_codes(z, codes, temperature=1e-7, generator=_gen(2), chunk=9)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_sample_nonfinite_policy():
    g = _gen(15)
    z = torch.randn(200, 3, generator=g)
    codes = torch.zeros(4, 3)
    codes[1, 0] = float("inf")
    codes[3, 2] = float("nan")
    z[5, 1] = float("nan")
    idx = sample_codes(z, codes, temperature=5.0, generator=_gen(3), chunk=3)
    assert idx[5] == 0
    assert not ((idx == 1) | (idx == 3)).any()
    assert (idx == 2).any() and (idx == 0).any()


def test_sample_empty_and_errors():
    codes = torch.randn(4, 3)
    out = sample_codes(torch.empty(0, 3), codes, generator=_gen(0))
    assert out.shape == (0,) and out.dtype == torch.int64
    z = torch.randn(2, 3)
    with pytest.raises(ValueError, match="temperature must be"):
        sample_codes(z, codes, temperature=-0.1)
    with pytest.raises(ValueError, match="temperature must be"):
        sample_codes(z, codes, temperature=float("inf"))
    with pytest.raises(TypeError, match="temperature must be"):
        sample_codes(z, codes, temperature="1")
    with pytest.raises(ValueError, match="chunk must be"):
        sample_codes(z, codes, chunk=0)
    with pytest.raises(TypeError, match="chunk must be an int"):
        sample_codes(z, codes, chunk=2.5)
    with pytest.raises(TypeError, match="generator"):
        sample_codes(z, codes, generator=0)
    with pytest.raises(ValueError, match="z must have shape"):
        sample_codes(torch.randn(3), codes)
    with pytest.raises(TypeError, match="z must be a torch.Tensor"):
        sample_codes([[0.0, 0.0, 0.0]], codes)


def test_sampling_memory_is_tiled(monkeypatch):
    # Shrink the tile budget: every tile the loops build must then stay within it, so neither
    # function ever holds an N x K matrix (checked through the GEMM, where each tile starts).
    n, k, chunk = 500, 300, 32
    monkeypatch.setattr(sampling, "TILE_ELEMS", 4096)
    seen = []
    real_addmm, real_matmul = torch.addmm, torch.Tensor.__matmul__

    def addmm(*args, **kwargs):
        out = real_addmm(*args, **kwargs)
        seen.append(out.numel())
        return out

    def matmul(a, b):
        out = real_matmul(a, b)
        seen.append(out.numel())
        return out

    g = _gen(16)
    z = torch.randn(n, 4, generator=g)
    codes = torch.randn(k, 4, generator=g)
    ref = _ref_sorted(z, codes)[1]
    monkeypatch.setattr(torch, "addmm", addmm)
    monkeypatch.setattr(torch.Tensor, "__matmul__", matmul)
    idx = topk_codes(z, codes, 4, chunk=chunk)[1]
    sample_codes(z, codes, temperature=1.0, generator=_gen(0), chunk=chunk)
    monkeypatch.undo()
    assert seen and max(seen) <= 4096
    torch.testing.assert_close(idx[:, 0], ref[:, 0], rtol=0, atol=0)


def test_sampling_on_device(device, monkeypatch):
    # CUDA where there is one: topk against the fp64 reference; for the same seed words, sampling
    # gives the same indices on the device as on CPU (the noise is a hash of (seed, row, code),
    # not a device RNG stream), up to the logits' GEMM rounding at near-ties.
    g = _gen(17)
    z = torch.randn(63, 6, generator=g)
    codes = torch.randn(129, 6, generator=g)
    ref_v, ref_i = _ref_sorted(z, codes)
    dist, idx = topk_codes(z.to(device), codes.to(device), 5, chunk=10)
    _assert_topk(z, codes, dist.cpu(), idx.cpu(), ref_v[:, :5], ref_i[:, :5])
    gen = torch.Generator(device).manual_seed(3)  # a generator on the device is accepted
    got = sample_codes(z.to(device), codes.to(device), temperature=0.5, generator=gen, chunk=10)
    assert got.device.type == torch.device(device).type and got.dtype == torch.int64
    monkeypatch.setattr(sampling, "_draw_seed", lambda generator: (123, 456))
    on_dev = sample_codes(z.to(device), codes.to(device), temperature=0.5, chunk=10)
    on_cpu = sample_codes(z, codes, temperature=0.5, chunk=33)
    torch.testing.assert_close(on_dev.cpu(), on_cpu, rtol=0, atol=0)
    zero = sample_codes(z.to(device), codes.to(device), temperature=0.0)
    torch.testing.assert_close(zero.cpu(), ref_i[:, 0], rtol=0, atol=0)
