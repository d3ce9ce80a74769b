"""The public fused VQ op: ``vector_quantize`` and the one autograd.Function behind it.

Semantics (VQ-VAE, van den Oord et al. 2017):

    idx       = argmin_k ||z - C_k||^2            (ties -> lowest index)
    quantized = z + sg(C[idx] - z)                (forward value exactly C[idx], gradient to z)
    loss      = mse(sg(z), C[idx]) + beta * mse(z, sg(C[idx]))

With ``rotation_trick=True`` (Fifty et al. 2024, arXiv 2410.06424) the forward value is still
exactly ``C[idx]`` but the gradient reaching ``z`` through ``quantized`` is the rotation trick's,
``sg(lambda R) z`` with ``R`` the rotation taking ``z``'s direction to ``q``'s and
``lambda = ||q|| / ||z||`` (see :func:`rotate_grad`), computed from O(N D) tensors in the backward.

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

from typing import NamedTuple

import torch

from ._checks import check_nonneg_real, check_rows_and_codebook
from .ops import _scatter_rows_unchecked, resolve_backend, search


class VQOutput(NamedTuple):
    """Result of :func:`vector_quantize`; unpacks as ``(quantized, indices, loss)``."""

    quantized: torch.Tensor  # like z: value codebook[indices]; grad to z straight-through/rotated
    indices: torch.Tensor  # int64, z.shape[:-1]: the nearest code per row, ties to the lowest
    loss: torch.Tensor  # fp32 0-dim: mse(sg(z), z_q) + beta * mse(z, sg(z_q)); 0 for no rows


ROTATION_EPS = 1e-6  # the norms' floor, as vector-quantize-pytorch's ``safe_div`` / ``l2norm``


def rotate_grad(
    grad_q: torch.Tensor, z: torch.Tensor, z_q: torch.Tensor, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """The rotation trick's gradient wrt ``z`` (Fifty et al. 2024, section 4.2), in O(N D).

    The estimator's output is ``sg(lambda) (z - 2 (z.w) w + 2 (z.u) q_hat)`` with every factor
    but ``z`` detached: ``u = z/||z||``, ``q_hat = q/||q||``, ``w = (u + q_hat)/||u + q_hat||``,
    ``lambda = ||q|| / ||z||`` (norms floored at ``ROTATION_EPS``, as vector-quantize-pytorch
    does). Its forward value is ``q`` up to rounding; its Jacobian's transpose applied to ``g`` is
    ``lambda (g - 2 w (w.g) + 2 u (q_hat.g))``, what this returns. Rows of ``z`` holding NaN/Inf
    have no rotation: they get ``g`` unchanged (straight-through), so NaN padding adds no NaN;
    so do rows outside ``keep`` (masked padding is often all zeros, where ``lambda`` would be
    ``||q|| / 1e-6``).

    Args:
        grad_q: (N, D) upstream gradient of the quantized output.
        z: fp32 (N, D) the inputs; z_q: (N, D) their codes, in ``z``'s dtype.
        keep: optional bool (N,), the rows to rotate (the others: straight-through).

    Returns:
        (N, D) in ``z``'s dtype (the op passes fp32).
    """
    g = grad_q.to(z.dtype)
    nz = torch.linalg.vector_norm(z, dim=1, keepdim=True)
    nq = torch.linalg.vector_norm(z_q, dim=1, keepdim=True)
    u = z / nz.clamp_min(ROTATION_EPS)
    qh = z_q / nq.clamp_min(ROTATION_EPS)
    w = u + qh
    w = w / torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min(ROTATION_EPS)
    lam = nq / nz.clamp_min(ROTATION_EPS)
    wg = (w * g).sum(1, keepdim=True)
    qg = (qh * g).sum(1, keepdim=True)
    rot = lam * (g - 2.0 * wg * w + 2.0 * qg * u)
    ok = torch.isfinite(nz) if keep is None else torch.isfinite(nz) & keep[:, None]
    return torch.where(ok, rot, g)


class _AttachCodes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, q, rotation: bool, keep):
        ctx.rotation = rotation
        ctx.save_for_backward(z, q, keep)
        return q.clone()

    @staticmethod
    def backward(ctx, g):
        z, q, keep = ctx.saved_tensors
        if not ctx.rotation:
            return g, None, None, None
        rot = rotate_grad(g, z.to(torch.float32), q.to(torch.float32), keep)
        return rot.to(z.dtype), None, None, None


def attach_codes(
    z: torch.Tensor, q: torch.Tensor, *, rotation: bool, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Codes found elsewhere (a beam search, a stack's pooled search) as the fused op gives a
    layer's ``quantized``: forward value exactly ``q``, gradient to ``z`` straight through or,
    with ``rotation``, by the rotation trick (:func:`rotate_grad`, computed in fp32; rows outside
    ``keep`` and rows holding NaN/Inf straight through).

    Args:
        z: (..., D) the inputs; q: (..., D) their codes; keep: optional bool (...).

    Returns:
        (..., D): ``q``'s values, with ``z``'s gradient.
    """
    d = z.shape[-1]
    keep = None if keep is None else keep.reshape(-1)
    return _AttachCodes.apply(z.reshape(-1, d), q.reshape(-1, d), rotation, keep).view(q.shape)


