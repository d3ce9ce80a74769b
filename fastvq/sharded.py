"""Sharded codebook (model-parallel search): each of R ranks holds a contiguous shard of K codes.

Forward, for the rows ``z`` of every rank (per-rank batch sizes may differ, zero included):

1. all-gather the per-rank row counts, then the rows (padded to the largest count, sent as bytes);
2. each rank searches its shard for every gathered row (``fastvq.search``: no N x K tensor);
3. one ``all_reduce(MIN)`` over an int64 key per row picks the global winner:
   ``key = bits(err) << 32 | global_index``. ``err = sum_d (z - c)^2`` is the non-negative fp32
   squared error that the search already returns, so its IEEE bits order like its values and the
   lowest key is (smallest error, then lowest global index);
4. the owner of each row's winning code fills that row, every other rank leaves zeros, and one
   ``reduce_scatter`` (a byte-wise SUM: exactly one rank is non-zero, so it is a bitwise copy)
   returns each rank its own rows' codes.

Why pack ``err`` and not the GEMM distance ``||c||^2 - 2 z.c`` that the search minimises: ``err`` is
computed by one fixed formula from (row, code) values, so duplicate codes in different shards give
bitwise-equal keys and the tie goes to the lowest global index, as in the unsharded op; a GEMM
value for the same code can round differently at different tile offsets and may be negative. The
price: inside a shard codes are ranked by the GEMM distance, across shards by ``err``, so the
winner can differ from the unsharded op's only when two codes' distances differ by rounding.

Backward (the owner of a shard computes its gradient from every rank's rows, so no codebook
gradient is communicated; one all-gather of R scalars carries the upstream loss gradients):

    grad_shard = (1/R) sum_r  g_r * 2/(n_r D) * sum_{i in rank r, idx_i in shard} (c_idx_i - z_i)

which is exactly what DDP computes for an unsharded codebook: each rank's gradient of its own loss
(mean over its n_r rows), averaged over the R ranks. With equal per-rank batches this is the
gradient of the mean loss over the concatenated batch. ``z``'s gradient is local and identical to
the unsharded op's (straight-through plus commitment).

Shard parameters must be kept out of DDP (it would average different shards, and it checks that
parameter shapes agree across ranks): see :func:`ddp_ignore_shards`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import _dist
from ._checks import check_same_device
from .codebook import Codebook, batch_statistics, in_backward
from .functional import (
    VectorQuantizeFunction,
    VQOutput,
    _check_inputs,
    check_beta,
    grad_z,
    vq_loss,
)
from .layer import check_input, flat_state_hooks
from .ops import _scatter_rows_unchecked, resolve_backend, search
from .streams import fresh_generator

# Keys: high 32 bits = IEEE bits of the non-negative fp32 error, low 32 bits = global code index.
_INDEX_BITS = 32
_INDEX_MASK = (1 << _INDEX_BITS) - 1
_WORST_ERR_BITS = 0x7FFFFFFF  # above +inf's bits: NaN errors sort last
_NO_CANDIDATE = torch.iinfo(torch.int64).max  # an empty shard, or a rank that must not win
MAX_CODES = 1 << 31


def shard_range(num_codes: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, end)`` of the codes held by ``rank`` out of ``world``: contiguous, in rank order,
    the first ``num_codes % world`` ranks hold one code more. Ranks beyond ``num_codes`` hold none.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    if num_codes < 0:
        raise ValueError(f"num_codes must be >= 0, got {num_codes}")
    base, extra = divmod(num_codes, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def pack_keys(err: torch.Tensor, global_indices: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like ``(err, global_index)`` for ``err >= 0`` fp32 (NaN sorts last)."""
    bits = err.abs().view(torch.int32).to(torch.int64)  # abs: -0.0 -> +0.0, NaN sign cleared
    bits = torch.where(torch.isnan(err), torch.full_like(bits, _WORST_ERR_BITS), bits)
    return (bits << _INDEX_BITS) | global_indices


def unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_keys`: ``(global_indices int64, err fp32)``."""
    err = (keys >> _INDEX_BITS).to(torch.int32).view(torch.float32)
    return keys & _INDEX_MASK, err


def rank_and_world(group=None) -> tuple[int, int]:
    """``(rank, world)`` in ``group``; ``(0, 1)`` when torch.distributed is not initialised."""
    return _dist.rank(group), _dist.world_size(group)


class ShardedSearch(NamedTuple):
    """Result of :func:`sharded_search` on one rank.

    indices: int64 (n,) global code index of each local row.
    codes: (n, D) in the shard's dtype, the winning code of each local row (bitwise).
    err: fp32 (n,) ``sum_d (z - code)^2`` of each local row.
    rows: (N_total, D) every rank's rows in rank order (z's dtype), for the owner's statistics.
    row_indices: int64 (N_total,) global winner of each of ``rows``.
    sizes: per-rank row counts (list of R ints).
    row_err: fp32 (N_total,) the winning error of each of ``rows``; non-finite exactly for rows
        holding NaN/Inf (or whose error overflows), which statistics leave out.
    """

    indices: torch.Tensor
    codes: torch.Tensor
    err: torch.Tensor
    rows: torch.Tensor
    row_indices: torch.Tensor
    sizes: list[int]
    row_err: torch.Tensor


@torch.no_grad()
def sharded_search(
    z2d: torch.Tensor, shard: torch.Tensor, num_codes: int, group=None, backend: str = "auto"
) -> ShardedSearch:
    """Nearest code among all ranks' shards for each local row; a collective (every rank calls it).

    Args:
        z2d: (n, D) this rank's rows (n may differ between ranks, 0 allowed).
        shard: (end - start, D) this rank's codes, ``(start, end) = shard_range(num_codes, r, R)``.
        num_codes: K, the global codebook size (1 <= K < 2^31).
        group: process group (default: the world).
        backend: search backend, "auto", "torch" or "triton".

    Returns:
        :class:`ShardedSearch`. Ties (bitwise-equal errors) go to the lowest global index; a row
        holding NaN/Inf gets index 0 and a non-finite code is never selected (as unsharded).
    """
    rank, world = rank_and_world(group)
    start, end = shard_range(num_codes, rank, world)
    dev, d = z2d.device, z2d.shape[1]
    n = z2d.shape[0]
    if not dist.is_initialized():  # one process: the shard is the whole codebook
        idx, _, err = search(z2d, shard, backend)
        return ShardedSearch(idx, shard.index_select(0, idx), err, z2d, idx, [n], err)

    # 1. Row counts, then the rows (padded to the largest count), in rank order. The counts
    # travel with what every rank must agree on (K, D, dtypes): a free consistency check on
    # every call, since this exchange syncs the host anyway.
    meta = [n, num_codes, d, _DTYPE_CODES[z2d.dtype], _DTYPE_CODES[shard.dtype]]
    table = _dist.all_gather_cat(torch.tensor([meta], device=dev), group).tolist()  # host sync
    _check_meta(table)
    sizes = [row[0] for row in table]
    n_max, n_total = max(sizes), sum(sizes)
    offset = sum(sizes[:rank])
    if n_total == 0:  # every rank sees the same sizes, so every rank returns here together
        empty = torch.empty(0, dtype=torch.int64, device=dev)
        err0 = z2d.new_empty(0, dtype=torch.float32)
        return ShardedSearch(
            empty, shard.new_empty((0, d)), err0, z2d.new_empty((0, d)), empty, sizes, err0,
        )  # fmt: skip
    rows, pos = _dist.all_gather_padded(z2d, sizes, group)  # pos: real rows in the padded layout

    # 2. Search this shard, 3. one all_reduce(MIN) over the packed keys.
    if end > start:
        local_idx, _, err = search(rows, shard, backend)
        # A shard holding only non-finite codes returns one with error NaN (packed last) or +inf:
        # any code with a finite error wins over it, as in the unsharded search.
        keys = pack_keys(err, local_idx + start)
    else:
        local_idx = torch.zeros(n_total, dtype=torch.int64, device=dev)
        keys = torch.full((n_total,), _NO_CANDIDATE, dtype=torch.int64, device=dev)
    if rank != 0:
        # A row holding NaN/Inf gets global index 0 (rank 0's first code), as in the unsharded op.
        row_ok = torch.isfinite(rows).all(dim=1)
        keys = torch.where(row_ok, keys, torch.full_like(keys, _NO_CANDIDATE))
    dist.all_reduce(keys, op=dist.ReduceOp.MIN, group=group)
    row_indices, row_err = unpack_keys(keys)

    # 4. Owner-filled codes, reduce-scattered back to the rank that holds each row.
    mine = (row_indices >= start) & (row_indices < end)
    if end > start:
        owned = shard.index_select(0, local_idx)
        owned = torch.where(mine[:, None], owned, torch.zeros((), dtype=owned.dtype, device=dev))
    else:
        owned = shard.new_zeros((n_total, d))
    if pos is None:
        send = owned
    else:
        send = shard.new_zeros((world * n_max, d)).index_copy_(0, pos, owned)
    recv = _dist.reduce_scatter_owned_(shard.new_empty((n_max, d)), send, group)

    local = slice(offset, offset + n)
    return ShardedSearch(
        row_indices[local], recv[:n], row_err[local].clone(), rows, row_indices, sizes, row_err
    )


_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_DTYPE_NAMES = {v: str(k).removeprefix("torch.") for k, v in _DTYPE_CODES.items()}


def _check_meta(table: list[list[int]]) -> None:
    """ValueError on every rank (all see the same table) when ranks disagree on K, D or dtypes:
    a differing K returns indices >= K on some rank, a differing D or dtype mixes the bytes of
    rows of different layouts."""
    names = ("num_codes", "D", "z dtype", "codebook shard dtype")
    for j, name in enumerate(names, start=1):
        values = [row[j] for row in table]
        if len(set(values)) > 1:
            if "dtype" in name:
                values = [_DTYPE_NAMES[v] for v in values]
            raise ValueError(
                f"sharded_vector_quantize: the ranks disagree on {name}: {values} (rank order); "
                "every rank must pass the same num_codes, D and dtypes"
            )


def shard_statistics(
    result: ShardedSearch, start: int, end: int, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shard owner's batch statistics over every rank's rows, for its codes ``[start, end)``:
    fp32 ``(counts (S,), sums (S, D))``, the all-reduced statistics of the unsharded layer.
    Rows holding NaN/Inf (non-finite error) are left out, as in the unsharded layer."""
    mine = (result.row_indices >= start) & (result.row_indices < end) & result.row_err.isfinite()
    return batch_statistics(result.row_indices - start, mine, result.rows, end - start, backend)


class ShardedVectorQuantizeFunction(torch.autograd.Function):
    """forward(z2d (n, D), shard (S, D), result, num_codes, beta, codebook_weight, group,
    backend) -> (quantized (n, D) in z's dtype, loss fp32 scalar), with ``result`` this call's
    :func:`sharded_search` of ``z2d`` (the indices are ``result.indices``).

    ``loss = (codebook_weight + beta) * mean((z - z_q)^2)`` over this rank's rows, as
    :class:`~fastvq.functional.VectorQuantizeFunction` (``codebook_weight=0``: an EMA shard)."""

    @staticmethod
    def forward(
        ctx, z2d, shard, res, num_codes, beta, codebook_weight, group, backend,
        rotation_trick=False,
    ):  # fmt: skip
        loss, _ = vq_loss(res.err, z2d.shape[1], beta, codebook_weight, None)
        ctx.save_for_backward(z2d, shard, res.codes, res.rows, res.row_indices)
        ctx.beta, ctx.group, ctx.sizes, ctx.num_codes = beta, group, res.sizes, num_codes
        ctx.codebook_weight, ctx.backend = codebook_weight, backend
        ctx.rotation_trick = rotation_trick
        return res.codes.to(z2d.dtype), loss

    @staticmethod
    def backward(ctx, grad_q, grad_loss):
        z2d, shard, codes, rows, row_indices = ctx.saved_tensors
        n, d = z2d.shape
        g = z2d.new_zeros((), dtype=torch.float32) if grad_loss is None else grad_loss.float()
        grad_z_out = grad_c = None
        if ctx.needs_input_grad[0]:  # local and identical to the unsharded op
            zf, zq = z2d.to(torch.float32), codes.to(torch.float32)
            rot = (zf, zq) if ctx.rotation_trick else None
            grad_z_out = grad_z(zq - zf, grad_q, g, ctx.beta, max(n * d, 1), z2d.dtype, None, rot)
        if ctx.needs_input_grad[1] and sum(ctx.sizes) > 0:
            # Every rank's loss gradient g_r, to weight its rows: 2 g_r / (n_r D) / R (DDP's mean).
            rank, world = rank_and_world(ctx.group)
            gs = _dist.all_gather_cat(g.reshape(1), ctx.group)
            start, end = shard_range(ctx.num_codes, rank, world)
            sizes = torch.tensor(ctx.sizes, dtype=torch.float32, device=z2d.device)
            w = gs * (2.0 * ctx.codebook_weight) / (sizes.clamp(min=1) * d * world)
            src = torch.repeat_interleave(
                torch.arange(world, device=z2d.device), torch.tensor(ctx.sizes, device=z2d.device)
            )
            mine = (row_indices >= start) & (row_indices < end)
            idx = row_indices[mine] - start
            owned = shard.detach().to(torch.float32).index_select(0, idx)  # (M, D)
            diff = (owned - rows[mine].to(torch.float32)) * w.index_select(0, src[mine])[:, None]
            grad_c = _scatter_rows_unchecked(idx, diff, end - start, backend=ctx.backend).to(
                shard.dtype
            )
        elif ctx.needs_input_grad[1]:
            grad_c = torch.zeros_like(shard)
        return grad_z_out, grad_c, None, None, None, None, None, None, None


def _check_shard(z, shard, num_codes, beta, group) -> tuple[int, int]:
    """Check the inputs of :func:`sharded_vector_quantize`; returns the shard's ``(start, end)``."""
    if (
        isinstance(num_codes, bool)
        or not isinstance(num_codes, int)
        or not 1 <= num_codes < MAX_CODES
    ):
        raise ValueError(f"num_codes must be an int in [1, 2^31), got {num_codes!r}")
    rank, world = rank_and_world(group)
    start, end = shard_range(num_codes, rank, world)
    if not isinstance(shard, torch.Tensor) or shard.dim() != 2 or shard.shape[0] != end - start:
        shape = tuple(shard.shape) if isinstance(shard, torch.Tensor) else type(shard).__name__
        raise ValueError(
            f"rank {rank} of {world} must hold codes [{start}, {end}) of K={num_codes}: a "
            f"({end - start}, D) shard (see shard_range), got {shape}"
        )
    # The op's own checks (dtypes, D, device, beta) on a non-empty stand-in for an empty shard.
    _check_inputs(z, shard if end > start else shard.new_zeros((1, shard.shape[1])), beta)
    return start, end


def sharded_vector_quantize(
    z: torch.Tensor,
    codebook_shard: torch.Tensor,
    *,
    num_codes: int,
    beta: float = 0.25,
    group=None,
    backend: str = "auto",
) -> VQOutput:
    """:func:`fastvq.vector_quantize` with the codebook sharded across the ranks of ``group``.

    A collective: every rank of ``group`` calls it (with its own rows, any count, zero included)
    and, when the shard requires grad, runs backward through its outputs.

    Args:
        z: (..., D) this rank's inputs, float32/float16/bfloat16.
        codebook_shard: (end - start, D) codes ``[start, end) = shard_range(num_codes, rank, R)``.
        num_codes: K, the global number of codes.
        beta: commitment weight.
        group: process group (default: the world). Without torch.distributed initialised, the
            shard is the whole codebook and this is ``vector_quantize``.
        backend: search backend ("auto", "torch", "triton").

    Returns:
        VQOutput(quantized, indices, loss) as :func:`fastvq.vector_quantize` on this rank's rows,
        with global indices. The shard's gradient is DDP's: the mean over ranks of the gradients of
        each rank's loss (module docstring); do not let DDP average it again.
    """
    _check_shard(z, codebook_shard, num_codes, beta, group)
    be = resolve_backend(backend, z.device)
    lead, d = z.shape[:-1], z.shape[-1]
    z2d = z.reshape(-1, d)
    if not dist.is_initialized():
        q2d, idx, loss, _ = VectorQuantizeFunction.apply(
            z2d, codebook_shard, float(beta), be, False
        )
    else:
        res = sharded_search(z2d, codebook_shard, num_codes, group, be)
        idx = res.indices
        q2d, loss = ShardedVectorQuantizeFunction.apply(
            z2d, codebook_shard, res, num_codes, float(beta), 1.0, group, be
        )
    return VQOutput(q2d.reshape(z.shape), idx.reshape(lead), loss)


@torch.no_grad()
def gather_codebook(shard: torch.Tensor, num_codes: int, group=None) -> torch.Tensor:
    """The full (K, D) codebook on every rank, from each rank's shard (a collective)."""
    _, world = rank_and_world(group)
    if world == 1:
        return shard.clone()
    sizes = [e - s for s, e in (shard_range(num_codes, r, world) for r in range(world))]
    return _dist.all_gather_padded(shard, sizes, group)[0]


def init_codes(start: int, end: int, dim: int, seed: int = 0, chunk: int = 4096) -> torch.Tensor:
    """Codes ``[start, end)`` of a K x dim codebook drawn from U(-sqrt(6/dim), sqrt(6/dim)) (the
    layer's kaiming-uniform scale), in chunks of ``chunk`` codes each seeded by ``(seed, chunk)``:
    the same codes whatever the number of ranks, and no rank ever draws the whole codebook."""
    bound = (6.0 / dim) ** 0.5
    parts = []
    for c in range(start // chunk, -(-end // chunk)):
        gen = fresh_generator(seed, "codes-init", member=c)
        block = torch.rand(chunk, dim, generator=gen) * (2 * bound) - bound
        lo, hi = max(start, c * chunk) - c * chunk, min(end, (c + 1) * chunk) - c * chunk
        parts.append(block[lo:hi])
    return torch.cat(parts) if parts else torch.empty(0, dim)


# The codebook's settings and state, read through to ``self.book``.
_BOOK_ATTRS = (
    "codebook", "cluster_size", "embed_avg", "steps_unused", "usage_counts", "initted",
    "decay", "eps", "kmeans_iters", "dead_code_steps", "restart_noise", "seed", "backend",
)  # fmt: skip
# What every rank must agree on (see VectorQuantizer's list).
_RANK_FIELDS = (
    "dim", "codebook_size", "codebook_dim", "ema", "beta", "decay", "eps", "training", "cosine",
    "kmeans initialised", "kmeans_iters", "dead_code_steps", "restart_noise", "seed",
)  # fmt: skip


class ShardedVectorQuantizer(nn.Module):
    """A VQ layer whose K codes are split across the ranks of ``group`` (model-parallel search).

    Each rank holds ``codebook`` = codes ``[start, end)`` of ``shard_range(K, rank, R)``. With
    ``ema=False`` the shard is an ``nn.Parameter`` trained by the loss's codebook term (its
    gradient is already DDP's mean over ranks); with ``ema=True`` it is a buffer updated in
    training forwards from every rank's rows, like ``VectorQuantizer(ema=True)`` under DDP::

        N_k <- g N_k + (1-g) n_k,  m_k <- g m_k + (1-g) s_k,
        c_k = m_k / ((N_k + eps) / (sum N + K eps) * sum N)      (sum over all K: one all_reduce)

    and the loss is ``beta`` * commitment. k-means init (on the rows of every rank) and dead-code
    restart run in :mod:`fastvq.codebook`, as for ``VectorQuantizer`` under DDP: every rank
    computes all K centres or replacements identically and keeps its slice, so the codes equal
    the unsharded layer's bit for bit. Not here: heads and masks.

    Wrap a model that contains it with DDP after :func:`ddp_ignore_shards`::

        model = Model(...)                # holds a ShardedVectorQuantizer
        ddp_ignore_shards(model)          # shards: no DDP broadcast, shape check or averaging
        model = DistributedDataParallel(model)

    Args:
        dim: D, the channels of the input (inputs are (..., dim)).
        codebook_size: K, the global number of codes.
        beta: commitment weight.
        ema: learn the codes by EMA (a buffer; the loss is then ``beta`` * commitment) instead
            of by the loss's codebook term (an ``nn.Parameter``, the default).
        decay: EMA decay gamma of the per-code counts and sums (with ``ema``).
        eps: EMA Laplace smoothing epsilon of the counts (with ``ema``).
        kmeans_init: k-means init on the first training batch of every rank (default off: the
            codes come from ``seed`` or ``codebook``; ignored when ``codebook`` is given).
        kmeans_iters: Lloyd iterations of that k-means.
        dead_code_steps: re-seed a code unused for this many training steps (as
            ``VectorQuantizer``; 0 = never).
        restart_noise: relative std of the noise added to a re-seeded code.
        codebook_dim: code dimension, with a linear projection in and out when it differs from
            ``dim`` (the projections are ordinary parameters: DDP averages them).
        cosine: l2-normalise inputs and codes.
        rotation_trick: the rotation trick's gradient to the input instead of straight-through
            (as ``VectorQuantizer``).
        group: the process group the codebook is sharded over (default: the world).
        backend: search backend.
        seed: seed of :func:`init_codes` (same codes for any number of ranks), of k-means and
            of the restart generators.
        codebook: optional full (K, codebook_dim) initial codebook (each rank keeps its slice).
        debug: check that the ranks agree on the layer's configuration at every forward, not
            only at the first (one small all-gather and a host sync). K, D and the dtypes are
            checked on every call in any case (they travel with the row counts).

    Rows holding NaN/Inf are left out of the EMA, usage, k-means and restart statistics (they
    still make the loss NaN/Inf).
    """

    def __init__(
        self, dim: int, codebook_size: int, *, beta: float = 0.25, ema: bool = False,
        decay: float = 0.99, eps: float = 1e-5, kmeans_init: bool = False, kmeans_iters: int = 10,
        dead_code_steps: int = 0, restart_noise: float = 0.01, codebook_dim: int | None = None,
        cosine: bool = False, group=None, backend: str = "auto", seed: int = 0,
        codebook: torch.Tensor | None = None, debug: bool = False, rotation_trick: bool = False,
    ):  # fmt: skip
        super().__init__()
        check_beta(beta)
        if dead_code_steps < 0:
            raise ValueError(f"dead_code_steps must be >= 0, got {dead_code_steps}")
        cd = dim if codebook_dim is None else codebook_dim
        self.dim, self.codebook_size, self.codebook_dim = dim, codebook_size, cd
        self.beta = float(beta)
        if not isinstance(rotation_trick, bool):
            raise TypeError(f"rotation_trick must be a bool, got {rotation_trick!r}")
        self.rotation_trick = rotation_trick
        self.debug, self._ranks_checked = debug, False
        self.ema, self.cosine, self.group = ema, cosine, group
        rank, world = rank_and_world(group)
        self.start, self.end = shard_range(codebook_size, rank, world)
        self.project_in = nn.Linear(dim, cd) if cd != dim else nn.Identity()
        self.project_out = nn.Linear(cd, dim) if cd != dim else nn.Identity()
        if codebook is not None:
            if tuple(codebook.shape) != (codebook_size, cd):
                raise ValueError(
                    f"codebook must be ({codebook_size}, {cd}), got {tuple(codebook.shape)}"
                )
            init = codebook.detach()[self.start : self.end].to(torch.float32).clone()
        else:
            init = init_codes(self.start, self.end, cd, seed)
        if cosine:
            init = F.normalize(init, dim=-1)
        # Only the features in use add buffers: a default layer's state_dict (and the names
        # ddp_ignore_shards returns) stay as they were before restart and k-means existed here.
        self.book = Codebook(
            1, codebook_size, cd, learning="ema" if ema else "grad", init=init,
            shard=(self.start, self.end), decay=decay, eps=eps, cosine=cosine,
            kmeans_init=kmeans_init and codebook is None, kmeans_iters=kmeans_iters,
            kmeans_flag=kmeans_init, dead_code_steps=dead_code_steps,
            restart_noise=restart_noise, counters=dead_code_steps > 0, seed=seed,
            backend=backend, sync_distributed=True, process_group=group, grouped=False,
        )  # fmt: skip
        save, load = flat_state_hooks()
        self._register_state_dict_hook(save)
        self._register_load_state_dict_pre_hook(load, with_module=True)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, "
            f"codebook_dim={self.codebook_dim}, shard=[{self.start}, {self.end}), "
            f"ema={self.ema}, beta={self.beta}, dead_code_steps={self.dead_code_steps}, "
            f"cosine={self.cosine}"
        )

    def __getattr__(self, name: str):
        if name in _BOOK_ATTRS:
            return getattr(super().__getattr__("book"), name)
        return super().__getattr__(name)

    def full_codebook(self) -> torch.Tensor:
        """The whole (K, codebook_dim) codebook gathered on every rank (for export; a
        collective)."""
        return gather_codebook(self.codebook.detach(), self.codebook_size, self.group)

    # A host sync: under torch.compile it runs eagerly (a graph break on the calls that check).
    @torch.compiler.disable
    def check_ranks(self) -> None:
        """ValueError on every rank when ranks disagree on the layer's configuration (an EMA
        rank issues an all_reduce that a gradient rank does not: a hang or mixed tensors)."""
        fields = {
            n: self.book.initialised if n == "kmeans initialised" else getattr(self, n)
            for n in _RANK_FIELDS
        }
        self.book.check_ranks("ShardedVectorQuantizer", fields)
        self._ranks_checked = True

    def forward(self, x: torch.Tensor) -> VQOutput:
        """``x`` (..., dim) -> VQOutput(quantized like x, global indices x.shape[:-1], loss).

        Args:
            x: float32/16/bf16 ``(..., dim)``, this rank's rows (any count, zero included); a
                collective: every rank of ``group`` calls it.
        """
        check_input(x, self.dim, False)
        check_same_device("x", x, "codebook", self.book.anchor)
        if self.debug or not self._ranks_checked:
            self.check_ranks()
        backend = resolve_backend(self.backend, x.device)
        lead = x.shape[:-1]
        z = self.project_in(x.reshape(-1, self.dim))
        # Not while autograd's engine runs (activation checkpointing recomputing this forward):
        # every rank recomputes alike, so skipping keeps the collectives matched.
        update = self.training and not in_backward()
        if update and not self.book.initialised:
            self.book.kmeans_init_([z.detach()], [None])
        if self.cosine:
            z = F.normalize(z, dim=-1)
        codes = self.book.codes()[0]
        res = sharded_search(z, codes, self.codebook_size, self.group, backend)
        q, loss = ShardedVectorQuantizeFunction.apply(
            z, codes, res, self.codebook_size, self.beta, 0.0 if self.ema else 1.0, self.group,
            backend, self.rotation_trick,
        )  # fmt: skip
        if update:
            mine = (res.row_indices >= self.start) & (res.row_indices < self.end)
            counts, sums = batch_statistics(
                res.row_indices - self.start, mine & res.row_err.isfinite(),
                res.rows if self.ema else None, self.end - self.start, backend,
            )  # fmt: skip
            self.book.step_(
                counts[None], None if sums is None else sums[None], [z.detach()],
                [res.err.isfinite().to(torch.float32)], sharded=True,
            )  # fmt: skip
        quantized = self.project_out(q).reshape(*lead, self.dim)
        return VQOutput(quantized, res.indices.reshape(lead), loss)


def ddp_ignore_shards(model: nn.Module) -> list[str]:
    """Keep every :class:`ShardedVectorQuantizer`'s parameters and buffers out of DDP.

    Call on the module you pass to ``DistributedDataParallel``, before wrapping it. DDP then
    neither broadcasts rank 0's shard at construction and per forward, nor checks shard shapes
    across ranks (they differ when K % R != 0), nor averages shard gradients (the op's backward
    already returns DDP's mean). Returns the names added to the ignore list.

    Args:
        model: the module to be wrapped; every ShardedVectorQuantizer among its submodules
            (itself included) has its ``book`` parameters and buffers added to its ignore list.
    """
    names = []
    for mname, mod in model.named_modules():
        if isinstance(mod, ShardedVectorQuantizer):
            for pname, _ in [*mod.book.named_parameters(), *mod.book.named_buffers()]:
                names.append(f"{mname}.book.{pname}" if mname else f"book.{pname}")
    existing = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, existing + [n for n in names if n not in existing]
    )
    return names
