"""Stochastic code sampling and k-nearest codes, tiled so that no N x K tensor exists.

vector-quantize-pytorch 1.32 ("vqp") samples codes (``stochastic_sample_codes``,
``sample_codebook_temp``) and returns the ``topk`` codes from a full N x K distance matrix. Here
both run over tiles of (rows x ``chunk`` codes) with a running reduction, as ``search`` does:

- :func:`sample_codes`: Gumbel-max over vqp's logits, a running max per row;
- :func:`topk_codes`: the k nearest codes, a running top-k merge per row;
- :func:`gumbel_soft_codes`: vqp's ``straight_through`` gradient (the softmax of its logits
  through the chosen codes), a running softmax per row in the backward.

The helpers at the top (argument checks, vqp's logits) are shared with
:mod:`fastvq.codebook_losses`.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_int, check_rows_and_codebook
from ._search_torch import sanitize_codes, scale_and_row_finite
from .ops import search

# vqp's ``cdist`` clamps the squared distance at 1e-8 before its square root, so its distances
# are never below 1e-4: every logit built from a distance here keeps that floor.
VQP_DIST_SQ_FLOOR = 1e-8
VQP_DIST_FLOOR = 1e-4

# A tile holds at most this many elements (rows x codes): its six work buffers (~1.3 MiB) stay in
# a core's L2 cache, so every elementwise pass of the noise runs from cache, not from memory.
TILE_ELEMS = 1 << 16

# The soft path's backward keeps many tile-sized temporaries alive at once (the logits' autograd
# graph, the weights), so its tiles are an eighth of the others: measured at N=4096, K=16384,
# D=32 (benchmarks/vqp_straight_through_memory.py), a peak RSS growth of 468-528 MiB with
# TILE_ELEMS tiles and 76 MiB with these, at the same backward time.
SOFT_TILE_ELEMS = TILE_ELEMS // 8

_MASK32 = 0xFFFFFFFF
# lowbias32's multipliers as int32 words (the second one's two's-complement value)
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B - (1 << 32)
# sample_codes' tile buffers: scores, two noise temporaries, the hash words and a temporary, a mask
_TILE_DTYPES = (torch.float32,) * 3 + (torch.int32,) * 2 + (torch.bool,)


# --- argument checks (shared with codebook_losses) ----------------------------------------------


def check_temperature(name: str, value) -> float:
    """A finite real ``>= 0`` (a Python or 0-dim number), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    t = float(value)
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return t


def check_rows_codes(z, codes, z_shape: str = "(N, D)", z_ndims: tuple[int, ...] = (2,)) -> None:
    """``z`` rows against ``codes`` (K, D): :func:`check_rows_and_codebook` with this module's
    names. Zero rows are valid."""
    check_rows_and_codebook(z, codes, z_shape=z_shape, z_ndim=z_ndims, codebook_name="codes")


# --- vqp's logits -------------------------------------------------------------------------------


def vqp_logits(
    z32: torch.Tensor, codes32: torch.Tensor, code_sq: torch.Tensor, cosine: bool
) -> torch.Tensor:
    """vqp's ``dist`` of a tile, differentiable: fp32 (n, m) from fp32 rows (n, D), codes (m, D).

    Euclidean: ``-sqrt(clamp(||z||^2 + ||c||^2 - 2 z.c, 1e-8))``, vqp's ``-cdist`` with its
    operation order (the expanded form is what makes a tile one GEMM); the distance is NOT squared.
    Cosine (vqp's ``use_cosine_sim``, inputs already l2-normalised by the caller): ``z.c``.
    ``code_sq`` is ``||c||^2`` (m,), computed once per call rather than once per tile.
    """
    dot = z32 @ codes32.t()
    if cosine:
        return dot
    d2 = (z32.square().sum(dim=1)[:, None] + code_sq[None, :]) + dot * -2
    return -d2.clamp(min=VQP_DIST_SQ_FLOOR).sqrt()


# --- counter-based Gumbel noise -----------------------------------------------------------------


