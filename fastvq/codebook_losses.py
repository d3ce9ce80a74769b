"""vqp's auxiliary codebook losses as pure functions, without vqp's N x K distance matrices.

vector-quantize-pytorch 1.32 ("vqp") offers three auxiliary losses; here each is a function of
its tensors, with vqp's exact value and gradient:

- :func:`orthogonal_loss`: orthogonal regularisation of the codes (Shin et al. 2021, eq. 2), on
  all codes, the active ones, or a random subset;
- :func:`diversity_loss`: the codebook diversity loss, minus the entropy of the mean code
  distribution ``softmax(temperature * logits)``;
- :func:`ce_commitment_loss`: the cross-entropy commitment loss, ``cross_entropy(logits, idx)``.

The last two need vqp's logits, its NEGATIVE NON-SQUARED distance ``-max(||z - c||, 1e-4)``
(``z.c`` for its cosine codebook), for every row and code. Here they are computed over chunks of
rows, in the forward and again in the backward (each an ``autograd.Function`` that recomputes a
chunk's logits to backpropagate through it), so memory is O(chunk x K), never N x K, and the
gradient is the one of the literal full formula. Both are first-order only (no double backward).
"""

from __future__ import annotations

import torch

from ._checks import check_float, check_int, check_same_device, check_tensor
from .sampling import check_rows_codes, check_temperature, vqp_logits

# vqp's ``l2norm`` (F.normalize's eps) and ``entropy``'s clamp of the probabilities in its log.
VQP_NORM_EPS = 1e-6
VQP_ENTROPY_EPS = 1e-5


# --- orthogonal_loss ----------------------------------------------------------------------------


def _sum_sq_cosines(u: torch.Tensor) -> torch.Tensor:
    """``sum_ij (u_i . u_j)^2`` over the last two dims of fp32 (..., M, D) unit rows.

    It equals ``||U^T U||_F^2`` (the Gram's squared Frobenius norm, by the cyclic trace), so it is
    taken from whichever Gram matrix is smaller: D x D when D < M (O(D^2) memory however many
    codes), otherwise M x M.
    """
    m, d = u.shape[-2], u.shape[-1]
    gram = u.transpose(-1, -2) @ u if d < m else u @ u.transpose(-1, -2)
    return gram.square().sum(dim=(-1, -2))


def _random_subset(n: int, m: int, generator, device) -> torch.Tensor:
    """``m`` of ``range(n)`` at random, as vqp's ``randperm(n)[:m]``."""
    gen_dev = generator.device if generator is not None else device
    return torch.randperm(n, generator=generator, device=gen_dev)[:m].to(device)


