"""vqp's auxiliary codebook losses as pure functions, without vqp's N x K distance matrices.

vector-quantize-pytorch 1.32 ("vqp") offers three auxiliary losses; here each is a function of
its tensors, with vqp's exact value and gradient:

- :func:`orthogonal_loss`: orthogonal regularisation of the codes (Shin et al. 2021, eq. 2), on
  all codes, the active ones, or a random subset;
- :func:`diversity_loss`: the codebook diversity loss, minus the entropy of the mean code
  distribution ``softmax(temperature * logits)``;
- :func:`ce_commitment_loss`: the cross-entropy commitment loss, ``cross_entropy(logits, idx)``.

The last two need vqp's logits, its NEGATIVE NON-SQUARED distance ``-max(||z - c||, 1e-4)``
(``z.c`` for its cosine codebook), for every row and code. Here they are computed over tiles of
rows AND codes (at most :data:`TILE_ELEMS` logits, 4 MiB, per tile): the forward streams each
row's logsumexp over the code tiles (running max and rescaled sum), and the backward recomputes
each tile's probabilities from that saved logsumexp. Working memory is a few tiles plus O(N + K)
vectors (the diversity loss's T x K means too), never N x K or chunk x K, and the gradient is the
one of the literal full formula. The tile loops run inside ``torch.library.custom_op``s, so
``torch.compile(fullgraph=True)`` traces both losses as single ops. Both are first-order only (no
double backward).
"""

from __future__ import annotations

import torch

from ._checks import check_float, check_int, check_same_device, check_tensor
from .sampling import VQP_DIST_SQ_FLOOR, check_rows_codes, check_temperature

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


# --- tiled losses over vqp's logits -------------------------------------------------------------

# fp32 values in one (rows x codes) tile of logits: 4 MiB. A forward or backward holds a few
# such tiles at once, so its working memory is a few MiB whatever N and K.
TILE_ELEMS = 1 << 20


