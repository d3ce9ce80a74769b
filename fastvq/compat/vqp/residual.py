"""vqp's ``ResidualVQ`` and ``GroupedResidualVQ`` over :class:`.vq.VectorQuantize` (its
``state_dict`` keys: ``layers.{i}._codebook.*``, ``rvqs.{g}.layers.{i}...``)."""

from __future__ import annotations

import math
import random

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ... import _dist
from ...residual import residual_beam_search
from ...stack import frac_gradient
from .vq import VectorQuantize, _directional_reparam, _rotate_or_pass, _unsupported

__all__ = ["GroupedResidualVQ", "ResidualVQ"]

DIVEQ_VARIANCE = 5e-3  # vqp's ``directional_reparam`` default, which its ResidualVQ uses


def _maybe_sync_seed(device, max_size: int = 10_000) -> int:
    """vqp's ``get_maybe_sync_seed``: one draw of the global generator (all-reduced across
    ranks), so the same torch seed drops the same depths as vqp."""
    r = torch.randint(0, max_size, (), device=device)
    if _dist.is_distributed():
        dist.all_reduce(r)
    return int(r.item())


def vqp_num_active(q: int, cutoff: int, multiple_of: int, seed) -> int:
    """Depths vqp's stacks run for a given ``rand_quantize_dropout_fixed_seed``: the last kept
    depth from ``random.Random(seed)``, rounded up to a multiple, plus one (at most ``q``).
    Checked here, where vqp fails too (with ``randrange``'s "empty range"): the layers accept a
    cutoff of Q or more at construction, as vqp's do, since only the draw uses it."""
    if cutoff >= q:
        raise ValueError(
            f"quantize_dropout_cutoff_index must be below num_quantizers={q} for a quantize-"
            f"dropout draw, got {cutoff}"
        )
    i = random.Random(seed).randrange(cutoff, q)
    if multiple_of != 1:
        i = math.ceil((i + 1) / multiple_of) * multiple_of - 1
    return min(i + 1, q)


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

    Args:
        dim: channels of the input ``x``.
        num_quantizers: depths Q; may be None when ``codebook_size`` is a tuple (then its length).
        codebook_size: codes per depth: an int for every depth, or a tuple of one size per depth
            (its length must equal ``num_quantizers`` when both are given: ValueError otherwise).
        codebook_dim: dim ``d`` of the codes; default ``dim``. Otherwise one ``nn.Linear`` in
            (``dim -> d``) and one out, shared by all depths.
        shared_codebook: every depth uses depth 0's codebook (one codebook size, else ValueError);
            in training its EMA pools every depth, and dead codes are replaced from all depths.
        diveq: vqp's DiVeQ: codes learned by gradient (layers without EMA or commitment loss),
            ``quant_grad_frac`` 1, the summed output reparametrised (variance 5e-3, in eval too).
        heads: must be 1 (ValueError otherwise, as vqp).
        quantize_dropout: in training, run only the first n depths, n drawn per forward by vqp's
            rule; the dropped depths give index -1 and loss 0. Off when ``num_quantizers`` is 1.
        quantize_dropout_cutoff_index: the last kept depth is drawn from ``[cutoff,
            num_quantizers)``: at least ``cutoff + 1`` depths run; negative: ValueError; Q or
            more: ValueError at the first draw (as vqp, whose draw fails there).
        quantize_dropout_multiple_of: the number of depths kept is rounded up to a multiple of
            this (at most ``num_quantizers``).
        accept_image_fmap: ``x`` and the output are ``(B, dim, H, W)`` (indices ``(B, H, W, Q)``),
            given to every depth's layer; no ``mask``, no beam search.
        implicit_neural_codebook: vqp's QINCo codebooks: not supported (a true value raises
            NotImplementedError).
        mlp_kwargs: options of QINCo's MLPs: not supported (a non-empty dict raises
            NotImplementedError; None or ``{}`` is accepted).
        beam_size: beam width of the code search in training (and in eval unless
            ``eval_beam_size``); None or 1: greedy, depth by depth. See the beam search above.
        eval_beam_size: beam width in eval mode; default ``beam_size``. Needs ``beam_size``
            (ValueError).
        beam_score_quantizer_weights: one weight per depth on its commitment term in the beam's
            score (length ``num_quantizers``, else ValueError); default all 1.0.
        quant_grad_frac: the fraction of each depth's output gradient that flows into the next
            depth's residual (0: the residual subtracts a detached code, as vqp); 1 with ``diveq``.
        return_zeros_for_masked_padding: masked positions of the output are zeros (True) or the
            input ``x`` (False); also given to every depth's layer.
        **vq_kwargs: every other :class:`.vq.VectorQuantize` option, given to each depth's layer
            (``shared_codebook`` and ``diveq`` override some, as listed above).
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
        self.diveq = bool(diveq)
        if self.diveq:  # vqp: the codes learn by DiVeQ on the summed output, not by EMA
            vq_kwargs.update(
                ema_update=False, learnable_codebook=True, route_gradients_to_input=False,
                commitment_weight=0.0,
            )  # fmt: skip
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
        self.quant_grad_frac = 1.0 if self.diveq else quant_grad_frac
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
                vq.share_codebook_(self.layers[0])

    @property
    def codebook_size(self) -> int:
        return self.layers[0].codebook_size

    @property
    def codebooks(self):
        """``(Q, K, d)`` (a tuple of ``(K_i, d)`` for sizes per depth)."""
        books = tuple(layer.codebook_module.embed[0] for layer in self.layers)
        return torch.stack(books) if self.uniform_codebook_size else books

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes ``(Q, B, ..., d)`` for indices ``(B, ..., q)`` (-1 and missing depths: 0).

        Args:
            indices: int ``(B, ..., q)``, one index per depth (-1: no code); ``q <
                num_quantizers`` (the coarse depths only) needs ``quantize_dropout`` (ValueError).
        """
        q = indices.shape[-1]
        if q < self.num_quantizers:
            if not self.quantize_dropout:
                raise ValueError("fewer indices than quantizers needs quantize_dropout (as in vqp)")
            indices = F.pad(indices, (0, self.num_quantizers - q), value=-1)
        dropped = indices == -1
        indices = indices.masked_fill(dropped, 0)
        codes = torch.stack([
            F.embedding(indices[..., i], self.layers[i].codebook_module.embed[0])
            for i in range(self.num_quantizers)
        ])  # fmt: skip
        return codes.masked_fill(dropped.movedim(-1, 0)[..., None], 0.0)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.project_out(self.get_codes_from_indices(indices).sum(0))

    def _num_active(self, seed, device) -> int:
        """vqp's quantize dropout draw: the last depth run, from ``random.Random(seed)``."""
        if seed is None:
            seed = _maybe_sync_seed(device)
        return vqp_num_active(
            self.num_quantizers, self.quantize_dropout_cutoff_index,
            self.quantize_dropout_multiple_of, seed,
        )  # fmt: skip

    def forward(
        self, x, mask=None, indices=None, return_all_codes=False, sample_codebook_temp=None,
        freeze_codebook=False, beam_size=None, rand_quantize_dropout_fixed_seed=None,
    ):  # fmt: skip
        """See the class docstring.

        Args:
            x: float tensor ``(B, N, dim)``, or ``(B, dim, H, W)`` with ``accept_image_fmap``.
            mask: optional bool ``(B, N)``, True for real tokens: masked positions get index -1,
                no loss or codebook update, zeros or ``x`` (``return_zeros_for_masked_padding``).
            indices: vqp's cross entropy to given codes: not supported (NotImplementedError when
                given; vqp 1.32.0 fails there too).
            return_all_codes: also return each depth's codes ``(Q, B, N, codebook_dim)`` (zeros for
                index -1), as :meth:`get_codes_from_indices`.
            sample_codebook_temp: the layers' sampling temperature for this call
                (``stochastic_sample_codes``, ``straight_through``); None: each layer's own.
            freeze_codebook: True: no codebook update from this call (no EMA step; learned codes
                get no commitment gradient); with ``shared_codebook`` dead codes are still replaced.
            beam_size: beam width for this call; None: ``beam_size`` in training, ``eval_beam_size``
                in eval.
            rand_quantize_dropout_fixed_seed: seed of the quantize-dropout draw
                (``random.Random(seed)``, as vqp); None: one draw of torch's global RNG, all-reduced
                across ranks. Used only with ``quantize_dropout`` in training.
        """
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
                residual = residual - frac_gradient(q, self.quant_grad_frac)
                quantized_out = quantized_out + q
                all_idx.append(idx)
                all_losses.append(loss.reshape(()))
        # vqp runs this even with freeze_codebook (a recomputation of the codes from unchanged
        # statistics then, and dead-code replacement)
        if self.training and self.shared_codebook:
            first = self.layers[0]
            if self.vq_is_ema_updating:
                first.codebook_module.smooth_()
            pooled = torch.stack([r.detach() for r in residuals], dim=-2)
            first.expire_codes_(pooled.reshape(pooled.shape[0], -1, pooled.shape[-1]))
        fill_idx = all_idx[0].new_full(all_idx[0].shape, -1)
        all_idx = all_idx + [fill_idx] * (q_total - active)
        zero = torch.zeros((), device=x.device)
        all_losses = all_losses + [zero] * (q_total - active)
        if self.diveq:  # vqp: in eval too, with its default noise variance
            quantized_out = _directional_reparam(z, quantized_out, DIVEQ_VARIANCE)
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
        if self.training and not all(vq.codebook_module.initialised for vq in layers):
            # vqp's k-means runs on each depth's rows first; the beam reads the codes as they are
            raise _unsupported(
                name, "beam_size with kmeans_init (before the codes are initted)", beam
            )
        lead, d = z.shape[:-1], z.shape[-1]
        books = [vq.codebook_module.embed[0].detach() for vq in layers]
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
            embed = vq.codebook_module.embed[0]
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
            residual = residual - frac_gradient(q, self.quant_grad_frac)
            out = out + q
            layer_idx = idx[..., i] if keep is None else torch.where(keep, idx[..., i], -1)
            all_idx.append(layer_idx)
            all_losses.append(loss)
        if self.training and not freeze:
            for vq, r, i in zip(layers, residuals, all_idx, strict=True):
                vq.update_indices(r.detach(), i, mask=mask)
        return out, all_idx, all_losses, residuals


