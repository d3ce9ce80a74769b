"""The codebook learning rules, over a :class:`~fastvq.codebook.Codebook`'s state.

The state arrives as a :class:`CodebookState` of views with a leading codebook dim ``G``; a
sharded codebook's views hold its shard ``[start, end)`` of the ``K`` codes (``S`` below is
``end - start``, ``K`` unsharded)::

    codebook      (G, S, D)  the codes (a buffer, or a parameter's ``.data``)
    cluster_size  (G, S)     EMA counts N_k          (None for a gradient codebook)
    embed_avg     (G, S, D)  EMA sums m_k            (None for a gradient codebook)
    steps_unused  (G, S)     consecutive training steps without a row  (None: no restart)
    usage_counts  (G, S)     rows per code over all training batches    (None: not kept)
    initted       ()         k-means init done                          (None: no k-means)

The settings (``decay``, ``eps``, ``cosine``, ``codebook_size``, ``dead_code_steps``,
``restart_noise``, ``kmeans_iters``, ``seed``, ``backend``) and the random streams are the
codebook's public attributes, passed in as ``cb``.

One training step (:func:`update_`), never inside autograd's backward:

* EMA: ``N_k <- g N_k + (1-g) n_k``, ``m_k <- g m_k + (1-g) s_k``, then Laplace smoothing
  ``c_k = m_k / ((N_k + eps) / (sum N + K eps) * sum N)`` (the sum over all K codes);
* usage: ``usage_counts += n_k``; ``steps_unused`` resets where ``n_k > 0``;
* dead-code restart: a code unused for ``dead_code_steps`` steps is re-seeded from this step's
  rows plus a little noise (:func:`restart_dead_`).

The distributed policy: every rank calls the same collectives in the same order with same-shaped
tensors whatever its data (see ``_dist``); the streams are seeded identically on every rank, so
every rank draws the same choices, and a sharded rank computes all K replacements (or k-means
centres) and keeps its slice: its codes are bit-identical to the unsharded layer's under DDP.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import _dist
from ..kmeans import kmeans
from ..streams import fresh_generator


class CodebookState(NamedTuple):
    """Views of a codebook's state with a leading codebook dim (module docstring)."""

    codebook: torch.Tensor
    cluster_size: torch.Tensor | None
    embed_avg: torch.Tensor | None
    steps_unused: torch.Tensor | None
    usage_counts: torch.Tensor | None
    initted: torch.Tensor | None