def _mix32_(h: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """Wellons' "lowbias32" 32-bit hash (full avalanche), in place on int32 words ``h``.

    The words are unsigned values mod 2^32 held as int32: the products wrap in two's complement
    (AVX2's ``vpmulld``, CUDA's ``mul.lo``), and the logical shifts are arithmetic shifts with the
    sign-extended bits masked off. int32 rather than int64 halves the bytes per pass, and the
    wrapping multiply replaces the three-op 16-bit split that int64 needed. ``tmp`` is int32 of
    ``h``'s shape, overwritten. tests/test_sampling.py checks the words against Python's integers.
    """
    torch.bitwise_right_shift(h, 16, out=tmp)
    h ^= tmp.bitwise_and_(0xFFFF)
    h *= _MUL1
    torch.bitwise_right_shift(h, 15, out=tmp)
    h ^= tmp.bitwise_and_(0x1FFFF)
    h *= _MUL2
    torch.bitwise_right_shift(h, 16, out=tmp)
    h ^= tmp.bitwise_and_(0xFFFF)
    return h


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """:func:`_mix32_` out of place; int64 ``x`` in [0, 2^32) gives int64 in [0, 2^32)."""
    wide = x.dtype == torch.int64
    h = x.to(torch.int32) if wide else x.clone()
    _mix32_(h, torch.empty_like(h))
    return h.to(torch.int64) & _MASK32 if wide else h


def _gumbel_(h, tmp, p, q, upper) -> torch.Tensor:
    """fp32 standard Gumbel noise ``-log(-log(u))`` from uniform 32-bit words ``h``, into ``p``.

    ``u = (h + 0.5) / 2^32`` lies strictly inside (0, 1), so no clamp is needed (vqp clamps its
    logs at 1e-20 instead). ``log(u)`` is taken from ``u`` itself when ``u < 1/2`` and as
    ``log1p(-v)`` from ``v = 1 - u``, computed from the integer, otherwise: fp32 cannot hold ``u``
    near 1 to better than 6e-8, which would coarsen exactly the large-noise tail where the Gumbel
    maximum lives.

    ``h`` int32 words (unsigned values mod 2^32, read only); ``tmp`` int32, ``p``, ``q`` fp32 and
    ``upper`` bool, all of ``h``'s shape, overwritten. Returns ``p``.
    """
    # u or v: the word itself in the lower half, its complement 2^32 - 1 - h (= ~h) in the upper
    torch.bitwise_right_shift(h, 31, out=tmp)  # -1 (all ones) exactly in the upper half
    tmp ^= h
    p.copy_(tmp).add_(0.5).mul_(2.0**-32)  # u or v, in (0, 1/2]
    torch.lt(h, 0, out=upper)
    torch.neg(p, out=q).log1p_()
    torch.where(upper, q, p.log_(), out=p)  # log(u) < 0
    return p.neg_().log_().neg_()


def _gumbel_from_bits(h: torch.Tensor) -> torch.Tensor:
    """:func:`_gumbel_` out of place, from int32 words or int64 words in [0, 2^32)."""
    h = h.to(torch.int32)
    p, q = (torch.empty(h.shape, dtype=torch.float32, device=h.device) for _ in range(2))
    upper = torch.empty(h.shape, dtype=torch.bool, device=h.device)
    return _gumbel_(h, torch.empty_like(h), p, q, upper)


def _draw_seed(generator: torch.Generator | None) -> tuple[int, int]:
    """Two 32-bit seed words from ``generator`` (or torch's default CPU generator)."""
    dev = generator.device if generator is not None else torch.device("cpu")
    words = torch.randint(0, 1 << 32, (2,), generator=generator, device=dev, dtype=torch.int64)
    s0, s1 = words.tolist()
    return int(s0), int(s1)


def _row_keys(n0: int, n1: int, seed: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(n0, n1, device=device, dtype=torch.int64)
    return _mix32(_mix32((i & _MASK32) ^ seed) ^ (i >> 32))


# --- sample_codes -------------------------------------------------------------------------------


def sample_codes(
    z: torch.Tensor,
    codes: torch.Tensor,
    *,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    chunk: int = 1024,
    cosine: bool = False,
) -> torch.Tensor:
    """Sample one code per row from ``softmax(logits / temperature)`` by Gumbel-max, tiled over K.

    vqp's ``gumbel_sample`` with ``stochastic=True`` in training: ``argmax_k (logits_k /
    temperature + g_k)`` with ``g`` standard Gumbel noise and vqp's logits, the NEGATIVE
    NON-SQUARED distance ``-max(||z - c_k||, 1e-4)`` (``z.c_k`` with ``cosine=True``, for inputs
    the caller has l2-normalised, as vqp's cosine codebook does). So the sampling distribution is
    ``softmax(-||z - c_k|| / temperature)``.

    The logits are computed tile by tile (``chunk`` codes at a time, rows blocked so that a tile
    holds at most :data:`TILE_ELEMS` values) with a running max per row, so memory is O((N + K) D
    + TILE_ELEMS), never N x K: six work buffers of one tile (about 1.3 MiB, reused by every tile
    so that they stay in cache) beside the fp32 scaled copies of ``z`` and ``codes``.

    Reproducibility: the noise of (row i, code k) is a counter-based hash of (seed, i, k), the seed
    being two 32-bit words drawn from ``generator``. So the noise of every (row, code) pair is
    independent of ``chunk`` and of the device, and the same ``generator`` state gives the same
    indices for every ``chunk`` (up to GEMM rounding of the logits, which differs by tile shape in
    the last bits and could flip only a sample whose top two scores tie to within an ulp). It is
    not vqp's noise stream (vqp draws ``uniform_`` on the whole N x K tensor): the distribution is
    the same, the draws are not. Row i's noise depends on its position i in ``z``.

    Args:
        z: (N, D) float32/float16/bfloat16 rows, N >= 0; computed in fp32.
        codes: (K, D) float32/float16/bfloat16 codes, K >= 1, same device.
        temperature: finite >= 0. 0 is deterministic: the nearest code by squared L2, ties to the
            lowest index, exactly :func:`fastvq.search` (the argmax with ``cosine=True``).
        generator: the source of the seed (any device); None uses torch's default CPU generator.
            Two values are drawn from it per call (also when N = 0, never when temperature = 0).
        chunk: codes per tile, >= 1 (the indices do not depend on it).
        cosine: logits ``z.c`` instead of ``-||z - c||``.

    Returns:
        int64 (N,). A row of ``z`` holding NaN/Inf gets index 0 and a code holding NaN/Inf is
        never sampled (fastvq's NaN policy), unless every code does.
    """
    check_rows_codes(z, codes)
    t = check_temperature("temperature", temperature)
    chunk = check_int("chunk", chunk, 1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)}")
    if t == 0.0 and not cosine:
        return search(z, codes)[0]
    z, codes = z.detach(), codes.detach()
    n, k = z.shape[0], codes.shape[0]
    dev = z.device
    out = torch.zeros(n, dtype=torch.int64, device=dev)
    seed = _draw_seed(generator) if t > 0 else (0, 0)
    if n == 0:
        return out

    # An exact power-of-two scale of both operands (as the search uses) keeps ||z||^2, ||c||^2
    # and z.c finite and normal for any finite input; the distance is unscaled after the sqrt.
    scale, row_finite = scale_and_row_finite(z, codes)
    cs, cn = sanitize_codes(codes.to(torch.float32), scale)  # bad codes: norm +inf, zeroed
    zs = torch.where(row_finite[:, None], z.to(torch.float32) * scale, 0.0)
    inv_scale = 1.0 / scale
    code_keys = _mix32(torch.arange(k, device=dev, dtype=torch.int64) ^ seed[1]).to(torch.int32)
    # cosine: z.c + 0 (exact), or -inf for a bad code (norm +inf), never sampled
    bias = torch.where(torch.isfinite(cn), 0.0, -math.inf) if cosine else None

    bk = min(chunk, k, TILE_ELEMS)
    bn = max(1, min(n, TILE_ELEMS // bk))
    # Work buffers allocated once and reused by every tile (a fresh tensor per pass would cost an
    # allocation and its page faults each time); each tile views their first r x m elements.
    flat = [torch.empty(bn * bk, dtype=dt, device=dev) for dt in _TILE_DTYPES]
    for n0 in range(0, n, bn):
        n1 = min(n0 + bn, n)
        zb = zs[n0:n1]
        zb_sq = None if cosine else zb.square().sum(dim=1, keepdim=True)
        rkeys = _row_keys(n0, n1, seed[0], dev).to(torch.int32)[:, None]
        best = torch.full((n1 - n0,), -math.inf, device=dev)
        best_i = torch.zeros(n1 - n0, dtype=torch.int64, device=dev)
        for k0 in range(0, k, bk):
            k1 = min(k0 + bk, k)
            shape = (n1 - n0, k1 - k0)
            scores, p, q, h, tmp, upper = (b[: shape[0] * shape[1]].view(shape) for b in flat)
            if cosine:  # unscaled z.c
                torch.addmm(bias[k0:k1], zb, cs[k0:k1].t(), out=scores)
                scores.mul_(inv_scale).mul_(inv_scale)
            else:
                # (||z||^2 + ||c||^2) - 2 z.c, the scaled squared distance (+inf: bad code)
                torch.add(zb_sq, cn[k0:k1], out=scores)
                torch.addmm(scores, zb, cs[k0:k1].t(), alpha=-2.0, out=scores)
                # -sqrt(clamp(d2, 1e-8)) unscaled, written so that no scaled floor can overflow
                scores.clamp_(min=0).sqrt_().mul_(inv_scale).clamp_(min=VQP_DIST_FLOOR).neg_()
            if t > 0:
                torch.bitwise_xor(rkeys, code_keys[k0:k1], out=h)
                g = _gumbel_(_mix32_(h, tmp), tmp, p, q, upper)
                scores.div_(t).add_(g)  # vqp's order: (logits / temperature) + noise
            tmax, targ = scores.max(dim=1)  # first maximum within the tile
            better = tmax > best  # strict: an earlier (lower-index) tile keeps ties
            best_i = torch.where(better, targ + k0, best_i)
            best = torch.where(better, tmax, best)
        out[n0:n1] = best_i
    return out.masked_fill_(~row_finite, 0)


# --- topk_codes ---------------------------------------------------------------------------------


def _sort_pairs(vals: torch.Tensor, idx: torch.Tensor, k: int):
    """The k smallest (value, index) pairs per row in lexicographic order, given that equal values
    already appear in ascending index order along each row (a stable sort then keeps it)."""
    v, order = vals.sort(dim=1, stable=True)
    return v[:, :k], idx.gather(1, order[:, :k])


def topk_codes(
    z: torch.Tensor, codes: torch.Tensor, k: int, *, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest codes of each row by squared L2, ascending, ties to the lowest index.

    vqp's ``topk`` (``sampling_logits.topk(k)`` on ``-cdist``, the same order) without its
    N x K distance matrix: the codes are visited in tiles of ``chunk``, and each tile's k best
    are merged into a running top-k per row, so memory is O(N k + rows x chunk).

    Ranking uses ``||c||^2 - 2 z.c`` in fp32 after the search's exact power-of-two rescaling (the
    order of the search, which it equals for k = 1); the returned distances are then recomputed
    directly as ``sum_d (z - c)^2`` (the expanded form cancels catastrophically near a code) and
    the k pairs re-sorted by (distance, index).

    Args:
        z: (N, D) float32/float16/bfloat16 rows, N >= 0; computed in fp32.
        codes: (K, D) float32/float16/bfloat16 codes, K >= 1, same device.
        k: 1 <= k <= K.
        chunk: codes per tile, >= 1.

    Returns:
        dist: fp32 (N, k) squared distances, ascending along each row.
        indices: int64 (N, k).

    A code holding NaN/Inf ranks after every finite code (distance NaN/Inf); a row holding
    NaN/Inf gets NaN/Inf distances, its indices ranked as for a zero row.
    """
    check_rows_codes(z, codes)
    num_codes = codes.shape[0]
    k = check_int("k", k, 1, num_codes)
    chunk = check_int("chunk", chunk, 1)
    z, codes = z.detach(), codes.detach()
    n = z.shape[0]
    dev = z.device
    dist = torch.empty((n, k), dtype=torch.float32, device=dev)
    indices = torch.empty((n, k), dtype=torch.int64, device=dev)
    if n == 0:
        return dist, indices

    scale, row_finite = scale_and_row_finite(z, codes)
    cs, cn = sanitize_codes(codes.to(torch.float32), scale)
    z32 = z.to(torch.float32)
    zs = torch.where(row_finite[:, None], z32 * scale, 0.0)
    bk = min(chunk, num_codes)
    bn = max(1, min(n, TILE_ELEMS // (bk + k)))
    for n0 in range(0, n, bn):
        n1 = min(n0 + bn, n)
        zb = zs[n0:n1]
        vals = zb.new_empty((n1 - n0, 0))
        idx = torch.empty((n1 - n0, 0), dtype=torch.int64, device=dev)
        for k0 in range(0, num_codes, bk):
            k1 = min(k0 + bk, num_codes)
            tile = torch.addmm(cn[k0:k1], zb, cs[k0:k1].t(), alpha=-2.0)
            tidx = torch.arange(k0, k1, device=dev).expand(n1 - n0, -1)
            tv, ti = _sort_pairs(tile, tidx, k)
            # Every running index is below k0, so in [running, tile] equal values stand in
            # ascending index order, and the stable sort keeps ties to the lowest index.
            vals, idx = _sort_pairs(torch.cat([vals, tv], 1), torch.cat([idx, ti], 1), k)
        indices[n0:n1] = idx
    # Exact distances of the chosen pairs, rows blocked so that the (rows, k, D) difference
    # stays within the tile budget.
    d = z.shape[1]
    bn = max(1, TILE_ELEMS // (k * d))
    for n0 in range(0, n, bn):
        n1 = min(n0 + bn, n)
        idx = indices[n0:n1]
        diff = z32[n0:n1, None, :] - codes.index_select(0, idx.reshape(-1)).view(n1 - n0, k, d)
        dv = diff.to(torch.float32).square().sum(dim=2)
        # ascending index first, then a stable sort by distance: ties to the lowest index even
        # where the recomputed distances tie but the ranking values did not
        idx, order = idx.sort(dim=1)
        dv = dv.gather(1, order)
        dist[n0:n1], indices[n0:n1] = _sort_pairs(dv, idx, k)
    return dist, indices


# --- gumbel_soft_codes --------------------------------------------------------------------------


def _soft_grad(
    g: torch.Tensor, z: torch.Tensor, codes: torch.Tensor, t: float, cosine: bool, chunk: int
) -> torch.Tensor:
    """``d/dz sum_i g_i . (sum_k softmax(l_i / t)_k c_k)`` with ``l`` vqp's logits, without an
    N x K tensor: fp32 (N, D) from ``g``, ``z`` (N, D), ``codes`` (K, D).

    With ``pi = softmax(l / t)``, ``a_k = g . c_k`` and ``s = sum_k pi_k a_k``, the gradient is
    ``sum_k pi_k (a_k - s) dl_k/dz / t``. Pass 1 runs over code tiles with a running max to get
    ``log sum exp(l / t)`` and ``s`` per row; pass 2 rebuilds each tile's logits
    (:func:`vqp_logits`, its clamp included) and back-propagates the tile's weights through them.
    """
    z32, c32, g32 = (t_.detach().to(torch.float32) for t_ in (z, codes, g))
    n, k = z32.shape[0], c32.shape[0]
    out = torch.zeros_like(z32)
    if n == 0:
        return out
    code_sq = c32.square().sum(1)
    bk = min(chunk, k)
    bn = max(1, min(n, SOFT_TILE_ELEMS // bk))
    for n0 in range(0, n, bn):
        zb, gb = z32[n0 : n0 + bn], g32[n0 : n0 + bn]
        m = torch.full((zb.shape[0],), -math.inf, device=zb.device)
        tot = torch.zeros_like(m)  # sum_k exp(l_k / t - m)
        acc = torch.zeros_like(m)  # sum_k exp(l_k / t - m) a_k
        for k0 in range(0, k, bk):
            ct = c32[k0 : k0 + bk]
            logits = vqp_logits(zb, ct, code_sq[k0 : k0 + bk], cosine) / t
            m_new = torch.maximum(m, logits.max(1).values)
            keep = torch.exp(m - m_new)
            w = torch.exp(logits - m_new[:, None])
            tot = tot * keep + w.sum(1)
            acc = acc * keep + (w * (gb @ ct.t())).sum(1)
            m = m_new
        lse, s = m + tot.log(), acc / tot
        zg = zb.clone().requires_grad_()
        with torch.enable_grad():
            for k0 in range(0, k, bk):
                ct = c32[k0 : k0 + bk]
                logits = vqp_logits(zg, ct, code_sq[k0 : k0 + bk], cosine) / t
                weight = torch.exp(logits.detach() - lse[:, None]) * (gb @ ct.t() - s[:, None])
                (grad,) = torch.autograd.grad(logits, zg, weight)
                out[n0 : n0 + bn] += grad
    return out


class _GumbelSoftCodes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, codes, indices, temperature, cosine, chunk):
        ctx.save_for_backward(z, codes)
        ctx.temperature, ctx.cosine, ctx.chunk = temperature, cosine, chunk
        return codes.index_select(0, indices).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, codes = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = _soft_grad(g, z, codes, ctx.temperature, ctx.cosine, ctx.chunk).to(z.dtype)
        return grad, None, None, None, None, None


def gumbel_soft_codes(
    z: torch.Tensor,
    codes: torch.Tensor,
    indices: torch.Tensor,
    *,
    temperature: float = 1.0,
    cosine: bool = False,
    chunk: int = 4096,
) -> torch.Tensor:
    """vqp's Gumbel straight-through codes (``gumbel_sample(..., straight_through=True)``):
    forward value exactly ``codes[indices]``, gradient to ``z`` that of
    ``sum_k softmax(logits / temperature)_k c_k`` (vqp's ``one_hot + pi - sg(pi)``), with vqp's
    logits (:func:`vqp_logits`: ``-max(||z - c||, 1e-4)``, ``z.c`` with ``cosine``).

    No N x K tensor: the backward runs two passes over tiles of ``chunk`` codes (rows blocked
    too), so memory is O(N D + rows x chunk). The codes get no gradient (vqp forbids this path
    with a learned codebook).

    Args:
        z: (N, D) rows, N >= 0 (fp32, fp16 or bf16; the gradient is computed in fp32).
        codes: (K, D) codes, K >= 1, same device.
        indices: int64 (N,) the chosen codes (the nearest, or sampled), in ``[0, K)``.
        temperature: finite > 0.
        cosine: logits ``z.c`` (``z`` and ``codes`` l2-normalised by the caller).
        chunk: codes per tile, >= 1.

    Returns:
        (N, D) in ``z``'s dtype: ``codes[indices]``, differentiable in ``z``.
    """
    check_rows_codes(z, codes)
    t = check_temperature("temperature", temperature)
    if t == 0:
        raise ValueError("temperature must be > 0 for the soft path, got 0")
    chunk = check_int("chunk", chunk, 1)
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64:
        raise TypeError(
            f"indices must be an int64 tensor, got {getattr(indices, 'dtype', indices)}"
        )
    if indices.shape != z.shape[:1]:
        raise ValueError(f"indices must have shape ({z.shape[0]},), got {tuple(indices.shape)}")
    return _GumbelSoftCodes.apply(z, codes.detach(), indices, t, bool(cosine), chunk)