def orthogonal_loss(
    codes: torch.Tensor,
    *,
    active: torch.Tensor | None = None,
    max_codes: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """vqp's orthogonal regularisation (``orthogonal_loss_fn``) of the l2-normalised codes.

    For the M codes used, normalised ``u_i = c_i / max(||c_i||, 1e-6)``::

        loss = sum_ij (u_i . u_j)^2 / M^2 - 1 / M

    (0 for M orthonormal codes), averaged over heads. vqp builds the M x M cosine Gram matrix; the
    same sum is taken here from the D x D Gram ``U^T U`` when D < M, so memory is
    O(H min(M, D)^2): M x M only when M <= D.

    Args:
        codes: (K, D) or (H, K, D) float32/float16/bfloat16; computed in fp32, differentiable.
        active: optional bool (K,) or, for (H, K, D) codes, (H, K): the codes to use, vqp's
            ``orthogonal_reg_active_codes_only`` (vqp passes the codes its batch selected). A
            (K,) mask selects the same codes in every head, as vqp does.
        max_codes: optional int >= 1: when more than this many codes are used, a random subset of
            this many, vqp's ``orthogonal_reg_max_codes`` (one subset shared by every head when
            each uses the same codes, as vqp does; one per head for an (H, K) mask).
        generator: the source of the subset (``randperm``); None uses torch's default generator
            of ``codes``' device.

    Returns:
        fp32 scalar. Per head, with M = the codes used: for equal M in every head this is exactly
        vqp's ``sum / (H M^2) - 1 / M``; with an (H, K) mask (which vqp does not support) each
        head's loss uses its own M. A head using no code adds 0 (vqp would give NaN).

    ``active`` (a boolean selection) and the subset's size are read on the host: a device sync on
    CUDA.
    """
    check_tensor("codes", codes)
    check_float("codes", codes)
    if codes.dim() not in (2, 3):
        raise ValueError(f"codes must have shape (K, D) or (H, K, D), got {tuple(codes.shape)}")
    if codes.shape[-2] == 0 or codes.shape[-1] == 0:
        raise ValueError(f"codes must have K >= 1 and D >= 1, got shape {tuple(codes.shape)}")
    if max_codes is not None:
        max_codes = check_int("max_codes", max_codes, 1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)}")
    c = codes if codes.dim() == 3 else codes[None]
    h, k, _ = c.shape
    if active is not None:
        check_tensor("active", active)
        if active.dtype != torch.bool:
            raise TypeError(f"active must be a bool tensor, got {active.dtype}")
        shapes = [(k,)] if codes.dim() == 2 else [(k,), (h, k)]
        if tuple(active.shape) not in shapes:
            want = " or ".join(str(s) for s in shapes)
            raise ValueError(f"active must have shape {want}, got {tuple(active.shape)}")
        check_same_device("active", active, "codes", codes)

    # One subset for every head (vqp's case): a single batched Gram product.
    if active is None or active.dim() == 1:
        if active is not None:
            c = c[:, active]
        m = c.shape[1]
        if m == 0:
            return torch.zeros((), dtype=torch.float32, device=codes.device)
        if max_codes is not None and m > max_codes:
            c = c[:, _random_subset(m, max_codes, generator, codes.device)]
            m = max_codes
        u = torch.nn.functional.normalize(c.to(torch.float32), p=2, dim=-1, eps=VQP_NORM_EPS)
        return _sum_sq_cosines(u).sum() / (h * m**2) - 1.0 / m

    # A subset per head: heads may use different numbers of codes.
    total = torch.zeros((), dtype=torch.float32, device=codes.device)
    for i in range(h):
        ci = c[i, active[i]]
        m = ci.shape[0]
        if m == 0:
            continue
        if max_codes is not None and m > max_codes:
            ci = ci[_random_subset(m, max_codes, generator, codes.device)]
            m = max_codes
        u = torch.nn.functional.normalize(ci.to(torch.float32), p=2, dim=-1, eps=VQP_NORM_EPS)
        total = total + (_sum_sq_cosines(u) / m**2 - 1.0 / m)
    return total / h


# --- chunked losses over vqp's logits -----------------------------------------------------------


def _chunk_grads(ctx, z32, codes32, chunk, surrogate):
    """Backpropagate a sum over row chunks: for each chunk, recompute ``surrogate(zc, cc, r0, r1)``
    (a scalar whose gradient is the chunk's share of the loss's) with autograd and accumulate its
    gradients, so only one chunk's logits exist at a time."""
    need_z, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gz = torch.zeros_like(z32) if need_z else None
    gc = torch.zeros_like(codes32) if need_c else None
    if not (need_z or need_c):
        return gz, gc
    with torch.enable_grad():
        cc = codes32.detach().requires_grad_(need_c)
        for r0 in range(0, z32.shape[0], chunk):
            r1 = min(r0 + chunk, z32.shape[0])
            zc = z32[r0:r1].detach().requires_grad_(need_z)
            s = surrogate(zc, cc, r0, r1)
            inputs = [t for t, need in ((zc, need_z), (cc, need_c)) if need]
            grads = torch.autograd.grad(s, inputs)
            if need_z:
                gz[r0:r1] = grads[0]
            if need_c:
                gc += grads[-1]
    return gz, gc


def _neg_mean_entropy(avg: torch.Tensor) -> torch.Tensor:
    """vqp's ``-entropy(avg_prob).mean()``, its ``log`` clamped at 1e-5 as vqp's ``entropy``."""
    ent = (-avg * torch.log(avg.clamp(min=VQP_ENTROPY_EPS))).sum(dim=-1)
    return -ent.mean()