def lookup(codes: torch.Tensor, indices: torch.Tensor, heads: int) -> torch.Tensor:
    """Decode int64 ``indices`` (...) (or (..., heads)) against ``codes`` (G, K, D): the codes
    ``(..., heads * D)`` (``(..., D)`` for one head); G = 1 shares one codebook among heads."""
    if heads == 1:
        return F.embedding(indices, codes[0])
    if codes.shape[0] == 1:
        return F.embedding(indices, codes[0]).flatten(-2)
    offs = torch.arange(heads, device=indices.device) * codes.shape[1]
    return F.embedding(indices + offs, codes.reshape(-1, codes.shape[-1])).flatten(-2)


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
    cb,
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
        cb: the codebook, for its settings (``decay``, ``eps``, ``cosine``, ``codebook_size``,
            ``dead_code_steps``, ``restart_noise``) and random streams.
        st: its buffers (module docstring).
        counts: fp32 (G, S) this rank's rows per code; ``sums`` fp32 (G, S, D) their sums (EMA).
            Sharded: already over every rank's rows (the owner's statistics).
        rows, weights: per codebook, this rank's rows (M, D) and their fp32 (M,) 0/1 validity,
            the restart candidates.
        group, distributed: the process group and whether to synchronise over it.
        sharded: the state holds codes ``[start, start + S)`` of K and the statistics are the
            shard's own; otherwise they are all-reduced here.
        ema_step: False skips the EMA step (``forward(..., ema_update=False)``); so does
            ``cb.decay == 1`` (a frozen EMA codebook: its buffers and codes stay bit-identical,
            where a lerp by 0 followed by the smoothing would move them by rounding). ``sums``
            may then be None, and only the counts are all-reduced (usage, dead codes).
    """
    k = cb.codebook_size
    if st.cluster_size is not None and ema_step and cb.decay < 1.0:
        if distributed and not sharded:  # one all-reduce for counts and sums together
            stat = _dist.all_reduce_sum_(torch.cat([sums, counts.unsqueeze(-1)], dim=-1), group)
            sums, counts = stat[..., :-1], stat[..., -1]
        st.cluster_size.lerp_(counts, 1.0 - cb.decay)
        st.embed_avg.lerp_(sums, 1.0 - cb.decay)
        total = st.cluster_size.sum(-1, keepdim=True)
        if distributed and sharded:  # sum N over all K codes: one all_reduce of G numbers
            total = _dist.all_reduce_sum_(total, group)
        codes = smoothed_codes(st.cluster_size, st.embed_avg, total, cb.eps, k)
        st.codebook.copy_(F.normalize(codes, dim=-1) if cb.cosine else codes)
    elif distributed and not sharded:
        counts = _dist.all_reduce_sum_(counts.clone(), group)
    if st.usage_counts is not None:
        st.usage_counts.add_(counts)
    if st.steps_unused is not None:
        st.steps_unused.copy_(torch.where(counts > 0, 0, st.steps_unused + 1))
    if cb.dead_code_steps > 0:
        restart_dead_(cb, st, rows, weights, group=group, distributed=distributed, start=start)
    return counts


@torch.no_grad()
def restart_dead_(
    cb, st: CodebookState, rows: list, weights: list, *, group=None, distributed=False, start=0
) -> None:
    """Re-seed codes unused for ``dead_code_steps`` steps from this step's rows, on device.

    Each rank samples ``ceil(K / world)`` candidate rows per codebook (uniformly among its
    valid rows, with replacement) and their rank's valid-row count; the candidates of all
    ranks are gathered in rank order (one fixed-size all_gather) and every rank picks the
    same replacement for each of the K codes with a generator seeded identically everywhere,
    each rank's candidates weighted by its number of valid rows. A shard keeps its slice.
    """
    k, g_count = cb.codebook_size, st.codebook.shape[0]
    cd, s = st.codebook.shape[-1], st.codebook.shape[-2]
    dev = st.codebook.device
    world = _dist.world_size(group) if distributed else 1
    rank = _dist.rank(group) if distributed else 0
    p = -(-k // world)
    local_gen = cb.random_streams.get("restart-local", dev, rank)
    shared_gen = cb.random_streams.get("restart-shared", dev)
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
    repl = repl + cb.restart_noise * scale * noise
    if cb.cosine:
        repl = F.normalize(repl, dim=-1)
    repl = repl[:, start : start + s]  # a shard's slice of all K draws
    dead = (st.steps_unused >= cb.dead_code_steps) & (total > 0)  # (G, S)
    dead3 = dead.unsqueeze(-1)
    st.codebook.copy_(torch.where(dead3, repl.to(st.codebook.dtype), st.codebook))
    if st.cluster_size is not None:
        st.embed_avg.copy_(torch.where(dead3, repl, st.embed_avg))
        st.cluster_size.copy_(torch.where(dead, 1.0, st.cluster_size))
    st.steps_unused.copy_(torch.where(dead, 0, st.steps_unused))


@torch.no_grad()
def kmeans_init_(
    cb, st: CodebookState, rows: list, keep: list, *, group=None, distributed=False, start=0
) -> bool:
    """k-means on this batch's kept, finite rows, gathered from every rank; the same K centres
    everywhere (a shard keeps its slice). Returns False, changing nothing, when no rank has a
    row yet (try again next batch).

    Args:
        rows: per codebook, this rank's rows (M, D); ``keep`` per codebook a bool (M,) or None.
    """
    gen = fresh_generator(cb.seed, "kmeans")
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
            sample, cb.codebook_size, iters=cb.kmeans_iters, cosine=cb.cosine,
            generator=gen, backend=cb.backend,
        )  # fmt: skip
        new.append(centres)
    new = torch.stack(new)
    if distributed:  # identical inputs give identical centres; broadcast guards against atomics
        _dist.broadcast_(new, 0, group)
    set_codes_(st, new[:, start : start + st.codebook.shape[-2]], clear_unused=False)
    return True


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
