"""The codebook engine: every write to a VQ layer's codebook state, as functions over its buffers.

``VectorQuantizer`` and ``ShardedVectorQuantizer`` keep their own buffers (so ``state_dict`` keys
do not change) and hand them here as a :class:`CodebookState` of views with a leading codebook
dim ``G``; a sharded layer's views hold its shard ``[start, end)`` of the ``K`` codes (``S`` below
is ``end - start``, ``K`` for an unsharded layer)::

    codebook      (G, S, D)  the codes (a buffer, or a parameter's ``.data``)
    cluster_size  (G, S)     EMA counts N_k          (None for a gradient codebook)
    embed_avg     (G, S, D)  EMA sums m_k            (None for a gradient codebook)
    steps_unused  (G, S)     consecutive training steps without a row  (None: no restart)
    usage_counts  (G, S)     rows per code over all training batches    (None: not kept)
    initted       ()         k-means init done                          (None: no k-means)

One training step (:func:`update_`), never inside autograd's backward:

* EMA: ``N_k <- g N_k + (1-g) n_k``, ``m_k <- g m_k + (1-g) s_k``, then Laplace smoothing
  ``c_k = m_k / ((N_k + eps) / (sum N + K eps) * sum N)`` (the sum over all K codes);
* usage: ``usage_counts += n_k``; ``steps_unused`` resets where ``n_k > 0``;
* dead-code restart: a code unused for ``dead_code_steps`` steps is re-seeded from this step's
  rows plus a little noise (:func:`restart_dead_`).

The distributed policy: every rank calls the same collectives in the same order with same-shaped
tensors whatever its data (see ``_dist``); the generators are seeded identically on every rank, so
every rank draws the same choices, and a sharded rank computes all K replacements (or k-means
centres) and keeps its slice: its codes are bit-identical to the unsharded layer's under DDP.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import _dist
from .kmeans import kmeans
from .ops import _scatter_rows_unchecked


class CodebookState(NamedTuple):
    """Views of a layer's buffers with a leading codebook dim (module docstring)."""

    codebook: torch.Tensor
    cluster_size: torch.Tensor | None
    embed_avg: torch.Tensor | None
    steps_unused: torch.Tensor | None
    usage_counts: torch.Tensor | None
    initted: torch.Tensor | None


def in_backward() -> bool:
    """True while autograd's engine runs (e.g. activation checkpointing recomputes a forward):
    no state update then, so a recomputed forward does not update twice."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def generator(cache: dict, seed: int, name: str, device, offset: int = 0) -> torch.Generator:
    """The layer's generator ``name`` on ``device``, seeded ``seed * 1000003 + offset`` once."""
    key = (name, str(device))
    gen = cache.get(key)
    if gen is None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed * 1000003 + offset)
        cache[key] = gen
    return gen


def register_state(
    module, init: torch.Tensor, *, ema: bool, restart: bool = True, kmeans: bool = True,
    initted: bool = False, codes: bool = True,
) -> None:  # fmt: skip
    """Register the codebook state on ``module`` from ``init`` (..., S, D): ``codebook`` (a
    buffer for EMA, else an ``nn.Parameter``), ``cluster_size``/``embed_avg`` (EMA),
    ``steps_unused``/``usage_counts`` (``restart``), ``initted`` (``kmeans``), the host mirror
    ``_initted`` kept by a load hook, and the generator cache. ``codes=False`` registers no
    ``codebook`` (the layer computes its codes, as SimVQ does); ``init`` then gives the shape."""
    if not codes:
        if ema:
            raise ValueError("an EMA codebook needs its codes registered (codes=True)")
    elif ema:
        module.register_buffer("codebook", init)
        module.register_buffer("cluster_size", torch.ones(init.shape[:-1]))
        module.register_buffer("embed_avg", init.clone())
    else:
        module.codebook = torch.nn.Parameter(init)
    if restart:
        module.register_buffer("steps_unused", torch.zeros(init.shape[:-1], dtype=torch.int64))
        module.register_buffer("usage_counts", torch.zeros(init.shape[:-1]))  # training batches
    if kmeans:
        module.register_buffer("initted", torch.tensor(initted))
    module._initted = initted  # host mirror of ``initted``: no sync per forward
    module._generators = {}
    module.register_load_state_dict_post_hook(_after_load)


def _after_load(module, incompatible_keys) -> None:
    if hasattr(module, "initted"):
        module._initted = bool(module.initted)


