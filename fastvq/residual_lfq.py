"""``ResidualLFQ`` and ``GroupedResidualLFQ``: :class:`~fastvq.LFQ` on the family-wide residual
stack (:mod:`fastvq.stack`)::

    r_0 = project_in(x);  (q_i, idx_i, l_i) = LFQ_i(r_i);  r_{i+1} = r_i - sg(q_i)
    quantized = project_out(sum_i q_i);  loss = sum_i l_i

LFQ's per-depth hook is its code magnitude: depth ``i`` quantizes to ``+-s 2^-i`` (each depth
halves the step the previous one left, vector-quantize-pytorch's ``ResidualLFQ``), with its
soft clamp ``v 2^-i`` when one is given, and its own entropy and commitment losses (the
entropies over depth ``i``'s codes, computed exactly and in chunks by each layer). Quantize
dropout, its replay under activation checkpointing, the output tuples and decoding are the
stack's: a depth left out gives index ``-1``, no code and a zero loss.
"""

from __future__ import annotations

import torch

from ._checks import is_int, is_real
from .lfq import LFQ
from .stack import GroupedResidualStack, ResidualStack

__all__ = ["GroupedResidualLFQ", "ResidualLFQ"]


class ResidualLFQ(ResidualStack):
    """Residual LFQ: ``num_quantizers`` :class:`~fastvq.LFQ` layers of ``codebook_size`` codes.

    Args:
        codebook_size: codes per depth, a power of 2 (``d = log2(codebook_size)`` bits).
        num_quantizers: depths Q.
        dim: channels of the input (default ``d``; otherwise one projection in and out shared
            by all depths, ``projection_has_bias``).
        channel_first: ``x`` is ``(B, dim, ...)``.
        quantize_dropout: in training, a forward without ``num_active`` runs only the first
            ``n`` depths, ``n`` drawn per forward (the rest give index -1); off when Q is 1.
        quantize_dropout_cutoff_index: in ``[0, Q)``: the last kept depth is drawn uniformly
            from ``[cutoff, Q)``, so at least ``cutoff + 1`` depths run.
        quantize_dropout_multiple_of: round the number of kept depths up to a multiple of this
            (capped at Q), as :class:`~fastvq.ResidualVQ`.
        codebook_scale: ``s``, depth 0's code magnitude; depth ``i`` uses ``s 2^-i``.
        soft_clamp_input_value: None or ``v >= s``: depth ``i`` clamps its residual to
            ``tanh(r / v_i) v_i``, ``v_i = v 2^-i``.
        projection_has_bias: ``project_in`` and ``project_out`` have a bias (when ``dim != d``).
        seed: seeds the quantize-dropout draw (a CPU generator, the same on every rank).
        **lfq_kwargs: every other :class:`~fastvq.LFQ` option, the same at every depth
            (``entropy_loss_weight``, ``commitment_loss_weight``, ``diversity_gamma``,
            ``spherical``, ``frac_per_sample_entropy``, ``inv_temperature``, ``prob_floor``,
            ``entropy_chunk``).

    ``forward(x, mask=None, *, inv_temperature=None, return_stats=False, return_losses=False,
    return_loss_breakdown=False, num_active=None)`` returns ``(quantized, indices, loss)``:
    indices int64 ``x``'s shape without the channel dim plus ``(Q,)`` (``-1`` for a dropped
    depth), ``loss`` the fp32 sum of the depths' losses (zero in eval); ``return_losses`` adds
    each depth's, ``return_stats`` each depth's :class:`~fastvq.CodebookStats`;
    ``return_loss_breakdown`` returns every field (:class:`~fastvq.stack.
    ResidualOutputWithBreakdown`), its ``breakdown`` an :class:`~fastvq.lfq.LFQLossBreakdown`
    of per-depth ``(Q,)`` terms (per-sample entropy, codebook entropy, commitment; unweighted).
    ``inv_temperature`` overrides every depth's.
    """

    depth_class = LFQ  # a front end's depth layer (its state_dict keys)

    def __init__(
        self, codebook_size: int, num_quantizers: int, dim: int | None = None, *,
        channel_first: bool = False, quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0, quantize_dropout_multiple_of: int = 1,
        codebook_scale: float = 1.0, soft_clamp_input_value: float | None = None,
        projection_has_bias: bool = True, seed: int = 0, **lfq_kwargs,
    ):  # fmt: skip
        q = num_quantizers
        if not is_int(q) or q < 1:
            raise ValueError(f"num_quantizers must be a positive int, got {q!r}")
        for bad in ("dim", "num_codebooks", "projections"):
            if bad in lfq_kwargs:
                raise TypeError(f"ResidualLFQ got an unexpected keyword argument {bad!r}")
        if not is_real(codebook_scale) or codebook_scale <= 0:
            raise ValueError(f"codebook_scale must be a positive float, got {codebook_scale!r}")
        v = soft_clamp_input_value
        if v is not None and (not is_real(v) or v < codebook_scale):
            raise ValueError(
                f"soft_clamp_input_value must be None or a float >= codebook_scale, got {v!r}"
            )
        layers = [
            self.depth_class(
                codebook_size=codebook_size,
                codebook_scale=codebook_scale * 2.0**-i,
                soft_clamp_input_value=None if v is None else v * 0.5**i,
                projections=False,
                **lfq_kwargs,
            )  # fmt: skip
            for i in range(q)
        ]
        super().__init__(
            layers, dim, channel_first=channel_first, quantize_dropout=quantize_dropout,
            quantize_dropout_cutoff_index=quantize_dropout_cutoff_index,
            quantize_dropout_multiple_of=quantize_dropout_multiple_of,
            projection_has_bias=projection_has_bias, seed=seed,
        )  # fmt: skip
        self.codebook_scale, self.soft_clamp_input_value = float(codebook_scale), v

    def extra_repr(self) -> str:
        return (
            f"codebook_size={self.codebook_size}, num_quantizers={self.num_quantizers}, "
            f"dim={self.dim}, quantize_dropout={self.quantize_dropout}"
        )

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, *,
        inv_temperature: float | None = None, return_stats: bool = False,
        return_losses: bool = False, return_loss_breakdown: bool = False,
        num_active: int | None = None,
    ):  # fmt: skip
        """Quantize ``x`` with every depth (or the first ``num_active``); see the class.

        Args:
            x: float32, float16 or bfloat16 ``(..., dim)``, or ``(B, dim, ...)`` with
                ``channel_first``.
            mask: None, or bool with ``x``'s shape without the channel dim; True = real row
                (masked rows output their code, pass no gradient, count in no loss or stats).
            inv_temperature: positive float, every depth's entropy ``beta`` for this call; None:
                each depth's configured one.
            return_stats: also return each depth's :class:`~fastvq.CodebookStats` (a list of Q,
                None for a depth left out).
            return_losses: also return ``losses``, fp32 (Q,), each depth's loss (0 for a depth
                left out); ``loss`` is their sum.
            return_loss_breakdown: return every field (``losses`` included, ``stats`` None
                unless ``return_stats``) and the per-depth :class:`~fastvq.lfq.LFQLossBreakdown`.
            num_active: run only the first ``num_active`` depths, in ``[1, Q]`` (the rest give
                index -1); None: every depth, or in training with ``quantize_dropout`` a draw.
        """
        return super().forward(
            x, mask, return_stats=return_stats, return_losses=return_losses,
            num_active=num_active, inv_temperature=inv_temperature,
            return_loss_breakdown=return_loss_breakdown,
        )  # fmt: skip