class ImplicitStackFront:
    """What vqp's stacks of implicit quantizers (``ResidualFSQ``, ``ResidualLFQ``) share, on a
    :class:`fastvq.stack.ResidualStack`: vqp's dropout draw and its decoding methods."""

    def vqp_num_active(self, seed) -> int:
        """Depths for one forward, as vqp: dropout only in training with gradients on; without
        ``seed`` the stack's own replayable draw, with one vqp's draw from ``seed``."""
        if not (self.training and self.quantize_dropout and torch.is_grad_enabled()):
            return self.num_quantizers
        if seed is None:
            return self.num_active_for(None)
        return vqp_num_active(
            self.num_quantizers, self.quantize_dropout_cutoff_index,
            self.quantize_dropout_multiple_of, seed,
        )  # fmt: skip

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``(Q, ..., d)`` each depth's scaled code (0 for -1); fewer than Q indices are padded
        with -1 (coarse codes; vqp accepts fewer only with ``quantize_dropout``)."""
        pad = self.num_quantizers - indices.shape[-1]
        if pad > 0:
            fill = indices.new_full((*indices.shape[:-1], pad), -1)
            indices = torch.cat([indices, fill], dim=-1)
        return self.depth_codes(indices, check=False).movedim(-2, 0)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.project_out(self.get_codes_from_indices(indices).sum(0))


class GroupedStack:
    """What vqp's grouped stacks (``GroupedResidualVQ``, ``GroupedResidualFSQ``) share: one
    stack per channel group in ``self.rvqs``, split along ``split_dim``."""

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


class GroupedResidualVQ(GroupedStack, nn.Module):
    """vqp's ``GroupedResidualVQ``: the feature dim split into ``groups``, one
    :class:`ResidualVQ` each. ``forward(x, indices=None, return_all_codes=False,
    sample_codebook_temp=None, freeze_codebook=False, mask=None)`` returns ``(quantized,
    indices (groups, B, N, Q), losses (groups, Q))``.

    Args:
        dim: channels of the input, divisible by ``groups`` (ValueError otherwise).
        groups: number of :class:`ResidualVQ` stacks, each on ``dim // groups`` consecutive
            channels; ``**kwargs`` go to every stack.
        accept_image_fmap: ``x`` is ``(B, dim, H, W)``: split along dim 1, each stack built
            with ``accept_image_fmap``.
    """

    def __init__(self, *, dim, groups=1, accept_image_fmap=False, **kwargs):
        super().__init__()
        if dim % groups != 0:
            raise ValueError(f"dim ({dim}) must be divisible by groups ({groups})")
        self.dim, self.groups, self.accept_image_fmap = dim, groups, accept_image_fmap
        self.rvqs = nn.ModuleList(
            ResidualVQ(dim=dim // groups, accept_image_fmap=accept_image_fmap, **kwargs)
            for _ in range(groups)
        )

    def forward(
        self, x, indices=None, return_all_codes=False, sample_codebook_temp=None,
        freeze_codebook=False, mask=None,
    ):  # fmt: skip
        """See the class docstring.

        Args:
            x: float tensor ``(B, N, dim)``, or ``(B, dim, H, W)`` with ``accept_image_fmap``.
            indices: vqp's cross entropy to given codes: not supported (NotImplementedError when
                given; vqp 1.32.0 fails there too).
            return_all_codes: also return the codes ``(groups, Q, B, N, codebook_dim)``.
            sample_codebook_temp: as :meth:`ResidualVQ.forward`, for every group.
            freeze_codebook: as :meth:`ResidualVQ.forward`, for every group.
            mask: optional bool ``(B, N)``, True for real tokens, given to every group (as
                :meth:`ResidualVQ.forward`).
        """
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
