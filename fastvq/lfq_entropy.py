"""LFQ's entropy terms, exact and without an ``N x 2^d`` matrix (docs/lfq.md).

For rows ``z`` (N, d) and the codes ``c`` in ``{-s, +s}^d`` with logits ``-beta ||z - c||^2``
(``beta`` the inverse temperature), the code distribution of a row is the product of ``d`` per-bit
distributions: bit ``i`` is 1 (``c_i = +s``) with probability ``sigmoid(u_i)``,
``u_i = 4 beta s z_i``. Hence, with ``b(c)`` in ``{0, 1}^d`` the code's bits::

    log p_n(c) = a_n + u_n . b(c),          a_n = sum_i logsigmoid(-u_{n,i})
    per-sample entropy  H(p_n) = sum_i (softplus(u_i) - sigmoid(u_i) u_i)       exact, O(N d)
    codebook entropy    H(mean_n p_n) over all 2^d codes, in chunks of codes: O(N chunk) memory

Every function takes ``u`` (C, N, d) (C independent codebooks) and returns one entropy per
codebook (C,). The chunked ones are :class:`torch.autograd.Function` s whose backward recomputes
each chunk and saves nothing of size ``N x 2^d``. ``log_floor`` reproduces
vector-quantize-pytorch's ``log(clamp(p, 1e-5))`` (``log_floor = log(1e-5)``): with it the
per-sample entropy no longer factorises, and :func:`clamped_sample_entropy` takes it in chunks.
Bit ``i`` of code ``k`` is ``(k >> (d - 1 - i)) & 1`` (the first channel is the highest bit).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "bit_offsets", "codebook_entropy", "clamped_sample_entropy", "code_bits", "default_chunk",
    "per_sample_entropy",
]  # fmt: skip

CHUNK_ELEMENTS = 2**20  # C * N * chunk elements per chunk: 4 MiB of fp32


def default_chunk(c: int, n: int, k: int) -> int:
    """Codes per chunk: ``C * N * chunk`` about :data:`CHUNK_ELEMENTS`, at least 1, at most k."""
    return max(1, min(k, CHUNK_ELEMENTS // max(1, c * n)))


def code_bits(k0: int, k1: int, d: int, dtype, device) -> torch.Tensor:
    """The bits ``(k1 - k0, d)`` of codes ``k0 .. k1 - 1`` as ``dtype`` 0/1, first channel the
    highest bit."""
    k = torch.arange(k0, k1, dtype=torch.int64, device=device)
    shifts = torch.arange(d - 1, -1, -1, dtype=torch.int64, device=device)
    return ((k[:, None] >> shifts) & 1).to(dtype)


def bit_offsets(u: torch.Tensor) -> torch.Tensor:
    """``a = sum_i logsigmoid(-u_i)`` (C, N): the log-probability of the all-zero-bits code."""
    return F.logsigmoid(-u).sum(-1)


def per_sample_entropy(u: torch.Tensor) -> torch.Tensor:
    """Exact mean over rows of each row's entropy over all ``2^d`` codes: the sum of the per-bit
    entropies, ``(C,)``. An empty batch gives 0."""
    # softplus(u) - sigmoid(u) u, written as two non-negative terms of |u| (the bit entropy is
    # even in u): the difference form cancels to noise once |u| is large (u ~ 1e6: ~0.1 nats).
    au = u.abs()
    h = (F.softplus(-au) + torch.sigmoid(-au) * au).sum(-1)  # (C, N)
    return h.sum(-1) / max(1, u.shape[1])


def _work_dtype(u: torch.Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _bit_logs(u: torch.Tensor) -> torch.Tensor:
    """Per-bit log-probabilities ``[logsigmoid(-u), logsigmoid(u)]`` (C, N, 2d), all <= 0."""
    return torch.cat([F.logsigmoid(-u), F.logsigmoid(u)], dim=-1)


def _logp(logs, k0, k1):
    """``log p_n(c)`` (C, N, k1 - k0) for codes ``k0 .. k1 - 1`` from :func:`_bit_logs`.

    ``log p = sum_i (1 - b_i) logsigmoid(-u_i) + b_i logsigmoid(u_i)`` (= ``a + u . b``): a sum
    of terms of one sign, so it stays accurate where ``a + u . b`` cancels (``|u|`` ~ 1e6 in fp32
    put the near codes' log-probabilities off by whole nats and the entropy past ``log 2^d``).
    """
    d = logs.shape[-1] // 2
    b = code_bits(k0, k1, d, logs.dtype, logs.device)
    w = torch.cat([1 - b, b], dim=-1)  # (k, 2d)
    return logs @ w.T


def _chunks(k: int, chunk: int):
    return ((k0, min(k, k0 + chunk)) for k0 in range(0, k, chunk))


def _floored(x: torch.Tensor, log_floor: float | None) -> torch.Tensor:
    return x if log_floor is None else x.clamp_min(log_floor)


def _floor_slope(x: torch.Tensor, log_floor: float | None) -> torch.Tensor:
    return x if log_floor is None else x.clamp_min(log_floor) + (x > log_floor).to(x.dtype) - 1


class _CodebookEntropy(torch.autograd.Function):
    """``-sum_c pbar_c log pbar_c`` with ``log pbar_c = logsumexp_n(log p_n(c)) - log N``."""

    @staticmethod
    def forward(ctx, u, a, chunk: int, log_floor):
        cn, n, d = u.shape
        k = 2**d
        log_n = math.log(n)
        out = u.new_zeros(cn)
        lbar = u.new_empty(cn, k)  # log pbar, (C, K): kept for the backward (K, not N x K)
        logs = _bit_logs(u)  # ``a`` enters through its gradient; the values come from ``logs``
        for k0, k1 in _chunks(k, chunk):
            lb = torch.logsumexp(_logp(logs, k0, k1), dim=1) - log_n  # (C, k)
            lbar[:, k0:k1] = lb
            out -= (lb.exp() * _floored(lb, log_floor)).sum(-1)
        ctx.save_for_backward(u, a, lbar)
        ctx.chunk, ctx.log_floor = chunk, log_floor
        return out

    @staticmethod
    def backward(ctx, g):
        u, a, lbar = ctx.saved_tensors
        n, d = u.shape[1], u.shape[2]
        gu, ga = torch.zeros_like(u), torch.zeros_like(a)
        # dH/dlog p_n(c) = -(log pbar_c + 1) p_n(c) / N  (floored: the clamp's own slope)
        coef = -(_floor_slope(lbar, ctx.log_floor) + 1) * (g[:, None] / n)  # (C, K)
        logs = _bit_logs(u)
        for k0, k1 in _chunks(2**d, ctx.chunk):
            gl = _logp(logs, k0, k1).exp_().mul_(coef[:, None, k0:k1])  # (C, N, k)
            ga += gl.sum(-1)
            gu += gl @ code_bits(k0, k1, d, u.dtype, u.device)
        return gu, ga, None, None


class _ClampedSampleEntropy(torch.autograd.Function):
    """``-mean_n sum_c p_n(c) max(log p_n(c), log_floor)``, in chunks of codes."""

    @staticmethod
    def forward(ctx, u, a, chunk: int, log_floor: float):
        cn, n, d = u.shape
        out = u.new_zeros(cn)
        logs = _bit_logs(u)
        for k0, k1 in _chunks(2**d, chunk):
            lp = _logp(logs, k0, k1)
            out -= (lp.exp() * lp.clamp_min(log_floor)).sum((1, 2))
        ctx.save_for_backward(u, a)
        ctx.chunk, ctx.log_floor = chunk, log_floor
        return out / n

    @staticmethod
    def backward(ctx, g):
        u, a = ctx.saved_tensors
        n, d = u.shape[1], u.shape[2]
        gu, ga = torch.zeros_like(u), torch.zeros_like(a)
        scale = -(g / n)[:, None, None]
        logs = _bit_logs(u)
        for k0, k1 in _chunks(2**d, ctx.chunk):
            lp = _logp(logs, k0, k1)
            gl = lp.exp() * (_floor_slope(lp, ctx.log_floor) + 1) * scale  # (C, N, k)
            ga += gl.sum(-1)
            gu += gl @ code_bits(k0, k1, d, u.dtype, u.device)
        return gu, ga, None, None


def _prepare(u: torch.Tensor, chunk: int | None):
    if u.dim() != 3:
        raise ValueError(f"u must be (C, N, d), got shape {tuple(u.shape)}")
    cn, n, d = u.shape
    if d > 62:
        raise ValueError(f"u has d={d} bits: at most 62 (2^d codes must fit an int64)")
    if chunk is None:
        chunk = default_chunk(cn, n, 2**d)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be None or a positive int, got {chunk!r}")
    return u.to(_work_dtype(u)), chunk


def codebook_entropy(u: torch.Tensor, chunk: int | None = None,
                     log_floor: float | None = None) -> torch.Tensor:  # fmt: skip
    """Entropy of the mean code distribution over the rows of each codebook, over all ``2^d``
    codes, ``(C,)`` in fp32 (fp64 for fp64 ``u``). ``chunk``: codes per chunk (default
    :func:`default_chunk`; the last chunk may be shorter); ``log_floor``: take
    ``max(log pbar, log_floor)`` in the entropy's log (vqp's clamp; None: exact). An empty batch
    gives 0. The function a fused kernel would replace: it alone touches all codes."""
    u, chunk = _prepare(u, chunk)
    if u.shape[1] == 0:
        return u.sum((1, 2)) * 0
    return _CodebookEntropy.apply(u, bit_offsets(u), chunk, log_floor)


def clamped_sample_entropy(u: torch.Tensor, log_floor: float,
                           chunk: int | None = None) -> torch.Tensor:  # fmt: skip
    """vqp's per-sample entropy ``-mean_n sum_c p_n(c) max(log p_n(c), log_floor)``, ``(C,)``,
    in chunks of codes (it does not factorise over the bits)."""
    u, chunk = _prepare(u, chunk)
    if u.shape[1] == 0:
        return u.sum((1, 2)) * 0
    return _ClampedSampleEntropy.apply(u, bit_offsets(u), chunk, float(log_floor))
