"""vqp's auxiliary codebook losses as pure functions, without vqp's N x K distance matrices.

vector-quantize-pytorch 1.32 ("vqp") offers three auxiliary losses; here each is a function of
its tensors, with vqp's exact value and gradient:

- :func:`orthogonal_loss`: orthogonal regularisation of the codes (Shin et al. 2021, eq. 2), on
  all codes, the active ones, or a random subset;
- :func:`diversity_loss`: the codebook diversity loss, minus the entropy of the mean code
  distribution ``softmax(temperature * logits)``;
- :func:`ce_commitment_loss`: the cross-entropy commitment loss, ``cross_entropy(logits, idx)``.

The last two need the softmax over vqp's logits, its NEGATIVE NON-SQUARED distance
``-max(||z - c||, 1e-4)`` (``z.c`` for its cosine codebook), for every row and code: both are
built on :func:`fastvq.soft_assign` (similarity ``"neg_dist"`` or ``"dot"``), the one
implementation of that softmax, which streams each row's log-sum-exp over tiles of codes and
recomputes each tile's probabilities in the backward (the Triton kernels on CUDA). The
cross-entropy is the op's log-sum-exp minus the logit at the given index; the diversity loss is
the entropy of the op's column sums. Working memory is a few tiles (at most :data:`TILE_ELEMS`
logits, 4 MiB, each) plus O(N + K) vectors (the diversity loss's T x K means too), never N x K
or chunk x K, and the gradient is the one of the literal full formula. Both are first-order only
(no double backward).
"""

from __future__ import annotations

import torch

from ._checks import check_float, check_int, check_same_device, check_tensor
from .sampling import VQP_DIST_SQ_FLOOR, check_rows_codes, check_temperature
from .soft_assignment import VQP_DIST_EPS, soft_assign

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

    ``active`` alone is a mask (no host sync; ``torch.compile(fullgraph=True)`` traces it). With
    ``max_codes``, the active codes are selected and the subset's size is read on the host: a
    device sync on CUDA, and a graph break under ``torch.compile``.
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

    # Active codes without a random subset: masked (inactive codes zeroed, M counted as a tensor),
    # no boolean selection, so no host sync and no data-dependent shape (torch.compile traces it).
    if active is not None and max_codes is None:
        keep = active if active.dim() == 2 else active[None].expand(h, k)
        c = torch.where(keep[..., None], c.to(torch.float32), 0.0)  # zero rows normalise to 0
        u = torch.nn.functional.normalize(c, p=2, dim=-1, eps=VQP_NORM_EPS)
        m = keep.sum(dim=-1).to(torch.float32)  # (H,)
        m1 = m.clamp(min=1.0)
        per_head = torch.where(m > 0, _sum_sq_cosines(u) / m1.square() - 1.0 / m1, 0.0)
        return per_head.mean()

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


# --- losses over vqp's logits, on soft_assign ----------------------------------------------------

# fp32 values in one (rows x codes) tile of logits: 4 MiB. A forward or backward holds a few
# such tiles at once, so its working memory is a few MiB whatever N and K.
TILE_ELEMS = 1 << 20