class GroupedResidualLFQ(GroupedResidualStack):
    """``groups`` :class:`ResidualLFQ` stacks over equal slices of the channel dim (as
    :class:`~fastvq.GroupedResidualVQ`): indices ``(..., groups, Q)``, losses ``(groups, Q)``,
    ``loss`` the groups' mean, one quantize-dropout draw per forward for every group; group
    ``g`` is seeded ``seed + g``. Other arguments: :class:`ResidualLFQ`.

    Args:
        codebook_size: codes per depth in every group, a power of 2 (as :class:`ResidualLFQ`).
        num_quantizers: Q, depths per group.
        dim: channels of the input, divisible by ``groups``.
        groups: stacks, each on ``dim // groups`` consecutive channels.
        channel_first: ``x`` is ``(B, dim, ...)`` instead of ``(..., dim)``.
        seed: group ``g``'s stack gets ``seed + g``; the one quantize-dropout draw per forward
            comes from group 0's stream (``seed``).
    """

    def __init__(self, codebook_size: int, num_quantizers: int, dim: int, *, groups: int = 1,
                 channel_first: bool = False, seed: int = 0, **kwargs):  # fmt: skip
        super().__init__(
            dim, groups,
            lambda g, d: ResidualLFQ(codebook_size, num_quantizers, d, seed=seed + g, **kwargs),
            channel_first=channel_first,
        )  # fmt: skip

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, *,
        inv_temperature: float | None = None, return_stats: bool = False,
        return_losses: bool = False, num_active: int | None = None,
    ):  # fmt: skip
        """As :meth:`ResidualLFQ.forward`, per group (without a loss breakdown).

        Args:
            x: float32, float16 or bfloat16 ``(..., dim)``, or ``(B, dim, ...)`` with
                ``channel_first``; group ``g`` quantizes the ``g``-th slice of the channels.
            mask: None, or bool with ``x``'s shape without the channel dim (True = real row),
                given to every group.
            inv_temperature: positive float, every depth's entropy ``beta`` in every group for
                this call; None: each depth's configured one.
            return_stats: also return ``stats``, a list per group of each depth's
                :class:`~fastvq.CodebookStats` (None for a depth left out).
            return_losses: also return ``losses``, fp32 ``(groups, Q)``; ``loss`` is the mean
                over groups of each group's sum.
            num_active: as :meth:`ResidualLFQ.forward`, the same for every group (one draw for
                all groups under quantize dropout).
        """
        return super().forward(
            x, mask, return_stats=return_stats, return_losses=return_losses,
            num_active=num_active, inv_temperature=inv_temperature,
        )  # fmt: skip
