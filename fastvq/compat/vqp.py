"""A vector-quantize-pytorch 1.32.0 ("vqp") compatible front end on fastvq's fused op.

``from fastvq.compat.vqp import VectorQuantize`` replaces ``from vector_quantize_pytorch import
VectorQuantize`` (likewise ``ResidualVQ`` and ``GroupedResidualVQ``): vqp's argument names and
defaults (``decay=0.8``, ``commitment_weight=1``, rotation trick on when ``dim > 1``, no k-means,
no dead-code threshold, ``channel_last=True``, shared codebook across heads, ``codebook_dim``
defaulting to ``dim`` per head), its return values ``(quantize, indices, loss)`` (plus
``LossBreakdown`` with ``return_loss_breakdown``), its masking (``mask`` or ``lens``: zeros and
index -1 at masked positions), its eval mode (loss 0, no gradient to the input through the
output, the codebook still k-means-initialised on the first call) and its ``state_dict`` keys
(``_codebook.initted``, ``_codebook.cluster_size``, ``_codebook.embed_avg``, ``_codebook.embed``,
``project_in.*``, ``project_out.*``; ``layers.{i}._codebook.*``; ``rvqs.{g}.layers.{i}...``), so
vqp checkpoints load with ``strict=True``.

Underneath, the nearest-code search, the commitment loss and the straight-through or rotation
trick gradient are one call of :func:`fastvq.functional.quantize_rows` per codebook (no N x K
tensor). vqp's losses on its N x K logits (the cross-entropy commitment, the diversity loss, the
``indices=`` cross entropy) and the orthogonal loss are :mod:`fastvq.codebook_losses`'; ``topk``
and stochastic sampling are :mod:`fastvq.sampling`'s (chunked, no N x K tensor either).
vqp's EMA is kept as vqp computes it, which differs from fastvq's layer::

    N_k <- lerp(N_k, n_k, 1 - decay),   m_k <- lerp(m_k, s_k, 1 - decay)      (torch.lerp_)
    c_k = m_k / ((N_k + eps) / (sum N + K eps) * sum N)          (then l2-normalised for cosine)

with the batch's counts ``n_k`` and sums ``s_k`` from fastvq's scatter; vqp's k-means init and
dead-code replacement (``cluster_size < threshold_ema_dead_code``) are reproduced with the same
random calls, on fastvq's search. Rows holding NaN/Inf are left out of the EMA statistics (vqp
would let them poison the sums).

Differences from vqp that remain (docs/layer.md, "Coming from vector-quantize-pytorch"):

* the rotation trick's forward value is exactly the code (vqp's is the rotated input, equal up
  to rounding); its gradient is the same estimator;
* with a mask, the commitment term compares the code to the input in codebook space (after
  ``project_in``, heads and cosine normalisation), as without a mask; vqp 1.32.0 compares it to
  the raw input there (later fixed upstream); a fully masked batch gives loss 0 (vqp: NaN);
* ties in distance go to the lowest index (vqp: ``argmax`` of a square-rooted distance);
* ``get_codes_from_indices`` with heads sharing one codebook returns ``(..., heads * d)``;
* stochastic sampling draws fastvq's counter-based Gumbel noise, not vqp's ``uniform_`` stream
  (the same distribution, other samples);
* with an EMA codebook the gradients of the distance-based losses are those of the forward
  (vqp 1.32.0's EMA overwrites the codes its ``cdist`` saved for backward); with no valid row
  the cross entropy is 0 (vqp: NaN); the orthogonal loss counts a zero code's Gram diagonal as
  0 (upstream's later fix) and is computed in fp32.

An argument this front end cannot honour raises ``NotImplementedError`` naming it.
"""

from __future__ import annotations

import math
import random
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..codebook import batch_statistics
from ..codebook_losses import ce_commitment_loss, diversity_loss
from ..codebook_losses import orthogonal_loss as _orthogonal_loss
from ..functional import quantize_rows
from ..ops import resolve_backend, search
from ..residual import residual_beam_search
from ..sampling import sample_codes, topk_codes

__all__ = ["GroupedResidualVQ", "LossBreakdown", "ResidualVQ", "VectorQuantize"]

L2NORM_EPS = 1e-6  # vqp's l2norm / safe_div floor


class LossBreakdown(NamedTuple):
    """vqp's ``return_loss_breakdown=True`` fourth output (unweighted terms)."""

    commitment: torch.Tensor
    codebook_diversity: torch.Tensor
    orthogonal_reg: torch.Tensor
    inplace_optimize: torch.Tensor


def _unsupported(cls: str, name: str, value) -> NotImplementedError:
    return NotImplementedError(
        f"fastvq.compat.vqp.{cls}: {name}={value!r} is not supported by this front end "
        "(see docs/layer.md, 'Coming from vector-quantize-pytorch')"
    )


def _l2norm(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, p=2, dim=-1, eps=L2NORM_EPS)


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _sample_vectors(samples: torch.Tensor, num: int) -> torch.Tensor:
    """vqp's ``sample_vectors``: ``num`` rows of ``samples`` (M, d) without replacement when
    possible, with the same random calls (so the same global seed picks the same rows)."""
    m = samples.shape[0]
    if m >= num:
        ind = torch.randperm(m, device=samples.device)[:num]
    else:
        ind = torch.randint(0, m, (num,), device=samples.device)
    return samples[ind]


def orthogonal_loss(codes: torch.Tensor) -> torch.Tensor:
    """Orthogonal regularisation (Shin et al. 2021, eq. 2) of ``codes`` (h, n, d) or (n, d):
    the mean squared error of the codes' cosine Gram matrix against the identity,
    ``mean((G - I)^2)`` over (h, n, n), with vqp's l2norm floor.

    For non-zero codes this is vqp 1.32.0's ``sum(G^2) / (h n^2) - 1/n`` (its diagonal is 1),
    which :func:`fastvq.codebook_losses.orthogonal_loss` computes without an n x n matrix when
    d < n. A zero code has a zero Gram row, which vqp's form counts as 1 on the diagonal and
    upstream's later ``test_orthogonal_zero_codes`` corrects to this form: the difference is
    the diagonal term ``2 sum_i (1 - |u_i|^2) / (h n^2)``, added here (O(h n d)).

    Computed in fp32 (``fastvq.codebook_losses``); the result has ``codes``' dtype."""
    dtype = codes.dtype
    c32 = codes if dtype in (torch.float16, torch.bfloat16) else codes.to(torch.float32)
    h = c32.shape[0] if c32.dim() == 3 else 1
    n = c32.shape[-2]
    diag = _l2norm(c32.float()).square().sum(-1)  # |u_i|^2: 1, or below 1 for (near-)zero codes
    return (_orthogonal_loss(c32) + 2 * (1 - diag).sum() / (h * n * n)).to(dtype)