def _tiles(chunk: int, k: int) -> tuple[int, int]:
    """(rows, codes) per tile, at most ``chunk`` rows. When 128 or more rows' logits over all K
    codes fit in one tile, the tile holds them all (one pass over the codes instead of two for
    the diversity loss); otherwise tiles of up to 512 rows (code tiles of a few hundred KiB that
    stay in cache). A tile holds at most :data:`TILE_ELEMS` values."""
    whole = TILE_ELEMS // k
    rows = min(chunk, whole if whole >= 128 else 512)
    return rows, max(1, min(k, TILE_ELEMS // rows))


def _tile_logits(zt, zsq, ct, csq, cosine):
    """vqp's logits of a tile (as :func:`fastvq.sampling.vqp_logits`, same operation order) and
    the unclamped squared distances (None for cosine), for the backward's clamp mask."""
    if cosine:
        return zt @ ct.t(), None
    d2 = torch.addmm(zsq[:, None] + csq[None, :], zt, ct.t(), alpha=-2.0)  # (|z|^2+|c|^2) - 2 z.c
    return d2.clamp(min=VQP_DIST_SQ_FLOOR).sqrt_().neg_(), d2


def _row_lse(zt, zsq, codes, csq, temperature, cosine, ctile, y=None):
    """Per row of a row tile: ``logsumexp_k(temperature * logits)`` as ``(max, log(sum))``
    (kept apart, so ``exp((x - max) - log(sum))`` rounds as ``softmax``), streamed over code tiles
    (running max and rescaled sum), and with ``y`` (local -1 = none) the logit ``logits[i, y_i]``.
    """
    m = torch.full((zt.shape[0],), float("-inf"), dtype=torch.float32, device=zt.device)
    s = torch.zeros_like(m)
    picked = torch.zeros_like(m) if y is not None else None
    for c0 in range(0, codes.shape[0], ctile):
        c1 = min(c0 + ctile, codes.shape[0])
        x, _ = _tile_logits(zt, zsq, codes[c0:c1], csq[c0:c1], cosine)
        if y is not None:
            local = y - c0
            inside = (local >= 0) & (local < c1 - c0)
            got = x.gather(1, local.clamp(0, c1 - c0 - 1)[:, None])[:, 0]
            picked = torch.where(inside, got, picked)
        if temperature != 1.0:
            x = x.mul_(temperature)
        m_new = torch.maximum(m, x.amax(dim=1))
        s = s * torch.exp(m - m_new) + torch.exp(x.sub_(m_new[:, None])).sum(dim=1)
        m = m_new
    return m, s.log(), picked


def _row_tiles(z32: torch.Tensor, chunk: int):
    """``(r0, r1, rows, their squared norms)`` for each tile of ``chunk`` rows of ``z32``."""
    n = z32.shape[0]
    for r0 in range(0, n, chunk):
        r1 = min(r0 + chunk, n)
        zt = z32[r0:r1]
        yield r0, r1, zt, zt.square().sum(dim=1)


def _accumulate_grads(gz, gc, zt, zsq, ct, csq, r0, c0, g, d2, logits, cosine, need_z, need_c):
    """Add a tile's share of the gradients, from ``g`` = d loss / d logits (rows x codes)."""
    c1 = c0 + ct.shape[0]
    if cosine:  # logits = z c^T
        h = g
    else:  # logits = -sqrt(max(d2, floor)), d2 = |z|^2 + |c|^2 - 2 z.c; clamp passes d2 >= floor
        # d logits / d z_i = (z_i - c_j) / logits_ij, d logits / d c_j = (c_j - z_i) / logits_ij
        h = g.div_(logits).masked_fill_(d2 < VQP_DIST_SQ_FLOOR, 0.0)
    if need_z:
        if cosine:
            gz[r0 : r0 + zt.shape[0]].addmm_(h, ct)
        else:
            gz_t = torch.addmm(zt * h.sum(dim=1)[:, None], h, ct, alpha=-1.0)
            gz[r0 : r0 + zt.shape[0]] += gz_t
    if need_c:
        if cosine:
            gc[c0:c1].addmm_(h.t(), zt)
        else:
            gc[c0:c1] += torch.addmm(ct * h.sum(dim=0)[:, None], h.t(), zt, alpha=-1.0)


@torch.library.custom_op("fastvq::ce_commitment_fwd", mutates_args=())
def _ce_fwd_op(
    z32: torch.Tensor, codes32: torch.Tensor, y: torch.Tensor, chunk: int, cosine: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: ``logsumexp_k logits`` as (2, N) ``(max, log(sum))``, and ``logits[i, y_i]``
    (0 where y = -1)."""
    n, k = z32.shape[0], codes32.shape[0]
    lse = torch.zeros((2, n), dtype=torch.float32, device=z32.device)
    picked = torch.zeros((n,), dtype=torch.float32, device=z32.device)
    csq = codes32.square().sum(dim=1)
    chunk, ctile = _tiles(chunk, k)
    for r0, r1, zt, zsq in _row_tiles(z32, chunk):
        lse[0, r0:r1], lse[1, r0:r1], picked[r0:r1] = _row_lse(
            zt, zsq, codes32, csq, 1.0, cosine, ctile, y[r0:r1]
        )
    return lse, picked


@_ce_fwd_op.register_fake
def _(z32, codes32, y, chunk, cosine):
    n = z32.shape[0]
    return z32.new_empty((2, n), dtype=torch.float32), z32.new_empty((n,), dtype=torch.float32)


@torch.library.custom_op("fastvq::ce_commitment_bwd", mutates_args=())
def _ce_bwd_op(
    z32: torch.Tensor,
    codes32: torch.Tensor,
    y: torch.Tensor,
    lse: torch.Tensor,
    scale: torch.Tensor,
    chunk: int,
    cosine: bool,
    need_z: bool,
    need_c: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``sum_i scale_i (lse_i - logits[i, y_i])``: d/d logits = scale (p - onehot)."""
    k = codes32.shape[0]
    gz, gc = torch.zeros_like(z32), torch.zeros_like(codes32)
    if not (need_z or need_c):
        return gz, gc
    csq = codes32.square().sum(dim=1)
    chunk, ctile = _tiles(chunk, k)
    for r0, r1, zt, zsq in _row_tiles(z32, chunk):
        s, yt, mt, lt = scale[r0:r1], y[r0:r1], lse[0, r0:r1, None], lse[1, r0:r1, None]
        for c0 in range(0, k, ctile):
            c1 = min(c0 + ctile, k)
            ct = codes32[c0:c1]
            logits, d2 = _tile_logits(zt, zsq, ct, csq[c0:c1], cosine)
            g = (logits - mt).sub_(lt).exp_().mul_(s[:, None])
            local = yt - c0
            inside = (local >= 0) & (local < c1 - c0)
            g.scatter_add_(
                1, local.clamp(0, c1 - c0 - 1)[:, None], torch.where(inside, -s, 0.0)[:, None]
            )
            _accumulate_grads(gz, gc, zt, zsq, ct, csq[c0:c1], r0, c0, g, d2, logits, cosine,
                              need_z, need_c)  # fmt: skip
    return gz, gc


@_ce_bwd_op.register_fake
def _(z32, codes32, y, lse, scale, chunk, cosine, need_z, need_c):
    return torch.empty_like(z32), torch.empty_like(codes32)


@torch.library.custom_op("fastvq::diversity_fwd", mutates_args=())
def _div_fwd_op(
    z32: torch.Tensor,
    codes32: torch.Tensor,
    weight: torch.Tensor,
    temperature: float,
    chunk: int,
    positions: int,
    cosine: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_i weight_i softmax(temperature * logits_i)`` per position (T, K), row r at position
    ``r mod T``, and each row's ``logsumexp(temperature * logits_i)``: two passes over the codes
    per row tile, the first for the logsumexp, the second for the probabilities."""
    n, k = z32.shape[0], codes32.shape[0]
    acc = torch.zeros((positions, k), dtype=torch.float32, device=z32.device)
    lse = torch.zeros((2, n), dtype=torch.float32, device=z32.device)
    csq = codes32.square().sum(dim=1)
    chunk, ctile = _tiles(chunk, k)
    pos = torch.arange(n, device=z32.device) % positions
    for r0, r1, zt, zsq in _row_tiles(z32, chunk):
        w = weight[r0:r1, None]
        if ctile >= k:  # all codes in one tile: one pass, softmax's own rounding
            x = _tile_logits(zt, zsq, codes32, csq, cosine)[0].mul_(temperature)
            mt = x.amax(dim=1)
            p = x.sub_(mt[:, None]).exp_()
            s = p.sum(dim=1)
            lse[0, r0:r1], lse[1, r0:r1] = mt, s.log()
            p = p.mul_(w / s[:, None])
            if positions == 1:
                acc[0] += p.sum(dim=0)
            else:
                acc.index_add_(0, pos[r0:r1], p)
            continue
        mt, lt, _ = _row_lse(zt, zsq, codes32, csq, temperature, cosine, ctile)
        lse[0, r0:r1], lse[1, r0:r1] = mt, lt
        for c0 in range(0, k, ctile):
            c1 = min(c0 + ctile, k)
            x, _ = _tile_logits(zt, zsq, codes32[c0:c1], csq[c0:c1], cosine)
            p = x.mul_(temperature).sub_(mt[:, None]).sub_(lt[:, None]).exp_().mul_(w)
            if positions == 1:
                acc[0, c0:c1] += p.sum(dim=0)
            else:
                acc[:, c0:c1].index_add_(0, pos[r0:r1], p)
    return acc, lse


@_div_fwd_op.register_fake
def _(z32, codes32, weight, temperature, chunk, positions, cosine):
    return (
        z32.new_empty((positions, codes32.shape[0]), dtype=torch.float32),
        z32.new_empty((2, z32.shape[0]), dtype=torch.float32),
    )


@torch.library.custom_op("fastvq::diversity_bwd", mutates_args=())
def _div_bwd_op(
    z32: torch.Tensor,
    codes32: torch.Tensor,
    weight: torch.Tensor,
    lse: torch.Tensor,
    g_acc: torch.Tensor,
    temperature: float,
    chunk: int,
    positions: int,
    cosine: bool,
    need_z: bool,
    need_c: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients through :func:`_div_fwd_op`'s sums given ``g_acc`` (T, K) = d loss / d sums.

    With ``a_ij = weight_i g_acc[pos_i, j]`` and ``p = softmax(temperature * logits)``,
    d loss / d logits = ``temperature * p * (a - sum_k p_ik a_ik)``: per row tile one pass over
    the codes for the row sums, one for the gradients."""
    n, k = z32.shape[0], codes32.shape[0]
    gz, gc = torch.zeros_like(z32), torch.zeros_like(codes32)
    if not (need_z or need_c):
        return gz, gc
    csq = codes32.square().sum(dim=1)
    chunk, ctile = _tiles(chunk, k)
    pos = torch.arange(n, device=z32.device) % positions
    for r0, r1, zt, zsq in _row_tiles(z32, chunk):
        mt, lt = lse[0, r0:r1, None], lse[1, r0:r1, None]
        w, pt = weight[r0:r1, None], pos[r0:r1]

        def tile(c0, c1):
            logits, d2 = _tile_logits(zt, zsq, codes32[c0:c1], csq[c0:c1], cosine)  # noqa: B023
            p = (logits * temperature).sub_(mt).sub_(lt).exp_()  # noqa: B023
            a = (g_acc[0, c0:c1][None, :] if positions == 1 else g_acc[pt, c0:c1]) * w  # noqa: B023
            return logits, d2, p, a

        if ctile >= k:  # all codes in one tile: one pass
            logits, d2, p, a = tile(0, k)
            g = a.sub_((p * a).sum(dim=1)[:, None]).mul_(p).mul_(temperature)
            _accumulate_grads(gz, gc, zt, zsq, codes32, csq, r0, 0, g, d2, logits, cosine,
                              need_z, need_c)  # fmt: skip
            continue
        r = torch.zeros((r1 - r0,), dtype=torch.float32, device=z32.device)
        for c0 in range(0, k, ctile):
            _, _, p, a = tile(c0, min(c0 + ctile, k))
            r += (p * a).sum(dim=1)
        for c0 in range(0, k, ctile):
            c1 = min(c0 + ctile, k)
            logits, d2, p, a = tile(c0, c1)
            g = a.sub_(r[:, None]).mul_(p).mul_(temperature)
            _accumulate_grads(gz, gc, zt, zsq, codes32[c0:c1], csq[c0:c1], r0, c0, g, d2,
                              logits, cosine, need_z, need_c)  # fmt: skip
    return gz, gc


@_div_bwd_op.register_fake
def _(z32, codes32, weight, lse, g_acc, temperature, chunk, positions, cosine, need_z, need_c):
    return torch.empty_like(z32), torch.empty_like(codes32)


def _neg_mean_entropy(avg: torch.Tensor) -> torch.Tensor:
    """vqp's ``-entropy(avg_prob).mean()``, its ``log`` clamped at 1e-5 as vqp's ``entropy``."""
    ent = (-avg * torch.log(avg.clamp(min=VQP_ENTROPY_EPS))).sum(dim=-1)
    return -ent.mean()


def _neg_mean_entropy_grad(avg: torch.Tensor) -> torch.Tensor:
    """d :func:`_neg_mean_entropy` / d avg: ``(log(max(avg, 1e-5)) + [avg >= 1e-5]) / T``."""
    ok = avg >= VQP_ENTROPY_EPS
    return (torch.log(avg.clamp(min=VQP_ENTROPY_EPS)) + ok.to(avg.dtype)) / avg.shape[0]


class _DiversityLoss(torch.autograd.Function):
    """Forward: the weighted probability sums per position (one tiled op) over ``batch`` (a
    number or a 0-dim tensor). Backward: the loss's gradient wrt those sums (T x K), then one
    tiled op that recomputes the probabilities from the saved per-row logsumexp."""

    @staticmethod
    def forward(ctx, z32, codes32, weight, batch, temperature, chunk, positions, cosine):
        acc, lse = _div_fwd_op(z32, codes32, weight, temperature, chunk, positions, cosine)
        avg = acc / batch
        ctx.save_for_backward(z32, codes32, weight, lse, avg, batch)
        ctx.args = (temperature, chunk, positions, cosine)
        return _neg_mean_entropy(avg)

    @staticmethod
    def backward(ctx, grad):
        z32, codes32, weight, lse, avg, batch = ctx.saved_tensors
        temperature, chunk, positions, cosine = ctx.args
        g_acc = _neg_mean_entropy_grad(avg) * (grad / batch)
        gz, gc = _div_bwd_op(
            z32, codes32, weight, lse, g_acc, temperature, chunk, positions, cosine,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )  # fmt: skip
        return gz, gc, None, None, None, None, None, None


def diversity_loss(
    z: torch.Tensor,
    codes: torch.Tensor,
    *,
    temperature: float = 100.0,
    chunk: int = 4096,
    cosine: bool = False,
) -> torch.Tensor:
    """vqp's codebook diversity loss, tiled over rows and codes: no N x K (or chunk x K) tensor.

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
        chunk: at most this many rows per tile, >= 1 (codes per tile so a tile holds at most
            :data:`TILE_ELEMS` logits).
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
    ``mask`` (N,) is True (None: every row): the masked rows weigh 0 and are zeroed, so no host
    sync and no data-dependent shape (``torch.compile(fullgraph=True)`` traces it)."""
    t = check_temperature("temperature", temperature)
    chunk = check_int("chunk", chunk, 1)
    positions = z.shape[1] if z.dim() == 3 else 1
    if z.dim() == 3 and positions == 0:
        return torch.zeros((), dtype=torch.float32, device=z.device)
    # fp32 copies through autograd (the casts' backward returns z's and codes' dtypes)
    z32 = z.reshape(-1, z.shape[-1]).to(torch.float32)
    codes32 = codes.to(torch.float32)
    if mask is None:
        weight = torch.ones((z32.shape[0],), dtype=torch.float32, device=z.device)
        batch = torch.full((), max(z32.shape[0] // positions, 1), dtype=torch.float32,
                           device=z.device)  # fmt: skip
    else:
        z32 = torch.where(mask[:, None], z32, 0.0)  # a NaN in a masked row reaches nothing
        weight = mask.to(torch.float32)
        batch = weight.sum().clamp(min=1.0)
    return _DiversityLoss.apply(z32, codes32, weight, batch, t, chunk, positions, bool(cosine))


class _CECommitment(torch.autograd.Function):
    """Forward: each row's logsumexp and picked logit (one tiled op). Backward: one tiled op that
    recomputes the probabilities from the saved logsumexp."""

    @staticmethod
    def forward(ctx, z32, codes32, y, count, chunk, cosine):
        lse, picked = _ce_fwd_op(z32, codes32, y, chunk, cosine)
        valid = y >= 0
        ctx.save_for_backward(z32, codes32, y, lse, count)
        ctx.args = (chunk, cosine)
        return torch.where(valid, (lse[0] - picked) + lse[1], 0.0).sum() / count

    @staticmethod
    def backward(ctx, grad):
        z32, codes32, y, lse, count = ctx.saved_tensors
        chunk, cosine = ctx.args
        scale = torch.where(y >= 0, grad / count, 0.0)
        gz, gc = _ce_bwd_op(
            z32, codes32, y, lse, scale, chunk, cosine,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )  # fmt: skip
        return gz, gc, None, None, None, None


def ce_commitment_loss(
    z: torch.Tensor,
    codes: torch.Tensor,
    indices: torch.Tensor,
    *,
    chunk: int = 4096,
    cosine: bool = False,
) -> torch.Tensor:
    """vqp's cross-entropy commitment loss (``commitment_use_cross_entropy_loss``), tiled.

    ``cross_entropy(logits, indices, ignore_index=-1)``, the mean over the rows whose index is
    not -1, with vqp's logits: the negative NON-SQUARED distance ``-max(||z - c_k||, 1e-4)``, no
    temperature (``z.c`` with ``cosine=True``, for inputs the caller has l2-normalised). vqp
    passes the selected codes as ``indices``, masked rows set to -1. Tiled over rows and codes:
    no N x K (or chunk x K) tensor.

    Args:
        z: (N, D) float32/float16/bfloat16 rows; computed in fp32, differentiable.
        codes: (K, D) float32/float16/bfloat16 codes, K >= 1, same device; differentiable.
        indices: int64 (N,) in [0, K), or -1 to ignore a row.
        chunk: at most this many rows per tile, >= 1.
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
    count = (y >= 0).sum().clamp(min=1).to(torch.float32)
    # ignored rows are zeroed before the logits: a NaN there reaches neither loss nor gradient
    z32 = torch.where((y >= 0)[:, None], z.to(torch.float32), 0.0)
    loss = _CECommitment.apply(z32, codes.to(torch.float32), y, count, chunk, bool(cosine))
    return loss if check_on_host else torch.where(bad.any(), torch.nan, loss)