class _DiversityLoss(torch.autograd.Function):
    """Forward: the mean probabilities per position, accumulated over row chunks. Backward: the
    loss's gradient wrt those means (a small T x K autograd), then each chunk's probabilities
    recomputed and backpropagated against it."""

    @staticmethod
    def forward(ctx, z32, codes32, temperature, chunk, positions, cosine):
        rows, k = z32.shape[0], codes32.shape[0]
        batch = rows // positions
        avg = torch.zeros((positions, k), dtype=torch.float32, device=z32.device)
        code_sq = codes32.square().sum(dim=1)
        pos = torch.arange(rows, device=z32.device) % positions  # row r = (b, t): t = r mod T
        for r0 in range(0, rows, chunk):
            r1 = min(r0 + chunk, rows)
            logits = vqp_logits(z32[r0:r1], codes32, code_sq, cosine)
            avg.index_add_(0, pos[r0:r1], (logits * temperature).softmax(dim=-1))
        if batch > 0:
            avg /= batch
        ctx.save_for_backward(z32, codes32, avg)
        ctx.args = (temperature, chunk, positions, cosine, batch)
        if rows == 0:
            return torch.zeros((), dtype=torch.float32, device=z32.device)
        return _neg_mean_entropy(avg)

    @staticmethod
    def backward(ctx, grad):
        z32, codes32, avg = ctx.saved_tensors
        temperature, chunk, positions, cosine, batch = ctx.args
        if z32.shape[0] == 0:
            return torch.zeros_like(z32), torch.zeros_like(codes32), None, None, None, None
        with torch.enable_grad():
            a = avg.detach().requires_grad_(True)
            (g_avg,) = torch.autograd.grad(_neg_mean_entropy(a), a, grad)
        g_avg = g_avg / batch  # avg = (1 / B) sum_b prob_b
        pos = torch.arange(z32.shape[0], device=z32.device) % positions

        def surrogate(zc, cc, r0, r1):
            logits = vqp_logits(zc, cc, cc.square().sum(dim=1), cosine)
            prob = (logits * temperature).softmax(dim=-1)
            return (prob * g_avg[pos[r0:r1]]).sum()

        gz, gc = _chunk_grads(ctx, z32, codes32, chunk, surrogate)
        return gz, gc, None, None, None, None


def diversity_loss(
    z: torch.Tensor,
    codes: torch.Tensor,
    *,
    temperature: float = 100.0,
    chunk: int = 4096,
    cosine: bool = False,
) -> torch.Tensor:
    """vqp's codebook diversity loss, chunked over rows: memory O(chunk x K), not O(N x K).

    vqp (``codebook_diversity_loss_weight > 0``)::

        prob     = softmax(temperature * logits)        # (..., T, K), logits = -||z - c||
        avg_prob = prob averaged over every dim but T   # (T, K)
        loss     = -mean_t entropy(avg_prob[t])         # entropy(p) = -sum p log(max(p, 1e-5))

    Minimising it spreads the batch's soft assignments over the codebook. vqp's logits are the
    negative non-squared distance ``-max(||z - c||, 1e-4)`` (``z.c`` with ``cosine=True``, for
    inputs the caller has l2-normalised, as vqp's cosine codebook).

    vqp averages over the batch (and heads) separately for each sequence position T of its
    (B, T, D) input. A 2-D ``z`` (N, D) is one position (the mean over all N rows, the codebook's
    usage over the batch: vqp's value for an input of shape (N, 1, D)); a 3-D ``z`` (B, T, D) is
    vqp's per-position reduction exactly (fold heads into B, as vqp does).

    Args:
        z: (N, D) or (B, T, D) float32/float16/bfloat16; computed in fp32, differentiable.
        codes: (K, D) float32/float16/bfloat16, K >= 1, same device; differentiable.
        temperature: finite >= 0, vqp's ``codebook_diversity_temperature``.
        chunk: rows per chunk, >= 1.
        cosine: logits ``z.c`` instead of ``-||z - c||``.

    Returns:
        fp32 scalar; 0 for no rows. Gradients (first order) are those of the literal formula.
        The per-position means take O(T x K) memory: a long sequence with a small batch brings
        back an N x K sized buffer, inherent to vqp's per-position definition; pass 2-D rows for
        the batch-wide loss.
    """
    check_rows_codes(z, codes, z_shape="(N, D) or (B, T, D)", z_ndims=(2, 3))
    t = check_temperature("temperature", temperature)
    chunk = check_int("chunk", chunk, 1)
    positions = z.shape[1] if z.dim() == 3 else 1
    if z.dim() == 3 and positions == 0:
        return torch.zeros((), dtype=torch.float32, device=z.device)
    # fp32 copies through autograd (the casts' backward returns z's and codes' dtypes)
    z32 = z.reshape(-1, z.shape[-1]).to(torch.float32)
    codes32 = codes.to(torch.float32)
    return _DiversityLoss.apply(z32, codes32, t, chunk, positions, bool(cosine))