def check_ranks(what: str, vq, names: tuple, group) -> None:
    """ValueError on every rank when ranks disagree on the layer attributes ``names`` (one small
    all-gather and a host sync; ``_initted`` is reported as "kmeans initialised")."""
    label = {"_initted": "kmeans initialised"}
    fields = {label.get(n, n): getattr(vq, n) for n in names}
    codes = vq._codes_tensor() if hasattr(vq, "_codes_tensor") else vq.codebook  # SimVQ: basis
    _dist.check_same_across_ranks(what, fields, codes.device, group)
    vq._ranks_checked = True


def dist_policy(sync: bool, group) -> dict:
    """The distributed policy as keyword arguments of the engine's functions: synchronise over
    ``group`` when ``sync`` and torch.distributed runs more than one rank in it."""
    group = group if sync else None
    return {"group": group, "distributed": sync and _dist.is_distributed(group)}


def lookup(codes: torch.Tensor, indices: torch.Tensor, heads: int) -> torch.Tensor:
    """Decode int64 ``indices`` (...) (or (..., heads)) against ``codes`` (G, K, D): the codes
    ``(..., heads * D)`` (``(..., D)`` for one head); G = 1 shares one codebook among heads."""
    if heads == 1:
        return F.embedding(indices, codes[0])
    if codes.shape[0] == 1:
        return F.embedding(indices, codes[0]).flatten(-2)
    offs = torch.arange(heads, device=indices.device) * codes.shape[1]
    return F.embedding(indices + offs, codes.reshape(-1, codes.shape[-1])).flatten(-2)


# --- statistics -----------------------------------------------------------------------------------


def row_counts(idx: torch.Tensor, num_bins: int) -> torch.Tensor:
    """fp32 (num_bins,) rows per code: an index_add of ones. ``fastvq.code_counts`` is a bincount,
    which syncs the host on CUDA and breaks ``torch.compile`` graphs (data-dependent shape)."""
    ones = torch.ones(idx.shape, dtype=torch.float32, device=idx.device)
    return torch.zeros(num_bins, dtype=torch.float32, device=idx.device).index_add_(0, idx, ones)


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of each row of ``counts`` (G, K), averaged over G."""
    p = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
    return torch.exp(-torch.special.xlogy(p, p).sum(-1)).mean()


def batch_statistics(
    idx: torch.Tensor, ok: torch.Tensor, rows: torch.Tensor | None, num_codes: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Counts ``n_k`` fp32 (K,) and, when ``rows`` (M, D) is given, sums ``s_k`` fp32 (K, D) of
    the rows with ``ok`` (M,) bool. Other rows (masked, non-finite) go to an extra bin K, dropped,
    and are zeroed before the scatter: a NaN never enters a sum."""
    idx_stat = torch.where(ok, idx, num_codes)
    counts = row_counts(idx_stat, num_codes + 1)[:num_codes]
    if rows is None:
        return counts, None
    zs = torch.where(ok[:, None], rows.detach(), 0.0)
    sums = _scatter_rows_unchecked(idx_stat, zs, num_codes + 1, backend=backend)[:num_codes]
    return counts, sums


@torch.no_grad()
def record_stats_(last_perplexity, last_used_fraction, counts: torch.Tensor):
    """Write this batch's perplexity and used fraction of ``counts`` (G, K); returns both."""
    ppl, used = perplexity(counts), (counts > 0).float().mean()
    last_perplexity.copy_(ppl)
    last_used_fraction.copy_(used)
    return ppl, used


# --- one training step ----------------------------------------------------------------------------


def smoothed_codes(
    cluster_size: torch.Tensor, embed_avg: torch.Tensor, total: torch.Tensor, eps: float, k: int
) -> torch.Tensor:
    """Laplace-smoothed EMA codes ``m_k / ((N_k + eps) / (sum N + K eps) * sum N)``; ``total``
    is ``sum N`` over all K codes, broadcastable to ``cluster_size``."""
    smoothed = (cluster_size + eps) / (total + k * eps) * total
    return embed_avg / smoothed.unsqueeze(-1)