def grad_z(
    diff: torch.Tensor,
    grad_q: torch.Tensor | None,
    g: torch.Tensor,
    beta: float,
    denom,
    dtype: torch.dtype,
    keep: torch.Tensor | None = None,
    rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``z``'s gradient: straight-through (or rotation trick) plus commitment, for the plain and
    the sharded op.

    d/dz beta * sum_{kept i} (z_i - sg(z_q_i))^2 / denom = -2 beta (z_q - z) / denom, times the
    loss's upstream gradient ``g`` (fp32 0-dim), plus ``grad_q`` (N, D) passed straight through,
    or through :func:`rotate_grad` when ``rotation`` is given.

    Args:
        diff: fp32 (N, D) ``z_q - z``.
        denom: the loss's divisor (a number or a 0-dim tensor): kept rows times D.
        keep: optional bool (N,); other rows get ``grad_q`` only, straight through (``torch.where``:
            a masked row holding NaN/Inf adds no NaN).
        rotation: ``(z, z_q)`` fp32 (N, D) each, for the rotation trick (rows in ``keep``).
    """
    gz = diff * (-beta * (2.0 / denom) * g)
    if keep is not None:
        gz = torch.where(keep[:, None], gz, 0.0)
    if grad_q is not None:
        if rotation is None:
            gz = gz + grad_q.to(torch.float32)
        else:
            gz = gz + rotate_grad(grad_q, *rotation, keep)
    return gz.to(dtype)


def vq_loss(
    err: torch.Tensor, d: int, beta: float, codebook_weight: float, keep: torch.Tensor | None
) -> tuple[torch.Tensor, object]:
    """``(loss, denom)``: ``(codebook_weight + beta) * sum_{kept i} err_i / denom``, the codebook
    and commitment terms (both have the forward value ``mean((z - z_q)^2)``) over ``denom`` =
    kept rows times ``d``; an empty or fully masked batch gives 0, not NaN.

    Args:
        err: fp32 (N,) the search's per-row squared error.
        keep: optional bool (N,); rows left out are dropped with ``torch.where``, not a 0/1
            weight: a masked row's NaN error would give NaN * 0 = NaN.
    """
    if keep is None:
        denom = max(err.shape[0] * d, 1)
        total = err.sum()
    else:
        denom = keep.sum().clamp_min(1) * d
        total = torch.where(keep, err, 0.0).sum()
    return total * ((codebook_weight + beta) / denom), denom


def _upstream(grad_loss: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The loss's upstream gradient as fp32 0-dim (0 when the loss is unused)."""
    if grad_loss is None:
        return torch.zeros((), dtype=torch.float32, device=like.device)
    return grad_loss.to(torch.float32)


class VectorQuantizeFunction(torch.autograd.Function):
    """Straight-through VQ with the codebook and commitment terms, for both backends.

    forward(z2d (N, D), codebook (K, D), beta, backend, deterministic, keep=None,
            codebook_weight=1.0, rotation_trick=False, indices=None) ->
        (quantized (N, D) in z's dtype, indices int64 (N,), loss fp32 scalar, err fp32 (N,))

    ``loss = (codebook_weight + beta) * sum_{kept i} err_i / (n_kept D)``: the codebook term
    ``codebook_weight * mse(sg(z), C[idx])`` plus ``beta * mse(z, sg(C[idx]))`` over the rows
    with ``keep`` (all rows when None; 0 when none). ``err`` is the search's per-row squared
    error, non-finite exactly for rows holding NaN/Inf. ``codebook_weight=0`` is an EMA codebook.
    ``rotation_trick`` sends ``quantized``'s gradient to ``z`` by :func:`rotate_grad` instead of
    straight through. Given ``indices`` (int64 (N,), e.g. sampled codes) replace the search:
    ``z_q`` is gathered from them, with the same loss and backward (O(N D)).
    """

    @staticmethod
    def forward(
        ctx, z2d, codebook, beta, backend, deterministic, keep=None, codebook_weight=1.0,
        rotation_trick=False, indices=None,
    ):  # fmt: skip
        if indices is None:
            indices, z_q, err = search(z2d, codebook, backend)
        else:
            z_q = codebook.index_select(0, indices).to(z2d.dtype)
            # the per-row error from the gathered row, as the search reports it (NaN rows: NaN)
            err = (z_q.to(torch.float32) - z2d.to(torch.float32)).square().sum(1)
        loss, denom = vq_loss(err, z2d.shape[1], beta, codebook_weight, keep)
        ctx.save_for_backward(z2d, codebook, indices, keep)
        ctx.beta, ctx.backend, ctx.deterministic = beta, backend, deterministic
        ctx.denom, ctx.codebook_weight = denom, codebook_weight
        ctx.rotation_trick = rotation_trick
        ctx.mark_non_differentiable(indices, err)
        return z_q, indices, loss, err

    @staticmethod
    def backward(ctx, grad_q, _grad_idx, grad_loss, _grad_err):
        z2d, codebook, indices, keep = ctx.saved_tensors
        need_z, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_z_out = grad_c = None
        if not (need_z or need_c):
            return None, None, None, None, None, None, None, None, None
        # diff = z_q - z in fp32, recomputed by a gather instead of saved: saves N x D memory.
        zf = z2d.to(torch.float32)
        zq = codebook.detach().to(torch.float32).index_select(0, indices)
        diff = zq - zf
        g = _upstream(grad_loss, z2d)
        if need_z:
            rot = (zf, zq) if ctx.rotation_trick else None
            grad_z_out = grad_z(diff, grad_q, g, ctx.beta, ctx.denom, z2d.dtype, keep, rot)
        if need_c:
            # codebook term: d/dC_k mean((sg(z) - C_idx)^2) = 2 sum_{i: idx_i = k} (z_q_i - z_i)/nd;
            # rows left out go to bin K, dropped by the scatter
            idx = indices if keep is None else torch.where(keep, indices, codebook.shape[0])
            summed = _scatter_rows_unchecked(
                idx, diff, codebook.shape[0], backend=ctx.backend, deterministic=ctx.deterministic
            )
            grad_c = (summed * ((2.0 / ctx.denom) * g * ctx.codebook_weight)).to(codebook.dtype)
        return grad_z_out, grad_c, None, None, None, None, None, None, None


def quantize_rows(
    z2d: torch.Tensor,
    codebook: torch.Tensor,
    *,
    beta: float,
    backend: str,
    keep: torch.Tensor | None = None,
    codebook_weight: float = 1.0,
    deterministic: bool | None = None,
    rotation_trick: bool = False,
    indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 2-D internal entry, for callers that checked their inputs and resolved ``backend``.

    Args:
        z2d: (N, D) rows; codebook (K, D); beta the commitment weight.
        backend: "torch" or "triton" (resolved).
        keep: optional bool (N,), the rows that count in the loss (the layer's mask).
        codebook_weight: weight of the codebook term (0 for an EMA codebook).
        rotation_trick: the rotation trick's gradient to ``z`` instead of straight-through.
        indices: optional int64 (N,) codes to use instead of the nearest (sampled codes; unchecked:
            the caller guarantees ``[0, K)``).

    Returns:
        ``(quantized (N, D), indices int64 (N,), loss fp32 0-dim, err fp32 (N,))``, as
        :class:`VectorQuantizeFunction`.
    """
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    return VectorQuantizeFunction.apply(
        z2d,
        codebook,
        beta,
        backend,
        deterministic,
        keep,
        codebook_weight,
        bool(rotation_trick),
        indices,
    )


def _check_inputs(z, codebook, beta) -> None:
    check_rows_and_codebook(z, codebook)
    check_beta(beta)


def check_beta(beta) -> None:
    """TypeError unless ``beta`` is a finite real number, ValueError when it is negative
    (:func:`~fastvq._checks.check_nonneg_real`, traceable under ``torch.compile``)."""
    check_nonneg_real("beta", beta)


def vector_quantize(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    beta: float = 0.25,
    backend: str = "auto",
    check_finite: bool = False,
    deterministic: bool | None = None,
    rotation_trick: bool = False,
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
        rotation_trick: send ``quantized``'s gradient to ``z`` by the rotation trick (Fifty et
            al. 2024) instead of straight through; the forward value stays ``codebook[indices]``.

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
    if not isinstance(rotation_trick, bool):
        raise TypeError(f"rotation_trick must be a bool, got {rotation_trick!r}")
    q2d, idx, loss, _ = VectorQuantizeFunction.apply(
        z2d, codebook, float(beta), be, bool(deterministic), None, 1.0, rotation_trick
    )
    return VQOutput(q2d.reshape(z.shape), idx.reshape(lead), loss)