def _rotate_or_pass(z: torch.Tensor, q: torch.Tensor, rotation: bool) -> torch.Tensor:
    """Forward value ``q`` (detached), gradient to ``z`` straight through or by the rotation
    trick (Fifty et al. 2024), for rows already paired with their codes: ``z``, ``q`` (..., d).

    The rotation's gradient is ``lambda (g - 2 w (w.g) + 2 u (q_hat.g))`` (u, q_hat, w, lambda
    detached, vqp's 1e-6 norm floors), obtained as the gradient of a function linear in ``z``
    whose forward contribution is cancelled: O(N d), no d x d matrix."""
    q = q.detach()
    if not rotation:
        return z + (q - z).detach()
    zd = z.detach()
    nz = zd.norm(dim=-1, keepdim=True)
    nq = q.norm(dim=-1, keepdim=True)
    u = zd / nz.clamp(min=L2NORM_EPS)
    qh = q / nq.clamp(min=L2NORM_EPS)
    w = _l2norm(u + qh)
    lam = nq / nz.clamp(min=L2NORM_EPS)
    lin = lam * (z - 2 * (z * w).sum(-1, keepdim=True) * w + 2 * (z * u).sum(-1, keepdim=True) * qh)
    return q + (lin - lin.detach())


@torch.no_grad()
def _pick_codes(rows, codes, *, cosine, temperature, topk):
    """vqp's ``gumbel_sample`` without its N x K tensor, on :mod:`fastvq.sampling`: one code per
    row sampled from ``softmax(logits / temperature)`` (``topk`` None: vqp's stochastic path in
    training, ``temperature > 0``; the noise is fastvq's, not vqp's draws), or the ``topk``
    largest logits, descending (no noise).

    vqp's logits are ``-cdist`` (ranked as the squared distance) or, for its cosine codebook,
    the dot product ``z.c``. For the top-k by dot product the codes get one more coordinate,
    ``sqrt(R^2 - |c|^2)`` with ``R = max |c|`` (the rows a 0): then ``|z - c|^2 = |z|^2 + R^2 -
    2 z.c`` ranks as ``-z.c`` exactly, whatever the codes' norms (a zero code included).

    Args:
        rows: fp32 (M, d); codes: fp32 (K, d).

    Returns:
        int64 (M,) or (M, topk).
    """
    if topk is None:
        return sample_codes(rows, codes, temperature=temperature, cosine=cosine)
    if cosine:
        sq = codes.square().sum(-1, keepdim=True)
        codes = torch.cat([codes, (sq.max() - sq).clamp(min=0).sqrt()], dim=-1)
        rows = F.pad(rows, (0, 1))
    return topk_codes(rows, codes, topk)[1]