@torch.no_grad()
def update_(
    vq,
    st: CodebookState,
    counts: torch.Tensor,
    sums: torch.Tensor | None,
    rows: list,
    weights: list,
    *,
    group=None,
    distributed: bool = False,
    sharded: bool = False,
    start: int = 0,
    ema_step: bool = True,
) -> torch.Tensor:
    """One training step's EMA, usage and dead-code bookkeeping; returns the global counts.

    Args:
        vq: the layer, for its settings (``decay``, ``eps``, ``cosine``, ``codebook_size``,
            ``dead_code_steps``, ``restart_noise``, ``seed``) and generator cache.
        st: its buffers (module docstring).
        counts: fp32 (G, S) this rank's rows per code; ``sums`` fp32 (G, S, D) their sums (EMA).
            Sharded: already over every rank's rows (the owner's statistics).
        rows, weights: per codebook, this rank's rows (M, D) and their fp32 (M,) 0/1 validity,
            the restart candidates.
        group, distributed: the process group and whether to synchronise over it.
        sharded: the state holds codes ``[start, start + S)`` of K and the statistics are the
            shard's own; otherwise they are all-reduced here.
        ema_step: False skips the EMA step (``forward(..., ema_update=False)``); so does
            ``vq.decay == 1`` (a frozen EMA codebook: its buffers and codes stay bit-identical,
            where a lerp by 0 followed by the smoothing would move them by rounding). ``sums``
            may then be None, and only the counts are all-reduced (usage, dead codes).
    """
    k = vq.codebook_size
    if st.cluster_size is not None and ema_step and vq.decay < 1.0:
        if distributed and not sharded:  # one all-reduce for counts and sums together
            stat = _dist.all_reduce_sum_(torch.cat([sums, counts.unsqueeze(-1)], dim=-1), group)
            sums, counts = stat[..., :-1], stat[..., -1]
        st.cluster_size.lerp_(counts, 1.0 - vq.decay)
        st.embed_avg.lerp_(sums, 1.0 - vq.decay)
        total = st.cluster_size.sum(-1, keepdim=True)
        if distributed and sharded:  # sum N over all K codes: one all_reduce of G numbers
            total = _dist.all_reduce_sum_(total, group)
        cb = smoothed_codes(st.cluster_size, st.embed_avg, total, vq.eps, k)
        st.codebook.copy_(F.normalize(cb, dim=-1) if vq.cosine else cb)
    elif distributed and not sharded:
        counts = _dist.all_reduce_sum_(counts.clone(), group)
    if st.usage_counts is not None:
        st.usage_counts.add_(counts)
    if st.steps_unused is not None:
        st.steps_unused.copy_(torch.where(counts > 0, 0, st.steps_unused + 1))
    if vq.dead_code_steps > 0:
        restart_dead_(vq, st, rows, weights, group=group, distributed=distributed, start=start)
    return counts