class _CECommitment(torch.autograd.Function):
    """Forward: the summed cross entropy of the valid rows, chunk by chunk. Backward: each
    chunk's cross entropy recomputed with autograd and backpropagated."""

    @staticmethod
    def _chunk_ce(zc, cc, code_sq, y, cosine):
        """Per-row cross entropy of a chunk; 0 on ignored rows (-1), zeroed before the logits so
        that a NaN in an ignored row reaches neither the loss nor any gradient."""
        valid = y >= 0
        zc = torch.where(valid[:, None], zc, 0.0)
        logits = vqp_logits(zc, cc, code_sq, cosine)
        picked = logits.gather(1, torch.where(valid, y, 0)[:, None])[:, 0]
        ce = torch.logsumexp(logits, dim=1) - picked
        return torch.where(valid, ce, 0.0)

    @staticmethod
    def forward(ctx, z32, codes32, y, count, chunk, cosine):
        total = torch.zeros((), dtype=torch.float32, device=z32.device)
        code_sq = codes32.square().sum(dim=1)
        for r0 in range(0, z32.shape[0], chunk):
            r1 = min(r0 + chunk, z32.shape[0])
            total += _CECommitment._chunk_ce(z32[r0:r1], codes32, code_sq, y[r0:r1], cosine).sum()
        ctx.save_for_backward(z32, codes32, y, count)
        ctx.args = (chunk, cosine)
        return total / count

    @staticmethod
    def backward(ctx, grad):
        z32, codes32, y, count = ctx.saved_tensors
        chunk, cosine = ctx.args
        scale = grad / count

        def surrogate(zc, cc, r0, r1):
            ce = _CECommitment._chunk_ce(zc, cc, cc.square().sum(dim=1), y[r0:r1], cosine)
            return ce.sum() * scale

        gz, gc = _chunk_grads(ctx, z32, codes32, chunk, surrogate)
        return gz, gc, None, None, None, None


def ce_commitment_loss(
    z: torch.Tensor,
    codes: torch.Tensor,
    indices: torch.Tensor,
    *,
    chunk: int = 4096,
    cosine: bool = False,
) -> torch.Tensor:
    """vqp's cross-entropy commitment loss (``commitment_use_cross_entropy_loss``), chunked.

    ``cross_entropy(logits, indices, ignore_index=-1)``, the mean over the rows whose index is
    not -1, with vqp's logits: the negative NON-SQUARED distance ``-max(||z - c_k||, 1e-4)``, no
    temperature (``z.c`` with ``cosine=True``, for inputs the caller has l2-normalised). vqp
    passes the selected codes as ``indices``, masked rows set to -1. Memory O(chunk x K).

    Args:
        z: (N, D) float32/float16/bfloat16 rows; computed in fp32, differentiable.
        codes: (K, D) float32/float16/bfloat16 codes, K >= 1, same device; differentiable.
        indices: int64 (N,) in [0, K), or -1 to ignore a row.
        chunk: rows per chunk, >= 1.
        cosine: logits ``z.c`` instead of ``-||z - c||``.

    Returns:
        fp32 scalar; 0 when no row counts (N = 0 or every index -1, where torch's and so vqp's
        mean is NaN). Gradients (first order) are those of the literal formula. An index outside
        [-1, K) raises ValueError on CPU; on other devices it makes the loss NaN instead (the
        check would cost a device sync).
    """
    check_rows_codes(z, codes)
    check_tensor("indices", indices)
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be int64, got {indices.dtype}")
    if tuple(indices.shape) != (z.shape[0],):
        raise ValueError(
            f"indices must have shape (N,) = ({z.shape[0]},), got {tuple(indices.shape)}"
        )
    check_same_device("indices", indices, "z", z)
    chunk = check_int("chunk", chunk, 1)
    k = codes.shape[0]
    bad = (indices < -1) | (indices >= k)
    if indices.device.type == "cpu" and bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"indices must lie in [0, K) = [0, {k}) or be -1 (ignored); got indices[{first}] = "
            f"{int(indices[first])}"
        )
    y = torch.where(bad, -1, indices)
    count = (y >= 0).sum().clamp(min=1).to(torch.float32)
    loss = _CECommitment.apply(
        z.to(torch.float32), codes.to(torch.float32), y, count, chunk, bool(cosine)
    )
    # no host sync: an out-of-range index on an accelerator surfaces as NaN
    return torch.where(bad.any(), torch.nan, loss) if indices.device.type != "cpu" else loss
