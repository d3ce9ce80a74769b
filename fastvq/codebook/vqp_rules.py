"""vector-quantize-pytorch 1.32's codebook rules ("vqp"), as policies of a
:class:`~fastvq.codebook.Codebook` (``ema_rule="vqp"``, ``restart_rule="vqp"``,
``kmeans_rule="vqp"``), over the same :class:`~fastvq.codebook.rules.CodebookState` views as
:mod:`.rules`. They draw from torch's global RNG, as vqp does, so that one global seed picks the
rows vqp picks. The settings are the codebook's public attributes (``decay``, ``eps``,
``cosine``, ``codebook_size``, ``kmeans_iters``, ``backend``, ``dead_code_threshold``,
``reset_cluster_size``, ``smooth_each_step``).

* EMA (:func:`update_`): ``N_k <- lerp(N_k, n_k, (1 - decay) w)``, ``m_k <- lerp(m_k, s_k, (1 -
  decay) w)`` with vqp's optional per-code weight ``w`` and its accumulation of several batches'
  statistics (in the buffers' ``.grad``, as vqp keeps them), then :func:`smooth_`: the Laplace
  smoothing of :func:`.rules.smoothed_codes` (the same formula as fastvq's rule), l2-normalised
  with vqp's floor for cosine, every step or (``smooth_each_step=False``, vqp's
  ``manual_ema_update``) when the owner asks;
* k-means init (:func:`kmeans_init_`): ``K`` rows drawn by vqp's ``sample_vectors``, then
  :func:`fastvq.kmeans.kmeans`'s Lloyd steps from them; ``m_k = c_k n_k``, ``N_k = n_k`` and one
  smoothing (a code without rows becomes zero, as in vqp);
* dead-code restart (:func:`expire_`): a code whose EMA count ``N_k`` is below
  ``dead_code_threshold`` becomes a row of this batch (at most as many codes as rows), with
  ``N_k = reset_cluster_size`` and ``m_k = N_k c_k``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _dist
from ..kmeans import kmeans
from .rules import CodebookState, smoothed_codes

L2NORM_EPS = 1e-6  # vqp's l2norm floor


def l2norm(t: torch.Tensor) -> torch.Tensor:
    """vqp's ``l2norm`` (its 1e-6 floor)."""
    return F.normalize(t, p=2, dim=-1, eps=L2NORM_EPS)


def sample_vectors(samples: torch.Tensor, num: int) -> torch.Tensor:
    """vqp's ``sample_vectors``: ``num`` rows of ``samples`` (M, d) without replacement when
    possible, with vqp's random calls on the global RNG."""
    m = samples.shape[0]
    if m >= num:
        ind = torch.randperm(m, device=samples.device)[:num]
    else:
        ind = torch.randint(0, m, (num,), device=samples.device)
    return samples[ind]


@torch.no_grad()
def smooth_(cb, st: CodebookState) -> None:
    """The codes from the EMA statistics: :func:`.rules.smoothed_codes` (vqp's ``update_ema``)."""
    total = st.cluster_size.sum(-1, keepdim=True)
    codes = smoothed_codes(st.cluster_size, st.embed_avg, total, cb.eps, cb.codebook_size)
    st.codebook.copy_(l2norm(codes) if cb.cosine else codes)


@torch.no_grad()
def kmeans_init_(cb, st: CodebookState, rows: list, keep: list) -> bool:
    """vqp's k-means init from ``rows`` per codebook (M, d) with ``keep`` a bool (M,) or None;
    False (nothing changed) when a codebook has no row."""
    means, bins = [], []
    for sample, kg in zip(rows, keep, strict=True):
        sample = sample if kg is None else sample[kg]
        if sample.shape[0] == 0:
            return False
        start = sample_vectors(sample, cb.codebook_size)
        c, n = kmeans(
            sample, cb.codebook_size, iters=cb.kmeans_iters, cosine=cb.cosine, init=start,
            backend=cb.backend,
        )  # fmt: skip
        means.append(c)
        bins.append(n)
    means, bins = torch.stack(means), torch.stack(bins)
    st.embed_avg.copy_(means * bins[..., None])
    st.cluster_size.copy_(bins)
    smooth_(cb, st)
    st.initted.fill_(True)
    return True