@torch.no_grad()
def restart_dead_(
    vq, st: CodebookState, rows: list, weights: list, *, group=None, distributed=False, start=0
) -> None:
    """Re-seed codes unused for ``dead_code_steps`` steps from this step's rows, on device.

    Each rank samples ``ceil(K / world)`` candidate rows per codebook (uniformly among its
    valid rows, with replacement) and their rank's valid-row count; the candidates of all
    ranks are gathered in rank order (one fixed-size all_gather) and every rank picks the
    same replacement for each of the K codes with a generator seeded identically everywhere,
    each rank's candidates weighted by its number of valid rows. A shard keeps its slice.
    """
    k, g_count = vq.codebook_size, st.codebook.shape[0]
    cd, s = st.codebook.shape[-1], st.codebook.shape[-2]
    dev = st.codebook.device
    world = _dist.world_size(group) if distributed else 1
    rank = _dist.rank(group) if distributed else 0
    p = -(-k // world)
    local_gen = generator(vq._generators, vq.seed, "restart-local", dev, 1 + rank)
    shared_gen = generator(vq._generators, vq.seed, "restart-shared", dev, 0)
    cands = []
    for zg, wg in zip(rows, weights, strict=True):
        m = zg.shape[0]
        if m == 0:
            cands.append(torch.zeros(p, cd + 1, device=dev))
            continue
        cdf = torch.cumsum(wg, 0)  # masked and non-finite rows weigh 0: never a candidate
        total = cdf[-1]
        u = torch.rand(p, device=dev, generator=local_gen) * total
        j = torch.searchsorted(cdf, u, right=True).clamp_max(m - 1)
        cand = zg.detach().index_select(0, j).to(torch.float32)
        cands.append(torch.cat([cand, total.expand(p, 1)], dim=1))
    pool = torch.stack(cands, dim=1)  # (P, G, cd + 1)
    if distributed:
        pool = _dist.all_gather_cat(pool, group)  # (world * P, G, cd + 1), rank order
    pool = pool.transpose(0, 1)  # (G, S_pool, cd + 1)
    cdf = torch.cumsum(pool[..., -1], -1)  # each slot weighted by its rank's valid-row count
    total = cdf[:, -1:]  # (G, 1)
    u = torch.rand(g_count, k, device=dev, generator=shared_gen) * total
    pick = torch.searchsorted(cdf, u, right=True).clamp_max(pool.shape[1] - 1)  # (G, K)
    repl = torch.gather(pool[..., :-1], 1, pick.unsqueeze(-1).expand(-1, -1, cd))
    noise = torch.randn(repl.shape, device=dev, generator=shared_gen)
    scale = repl.square().mean(-1, keepdim=True).sqrt()
    repl = repl + vq.restart_noise * scale * noise
    if vq.cosine:
        repl = F.normalize(repl, dim=-1)
    repl = repl[:, start : start + s]  # a shard's slice of all K draws
    dead = (st.steps_unused >= vq.dead_code_steps) & (total > 0)  # (G, S)
    dead3 = dead.unsqueeze(-1)
    st.codebook.copy_(torch.where(dead3, repl.to(st.codebook.dtype), st.codebook))
    if st.cluster_size is not None:
        st.embed_avg.copy_(torch.where(dead3, repl, st.embed_avg))
        st.cluster_size.copy_(torch.where(dead, 1.0, st.cluster_size))
    st.steps_unused.copy_(torch.where(dead, 0, st.steps_unused))


# k-means (host syncs, data-dependent shapes, a generator) cannot trace: under torch.compile it
# runs eagerly, one graph break on the first training forward only (callers test a host bool).
@torch.compiler.disable
@torch.no_grad()
def kmeans_init_(
    vq, st: CodebookState, rows: list, keep: list, *, group=None, distributed=False, start=0
) -> bool:
    """k-means on this batch's kept, finite rows, gathered from every rank; the same K centres
    everywhere (a shard keeps its slice). Returns False, changing nothing, when no rank has a
    row yet (try again next batch).

    Args:
        rows: per codebook, this rank's rows (M, D); ``keep`` per codebook a bool (M,) or None.
    """
    gen = torch.Generator().manual_seed(vq.seed)
    new = []
    for sample, kg in zip(rows, keep, strict=True):
        finite = torch.isfinite(sample).all(-1)  # a NaN row would make a NaN centre
        kg = finite if kg is None else kg & finite
        sample = sample[kg].to(torch.float32).contiguous()  # a one-off host sync
        if distributed:
            sample = _dist.all_gather_varsize(sample, group)
        if sample.shape[0] == 0:
            return False
        centres, _ = kmeans(
            sample, vq.codebook_size, iters=vq.kmeans_iters, cosine=vq.cosine,
            generator=gen, backend=vq.backend,
        )  # fmt: skip
        new.append(centres)
    new = torch.stack(new)
    if distributed:  # identical inputs give identical centres; broadcast guards against atomics
        _dist.broadcast_(new, 0, group)
    set_codes_(st, new[:, start : start + st.codebook.shape[-2]], clear_unused=False)
    return True


@torch.no_grad()
def load_codes_(st: CodebookState, weight, normalize: bool) -> None:
    """``load_codebook``: ``weight`` (S, D) for every codebook or (G, S, D), checked, optionally
    l2-normalised, then :func:`set_codes_`."""
    weight = torch.as_tensor(weight)
    if weight.dim() == 2:
        weight = weight.unsqueeze(0).expand(st.codebook.shape[0], -1, -1)
    if tuple(weight.shape) != tuple(st.codebook.shape):
        raise ValueError(
            f"weight must have shape {tuple(st.codebook.shape[1:])} or "
            f"{tuple(st.codebook.shape)}, got {tuple(weight.shape)}"
        )
    weight = weight.to(st.codebook)
    set_codes_(st, F.normalize(weight, dim=-1) if normalize else weight)


@torch.no_grad()
def set_codes_(st: CodebookState, codes: torch.Tensor, *, clear_unused: bool = True) -> None:
    """Load ``codes`` (G, S, D): reset the EMA statistics to match (N_k = 1, m_k = c_k), mark
    the state initialised and (``clear_unused``) clear the dead-code counters."""
    st.codebook.copy_(codes.to(st.codebook.dtype))
    if st.cluster_size is not None:
        st.cluster_size.fill_(1.0)
        st.embed_avg.copy_(codes)
    if clear_unused and st.steps_unused is not None:
        st.steps_unused.zero_()
    if st.initted is not None:
        st.initted.fill_(True)