def _tiles(chunk: int, k: int) -> tuple[int, int]:
    """(rows, codes) per tile, at most ``chunk`` rows. When 128 or more rows' logits over all K
    codes fit in one tile, the tile holds them all; otherwise tiles of up to 512 rows (code tiles
    of a few hundred KiB that stay in cache). A tile holds at most :data:`TILE_ELEMS` values."""
    whole = TILE_ELEMS // k
    rows = min(chunk, whole if whole >= 128 else 512)
    return rows, max(1, min(k, TILE_ELEMS // rows))


def _soft_assign_rows(z32, codes32, mask, inv_temperature, chunk, cosine, column_sums):
    """:func:`fastvq.soft_assign` of vqp's logits ``inv_temperature * logits`` in tiles of
    :func:`_tiles` (rows, codes), at most :data:`TILE_ELEMS` logits each on the torch backend:
    each row's log-sum-exp (N,) and, with ``column_sums``, the column sums of the probabilities
    over the rows ``mask`` keeps (K,), else None."""
    out = soft_assign(
        z32, codes32, temperature=1.0 / inv_temperature, similarity="dot" if cosine else "neg_dist",
        mask=mask, eps=VQP_DIST_EPS, chunk=_tiles(chunk, codes32.shape[0]),
        column_sums=column_sums, expected_code=False, expected_logit=False,
    )  # fmt: skip
    return out.lse, out.column_sums


def _logit_at(z32: torch.Tensor, codes32: torch.Tensor, y: torch.Tensor, cosine: bool):
    """vqp's logit of each row's code ``y`` (N,) (as :func:`fastvq.sampling.vqp_logits`, same
    operation order), differentiable: O(N D), the codes gathered."""
    c = codes32[y]
    dot = (z32 * c).sum(dim=1)
    if cosine:
        return dot
    d2 = (z32.square().sum(dim=1) + c.square().sum(dim=1)) + dot * -2
    return -d2.clamp(min=VQP_DIST_SQ_FLOOR).sqrt()


def _neg_mean_entropy(avg: torch.Tensor) -> torch.Tensor:
    """vqp's ``-entropy(avg_prob).mean()``, its ``log`` clamped at 1e-5 as vqp's ``entropy``."""
    ent = (-avg * torch.log(avg.clamp(min=VQP_ENTROPY_EPS))).sum(dim=-1)
    return -ent.mean()


def diversity_loss(
    z: torch.Tensor,
    codes: torch.Tensor,
    *,
    temperature: float = 100.0,
    chunk: int = 4096,
    cosine: bool = False,
) -> torch.Tensor:
    """vqp's codebook diversity loss on :func:`fastvq.soft_assign`: no N x K (or chunk x K) tensor.

    vqp (``codebook_diversity_loss_weight > 0``)::

        prob     = softmax(temperature * logits)        # (..., T, K), logits = -||z - c||
        avg_prob = prob averaged over every dim but T   # (T, K)
        loss     = -mean_t entropy(avg_prob[t])         # entropy(p) = -sum p log(max(p, 1e-5))

    Minimising it spreads the batch's soft assignments over the codebook. vqp's logits are the
    negative non-squared distance ``-max(||z - c||, 1e-4)`` (``z.c`` with ``cosine=True``, for
    inputs the caller has l2-normalised, as vqp's cosine codebook). ``prob`` summed over the rows
    is the op's column sums (similarity ``"neg_dist"``, or ``"dot"``, at temperature
    ``1 / temperature``); their gradient is the op's.

    vqp averages over the batch (and heads) separately for each sequence position T of its
    (B, T, D) input. A 2-D ``z`` (N, D) is one position (the mean over all N rows, the codebook's
    usage over the batch: vqp's value for an input of shape (N, 1, D)); a 3-D ``z`` (B, T, D) is
    vqp's per-position reduction exactly (fold heads into B, as vqp does), one op call per
    position.

    Args:
        z: (N, D) or (B, T, D) float32/float16/bfloat16; computed in fp32, differentiable.
        codes: (K, D) float32/float16/bfloat16, K >= 1, same device; differentiable.
        temperature: finite >= 0, vqp's ``codebook_diversity_temperature``.
        chunk: at most this many rows per tile, >= 1 (codes per tile so a tile holds at most
            :data:`TILE_ELEMS` logits; the torch backend's tiles).
        cosine: logits ``z.c`` instead of ``-||z - c||``.

    Returns:
        fp32 scalar; 0 for no rows. Gradients (first order) are those of the literal formula.
        The per-position means take O(T x K) memory: a long sequence with a small batch brings
        back an N x K sized buffer, inherent to vqp's per-position definition; pass 2-D rows for
        the batch-wide loss.
    """
    check_rows_codes(z, codes, z_shape="(N, D) or (B, T, D)", z_ndims=(2, 3))
    return _diversity(z, codes, None, temperature, chunk, cosine)


def _diversity(z, codes, mask, temperature, chunk, cosine) -> torch.Tensor:
    """:func:`diversity_loss` (checked arguments) over the rows of a 2-D ``z`` where the bool
    ``mask`` (N,) is True (None: every row): the op leaves the masked rows out (no host sync and
    no data-dependent shape: ``torch.compile(fullgraph=True)`` traces it)."""
    t = check_temperature("temperature", temperature)
    chunk = check_int("chunk", chunk, 1)
    positions = z.shape[1] if z.dim() == 3 else 1
    if z.dim() == 3 and positions == 0:
        return torch.zeros((), dtype=torch.float32, device=z.device)
    # fp32 copies through autograd (the casts' backward returns z's and codes' dtypes)
    z32 = z.reshape(-1, z.shape[-1]).to(torch.float32)
    codes32 = codes.to(torch.float32)
    n, k = z32.shape[0], codes32.shape[0]
    if mask is None:
        mask = torch.ones((n,), dtype=torch.bool, device=z.device)
        batch = torch.full((), max(n // positions, 1), dtype=torch.float32, device=z.device)
    else:
        batch = mask.sum().clamp(min=1).to(torch.float32)
    if t == 0.0:
        # softmax(0 * logits) is uniform whatever z and codes: each counted row adds 1/K to every
        # code, and no gradient flows (the zero products keep both inputs in the graph)
        rows = mask.to(torch.float32).reshape(-1, positions).sum(dim=0)
        zero = (z32.sum() + codes32.sum()) * 0.0
        return _neg_mean_entropy((rows / (k * batch))[:, None].expand(positions, k)) + zero
    if positions == 1:
        col = _soft_assign_rows(z32, codes32, mask, t, chunk, cosine, True)[1][None]
    else:  # row b * T + t sits at position t
        zp, mp = z32.reshape(-1, positions, z32.shape[1]), mask.reshape(-1, positions)
        col = torch.stack([
            _soft_assign_rows(zp[:, i], codes32, mp[:, i], t, chunk, cosine, True)[1]
            for i in range(positions)
        ])  # fmt: skip
    return _neg_mean_entropy(col / batch)


def ce_commitment_loss(
    z: torch.Tensor,
    codes: torch.Tensor,
    indices: torch.Tensor,
    *,
    chunk: int = 4096,
    cosine: bool = False,
) -> torch.Tensor:
    """vqp's cross-entropy commitment loss (``commitment_use_cross_entropy_loss``), on
    :func:`fastvq.soft_assign`.

    ``cross_entropy(logits, indices, ignore_index=-1)``, the mean over the rows whose index is
    not -1, with vqp's logits: the negative NON-SQUARED distance ``-max(||z - c_k||, 1e-4)``, no
    temperature (``z.c`` with ``cosine=True``, for inputs the caller has l2-normalised). vqp
    passes the selected codes as ``indices``, masked rows set to -1. Per row, the op's
    log-sum-exp (similarity ``"neg_dist"`` or ``"dot"``) minus the logit at ``indices``: no
    N x K (or chunk x K) tensor.

    Args:
        z: (N, D) float32/float16/bfloat16 rows; computed in fp32, differentiable.
        codes: (K, D) float32/float16/bfloat16 codes, K >= 1, same device; differentiable.
        indices: int64 (N,) in [0, K), or -1 to ignore a row.
        chunk: at most this many rows per tile, >= 1 (the torch backend's tiles).
        cosine: logits ``z.c`` instead of ``-||z - c||``.

    Returns:
        fp32 scalar; 0 when no row counts (N = 0 or every index -1, where torch's and so vqp's
        mean is NaN). Gradients (first order) are those of the literal formula. An index outside
        [-1, K) raises ValueError on CPU; on other devices, and on CPU under ``torch.compile``,
        it makes the loss NaN instead (the check would cost a device sync, or a graph break).
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
    # eager on CPU: raise (one pass over the indices). Elsewhere, and under torch.compile (where
    # a data-dependent raise cannot trace), no host sync: a bad index makes the loss NaN.
    check_on_host = indices.device.type == "cpu" and not torch.compiler.is_compiling()
    if check_on_host and bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"indices must lie in [0, K) = [0, {k}) or be -1 (ignored); got indices[{first}] = "
            f"{int(indices[first])}"
        )
    y = torch.where(bad, -1, indices)
    valid = y >= 0
    count = valid.sum().clamp(min=1).to(torch.float32)
    # ignored rows are zeroed before the logits: a NaN there reaches neither loss nor gradient
    z32 = torch.where(valid[:, None], z.to(torch.float32), 0.0)
    codes32 = codes.to(torch.float32)
    lse, _ = _soft_assign_rows(z32, codes32, valid, 1.0, chunk, cosine, False)
    picked = _logit_at(z32, codes32, y.clamp(min=0), cosine)
    loss = torch.where(valid, lse - picked, 0.0).sum() / count
    return loss if check_on_host else torch.where(bad.any(), torch.nan, loss)