def _lerp_(old: torch.Tensor, new: torch.Tensor, decay: float, weight) -> None:
    if old.grad is not None:  # accumulated statistics (vqp's accum_ema_update) join this step's
        new = new + old.grad
        old.grad = None
    if weight is None:
        weight = 1.0
    elif torch.is_tensor(weight):
        weight = weight[None] if weight.ndim == 1 else weight
        if weight.ndim != 2 or weight.shape != old.shape[:2]:
            raise ValueError(
                f"ema_update_weight must have shape {tuple(old.shape[:2])}, "
                f"got {tuple(weight.shape)}"
            )
        weight = weight.reshape(*weight.shape, *(1,) * (old.ndim - 2))
    old.lerp_(new.to(old), (1.0 - decay) * weight)


@torch.no_grad()
def update_(
    cb, st: CodebookState, counts: torch.Tensor, sums: torch.Tensor, *, ema_step: bool = True,
    weight=None, accumulate: bool = False, group=None, distributed: bool = False,
) -> bool:  # fmt: skip
    """vqp's EMA step from this batch's fp32 ``counts`` (G, K) and ``sums`` (G, K, d) (summed
    over ranks here when ``distributed``). ``weight``: None, a (G, K) or (K,) tensor, or a
    function of ``(sums, counts)`` giving one; ``accumulate``: keep the statistics for the next
    step instead. vqp moves the statistics even with ``ema_step=False`` (for its dead-code
    threshold) but keeps the codes. Returns whether the step ran (not accumulated)."""
    if not ema_step and cb.dead_code_threshold <= 0:
        return False
    if distributed:
        counts = _dist.all_reduce_sum_(counts.clone(), group)
        sums = _dist.all_reduce_sum_(sums.clone(), group)
    if callable(weight):
        weight = weight(sums, counts)
    if accumulate:
        for buf, new in ((st.cluster_size, counts), (st.embed_avg, sums)):
            buf.grad = new.clone() if buf.grad is None else buf.grad.add_(new)
        return False
    _lerp_(st.cluster_size, counts, cb.decay, weight)
    _lerp_(st.embed_avg, sums, cb.decay, weight)
    if ema_step and cb.smooth_each_step:
        smooth_(cb, st)
    return True


@torch.no_grad()
def expire_(cb, st: CodebookState, rows, keep) -> None:
    """vqp's dead-code replacement from ``rows``, per codebook (M, d) (``keep``: a bool (M,) or
    None each, or None). vqp pairs rows and codebooks by their leading dim, keeping the first
    (a (B, N, d) tensor of one codebook's rows uses batch 0's)."""
    expired = st.cluster_size < cb.dead_code_threshold
    if not bool(expired.any()):
        return
    keep = [None] * len(rows) if keep is None else keep
    for g, (samples, kg, dead) in enumerate(zip(rows, keep, expired, strict=False)):
        samples = l2norm(samples) if cb.cosine else samples
        samples = samples if kg is None else samples[kg]
        if samples.numel() == 0:
            continue
        num_dead = int(dead.sum())
        if num_dead > samples.shape[0]:
            dead_idx = dead.nonzero(as_tuple=True)[0]
            dead_idx = dead_idx[torch.randperm(num_dead, device=dead.device)[: samples.shape[0]]]
            dead = torch.zeros_like(dead)
            dead[dead_idx] = True
            num_dead = samples.shape[0]
        sampled = sample_vectors(samples, num_dead).to(st.codebook)
        st.codebook[g][dead] = sampled
        st.cluster_size[g][dead] = cb.reset_cluster_size
        st.embed_avg[g][dead] = sampled * cb.reset_cluster_size
