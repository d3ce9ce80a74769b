"""vqp's ``VectorQuantize`` (vector-quantize-pytorch 1.32.0) on fastvq's pieces.

vqp's argument names and defaults (``decay=0.8``, ``commitment_weight=1``, the rotation trick
on when ``dim > 1``, ``channel_last=True``, heads sharing one codebook), its outputs
``(quantize, indices, loss)`` (and ``LossBreakdown``), its masking (zeros and index -1), its eval
mode (loss 0) and its ``state_dict`` keys, mapped onto:

* the codes and their learning: a :class:`fastvq.codebook.Codebook` with vqp's policies, under
  vqp's names (:class:`.codebook.VqpCodebook`); the layouts: :class:`.layout.Layout`;
* search, commitment loss and straight-through or rotation-trick gradient: one
  :func:`fastvq.functional.quantize_rows` per codebook (no N x K tensor); the rotation of given
  codes (``topk``, sampling, beam): :func:`fastvq.functional.attach_codes`;
* vqp's losses on its logits (cross-entropy commitment, diversity, ``indices=``) and the
  orthogonal loss: :mod:`fastvq.codebook_losses`; ``topk`` and stochastic sampling:
  :mod:`fastvq.sampling`.

The differences from vqp that remain are listed in docs/layer.md ("Coming from
vector-quantize-pytorch"); an argument this front end cannot honour raises
``NotImplementedError`` naming it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ... import _dist
from ..._docs import add_args
from ...codebook.vqp_rules import l2norm
from ...codebook_losses import ce_commitment_loss, diversity_loss
from ...codebook_losses import orthogonal_loss as _orthogonal_loss
from ...functional import attach_codes, quantize_rows
from ...ops import resolve_backend, search
from ...sampling import gumbel_soft_codes, sample_codes, topk_codes
from .codebook import VqpCodebook
from .layout import Layout

__all__ = ["LossBreakdown", "VectorQuantize", "orthogonal_loss"]


class LossBreakdown(NamedTuple):
    """vqp's ``return_loss_breakdown=True`` fourth output (unweighted terms).

    Args:
        commitment: fp32 0-dim, the commitment term (mse, or the cross entropy with
            ``commitment_use_cross_entropy_loss``); 0 when off or in eval; with ``topk``, per
            candidate ``(B, N, k)``, N the tokens (``H * W`` for a feature map, as vqp).
        codebook_diversity: fp32 0-dim, the diversity loss; 0 in eval or when its weight is 0.
        orthogonal_reg: fp32 0-dim, the orthogonal regulariser; 0 in eval or when its weight is 0.
        inplace_optimize: always 0 (vqp's ``in_place_codebook_optimizer`` is not supported).
    """

    commitment: torch.Tensor
    codebook_diversity: torch.Tensor
    orthogonal_reg: torch.Tensor
    inplace_optimize: torch.Tensor


def _unsupported(cls: str, name: str, value) -> NotImplementedError:
    return NotImplementedError(
        f"fastvq.compat.vqp.{cls}: {name}={value!r} is not supported by this front end "
        "(see docs/layer.md, 'Coming from vector-quantize-pytorch')"
    )


def orthogonal_loss(codes: torch.Tensor) -> torch.Tensor:
    """Orthogonal regularisation (Shin et al. 2021, eq. 2) of ``codes`` (h, n, d) or (n, d):
    the mean squared error of the codes' cosine Gram matrix against the identity,
    ``mean((G - I)^2)`` over (h, n, n), with vqp's l2norm floor.

    For non-zero codes this is vqp 1.32.0's ``sum(G^2) / (h n^2) - 1/n`` (its diagonal is 1),
    which :func:`fastvq.codebook_losses.orthogonal_loss` computes without an n x n matrix when
    d < n. A zero code has a zero Gram row, which vqp's form counts as 1 on the diagonal and
    upstream's later ``test_orthogonal_zero_codes`` corrects to this form: the difference is
    the diagonal term ``2 sum_i (1 - |u_i|^2) / (h n^2)``, added here (O(h n d)).

    Computed in fp32 (``fastvq.codebook_losses``); the result has ``codes``' dtype.

    Args:
        codes: float ``(h, n, d)`` (h codebooks of n codes of size d) or ``(n, d)``;
            differentiable.
    """
    dtype = codes.dtype
    c32 = codes if dtype in (torch.float16, torch.bfloat16) else codes.to(torch.float32)
    h = c32.shape[0] if c32.dim() == 3 else 1
    n = c32.shape[-2]
    diag = l2norm(c32.float()).square().sum(-1)  # |u_i|^2: 1, or below 1 for (near-)zero codes
    return (_orthogonal_loss(c32) + 2 * (1 - diag).sum() / (h * n * n)).to(dtype)


def _rotate_or_pass(z: torch.Tensor, q: torch.Tensor, rotation: bool) -> torch.Tensor:
    """Forward value ``q`` (detached), gradient to ``z`` straight through or by fastvq's
    rotation trick, for rows already paired with their codes: ``z``, ``q`` (..., d)."""
    q = q.detach()
    if not rotation:
        return z + (q - z).detach()
    return attach_codes(z, q.to(z.dtype), rotation=True)


@torch.no_grad()
def _check_mask_layout(layout, x, mask) -> None:
    """vqp takes no mask with one-token ``(B, dim)`` input or a feature map, in ``forward`` and
    ``update_indices`` alike."""
    if mask is not None and (x.ndim == 2 or layout.fmap):
        raise ValueError("mask is not supported for one token or feature maps (as in vqp)")


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


def _directional_reparam(z: torch.Tensor, q: torch.Tensor, variance: float) -> torch.Tensor:
    """vqp's ``directional_reparam`` (DiVeQ, openreview KRVnpTbx7R, fig. 1): ``z + sg(u) |q - z|``
    with ``u`` the unit direction of ``q - z`` plus Gaussian noise of ``variance`` (torch's
    global generator, vqp's draws): the output's value is about ``q``, and both ``z`` and the
    codes get a gradient through the error's norm. ``z``, ``q`` (..., d)."""
    err = q - z
    noised = err + math.sqrt(variance) * torch.randn_like(err)
    return z + l2norm(noised).detach() * err.norm(dim=-1, keepdim=True)


def _soft_codes(rows, embed, idx, temperature, cosine) -> torch.Tensor:
    """vqp's ``straight_through`` codes per codebook: ``embed[g][idx[g]]`` with the gradient of
    the softmax of vqp's logits to ``rows`` (:func:`fastvq.sampling.gumbel_soft_codes`, no
    M x K tensor). ``rows`` (G, M, d), ``embed`` (G, K, d), ``idx`` (G, M) -> (G, M, d)."""
    return torch.stack([
        gumbel_soft_codes(r, e.detach(), i, temperature=temperature, cosine=cosine)
        for r, e, i in zip(rows, embed, idx, strict=True)
    ])  # fmt: skip


class VectorQuantize(nn.Module):
    """vqp's ``VectorQuantize`` on fastvq's fused op (same arguments, defaults, outputs, keys).

    ``forward(x, indices=None, mask=None, lens=None, topk=None, sample_codebook_temp=None,
    freeze_codebook=None, return_loss_breakdown=False, codebook_transform_fn=None,
    ema_update_weight=None, accum_ema_update=False, ema_update=None)`` takes ``x`` ``(B, N, dim)``
    (``(B, dim, N)`` with ``channel_last=False``, ``(B, dim, H, W)`` with ``accept_image_fmap``,
    ``(B, dim, D, H, W)`` with ``accept_3d_fmap``, ``(B, dim)`` for one token) and returns
    ``(quantize, indices, loss)``: ``quantize`` like ``x``; ``indices`` int64 ``(B, N)`` (``(B, N,
    heads)`` with heads, ``(B, H, W)`` for a feature map), -1 at masked positions; ``loss`` an fp32
    scalar in training (``commitment_weight * mse`` + regularisers), 0 in eval. With ``topk=k``:
    ``(B, N, k, dim)``, ``(B, N, k)`` and a per-candidate loss ``(B, N, k)``; the codebook is not
    updated. With ``indices`` (the layer's index layout, -1 ignored): vqp's ``(quantize, ce_loss)``,
    the codes in codebook space in vqp's layout (``(B, N, d)``; heads ``(1, B heads, N, d)`` sharing
    a codebook, ``(heads, B, N, d)`` separate; no projection, mask or layout restored) and the cross
    entropy of vqp's logits to ``indices`` (the training step still updates the codebook).

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
        # vqp's derived defaults (with vq_bridge unsupported)
        diveq = bool(directional_reparam)
        ema_update = not diveq if ema_update is None else ema_update
        learnable_codebook = diveq if learnable_codebook is None else learnable_codebook
        rotation_trick = (not diveq and dim > 1) if rotation_trick is None else rotation_trick
        if sum(map(bool, (straight_through, rotation_trick, diveq))) > 1:
            raise ValueError(
                "straight_through, rotation_trick and directional_reparam: at most one (as in "
                "vqp; rotation_trick defaults to dim > 1, pass rotation_trick=False)"
            )
        if diveq and threshold_ema_dead_code == 0:
            raise ValueError(
                "directional_reparam needs threshold_ema_dead_code > 0 (periodic dead-code "
                "replacement, as in vqp)"
            )
        if straight_through and learnable_codebook:
            raise ValueError("straight_through is not allowed with learnable_codebook (as in vqp)")
        if use_cosine_sim and learnable_codebook:
            raise ValueError("use_cosine_sim is not compatible with learnable_codebook (as in vqp)")
        if ema_update and learnable_codebook:
            raise ValueError("learnable_codebook needs ema_update=False (as in vqp)")
        if not 0 <= sync_update_v <= 1:
            raise ValueError(f"sync_update_v must be in [0, 1], got {sync_update_v}")
        if sync_update_v > 0 and not learnable_codebook:
            raise ValueError("sync_update_v > 0 needs learnable_codebook=True (as in vqp)")
        sync_codebook = _dist.is_distributed() if sync_codebook is None else sync_codebook
        if sync_codebook and (kmeans_init or threshold_ema_dead_code > 0):
            # vqp samples k-means seeds and replacements across ranks; not reproduced here
            raise _unsupported(
                name, "sync_codebook (with kmeans_init or a dead-code threshold)", True
            )

        codebook_dim = dim if codebook_dim is None else codebook_dim
        self.dim, self.heads, self.codebook_dim = dim, heads, codebook_dim
        self.separate_codebook_per_head = separate_codebook_per_head
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
        # vqp's attribute names (ResidualVQ and vqp's users read them)
        self.eps, self.learnable_codebook = eps, learnable_codebook
        self.commitment_weight = commitment_weight
        self.has_commitment_loss = commitment_weight > 0 and not diveq
        self.directional_reparam = diveq
        self.directional_reparam_variance = directional_reparam_variance
        self.commitment_use_cross_entropy_loss = commitment_use_cross_entropy_loss
        self.orthogonal_reg_weight = orthogonal_reg_weight
        self.has_codebook_orthogonal_loss = orthogonal_reg_weight > 0
        self.orthogonal_reg_active_codes_only = orthogonal_reg_active_codes_only
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        self.codebook_diversity_loss_weight = codebook_diversity_loss_weight
        self.has_codebook_diversity_loss = codebook_diversity_loss_weight > 0
        self.codebook_diversity_temperature = codebook_diversity_temperature
        self.rotation_trick, self.sync_update_v = bool(rotation_trick), sync_update_v
        self.route_gradients_to_input = route_gradients_to_input
        self.stochastic_sample_codes, self.use_cosine_sim = stochastic_sample_codes, use_cosine_sim
        self.sample_codebook_temp, self.straight_through = sample_codebook_temp, straight_through
        self._codebook = VqpCodebook(
            codebook_dim, codebook_size,
            num_codebooks=heads if separate_codebook_per_head else 1,
            kmeans_init=kmeans_init, kmeans_iters=kmeans_iters, decay=decay, eps=eps,
            threshold_ema_dead_code=threshold_ema_dead_code,
            learnable_codebook=self.has_codebook_orthogonal_loss or learnable_codebook,
            ema_update=ema_update, manual_ema_update=manual_ema_update,
            use_cosine_sim=use_cosine_sim, use_ddp=sync_codebook, backend=backend,
        )  # fmt: skip
        self.codebook_size = codebook_size
        self.accept_image_fmap, self.accept_3d_fmap = accept_image_fmap, accept_3d_fmap
        self.channel_last = channel_last
        self.layout = Layout(
            heads, codebook_dim, separate_codebook_per_head, channel_last,
            accept_image_fmap or accept_3d_fmap,
        )  # fmt: skip
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.freeze_codebook = freeze_codebook
        self.in_place_codebook_optimizer = None

    # --- vqp's accessors ---------------------------------------------------------------------

    @property
    def codebook_module(self) -> VqpCodebook:
        """The codebook module (vqp's ``_codebook``)."""
        return self._codebook

    def share_codebook_(self, other: VectorQuantize) -> None:
        """Use ``other``'s codebook module (vqp's ``ResidualVQ(shared_codebook=True)``)."""
        self._codebook = other.codebook_module

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
        self._codebook.set_embed_(codes)

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes in codebook space for ``indices`` (the layer's index layout): ``(..., heads *
        d)``, channels moved to dim 1 as the layer's input layout has them."""
        codes = self._codebook.lookup(indices, self.heads)
        return codes.movedim(-1, 1) if self.layout.channels_first else codes

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """What the layer outputs in eval mode for ``indices``."""
        out = self.project_out(self._codebook.lookup(indices, self.heads))
        return out.movedim(-1, 1) if self.layout.channels_first else out

    def update_in_place_optimizer(self) -> None:
        """vqp's hook for its in-place codebook optimizer; this front end has none (a no-op,
        as in vqp without ``in_place_codebook_optimizer``)."""

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
                raise ValueError("topk in training needs commitment_use_cross_entropy_loss=False")
        freeze = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        if mask is not None and lens is not None:
            raise ValueError("pass mask or lens, not both")
        if lens is not None:
            mask = torch.arange(x.shape[1], device=lens.device) < lens[:, None]
        _check_mask_layout(self.layout, x, mask)
        dtype = x.dtype
        xt, restore, rows = self._rows(x)  # rows (G, M, d)
        (b, n), g_count = xt.shape[:2], rows.shape[0]
        row_mask = self.layout.row_mask(mask, g_count)

        cb = self._codebook
        rows_d = rows.detach()
        cb.kmeans_init_(list(rows_d), [None] * g_count if row_mask is None else list(row_mask))
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
        # vqp's Gumbel straight-through: its soft path survives only where the layer's own
        # straight-through (on an input that requires grad) does not replace it
        soft = self.straight_through and self.training and temp > 0 and not route
        if soft and is_topk:
            raise _unsupported(name, "topk with straight_through in training", topk)
        diveq = self.training and route and self.directional_reparam
        zk = rows
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
            if diveq:
                q = codes  # DiVeQ after the codebook step, as vqp (its noise follows its draws)
            elif self.training and route:
                q = _rotate_or_pass(zk.expand_as(codes), codes, self.rotation_trick)
            else:
                q = _soft_codes(rows, embed, idx, temp, self.use_cosine_sim) if soft else codes
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
            if diveq:
                q = torch.stack([F.embedding(idx[g], embed[g]) for g in range(g_count)])
            elif route:
                q = torch.stack([o[0] for o in outs])
            elif soft:
                q = _soft_codes(rows, embed, idx, temp, self.use_cosine_sim)
            else:  # vqp: no route to the input, the output keeps the codebook's gradient
                q = torch.stack([F.embedding(idx[g], embed[g]) for g in range(g_count)])
        else:
            idx = torch.stack(
                [search(rows[g].detach(), embed[g].detach(), be)[0] for g in range(g_count)]
            )
            q = torch.stack([F.embedding(idx[g], embed[g]) for g in range(g_count)])

        if update:
            cb.update_(rows_d, idx, row_mask, ema_update_weight, accum_ema_update, ema_now)
        if diveq:
            q = _directional_reparam(zk.expand_as(q), q, self.directional_reparam_variance)
        if self.training and self.sync_update_v > 0:
            q = q + self.sync_update_v * (q - q.detach())

        if indices is not None:  # vqp: (codes in codebook space, cross entropy to ``indices``)
            ce = self._cross_entropy(rows, embed, self.layout.index_rows(indices, b, n))
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
        q, idx = self.layout.merge(q.to(dtype), idx, b, n)
        q = self.project_out(q)
        if mask is not None:
            fill = torch.zeros_like(xt) if self.return_zeros_for_masked_padding else xt
            fill = fill[:, :, None].expand_as(q) if is_topk else fill
            q = torch.where(mask.reshape(b, n, *(1,) * (q.ndim - 2)), q, fill)
            idx = torch.where(mask.reshape(b, n, *(1,) * (idx.ndim - 2)), idx, -1)
        q, idx = restore(q, True), restore(idx, False)
        if is_topk:
            loss = restore(loss.reshape(b, n, topk), False)
            if commit_term.dim():  # per candidate, (B, N, k) whatever the layout (as vqp's)
                commit_term = commit_term.reshape(b, n, topk)
        if not return_loss_breakdown:
            return q, idx, loss
        return q, idx, loss, LossBreakdown(commit_term, diversity, ortho, zero)

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

    def _rows(self, x: torch.Tensor):
        """``x`` in the input layout -> its tokens ``(B, N, dim)``, the function restoring the
        layout (:meth:`.layout.Layout.to_tokens`) and the codebook-space rows fp32 ``(G, M, d)``."""
        xt, restore = self.layout.to_tokens(x)
        z = self.project_in(xt)
        return xt, restore, self._codebook.transform_input(self.layout.split_heads(z)).float()

    @torch.no_grad()
    def expire_codes_(self, x: torch.Tensor) -> None:
        """vqp's dead-code replacement from ``x`` (codebook space, ``(B, N, heads * d)``)."""
        # vqp hands one head's (B, N, d) over as is: its leading dim then plays the codebook dim
        rows = x if self.heads == 1 else self.layout.split_heads(x)
        self._codebook.expire_(self._codebook.transform_input(rows).float())

    def update_indices(self, x, indices, mask=None) -> None:
        """The codebook step for ``x`` (the layer's input layout) and given ``indices`` (its
        index layout): vqp's manual EMA update (e.g. after ``topk`` or beam search)."""
        _check_mask_layout(self.layout, x, mask)
        with torch.no_grad():
            xt, _, rows = self._rows(x)
        idx = self.layout.index_rows(indices, *xt.shape[:2])
        idx = idx.masked_fill(idx == -1, 0)  # vqp: -1 counts as code 0 (masked rows: ``mask``)
        self._codebook.update_(rows, idx, self.layout.row_mask(mask, rows.shape[0]))

    update_ema_indices = update_indices


# VectorQuantize's argument tables: beside the class, so that its body holds code (the skeleton's
# size limits, tests/test_architecture.py); help() and docs/reference.md see one docstring.
add_args(
    VectorQuantize,
    """
        dim: the input's feature size (x's last axis; axis 1 with ``channel_last=False`` or a
            feature map).
        codebook_size: K, the number of codes of each codebook.
        codebook_dim: d, the code size; None: ``dim``. When ``heads * d != dim``, the layer adds
            ``project_in`` (``nn.Linear(dim, heads * d)``) and ``project_out`` (back to ``dim``).
        heads: h: each token's ``heads * d`` (projected) features are quantized as h vectors of
            d; with ``heads > 1`` the indices get a last axis of h.
        separate_codebook_per_head: True: one codebook per head (``codebook`` ``(heads, K, d)``);
            False: the heads share one codebook.
        decay: EMA decay of the codes' counts and sums (vqp's rule: ``N <- lerp(N, n, 1 -
            decay)``).
        eps: Laplace smoothing epsilon of the EMA counts when the codes are recomputed from them.
        freeze_codebook: default of ``forward``'s ``freeze_codebook`` (True: no codebook update,
            no commitment gradient to a learnable codebook).
        kmeans_init: the codes start at zero and are set by vqp's k-means (K sampled rows, then
            Lloyd steps) on the first forward's unmasked rows, in training or eval.
        kmeans_iters: Lloyd iterations of the k-means init.
        sync_kmeans: accepted and ignored: vqp uses it only with ``sync_codebook`` and
            ``kmeans_init`` or dead codes, which raise ``NotImplementedError`` here.
        use_cosine_sim: inputs (after ``project_in``) and codes l2-normalised, nearest code by
            dot product; ValueError with ``learnable_codebook``.
        layernorm_after_project_in: an ``nn.LayerNorm`` after ``project_in`` (only when there is
            a projection: ``heads * codebook_dim != dim``).
        threshold_ema_dead_code: in training, codes whose EMA count (``cluster_size``) is below
            this are replaced by random rows of the batch (vqp's rule); 0: never.
        channel_last: True: tokens ``(B, N, dim)``; False: ``(B, dim, N)``. Ignored for feature
            maps and one-token ``(B, dim)`` inputs.
        accept_image_fmap: x is a feature map ``(B, dim, H, W)``, indices ``(B, H, W)``; no
            ``mask``.
        accept_3d_fmap: x is a volume ``(B, dim, D, H, W)``, indices ``(B, D, H, W)``; no
            ``mask``.
        commitment_weight: weight of the commitment term (mse of the codebook-space input to its
            codes, or the cross entropy below) in the loss; <= 0: no commitment term in training.
        commitment_use_cross_entropy_loss: the commitment term is the cross entropy of vqp's
            logits (``-|z - c|``, ``z.c`` for cosine) to the chosen codes instead of the mse.
        orthogonal_reg_weight: weight of :func:`orthogonal_loss` of the codebook in the training
            loss; > 0 also makes the codes an ``nn.Parameter`` (the EMA still writes them).
        orthogonal_reg_active_codes_only: the regulariser over this batch's chosen codes only;
            ValueError in ``forward`` with ``separate_codebook_per_head`` and ``heads > 1``.
        orthogonal_reg_max_codes: None: every code; else at most this many, a random subset
            (``torch.randperm``, torch's global RNG) per step.
        codebook_diversity_loss_weight: weight of vqp's diversity loss (minus the entropy of the
            batch-averaged ``softmax(temperature * logits)``) in the training loss; 0: off. > 0
            with ``separate_codebook_per_head`` and ``heads > 1`` raises ``NotImplementedError``.
        codebook_diversity_temperature: the diversity loss's ``temperature``, multiplying vqp's
            logits (``-|z - c|``, ``z.c`` for cosine) before the softmax.
        stochastic_sample_codes: in training (temperature > 0) sample each code from
            ``softmax(logits / sample_codebook_temp)`` (fastvq's Gumbel noise, not vqp's draws).
        sample_codebook_temp: temperature of ``stochastic_sample_codes`` and
            ``straight_through``; <= 0 turns both off (nearest code, no soft gradient).
        straight_through: vqp's Gumbel straight-through in training: the output gets the
            gradient of the ``softmax(logits / temp)``-weighted codes where x gets none (x without
            grad, or ``route_gradients_to_input=False``). Needs ``rotation_trick=False``.
        rotation_trick: the input's gradient by the rotation trick (Fifty et al. 2024) instead
            of straight-through; None: ``dim > 1`` and not ``directional_reparam``.
        directional_reparam: DiVeQ: in training (x requiring grad, routed) the output is ``z +
            sg(u) |q - z|``, ``u`` the noised direction of ``q - z``; no commitment term. Sets
            ``ema_update=False``, ``learnable_codebook=True`` by default; needs a dead-code
            threshold (``threshold_ema_dead_code > 0``).
        directional_reparam_variance: variance of the Gaussian noise (torch's global RNG) added
            to ``q - z`` before its direction is taken.
        sync_codebook: all-reduce the EMA counts and sums over torch.distributed ranks; None: on
            when more than one rank runs at construction. ``NotImplementedError`` with
            ``kmeans_init`` or ``threshold_ema_dead_code > 0``.
        sync_affine_param: accepted and ignored (``affine_param`` is not supported).
        ema_update: the codes follow vqp's EMA each training step; None: not
            ``directional_reparam``. ValueError when on with ``learnable_codebook``.
        vq_bridge: not supported: anything but None raises ``NotImplementedError``.
        manual_ema_update: the EMA statistics move every training step, the codes only when
            ``codebook_module.smooth_()`` (or vqp's ``_codebook.update_ema()``) is called.
        learnable_codebook: the codes are an ``nn.Parameter`` trained by the gradient (the
            commitment mse included); None: ``directional_reparam``. Needs ``ema_update=False``;
            ValueError with ``use_cosine_sim`` or ``straight_through``.
        in_place_codebook_optimizer: not supported: anything but None raises
            ``NotImplementedError``.
        manual_in_place_optimizer_update: accepted and ignored (``in_place_codebook_optimizer``
            is not supported).
        affine_param: not supported: anything but False raises ``NotImplementedError``.
        affine_param_batch_decay: accepted and ignored (``affine_param`` is not supported).
        affine_param_codebook_decay: accepted and ignored (``affine_param`` is not supported).
        sync_update_v: v in [0, 1]; > 0 needs ``learnable_codebook``: in training the output
            becomes ``q + v (q - sg(q))`` (vqtorch's synchronous update rule, eq. 21).
        return_zeros_for_masked_padding: masked positions of the output hold zeros (True) or the
            input (False); their index is -1 either way.
        route_gradients_to_input: in training, x gets a gradient through the output
            (straight-through, rotation trick or DiVeQ); False: the output carries only a
            learnable codebook's gradient (or ``straight_through``'s).
        backend: fastvq only (keyword): ``"auto"`` (Triton on CUDA when it imports, else torch),
            ``"torch"`` or ``"triton"``, for the search, k-means and EMA statistics.
""",
)
add_args(
    VectorQuantize.share_codebook_,
    """
            other: another :class:`VectorQuantize`; this layer then holds its codebook module
                itself (codes and EMA state shared, not copied; sizes are not checked).
""",
)
add_args(
    VectorQuantize.get_codes_from_indices,
    """
            indices: int, as ``forward`` returns them (``(B, N)``, ``(B, N, heads)``, ``(B, H,
                W)``...), each in ``[0, codebook_size)`` (no -1).
""",
)
add_args(
    VectorQuantize.get_output_from_indices,
    """
            indices: int, as ``forward`` returns them (``(B, N)``, ``(B, N, heads)``, ``(B, H,
                W)``...), each in ``[0, codebook_size)`` (no -1).
""",
)
add_args(
    VectorQuantize.forward,
    """
            x: ``(B, N, dim)`` float; ``(B, dim, N)`` with ``channel_last=False``, ``(B, dim, H,
                W)`` / ``(B, dim, D, H, W)`` for feature maps, ``(B, dim)`` for one token.
            indices: None, or target codes in the layer's index layout (-1 ignored): then the
                call returns vqp's ``(codes in codebook space, cross entropy)``.
            mask: None or bool ``(B, N)``, True for real tokens; the others output zeros (or x)
                and index -1, and stay out of the commitment loss, k-means and codebook update.
                ValueError for one token or feature maps.
            lens: None or int ``(B,)`` lengths, ``mask = arange(x.shape[1]) < lens`` (so for
                channel-last ``(B, N, dim)`` input); not together with ``mask``.
            topk: None or k >= 1 (capped at ``codebook_size``): the k nearest codes per token,
                nearest first (class docstring); one head only, no codebook update.
            sample_codebook_temp: this call's sampling temperature; None: the constructor's.
            freeze_codebook: None: the constructor's; True: no EMA or dead-code step in this
                call (k-means init still runs) and no commitment gradient to a learnable codebook.
            return_loss_breakdown: also return a :class:`LossBreakdown` (fourth output).
            codebook_transform_fn: not supported: anything but None raises
                ``NotImplementedError``.
            ema_update_weight: None, or the EMA step's per-code weight ``w`` (factor ``(1 -
                decay) w``): a float, a ``(G, K)`` (G codebooks) or ``(K,)`` tensor, or a function
                of ``(sums (G, K, d), counts (G, K))`` returning one.
            accum_ema_update: add this call's counts and sums to an accumulator instead of the
                EMA and dead-code step; the next call without it steps on the total.
            ema_update: None: the constructor's; False skips this call's EMA step (with
                ``threshold_ema_dead_code > 0`` the statistics still move); True forces it.
""",
)
add_args(
    VectorQuantize.expire_codes_,
    """
            x: float ``(B, N, heads * d)`` rows after ``project_in`` (l2-normalised here for
                cosine); with one head only ``x[0]``'s rows are candidates, as in vqp.
""",
)
add_args(
    VectorQuantize.update_indices,
    """
            x: the input, in ``forward``'s layout.
            indices: int codes in the layer's index layout (as ``forward`` returns them); -1
                counts as code 0 (leave such rows out with ``mask``).
            mask: None or bool ``(B, N)``, True for rows to count; ValueError for one token or
                feature maps.
""",
)
