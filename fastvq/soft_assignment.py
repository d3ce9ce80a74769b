"""``soft_assign``: the softmax over the codebook, fused and memory-flat, with its exact gradient.

For rows ``z`` (N, D), codes ``C`` (K, D), a similarity ``s(z, c)`` and a temperature ``tau``,
``x_nk = s(z_n, c_k) / tau`` and ``p_n = softmax_k(x_n)``. One op gives, per row, the
log-sum-exp, the argmax, ``E_p[x]`` and ``p @ C``, and per code the column sums of ``p``: what
IBQ, the entropy losses and the cross-entropy commitment need, with no N x K tensor in the
forward or the backward (flash-attention style: the backward recomputes ``p`` per tile from the
saved log-sum-exp). Two forward/backward primitives with one contract, the tiled torch twin
(``_soft_assign_torch.py``) and the Triton kernels (``_soft_assign_triton.py``), behind one
``torch.autograd.Function``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._checks import FLOAT_DTYPES, check_same_device, check_tensor, is_int, is_real
from ._soft_assign_torch import (
    ROWS_PER_TILE,
    SIMILARITIES,
    default_chunk,
    soft_assign_bwd_torch,
    soft_assign_fwd_torch,
)
from .ops import resolve_backend

__all__ = ["SoftAssignment", "soft_assign"]

TRITON_MAX_D = 512  # as fastvq._soft_assign_triton.MAX_D, which imports Triton
VQP_DIST_EPS = 1e-4  # vqp's floor on the non-squared distance, -max(||z - c||, 1e-4)


class SoftAssignment(NamedTuple):
    """What :func:`soft_assign` returns (work dtype: fp32, or fp64 for fp64 inputs)."""

    lse: torch.Tensor  # (N,) log sum_k exp(x_nk)
    index: torch.Tensor  # (N,) int64 argmax_k x_nk, ties -> lowest k; no gradient
    expected_logit: torch.Tensor | None  # (N,) sum_k p_nk x_nk; None if not asked
    expected_code: torch.Tensor | None  # (N, D) sum_k p_nk c_k; None if not asked
    column_sums: torch.Tensor | None  # (K,) sum over counted rows of p_nk; None if not asked
    # (N,) the row entropy lse - E_p[x], accumulated relative to the row max so it keeps its
    # digits when p is one-hot (where lse and E_p[x] cancel); with expected_logit, else None
    entropy: torch.Tensor | None = None  # (N,) row entropy; with expected_logit, else None


def _fwd(backend, z, codes, w, inv_tau, sim, eps, chunk, want_col, want_q, want_e):
    if backend == "triton":
        from ._soft_assign_triton import soft_assign_fwd_triton

        return soft_assign_fwd_triton(z, codes, w, inv_tau, sim, eps, want_col)
    return soft_assign_fwd_torch(z, codes, w, inv_tau, sim, eps, chunk, want_col, want_q, want_e)


def _bwd(backend, z, codes, w, lse, lse_lo, a0, g_e, g_q, g_col, inv_tau, sim, eps, chunk, *,
         need_z, need_c, value_grad):  # fmt: skip
    if backend == "triton":
        from ._soft_assign_triton import soft_assign_bwd_triton

        # the kernels read every upstream gradient: absent ones as zeros
        g_e = z.new_zeros(z.shape[0]) if g_e is None else g_e
        g_q = torch.zeros_like(z) if g_q is None else g_q
        return soft_assign_bwd_triton(
            z, codes, w, lse, a0, g_e, g_q, g_col, inv_tau, sim, eps, need_z=need_z,
            need_c=need_c, value_grad=value_grad, lse_lo=lse_lo,
        )  # fmt: skip
    return soft_assign_bwd_torch(z, codes, w, lse, a0, g_e, g_q, g_col, inv_tau, sim, eps, chunk,
                                 need_z, need_c, value_grad, lse_lo)  # fmt: skip


class _SoftAssign(torch.autograd.Function):
    """Forward from either primitive; one backward that recomputes ``p`` tile by tile. Saves
    ``z``, ``C``, the row weights and the (N,) / (N, D) outputs: nothing of size N x K."""

    @staticmethod
    def forward(ctx, z, codes, w, inv_tau, sim, eps, chunk, want_col, want_q, want_e,
                value_grad, backend):  # fmt: skip
        lse, idx, e, ent, q, col, lse_lo = _fwd(backend, z, codes, w, inv_tau, sim, eps, chunk,
                                                want_col, want_q, want_e)  # fmt: skip
        q = q if want_q else None
        e, ent = (e, ent) if want_e else (None, None)
        ctx.save_for_backward(z, codes, w, lse, lse_lo, ent, q)
        ctx.args = (inv_tau, sim, eps, chunk, value_grad, backend)
        ctx.mark_non_differentiable(idx)
        # unused outputs' gradients arrive as None, and their passes are skipped
        ctx.set_materialize_grads(False)
        return tuple(t for t in (lse, idx, e, ent, q, col) if t is not None)

    @staticmethod
    def backward(ctx, *grads):
        z, codes, w, lse, lse_lo, ent, q = ctx.saved_tensors
        inv_tau, sim, eps, chunk, value_grad, backend = ctx.args
        g_lse = grads[0]
        rest = list(grads[2:])
        g_e = rest.pop(0) if ent is not None else None
        g_ent = rest.pop(0) if ent is not None else None
        g_q = rest.pop(0) if q is not None else None
        g_col = rest.pop(0) if rest else None
        if g_ent is not None:  # ent = lse - e
            g_lse = g_ent if g_lse is None else g_lse + g_ent
            g_e = -g_ent if g_e is None else g_e - g_ent
        keep = w > 0  # masked rows: no gradient, whatever their upstream
        a0 = torch.zeros_like(lse) if g_lse is None else g_lse
        if g_e is not None:
            g_e = torch.where(keep, g_e, 0.0)
            # the kernels' element term is g_e (x - lse): 1 + x - e = (1 + ent) + (x - lse)
            a0 = a0 + g_e * (1 + ent)
        if g_q is not None:
            g_q = torch.where(keep[:, None], g_q, 0.0).contiguous()
            a0 = a0 - (g_q * q).sum(1)
        a0 = torch.where(keep, a0, 0.0)
        dz, dc = _bwd(
            backend, z, codes, w, lse, lse_lo, a0, g_e, g_q, g_col, inv_tau, sim, eps, chunk,
            need_z=ctx.needs_input_grad[0], need_c=ctx.needs_input_grad[1], value_grad=value_grad,
        )  # fmt: skip
        return dz, dc, None, None, None, None, None, None, None, None, None, None


def _check(z, codes, temperature, similarity, mask, eps, chunk):
    for name, t in (("z", z), ("C", codes)):
        check_tensor(name, t)
        if t.dtype not in FLOAT_DTYPES + (torch.float64,):
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if z.dim() != 2:
        raise ValueError(f"z must have shape (N, D), got shape {tuple(z.shape)}")
    if codes.dim() != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
        raise ValueError(f"C must have shape (K, D) with K, D >= 1, got {tuple(codes.shape)}")
    if z.shape[1] != codes.shape[1]:
        raise ValueError(f"z's D ({z.shape[1]}) must equal C's D ({codes.shape[1]})")
    check_same_device("z", z, "C", codes)
    if (z.dtype == torch.float64) != (codes.dtype == torch.float64):
        raise TypeError(f"z and C must both be fp64 or neither, got {z.dtype} and {codes.dtype}")
    if not is_real(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite real > 0, got {temperature!r}")
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if not is_real(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite real > 0, got {eps!r}")
    pair = isinstance(chunk, tuple) and len(chunk) == 2
    if chunk is not None and not all(is_int(c) and c >= 1 for c in (chunk if pair else (chunk,))):
        raise ValueError(
            f"chunk must be None, an int >= 1 or a pair (rows, codes) of them, got {chunk!r}"
        )
    if mask is not None:
        check_tensor("mask", mask)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if tuple(mask.shape) != (z.shape[0],):
            raise ValueError(
                f"mask must have shape (N,) = ({z.shape[0]},), got {tuple(mask.shape)}"
            )
        check_same_device("mask", mask, "z", z)


def soft_assign(
    z: torch.Tensor,
    C: torch.Tensor,
    *,
    temperature: float = 1.0,
    similarity: str = "dot",
    mask: torch.Tensor | None = None,
    eps: float = VQP_DIST_EPS,
    backend: str = "auto",
    chunk: int | tuple[int, int] | None = None,
    column_sums: bool = True,
    expected_code: bool = True,
    expected_logit: bool = True,
    value_grad: bool = True,
) -> SoftAssignment:
    """Softmax of each row over the whole codebook, reduced on the fly: no N x K tensor.

    ``x_nk = s(z_n, c_k) / temperature``, ``p_n = softmax_k(x_n)``, with ``s`` one of
    ``"dot"`` (``z.c``), ``"neg_l2"`` (``-||z - c||^2``) or ``"neg_dist"``
    (``-max(||z - c||, eps)``, the logits of the CE-commitment and diversity losses).

    Args:
        z: (N, D) rows, float32/float16/bfloat16/float64; N = 0 is valid.
        C: (K, D) codes, K >= 1, same device; fp64 only together with fp64 ``z``.
        temperature: finite > 0.
        similarity: ``"dot"``, ``"neg_l2"`` or ``"neg_dist"``.
        mask: optional bool (N,): False rows are left out. They output 0 (index 0), add nothing
            to the column sums and get no gradient, NaN padding included.
        eps: the distance floor of ``"neg_dist"`` (its gradient is 0 below it).
        backend: ``"auto"`` (Triton for CUDA tensors), ``"torch"`` or ``"triton"`` (no fp64).
        chunk: codes per tile of the torch backend, or a pair ``(rows, codes)`` per tile
            (default: 4 MiB tiles of 512 rows); the last tile may be shorter.
        column_sums: False skips the column sums (one pass over the codes less); the field is
            None.
        expected_code: False skips ``p @ C`` (one product per tile less on the torch
            backend); the field is None.
        expected_logit: False skips ``E_p[x]`` and the row entropy (one product per tile less
            on the torch backend); those fields are None.
        value_grad: False makes ``expected_code`` ``p @ sg(C)``: its gradient reaches ``C``
            through ``p`` only (the flash-attention picture: ``C`` as keys, not as values),
            as IBQ's straight-through estimator needs.

    Returns:
        :class:`SoftAssignment` ``(lse (N,), index int64 (N,), expected_logit (N,) or None,
        expected_code (N, D) or None, column_sums (K,) or None, entropy (N,) or None)``
        (``entropy`` = ``lse - expected_logit``, accumulated relative to the row max: use it
        rather than the difference, which loses its digits when ``p`` is one-hot), computed in
        fp32 from the inputs as given (fp64 for fp64 inputs). Every output but ``index`` is
        differentiable to ``z`` and ``C``, with the exact gradient of the literal formula.

    Non-finite input: a counted row holding a NaN or Inf (or every row, if a code holds one)
    outputs NaN in ``lse``, ``expected_logit``, ``entropy`` and ``expected_code``, index 0,
    makes every column sum NaN, and passes no gradient (its outputs are constants). Logits must
    fit fp32 (``|s| / temperature`` below about 3e38).
    """
    _check(z, C, temperature, similarity, mask, eps, chunk)
    requested = backend
    backend = resolve_backend(backend, z.device)
    if requested == "auto" and backend == "triton" and z.shape[1] > TRITON_MAX_D:
        backend = "torch"  # the kernels hold D in one register tile
    if backend == "triton" and z.dtype == torch.float64:
        raise TypeError("backend='triton' takes no float64 input: use backend='torch'")
    k = C.shape[0]
    if chunk is None:
        chunk = (ROWS_PER_TILE, default_chunk(k))
    elif isinstance(chunk, tuple):
        chunk = (int(chunk[0]), min(int(chunk[1]), k))
    else:
        chunk = (ROWS_PER_TILE, min(chunk, k))
    work = torch.float64 if z.dtype == torch.float64 else torch.float32
    with torch.autocast(z.device.type, enabled=False):
        z32, c32 = z.to(work), C.to(work)
        keep = torch.ones(z.shape[0], dtype=torch.bool, device=z.device) if mask is None else mask
        row_ok = torch.isfinite(z32).all(1) & torch.isfinite(c32).all()
        # bad or masked rows and bad codes are zeroed before the op: no NaN reaches a tile
        z32 = torch.where((row_ok & keep)[:, None], z32, 0.0)
        c32 = torch.where(torch.isfinite(c32), c32, 0.0)
        w = keep.to(work)
        out = _SoftAssign.apply(z32.contiguous(), c32.contiguous(), w, 1.0 / temperature,
                                similarity, float(eps), chunk, column_sums, expected_code,
                                expected_logit, bool(value_grad), backend)  # fmt: skip
    lse, idx = out[:2]
    rest = list(out[2:])
    e = rest.pop(0) if expected_logit else None
    ent = rest.pop(0) if expected_logit else None
    q = rest.pop(0) if expected_code else None
    nan = torch.full((), math.nan, dtype=work, device=z.device)
    bad = keep & ~row_ok
    lse = torch.where(keep, torch.where(bad, nan, lse), 0.0)
    if e is not None:
        e = torch.where(keep, torch.where(bad, nan, e), 0.0)
        ent = torch.where(keep, torch.where(bad, nan, ent), 0.0)
    if q is not None:
        q = torch.where(keep[:, None], torch.where(bad[:, None], nan, q), 0.0)
    idx = torch.where(keep & row_ok, idx, 0)
    col = None
    if column_sums:
        col = torch.where(bad.any(), nan, rest.pop(0))
    return SoftAssignment(lse, idx, e, q, col, ent)