class Codebook(nn.Module):
    """vqp's ``Codebook`` state and update rules (its buffers, names and shapes).

    ``embed`` (G, K, d) is an ``nn.Parameter`` when ``learnable_codebook`` (vqp also makes it one
    with orthogonal regularisation), a buffer otherwise; ``cluster_size`` (G, K) and
    ``embed_avg`` (G, K, d) are the EMA statistics; ``initted`` the k-means flag. G is the number
    of codebooks (heads with separate codebooks, else 1). Rows handed to the methods are fp32
    ``(G, M, d)`` with an optional bool ``(G, M)`` mask.
    """

    def __init__(
        self, dim, codebook_size, *, num_codebooks=1, kmeans_init=False, kmeans_iters=10,
        decay=0.8, eps=1e-5, threshold_ema_dead_code=0, reset_cluster_size=None,
        learnable_codebook=False, ema_update=True, manual_ema_update=False,
        use_cosine_sim=False, use_ddp=False,
    ):  # fmt: skip
        super().__init__()
        self.decay, self.eps, self.ema_update = decay, eps, ema_update
        self.manual_ema_update = manual_ema_update
        self.codebook_size, self.num_codebooks = codebook_size, num_codebooks
        self.kmeans_iters, self.use_cosine_sim, self.use_ddp = kmeans_iters, use_cosine_sim, use_ddp
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.has_dead_code_replacement = threshold_ema_dead_code > 0
        self.reset_cluster_size = (
            threshold_ema_dead_code if reset_cluster_size is None else reset_cluster_size
        )
        if kmeans_init:
            embed = torch.zeros(num_codebooks, codebook_size, dim)
        else:
            embed = torch.empty(num_codebooks, codebook_size, dim)
            nn.init.kaiming_uniform_(embed)
            if use_cosine_sim:
                embed = _l2norm(embed)
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("cluster_size", torch.ones(num_codebooks, codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        self.learnable_codebook = learnable_codebook
        if learnable_codebook:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        self.backend = "auto"

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return _l2norm(x) if self.use_cosine_sim else x

    def _backend(self) -> str:
        return resolve_backend(self.backend, self.embed.device)

    def _nearest(self, rows: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
        """Nearest of ``means`` (K, d) for each of ``rows`` (M, d) by fastvq's search (for unit
        vectors, as cosine keeps them, the largest dot product)."""
        return search(rows, means, backend=self._backend())[0]

    @torch.no_grad()
    def init_embed_(self, rows: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """vqp's k-means init: ``K`` sampled rows, ``kmeans_iters`` Lloyd steps (a code without
        rows keeps its mean; cosine renormalises), then ``embed_avg = means * counts``,
        ``cluster_size = counts`` and one EMA normalisation (so empty codes become zero, as in
        vqp)."""
        if bool(self.initted):
            return
        if mask is not None:
            rows = rows[mask].view(rows.shape[0], -1, rows.shape[-1])
        k, be = self.codebook_size, self._backend()
        all_means, all_bins = [], []
        for samples in rows.unbind(0):
            means = _sample_vectors(samples, k)
            bins = torch.zeros(k, dtype=torch.int64, device=samples.device)
            for _ in range(self.kmeans_iters):
                buckets = self._nearest(samples, means)
                counts, sums = batch_statistics(
                    buckets, torch.ones_like(buckets, dtype=torch.bool), samples, k, be
                )
                bins = counts.to(torch.int64)
                new_means = sums / bins.clamp(min=1)[:, None].to(sums.dtype)
                if self.use_cosine_sim:
                    new_means = _l2norm(new_means)
                means = torch.where((bins == 0)[:, None], means, new_means)
            all_means.append(means)
            all_bins.append(bins)
        means, bins = torch.stack(all_means), torch.stack(all_bins)
        self.embed_avg.data.copy_(means * bins[..., None])
        self.cluster_size.data.copy_(bins)
        self.update_ema()
        self.initted.data.copy_(torch.tensor(True))

    @torch.no_grad()
    def update_ema(self) -> None:
        """``embed = embed_avg / laplace_smoothed(cluster_size)``, vqp's order of operations."""
        cs = self.cluster_size
        total = cs.sum(dim=-1, keepdim=True)
        smoothed = (cs + self.eps) / (total + self.codebook_size * self.eps) * total
        embed = self.embed_avg / smoothed[..., None]
        if self.use_cosine_sim:
            embed = _l2norm(embed)
        self.embed.data.copy_(embed)

    @staticmethod
    def _ema_inplace(old: torch.Tensor, new: torch.Tensor, decay: float, weight) -> None:
        if old.grad is not None:  # accumulated statistics (accum_ema_update) join this step's
            new = new + old.grad
            old.grad = None
        if weight is None:
            weight = 1.0
        elif torch.is_tensor(weight):
            if weight.ndim == 1:
                weight = weight[None]
            if weight.ndim != 2 or weight.shape != old.shape[:2]:
                raise ValueError(
                    f"ema_update_weight must have shape {tuple(old.shape[:2])}, "
                    f"got {tuple(weight.shape)}"
                )
            weight = weight.reshape(*weight.shape, *(1,) * (old.ndim - 2))
        old.data.lerp_(new.to(old), (1.0 - decay) * weight)

    @torch.no_grad()
    def track_(self, rows, idx, mask=None, ema_update_weight=None, accum_ema_update=False):
        """Fold this batch's counts and sums (rows with the mask, finite) into the EMA
        statistics (or accumulate them into their ``.grad`` with ``accum_ema_update``)."""
        ok = torch.isfinite(rows).all(-1)
        if mask is not None:
            ok = ok & mask
        be = self._backend()
        stats = [
            batch_statistics(i, o, r, self.codebook_size, be)
            for r, i, o in zip(rows, idx, ok, strict=True)
        ]
        counts = torch.stack([c for c, _ in stats])
        sums = torch.stack([s for _, s in stats])
        if self.use_ddp:
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        if callable(ema_update_weight):
            ema_update_weight = ema_update_weight(sums, counts)
        if accum_ema_update:
            for buf, new in ((self.cluster_size, counts), (self.embed_avg, sums)):
                buf.grad = new.clone() if buf.grad is None else buf.grad.add_(new)
            return
        self._ema_inplace(self.cluster_size, counts, self.decay, ema_update_weight)
        self._ema_inplace(self.embed_avg, sums, self.decay, ema_update_weight)

    def update_codebook(
        self, rows, idx, mask=None, ema_update_weight=None, accum_ema_update=False, ema_update=None
    ) -> None:
        """One training step of the codebook state, as vqp's ``update_codebook``."""
        ema_update = self.ema_update if ema_update is None else ema_update
        if not ema_update and not self.has_dead_code_replacement:
            return
        self.track_(rows, idx, mask, ema_update_weight, accum_ema_update)
        if accum_ema_update:
            return
        if ema_update and not self.manual_ema_update:
            self.update_ema()
        self.expire_codes_(rows, mask)

    @torch.no_grad()
    def expire_codes_(self, rows: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Replace codes whose EMA count fell below ``threshold_ema_dead_code`` by rows of this
        batch (vqp's rule and random calls; at most as many codes as rows per step)."""
        if not self.has_dead_code_replacement or not self.training:
            return
        expired = self.cluster_size < self.threshold_ema_dead_code
        if not bool(expired.any()):
            return
        rows = self.transform_input(rows.reshape(rows.shape[0], -1, rows.shape[-1]))
        # strict=False: vqp pairs a (B, N, d) input's batch rows with codebooks, keeping the first
        for g, (samples, dead) in enumerate(zip(rows, expired, strict=False)):
            if mask is not None:
                samples = samples[mask[g]]
            if samples.numel() == 0:
                continue
            num_dead = int(dead.sum())
            if num_dead > samples.shape[0]:
                dead_idx = dead.nonzero(as_tuple=True)[0]
                dead_idx = dead_idx[
                    torch.randperm(num_dead, device=dead.device)[: samples.shape[0]]
                ]
                dead = torch.zeros_like(dead)
                dead[dead_idx] = True
                num_dead = samples.shape[0]
            sampled = _sample_vectors(samples, num_dead).to(self.embed.data)
            self.embed.data[g][dead] = sampled
            self.cluster_size.data[g][dead] = self.reset_cluster_size
            self.embed_avg.data[g][dead] = sampled * self.reset_cluster_size

    def update_indices(
        self, rows, idx, mask=None, ema_update_weight=None, accum_ema_update=False, ema_update=None
    ) -> None:
        """The EMA step for given indices (G, M) of ``rows`` (G, M, d); -1 counts as code 0, as in
        vqp (masked rows are left out by ``mask``)."""
        idx = idx.masked_fill(idx == -1, 0)
        self.update_codebook(
            rows.float(), idx, mask, ema_update_weight, accum_ema_update, ema_update
        )

    update_ema_indices = update_indices


class VectorQuantize(nn.Module):
    """vqp's ``VectorQuantize`` on fastvq's fused op (same arguments, defaults, outputs, keys).

    ``forward(x, indices=None, mask=None, lens=None, topk=None, sample_codebook_temp=None,
    freeze_codebook=None, return_loss_breakdown=False, ema_update_weight=None,
    accum_ema_update=False, ema_update=None)`` takes ``x`` ``(B, N, dim)`` (``(B, dim, N)`` with
    ``channel_last=False``, ``(B, dim, H, W)`` with ``accept_image_fmap``, ``(B, dim, D, H, W)``
    with ``accept_3d_fmap``, ``(B, dim)`` for one token) and returns ``(quantize, indices,
    loss)``: ``quantize`` like ``x``; ``indices`` int64 ``(B, N)`` (``(B, N, heads)`` with heads,
    ``(B, H, W)`` for a feature map), -1 at masked positions; ``loss`` an fp32 scalar in training
    (``commitment_weight * mse`` + regularisers), 0 in eval. With ``topk=k``: ``(B, N, k, dim)``,
    ``(B, N, k)`` and a per-candidate loss ``(B, N, k)``; the codebook is not updated. With
    ``indices`` (the layer's index layout, -1 ignored): vqp's ``(quantize, ce_loss)``, the codes
    in codebook space in vqp's layout (``(B, N, d)``; heads ``(1, B heads, N, d)`` sharing a
    codebook, ``(heads, B, N, d)`` separate; no projection, mask or layout restored) and the
    cross entropy of vqp's logits to ``indices`` (the training step still updates the codebook).

    ``backend`` (fastvq only): ``"auto"``, ``"torch"`` or ``"triton"`` for the search.
    """

    def __init__(
        self, dim, codebook_size, codebook_dim=None, heads=1, separate_codebook_per_head=False,
        decay=0.8, eps=1e-5, freeze_codebook=False, kmeans_init=False, kmeans_iters=10,
        sync_kmeans=True, use_cosine_sim=False, layernorm_after_project_in=False,
        threshold_ema_dead_code=0, channel_last=True, accept_image_fmap=False,
        accept_3d_fmap=False, commitment_weight=1.0, commitment_use_cross_entropy_loss=False,
        orthogonal_reg_weight=0.0, orthogonal_reg_active_codes_only=False,
        orthogonal_reg_max_codes=None, codebook_diversity_loss_weight=0.0,
        codebook_diversity_temperature=100.0, stochastic_sample_codes=False,
        sample_codebook_temp=1.0, straight_through=False, rotation_trick=None,
        directional_reparam=False, directional_reparam_variance=5e-3, sync_codebook=None,
        sync_affine_param=False, ema_update=None, vq_bridge=None, manual_ema_update=False,
        learnable_codebook=None, in_place_codebook_optimizer=None,
        manual_in_place_optimizer_update=False, affine_param=False,
        affine_param_batch_decay=0.99, affine_param_codebook_decay=0.9, sync_update_v=0.0,
        return_zeros_for_masked_padding=True, route_gradients_to_input=True, *,
        backend: str = "auto",
    ):  # fmt: skip
        super().__init__()
        name = type(self).__name__
        for arg, value, ok in (
            ("straight_through", straight_through, False),
            ("directional_reparam", directional_reparam, False),
            ("vq_bridge", vq_bridge, None),
            ("in_place_codebook_optimizer", in_place_codebook_optimizer, None),
            ("affine_param", affine_param, False),
        ):
            if value != ok if ok is not None else value is not None:
                raise _unsupported(name, arg, value)
        if codebook_diversity_loss_weight > 0 and separate_codebook_per_head and heads > 1:
            # vqp averages the heads' soft assignments to their own codebooks into one
            # distribution; fastvq.codebook_losses.diversity_loss takes one codebook
            arg = "codebook_diversity_loss_weight with separate_codebook_per_head and heads > 1"
            raise _unsupported(name, arg, codebook_diversity_loss_weight)
        # vqp's derived defaults (with directional_reparam and vq_bridge unsupported)
        ema_update = True if ema_update is None else ema_update
        learnable_codebook = False if learnable_codebook is None else learnable_codebook
        rotation_trick = dim > 1 if rotation_trick is None else rotation_trick
        if use_cosine_sim and learnable_codebook:
            raise ValueError("use_cosine_sim is not compatible with learnable_codebook (as in vqp)")
        if ema_update and learnable_codebook:
            raise ValueError("learnable_codebook needs ema_update=False (as in vqp)")
        if not 0 <= sync_update_v <= 1:
            raise ValueError(f"sync_update_v must be in [0, 1], got {sync_update_v}")
        if sync_update_v > 0 and not learnable_codebook:
            raise ValueError("sync_update_v > 0 needs learnable_codebook=True (as in vqp)")
        sync_codebook = _is_distributed() if sync_codebook is None else sync_codebook
        if sync_codebook and (kmeans_init or threshold_ema_dead_code > 0):
            # vqp samples k-means seeds and replacements across ranks; not reproduced here
            raise _unsupported(
                name, "sync_codebook (with kmeans_init or a dead-code threshold)", True
            )

        self.dim, self.heads = dim, heads
        self.separate_codebook_per_head = separate_codebook_per_head
        codebook_dim = dim if codebook_dim is None else codebook_dim
        self.codebook_dim = codebook_dim
        inner = codebook_dim * heads
        self.has_projections = inner != dim
        if self.has_projections:
            proj = nn.Linear(dim, inner)
            self.project_in = (
                nn.Sequential(proj, nn.LayerNorm(inner)) if layernorm_after_project_in else proj
            )
            self.project_out = nn.Linear(inner, dim)
        else:
            self.project_in, self.project_out = nn.Identity(), nn.Identity()
        self.eps = eps
        self.commitment_weight = commitment_weight
        self.has_commitment_loss = commitment_weight > 0
        self.commitment_use_cross_entropy_loss = commitment_use_cross_entropy_loss
        self.learnable_codebook = learnable_codebook
        self.orthogonal_reg_weight = orthogonal_reg_weight
        self.has_codebook_orthogonal_loss = orthogonal_reg_weight > 0
        self.orthogonal_reg_active_codes_only = orthogonal_reg_active_codes_only
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        self.has_codebook_diversity_loss = codebook_diversity_loss_weight > 0
        self.codebook_diversity_loss_weight = codebook_diversity_loss_weight
        self.codebook_diversity_temperature = codebook_diversity_temperature
        self.rotation_trick = bool(rotation_trick)
        self.route_gradients_to_input = route_gradients_to_input
        self.sync_update_v = sync_update_v
        self.stochastic_sample_codes = stochastic_sample_codes
        self.sample_codebook_temp = sample_codebook_temp
        self.use_cosine_sim = use_cosine_sim
        self._codebook = Codebook(
            codebook_dim, codebook_size,
            num_codebooks=heads if separate_codebook_per_head else 1,
            kmeans_init=kmeans_init, kmeans_iters=kmeans_iters, decay=decay, eps=eps,
            threshold_ema_dead_code=threshold_ema_dead_code,
            learnable_codebook=self.has_codebook_orthogonal_loss or learnable_codebook,
            ema_update=ema_update, manual_ema_update=manual_ema_update,
            use_cosine_sim=use_cosine_sim, use_ddp=sync_codebook,
        )  # fmt: skip
        self._codebook.backend = backend
        self.codebook_size = codebook_size
        self.accept_image_fmap, self.accept_3d_fmap = accept_image_fmap, accept_3d_fmap
        self.channel_last = channel_last
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.freeze_codebook = freeze_codebook
        self.in_place_codebook_optimizer = None

    # --- vqp's accessors ---------------------------------------------------------------------

    @property
    def ema_update(self) -> bool:
        return self._codebook.ema_update

    @property
    def codebook(self) -> torch.Tensor:
        """``(K, d)`` (``(heads, K, d)`` with separate codebooks per head)."""
        embed = self._codebook.embed
        return embed if self.separate_codebook_per_head else embed[0]

    @codebook.setter
    def codebook(self, codes: torch.Tensor) -> None:
        if not self.separate_codebook_per_head:
            codes = codes[None]
        self._codebook.embed.copy_(codes)

    def _channels_first(self) -> bool:
        return not self.channel_last or self.accept_image_fmap or self.accept_3d_fmap

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes in codebook space for ``indices`` (the layer's index layout): ``(..., heads *
        d)``, channels moved to dim 1 as the layer's input layout has them."""
        codes = self._lookup(indices)
        return codes.movedim(-1, 1) if self._channels_first() else codes

    def _lookup(self, indices: torch.Tensor) -> torch.Tensor:
        embed = self._codebook.embed
        if self.heads == 1:
            return F.embedding(indices, embed[0])
        if self.separate_codebook_per_head:
            parts = [F.embedding(indices[..., h], embed[h]) for h in range(self.heads)]
        else:
            parts = [F.embedding(indices[..., h], embed[0]) for h in range(self.heads)]
        return torch.cat(parts, dim=-1)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """What the layer outputs in eval mode for ``indices``."""
        out = self.project_out(self._lookup(indices))
        return out.movedim(-1, 1) if self._channels_first() else out

    def update_in_place_optimizer(self) -> None:
        """vqp's hook for its in-place codebook optimizer; this front end has none (a no-op,
        as in vqp without ``in_place_codebook_optimizer``)."""

    # --- layout -------------------------------------------------------------------------------

    def _to_tokens(self, x: torch.Tensor):
        """``x`` -> ``(B, N, dim)`` and the function restoring a ``(B, N, ...)`` tensor to the
        input layout (``channel``: the tensor's last dim is the channel, moved to dim 1)."""
        if self.accept_image_fmap or self.accept_3d_fmap:
            spatial = x.shape[2:]
            return (
                x.flatten(2).transpose(1, 2),
                lambda t, channel: (
                    t.movedim(-1, 1).unflatten(2, spatial) if channel else t.unflatten(1, spatial)
                ),
            )
        if not self.channel_last:
            return x.transpose(1, 2), lambda t, channel: t.movedim(-1, 1) if channel else t
        return x, lambda t, channel: t

    def _split_heads(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, N, heads * d)`` -> vqp's ``(G, M, d)`` rows: separate codebooks ``(heads, B N,
        d)``, one shared codebook ``(1, B heads N, d)`` (vqp's row order)."""
        b, n = z.shape[:2]
        zh = z.reshape(b, n, self.heads, self.codebook_dim)
        if self.separate_codebook_per_head:
            return zh.permute(2, 0, 1, 3).reshape(self.heads, b * n, self.codebook_dim)
        return zh.permute(0, 2, 1, 3).reshape(1, b * self.heads * n, self.codebook_dim)

    def _merge_heads(self, t: torch.Tensor, b: int, n: int) -> torch.Tensor:
        """Inverse of :meth:`_split_heads` for ``(G, M, *rest)`` -> ``(B, N, heads, *rest)``."""
        rest = t.shape[2:]
        if self.separate_codebook_per_head:
            return t.reshape(self.heads, b, n, *rest).movedim(0, 2)
        return t.reshape(b, self.heads, n, *rest).movedim(1, 2)

    def _row_mask(self, mask: torch.Tensor | None, g: int) -> torch.Tensor | None:
        """vqp's ``repeat(mask, 'b n -> c (b h n)')``: the token mask for every row."""
        if mask is None:
            return None
        b, n = mask.shape
        h = 1 if self.separate_codebook_per_head else self.heads
        return mask[:, None, :].expand(b, h, n).reshape(1, -1).expand(g, -1)

    # --- forward ------------------------------------------------------------------------------

    def forward(
        self, x, indices=None, mask=None, lens=None, topk=None, sample_codebook_temp=None,
        freeze_codebook=None, return_loss_breakdown=False, codebook_transform_fn=None,
        ema_update_weight=None, accum_ema_update=False, ema_update=None,
    ):  # fmt: skip
        """See the class docstring."""
        name = type(self).__name__
        if codebook_transform_fn is not None:
            raise _unsupported(name, "codebook_transform_fn", codebook_transform_fn)
        input_requires_grad = x.requires_grad
        is_topk = topk is not None
        if is_topk:
            topk = min(int(topk), self.codebook_size)
            if self.heads != 1 or topk < 1:
                raise ValueError("topk codes need a single-head layer and topk >= 1 (as in vqp)")
            if self.commitment_use_cross_entropy_loss and self.training:
                raise ValueError(
                    "topk codes in training need commitment_use_cross_entropy_loss=False "
                    "(as in vqp)"
                )
        freeze = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        if mask is not None and lens is not None:
            raise ValueError("pass mask or lens, not both")
        if lens is not None:
            mask = torch.arange(x.shape[1], device=lens.device) < lens[:, None]
        only_one = x.ndim == 2
        if only_one:
            if mask is not None:
                raise ValueError("mask is not supported for a single token (as in vqp)")
            x = x[:, None]
        if (self.accept_image_fmap or self.accept_3d_fmap) and mask is not None:
            raise ValueError("mask is not supported with feature maps (as in vqp)")
        dtype = x.dtype
        xt, restore = self._to_tokens(x) if not only_one else (x, lambda t, channel: t)
        b, n = xt.shape[:2]
        z = self.project_in(xt)
        rows = self._codebook.transform_input(self._split_heads(z)).float()  # (G, M, d)
        g_count, m = rows.shape[:2]
        row_mask = self._row_mask(mask, g_count)

        cb = self._codebook
        cb.init_embed_(rows.detach(), row_mask)
        embed = cb.embed if cb.learnable_codebook else cb.embed.detach()
        update = self.training and not freeze and not is_topk
        ema_now = (cb.ema_update if ema_update is None else ema_update) and not is_topk
        if update and (ema_now or cb.has_dead_code_replacement):
            embed = embed.clone()  # the update writes embed in place; backward reads this copy
        temp = self.sample_codebook_temp if sample_codebook_temp is None else sample_codebook_temp
        sampled = self.training and self.stochastic_sample_codes and temp > 0
        if sampled and is_topk:  # vqp: Gumbel top-k (k samples without replacement)
            raise _unsupported(name, "topk with stochastic_sample_codes in training", topk)
        learn_commit = self.learnable_codebook and not freeze
        route = input_requires_grad and self.route_gradients_to_input
        be = resolve_backend(cb.backend, rows.device)
        zero = torch.zeros((), device=rows.device)

        commit = zero
        if is_topk or sampled:
            idx = torch.stack([
                _pick_codes(
                    rows[g].detach(), embed[g].detach(), cosine=self.use_cosine_sim,
                    temperature=temp, topk=topk,
                ) for g in range(g_count)
            ])  # fmt: skip
            codes = torch.stack([F.embedding(idx[g], embed[g]) for g in range(g_count)])
            zk = rows[:, :, None] if is_topk else rows
            # vqp detaches the codes in the training loss unless they are learned; eval keeps them
            cq = codes.detach() if (self.training and not learn_commit) else codes
            err = (cq - zk).square()
            if is_topk:  # per candidate, as vqp: mean over d, masked candidates 0
                commit = err.mean(-1)
                if row_mask is not None:
                    commit = torch.where(row_mask[..., None], commit, 0.0)
            elif row_mask is not None:
                commit = err[row_mask].mean()
            else:
                commit = err.mean()
            if self.training and route:
                q = _rotate_or_pass(zk.expand_as(codes), codes, self.rotation_trick)
            else:
                q = codes
        elif self.training:
            outs = [
                quantize_rows(
                    rows[g], embed[g], beta=1.0, backend=be,
                    keep=None if row_mask is None else row_mask[g],
                    codebook_weight=1.0 if learn_commit else 0.0,
                    rotation_trick=self.rotation_trick,
                ) for g in range(g_count)
            ]  # fmt: skip
            idx = torch.stack([o[1] for o in outs])
            losses = [o[2] for o in outs]
            if learn_commit:  # both terms carry the gradient; vqp's value is one mse
                losses = [lo - lo.detach() / 2 for lo in losses]
            commit = losses[0] if g_count == 1 else torch.stack(losses).mean()
            if route:
                q = torch.stack([o[0] for o in outs])
            else:  # vqp: no route to the input, the output keeps the codebook's gradient
                q = torch.stack([F.embedding(idx[g], embed[g]) for g in range(g_count)])
        else:
            idx = torch.stack(
                [search(rows[g].detach(), embed[g].detach(), be)[0] for g in range(g_count)]
            )
            q = torch.stack([F.embedding(idx[g], embed[g]) for g in range(g_count)])

        if update:
            cb.update_codebook(
                rows.detach(), idx, row_mask, ema_update_weight, accum_ema_update, ema_now
            )
        if self.training and self.sync_update_v > 0:
            q = q + self.sync_update_v * (q - q.detach())

        if indices is not None:  # vqp: (codes in codebook space, cross entropy to ``indices``)
            ce = self._cross_entropy(rows, embed, self._index_rows(indices, b, n))
            q = q.reshape(g_count, -1, n, *q.shape[2:])
            return (q[0] if self.heads == 1 else q).to(dtype), ce

        # the terms as vqp's LossBreakdown reports them (unweighted), in vqp's order of addition
        loss = commit_term = diversity = ortho = zero
        if self.training:
            loss = zero.clone().requires_grad_()
            if self.has_codebook_diversity_loss:
                # vqp averages the soft assignments over batch (and heads) per position
                diversity = diversity_loss(
                    rows[0].reshape(-1, n, rows.shape[-1]), embed[0],
                    temperature=self.codebook_diversity_temperature, cosine=self.use_cosine_sim,
                )  # fmt: skip
                loss = loss + diversity * self.codebook_diversity_loss_weight
            if self.has_commitment_loss:
                if self.commitment_use_cross_entropy_loss:
                    # vqp sets masked rows' indices to -1 (ignored), in place: the orthogonal
                    # loss's active codes below then include index -1, the last code
                    if row_mask is not None:
                        idx = idx.masked_fill(~row_mask, -1)
                    commit = self._cross_entropy(rows, embed, idx)
                commit_term = commit
                loss = loss + commit * self.commitment_weight
            if self.has_codebook_orthogonal_loss:
                ortho = self._orthogonal(idx)
                loss = loss + ortho * self.orthogonal_reg_weight
        elif is_topk:
            commit_term = commit
            loss = commit * self.commitment_weight if self.has_commitment_loss else commit

        # back to the input layout
        q = self._merge_heads(q.to(dtype), b, n)  # (B, N, heads, [k,] d)
        idx = self._merge_heads(idx, b, n)  # (B, N, heads[, k])
        if self.heads > 1:  # topk needs one head
            q = q.flatten(2)
        else:
            q, idx = q[:, :, 0], idx[:, :, 0]
        if is_topk:
            loss = loss.reshape(b, n, topk)
        q = self.project_out(q)
        if mask is not None:
            fill = torch.zeros_like(xt) if self.return_zeros_for_masked_padding else xt
            if is_topk:
                fill = fill[:, :, None].expand_as(q)
            q = torch.where(mask.reshape(b, n, *(1,) * (q.ndim - 2)), q, fill)
            idx = torch.where(mask.reshape(b, n, *(1,) * (idx.ndim - 2)), idx, -1)
        if only_one:
            q, idx = q[:, 0], idx[:, 0]
            if is_topk:
                loss = loss[:, 0]
        else:
            q, idx = restore(q, True), restore(idx, False)
            if is_topk and (self.accept_image_fmap or self.accept_3d_fmap):
                loss = restore(loss, False)
        if not return_loss_breakdown:
            return q, idx, loss
        return q, idx, loss, LossBreakdown(commit_term, diversity, ortho, zero)

    def _index_rows(self, indices: torch.Tensor, b: int, n: int) -> torch.Tensor:
        """Indices in the layer's layout (``(B, N)``, ``(B, N, heads)``, a feature map's
        ``(B, H, W[, heads])`` or vqp's flattened ``(B, H W)``) -> the rows' ``(G, M)``."""
        if indices.numel() != b * n * self.heads:
            raise ValueError(
                f"indices must hold {b} x {n} x {self.heads} (batch x tokens x heads) entries, "
                f"got shape {tuple(indices.shape)}"
            )
        idx = indices.reshape(b, n, self.heads).long()
        if self.separate_codebook_per_head:
            return idx.permute(2, 0, 1).reshape(self.heads, -1)
        return idx.permute(0, 2, 1).reshape(1, -1)

    def _cross_entropy(self, rows, embed, idx) -> torch.Tensor:
        """vqp's ``calculate_ce_loss``: cross entropy of vqp's logits (``-|z - c|``, ``z.c`` for
        cosine) to ``idx`` (G, M), -1 ignored, the mean over every valid row of every head, by
        :func:`fastvq.codebook_losses.ce_commitment_loss` (no M x K tensor). No valid row gives 0
        (vqp: NaN)."""
        cos = self.use_cosine_sim
        if rows.shape[0] == 1:
            return ce_commitment_loss(rows[0], embed[0], idx[0], cosine=cos)
        counts = (idx >= 0).sum(-1).float()
        losses = torch.stack([
            ce_commitment_loss(r, e, i, cosine=cos)
            for r, e, i in zip(rows, embed, idx, strict=True)
        ])  # fmt: skip
        return (losses * counts).sum() / counts.sum().clamp(min=1)

    def _orthogonal(self, idx: torch.Tensor) -> torch.Tensor:
        """vqp's orthogonal regulariser of the codebook (active codes only / a random subset of
        ``orthogonal_reg_max_codes`` codes when asked)."""
        codes = self._codebook.embed
        if self.orthogonal_reg_active_codes_only:
            if self.heads > 1 and self.separate_codebook_per_head:
                raise ValueError(
                    "orthogonal_reg_active_codes_only is not compatible with separate "
                    "codebooks per head (as in vqp)"
                )
            codes = codes[:, torch.unique(idx)]
        k = codes.shape[-2]
        if self.orthogonal_reg_max_codes is not None and k > self.orthogonal_reg_max_codes:
            keep = torch.randperm(k, device=codes.device)[: self.orthogonal_reg_max_codes]
            codes = codes[:, keep]
        return orthogonal_loss(codes)

    def _codebook_rows(self, x: torch.Tensor):
        """The input layout -> codebook-space rows ``(G, M, d)`` and ``(B, N)``."""
        only_one = x.ndim == 2
        xt = x[:, None] if only_one else self._to_tokens(x)[0]
        z = self.project_in(xt)
        return self._codebook.transform_input(self._split_heads(z)).float(), xt.shape[:2]

    @torch.no_grad()
    def expire_codes_(self, x: torch.Tensor) -> None:
        """vqp's dead-code replacement from ``x`` (codebook space, ``(B, N, heads * d)``)."""
        # vqp hands one head's (B, N, d) over as is: its leading dim then plays the codebook dim
        rows = x if self.heads == 1 else self._split_heads(x)
        self._codebook.expire_codes_(self._codebook.transform_input(rows).float())

    def update_indices(self, x, indices, mask=None) -> None:
        """The codebook step for ``x`` (the layer's input layout) and given ``indices`` (its
        index layout): vqp's manual EMA update (e.g. after ``topk`` or beam search)."""
        if (self.accept_image_fmap or self.accept_3d_fmap) and mask is not None:
            raise ValueError("mask is not supported with feature maps (as in vqp)")
        with torch.no_grad():
            rows, (b, n) = self._codebook_rows(x)
        idx = self._index_rows(indices, b, n)
        self._codebook.update_indices(rows, idx, self._row_mask(mask, rows.shape[0]))

    update_ema_indices = update_indices


# --- ResidualVQ ---------------------------------------------------------------------------------


def _frac_gradient(t: torch.Tensor, frac: float) -> torch.Tensor:
    if frac <= 0:
        return t.detach()
    return frac * t + (1.0 - frac) * t.detach()


def _maybe_sync_seed(device, max_size: int = 10_000) -> int:
    """vqp's ``get_maybe_sync_seed``: one draw of the global generator (all-reduced across
    ranks), so the same torch seed drops the same depths as vqp."""
    r = torch.randint(0, max_size, (), device=device)
    if _is_distributed():
        dist.all_reduce(r)
    return int(r.item())


class ResidualVQ(nn.Module):
    """vqp's ``ResidualVQ`` (SoundStream's algorithm 1) over this module's ``VectorQuantize``.

    ``forward(x, mask=None, indices=None, return_all_codes=False, sample_codebook_temp=None,
    freeze_codebook=False, beam_size=None, rand_quantize_dropout_fixed_seed=None)`` returns
    ``(quantized (B, N, dim), indices (B, N, Q), losses (Q,))`` (indices -1 at masked positions
    and dropped depths); ``return_all_codes`` adds the codes ``(Q, B, N, d)``.

    Beam search (``beam_size`` > 1) chooses the code sequences with fastvq's
    :func:`~fastvq.residual.residual_beam_search` under vqp's score (the sum of every depth's
    weighted commitment), then computes outputs, losses and gradients along the chosen sequence
    (vqp computes them for every beam and keeps the chosen one: the same values).
    """

    def __init__(
        self, *, dim, num_quantizers=None, codebook_size, codebook_dim=None,
        shared_codebook=False, diveq=False, heads=1, quantize_dropout=False,
        quantize_dropout_cutoff_index=0, quantize_dropout_multiple_of=1, accept_image_fmap=False,
        implicit_neural_codebook=False, mlp_kwargs=None, beam_size=None, eval_beam_size=None,
        beam_score_quantizer_weights=None, quant_grad_frac=0.0,
        return_zeros_for_masked_padding=True, **vq_kwargs,
    ):  # fmt: skip
        super().__init__()
        name = type(self).__name__
        if implicit_neural_codebook:
            raise _unsupported(name, "implicit_neural_codebook", implicit_neural_codebook)
        if diveq:
            raise _unsupported(name, "diveq", diveq)
        if mlp_kwargs:
            raise _unsupported(name, "mlp_kwargs", mlp_kwargs)
        if heads != 1:
            raise ValueError("residual vq is not compatible with multi-headed codes (as in vqp)")
        if num_quantizers is None and not isinstance(codebook_size, tuple):
            raise ValueError("pass num_quantizers or a tuple of codebook sizes")
        codebook_dim = dim if codebook_dim is None else codebook_dim
        self.codebook_dim = codebook_dim
        self.has_projections = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.has_projections else nn.Identity()
        self.accept_image_fmap = accept_image_fmap
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        vq_kwargs.update(return_zeros_for_masked_padding=return_zeros_for_masked_padding)
        if shared_codebook:
            vq_kwargs.update(manual_ema_update=True)
        sizes = (
            codebook_size if isinstance(codebook_size, tuple) else (codebook_size,) * num_quantizers
        )
        num_quantizers = len(sizes) if num_quantizers is None else num_quantizers
        if len(sizes) != num_quantizers:
            raise ValueError(f"{len(sizes)} codebook sizes for {num_quantizers} quantizers")
        self.num_quantizers, self.codebook_sizes = num_quantizers, sizes
        self.uniform_codebook_size = len(set(sizes)) == 1
        self.layers = nn.ModuleList(
            VectorQuantize(
                dim=codebook_dim, codebook_size=k, codebook_dim=codebook_dim,
                accept_image_fmap=accept_image_fmap, **vq_kwargs,
            ) for k in sizes
        )  # fmt: skip
        self.quantize_dropout = quantize_dropout and num_quantizers > 1
        if quantize_dropout_cutoff_index < 0:
            raise ValueError("quantize_dropout_cutoff_index must be >= 0")
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.vq_is_ema_updating = self.layers[0].ema_update
        self.quant_grad_frac = quant_grad_frac
        if eval_beam_size is not None and beam_size is None:
            raise ValueError("eval_beam_size needs beam_size (as in vqp)")
        self.beam_size = beam_size
        self.eval_beam_size = beam_size if eval_beam_size is None else eval_beam_size
        weights = beam_score_quantizer_weights or [1.0] * num_quantizers
        if len(weights) != num_quantizers:
            raise ValueError("beam_score_quantizer_weights needs one weight per quantizer")
        self.register_buffer("beam_score_weights", torch.tensor(weights), persistent=False)
        self.shared_codebook = shared_codebook
        if shared_codebook:
            if not self.uniform_codebook_size:
                raise ValueError("a shared codebook needs one codebook size (as in vqp)")
            for vq in self.layers[1:]:
                vq._codebook = self.layers[0]._codebook

    @property
    def codebook_size(self) -> int:
        return self.layers[0].codebook_size

    @property
    def codebooks(self):
        """``(Q, K, d)`` (a tuple of ``(K_i, d)`` for sizes per depth)."""
        books = tuple(layer._codebook.embed[0] for layer in self.layers)
        return torch.stack(books) if self.uniform_codebook_size else books

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes ``(Q, B, ..., d)`` for indices ``(B, ..., q)`` (-1 and missing depths: 0)."""
        q = indices.shape[-1]
        if q < self.num_quantizers:
            if not self.quantize_dropout:
                raise ValueError("fewer indices than quantizers needs quantize_dropout (as in vqp)")
            indices = F.pad(indices, (0, self.num_quantizers - q), value=-1)
        dropped = indices == -1
        indices = indices.masked_fill(dropped, 0)
        codes = torch.stack([
            F.embedding(indices[..., i], self.layers[i]._codebook.embed[0])
            for i in range(self.num_quantizers)
        ])  # fmt: skip
        return codes.masked_fill(dropped.movedim(-1, 0)[..., None], 0.0)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.project_out(self.get_codes_from_indices(indices).sum(0))

    def _num_active(self, seed, device) -> int:
        """vqp's quantize dropout draw: the last depth run, from ``random.Random(seed)``."""
        if seed is None:
            seed = _maybe_sync_seed(device)
        last = random.Random(seed).randrange(
            self.quantize_dropout_cutoff_index, self.num_quantizers
        )
        mult = self.quantize_dropout_multiple_of
        if mult != 1:
            last = math.ceil((last + 1) / mult) * mult - 1
        return last + 1

    def forward(
        self, x, mask=None, indices=None, return_all_codes=False, sample_codebook_temp=None,
        freeze_codebook=False, beam_size=None, rand_quantize_dropout_fixed_seed=None,
    ):  # fmt: skip
        """See the class docstring."""
        if indices is not None:  # vqp 1.32.0 fails here too (3 values unpacked from 2)
            raise _unsupported(
                type(self).__name__, "indices (cross-entropy to given codes)", "given"
            )
        beam = beam_size if beam_size is not None else (
            self.beam_size if self.training else self.eval_beam_size
        )  # fmt: skip
        is_beam = beam is not None and beam > 1
        z = self.project_in(x)
        q_total = self.num_quantizers
        active = q_total
        if self.training and self.quantize_dropout:
            active = self._num_active(rand_quantize_dropout_fixed_seed, x.device)
        layers = self.layers[:active]
        residuals, all_idx, all_losses = [], [], []
        quantized_out = torch.zeros_like(z)
        if is_beam:
            quantized_out, all_idx, all_losses, residuals = self._beam(
                z, mask, layers, beam, sample_codebook_temp, freeze_codebook
            )
        else:
            residual = z
            for vq in layers:
                residuals.append(residual)
                q, idx, loss = vq(
                    residual, mask=mask, sample_codebook_temp=sample_codebook_temp,
                    freeze_codebook=freeze_codebook,
                )  # fmt: skip
                residual = residual - _frac_gradient(q, self.quant_grad_frac)
                quantized_out = quantized_out + q
                all_idx.append(idx)
                all_losses.append(loss.reshape(()))
        # vqp runs this even with freeze_codebook (a recomputation of the codes from unchanged
        # statistics then, and dead-code replacement)
        if self.training and self.shared_codebook:
            first = self.layers[0]
            if self.vq_is_ema_updating:
                first._codebook.update_ema()
            pooled = torch.stack([r.detach() for r in residuals], dim=-2)
            first.expire_codes_(pooled.reshape(pooled.shape[0], -1, pooled.shape[-1]))
        fill_idx = all_idx[0].new_full(all_idx[0].shape, -1)
        all_idx = all_idx + [fill_idx] * (q_total - active)
        zero = torch.zeros((), device=x.device)
        all_losses = all_losses + [zero] * (q_total - active)
        quantized_out = self.project_out(quantized_out)
        if mask is not None:
            fill = torch.zeros_like(quantized_out) if self.return_zeros_for_masked_padding else x
            quantized_out = torch.where(mask[..., None], quantized_out, fill)
        out_idx = torch.stack(all_idx, dim=-1)
        ret = (quantized_out, out_idx, torch.stack(all_losses))
        if return_all_codes:
            ret = (*ret, self.get_codes_from_indices(out_idx))
        return ret

    def _beam(self, z, mask, layers, beam, temp, freeze):
        """Beam search over ``layers``: the chosen sequence by vqp's score, then each depth's
        output (rotation trick or straight-through) and loss along it, and vqp's EMA step from
        the chosen residuals."""
        name = type(self).__name__
        first = layers[0]
        if first.use_cosine_sim:
            raise _unsupported(name, "beam_size with use_cosine_sim", beam)
        if first.stochastic_sample_codes:
            raise _unsupported(name, "beam_size with stochastic_sample_codes", beam)
        if not first.has_commitment_loss:
            raise _unsupported(name, "beam_size with commitment_weight=0", beam)
        if self.training and first.commitment_use_cross_entropy_loss:
            raise ValueError(
                "beam search in training needs commitment_use_cross_entropy_loss=False (as in vqp)"
            )
        if self.training and first.has_codebook_diversity_loss:
            # vqp adds each depth's diversity over all beams to every candidate's loss
            raise _unsupported(name, "beam_size with codebook_diversity_loss_weight", beam)
        if self.accept_image_fmap:
            raise _unsupported(name, "beam_size with accept_image_fmap", beam)
        if self.training and first.has_codebook_orthogonal_loss:
            # vqp adds the orthogonal term to every candidate's loss; this route does not
            raise _unsupported(name, "beam_size with orthogonal_reg_weight", beam)
        if self.training and first.sync_update_v > 0:
            raise _unsupported(name, "beam_size with sync_update_v", beam)
        if self.training and not all(bool(vq._codebook.initted) for vq in layers):
            # vqp's k-means runs on each depth's rows first; the beam reads the codes as they are
            raise _unsupported(
                name, "beam_size with kmeans_init (before the codes are initted)", beam
            )
        lead, d = z.shape[:-1], z.shape[-1]
        books = [vq._codebook.embed[0].detach() for vq in layers]
        weights = self.beam_score_weights[: len(layers)].tolist()
        idx, _ = residual_beam_search(
            z.detach().reshape(-1, d).float(), books, beam, score_weights=weights
        )
        idx = idx.reshape(*lead, len(layers))
        keep = None if mask is None else mask
        residual, out = z, torch.zeros_like(z)
        residuals, all_idx, all_losses = [], [], []
        for i, vq in enumerate(layers):
            residuals.append(residual)
            embed = vq._codebook.embed[0]
            codes = F.embedding(idx[..., i], embed)
            cq = (
                codes
                if (vq.learnable_codebook and not freeze and self.training)
                else codes.detach()
            )
            per_token = (cq - residual.float()).square().mean(-1) * vq.commitment_weight
            if keep is not None:
                per_token = torch.where(keep, per_token, 0.0)
                loss = per_token.sum() / keep.sum().clamp_min(1e-4)
            else:
                loss = per_token.mean()
            if self.training and residual.requires_grad and vq.route_gradients_to_input:
                q = _rotate_or_pass(residual, codes, vq.rotation_trick).to(z.dtype)
            else:
                q = codes.to(z.dtype)
            if keep is not None:
                q = torch.where(keep[..., None], q, 0.0)
            residual = residual - _frac_gradient(q, self.quant_grad_frac)
            out = out + q
            layer_idx = idx[..., i] if keep is None else torch.where(keep, idx[..., i], -1)
            all_idx.append(layer_idx)
            all_losses.append(loss)
        if self.training and not freeze:
            for vq, r, i in zip(layers, residuals, all_idx, strict=True):
                vq.update_indices(r.detach(), i, mask=mask)
        return out, all_idx, all_losses, residuals


class GroupedResidualVQ(nn.Module):
    """vqp's ``GroupedResidualVQ``: the feature dim split into ``groups``, one
    :class:`ResidualVQ` each. ``forward(x, indices=None, return_all_codes=False,
    sample_codebook_temp=None, freeze_codebook=False, mask=None)`` returns ``(quantized,
    indices (groups, B, N, Q), losses (groups, Q))``."""

    def __init__(self, *, dim, groups=1, accept_image_fmap=False, **kwargs):
        super().__init__()
        if dim % groups != 0:
            raise ValueError(f"dim ({dim}) must be divisible by groups ({groups})")
        self.dim, self.groups, self.accept_image_fmap = dim, groups, accept_image_fmap
        self.rvqs = nn.ModuleList(
            ResidualVQ(dim=dim // groups, accept_image_fmap=accept_image_fmap, **kwargs)
            for _ in range(groups)
        )

    @property
    def codebooks(self) -> torch.Tensor:
        return torch.stack([rvq.codebooks for rvq in self.rvqs])

    @property
    def split_dim(self) -> int:
        return 1 if self.accept_image_fmap else -1

    def get_codes_from_indices(self, indices) -> torch.Tensor:
        return torch.stack(
            [rvq.get_codes_from_indices(i) for rvq, i in zip(self.rvqs, indices, strict=True)]
        )

    def get_output_from_indices(self, indices) -> torch.Tensor:
        outs = [rvq.get_output_from_indices(i) for rvq, i in zip(self.rvqs, indices, strict=True)]
        return torch.cat(outs, dim=self.split_dim)

    def forward(
        self, x, indices=None, return_all_codes=False, sample_codebook_temp=None,
        freeze_codebook=False, mask=None,
    ):  # fmt: skip
        """See the class docstring."""
        if indices is not None:  # vqp 1.32.0 fails here too (its ResidualVQ does)
            raise _unsupported(
                type(self).__name__, "indices (cross-entropy to given codes)", "given"
            )
        if x.shape[self.split_dim] != self.dim:
            raise ValueError(f"x must have {self.dim} channels in dim {self.split_dim}")
        chunks = x.chunk(self.groups, dim=self.split_dim)
        seed = _maybe_sync_seed(x.device) if self.training else None
        outs = [
            rvq(
                c, mask=mask, return_all_codes=return_all_codes,
                sample_codebook_temp=sample_codebook_temp, freeze_codebook=freeze_codebook,
                rand_quantize_dropout_fixed_seed=seed,
            ) for rvq, c in zip(self.rvqs, chunks, strict=True)
        ]  # fmt: skip
        quantized, idx, losses, *codes = zip(*outs, strict=True)
        ret = (torch.cat(quantized, dim=self.split_dim), torch.stack(idx), torch.stack(losses))
        return (*ret, torch.stack(codes[0])) if codes else ret
