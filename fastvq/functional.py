"""The public fused VQ op: ``vector_quantize`` and the one autograd.Function behind it.

Semantics (VQ-VAE, van den Oord et al. 2017):

    idx       = argmin_k ||z - C_k||^2            (ties -> lowest index)
    quantized = z + sg(C[idx] - z)                (forward value exactly C[idx], gradient to z)
    loss      = mse(sg(z), C[idx]) + beta * mse(z, sg(C[idx]))

Search precision: distances accumulate in fp32. The search runs in the promotion of the two
input dtypes (bf16 z with an fp32 codebook, as autocast produces, searches in fp32); on a GPU,
fp32 searches use ``tl.dot`` with tf32x3 (near-fp32) and bf16/fp16 searches use native tensor-core
MMAs with fp32 accumulation. The torch backend always computes distances in fp32.

Non-finite input (the NaN policy, the same in both backends): a code holding NaN/Inf is never
selected; a row of ``z`` holding NaN/Inf gets index 0; the loss of such a row is NaN/Inf, so the
problem surfaces in the loss instead of hiding. ``check_finite=True`` raises instead (it needs a
host sync on CUDA, so it is off by default).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._checks import check_rows_and_codebook
from .ops import _scatter_rows_unchecked, resolve_backend, search


class VQOutput(NamedTuple):
    """Result of :func:`vector_quantize`; unpacks as ``(quantized, indices, loss)``."""

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor


class VectorQuantizeFunction(torch.autograd.Function):
    """Straight-through VQ with the codebook and commitment terms, for both backends.

    forward(z2d (N, D), codebook (K, D), beta, backend, deterministic) ->
        (quantized (N, D) in z's dtype, indices int64 (N,), loss fp32 scalar)
    """

    @staticmethod
    def forward(ctx, z2d, codebook, beta, backend, deterministic):
        indices, z_q, err = search(z2d, codebook, backend)
        n, d = z2d.shape
        # Both terms share the forward value mean((z - z_q)^2); an empty batch gives 0, not NaN.
        loss = err.sum() * ((1.0 + beta) / max(n * d, 1))
        ctx.save_for_backward(z2d, codebook, indices)
        ctx.beta, ctx.backend, ctx.deterministic = beta, backend, deterministic
        ctx.mark_non_differentiable(indices)
        return z_q, indices, loss

    @staticmethod
    def backward(ctx, grad_q, _grad_idx, grad_loss):
        z2d, codebook, indices = ctx.saved_tensors
        need_z, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_z = grad_c = None
        if not (need_z or need_c):
            return None, None, None, None, None
        n, d = z2d.shape
        scale = 2.0 / max(n * d, 1)
        # diff = z_q - z in fp32, recomputed by a gather instead of saved: saves N x D memory.
        diff = codebook.detach().to(torch.float32).index_select(0, indices) - z2d.to(torch.float32)
        if grad_loss is not None:
            g = grad_loss.to(torch.float32)
        else:
            g = torch.zeros((), dtype=torch.float32, device=z2d.device)
        if need_z:
            # straight-through + commitment: d/dz beta*mean((z - sg(z_q))^2) = -2 beta (z_q - z)/nd
            gz = diff * (-ctx.beta * scale * g)
            if grad_q is not None:
                gz = gz + grad_q.to(torch.float32)
            grad_z = gz.to(z2d.dtype)
        if need_c:
            # codebook term: d/dC_k mean((sg(z) - C_idx)^2) = 2 sum_{i: idx_i = k} (z_q_i - z_i)/nd
            summed = _scatter_rows_unchecked(
                indices, diff, codebook.shape[0], backend=ctx.backend,
                deterministic=ctx.deterministic,
            )  # fmt: skip
            grad_c = (summed * (scale * g)).to(codebook.dtype)
        return grad_z, grad_c, None, None, None


def _check_inputs(z, codebook, beta) -> None:
    check_rows_and_codebook(z, codebook)
    check_beta(beta)


def check_beta(beta) -> None:
    """TypeError unless ``beta`` is a finite real number, ValueError when it is negative.

    Comparisons only, no ``math.isfinite``: under ``torch.compile(dynamic=True)`` a Python float
    argument or module attribute becomes a SymFloat, which comparisons trace and
    ``math.isfinite`` does not (a graph break, an error with ``fullgraph=True``).
    """
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a finite float, got {beta!r}")
    if not -math.inf < beta < math.inf:  # False for NaN and +-inf
        raise TypeError(f"beta must be a finite float, got {beta!r}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")


def vector_quantize(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    beta: float = 0.25,
    backend: str = "auto",
    check_finite: bool = False,
    deterministic: bool | None = None,
) -> VQOutput:
    """Quantize ``z`` to its nearest codes, with VQ-VAE's straight-through gradient and loss.

    Args:
        z: (..., D) float32/float16/bfloat16, any leading dims (zero rows allowed), any strides.
        codebook: (K, D) float32/float16/bfloat16, K >= 1, on ``z``'s device.
        beta: commitment weight (the second loss term trains the encoder).
        backend: "triton" (fused kernel), "torch" (tiled pure torch) or "auto" (Triton for CUDA
            tensors when Triton works, torch otherwise).
        check_finite: raise ValueError if ``z`` or ``codebook`` holds NaN/Inf (a host sync).
        deterministic: bitwise-reproducible codebook gradient on CUDA; default follows
            ``torch.are_deterministic_algorithms_enabled()``.

    Returns:
        VQOutput(quantized, indices, loss):
            quantized: like ``z`` (shape, dtype), forward value ``codebook[indices]``, gradient
                passes straight through to ``z``.
            indices: int64 ``z.shape[:-1]``, nearest code by squared L2, ties to the lowest index.
            loss: fp32 scalar ``mse(sg(z), z_q) + beta * mse(z, sg(z_q))``; 0 for an empty batch.

    Example:
        >>> z = torch.randn(8, 16, 64, requires_grad=True)
        >>> codebook = torch.randn(512, 64, requires_grad=True)
        >>> quantized, indices, loss = vector_quantize(z, codebook)
        >>> indices.shape
        torch.Size([8, 16])
    """
    _check_inputs(z, codebook, beta)
    be = resolve_backend(backend, z.device)
    if check_finite:
        for name, t in (("z", z), ("codebook", codebook)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} holds NaN or Inf values (check_finite=True)")
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    lead, d = z.shape[:-1], z.shape[-1]
    z2d = z.reshape(-1, d)
    q2d, idx, loss = VectorQuantizeFunction.apply(
        z2d, codebook, float(beta), be, bool(deterministic)
    )
    return VQOutput(q2d.reshape(z.shape), idx.reshape(lead), loss)
