"""What the VQ layers return: ``(quantized, indices, loss)``, then ``stats`` and ``breakdown``
when asked for, always in that order (:func:`quantize_output` picks the tuple type)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class QuantizeOutput(NamedTuple):
    """Unpacks as ``(quantized, indices, loss)``."""

    quantized: torch.Tensor  # like the input x: forward value the codes, gradient to x
    indices: torch.Tensor  # int64: x's shape without the channel dim, plus the layer's extra dims
    loss: torch.Tensor  # 0-dim: the layer's loss to add to the training objective


class CodebookStats(NamedTuple):
    """Per-batch codebook statistics (0-dim fp32 tensors on the layer's device, no host sync)."""

    perplexity: torch.Tensor  # exp(entropy of the batch's code histogram), mean over codebooks
    used_fraction: torch.Tensor  # fraction of codes picked by at least one row of the batch
    counts: torch.Tensor  # fp32 (num_codebooks, K) rows per code in this batch


class QuantizeOutputWithStats(NamedTuple):
    """``forward(..., return_stats=True)``: ``(quantized, indices, loss, stats)``."""

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    stats: CodebookStats


class LossBreakdown(NamedTuple):
    """The terms of the layer's loss as they enter it (weights applied, averaged over codebooks
    like the loss): ``loss == codebook + commitment + orthogonal + diversity`` up to rounding.
    Detached fp32 0-dim tensors, for logging; a term that is off is 0."""

    commitment: torch.Tensor  # beta * mse(z, sg(z_q)), or beta * cross entropy (ce commitment)
    codebook: torch.Tensor  # codebook_loss_weight * mse(sg(z), z_q); 0 for EMA / frozen codes
    orthogonal: torch.Tensor  # orthogonal_reg_weight * orthogonal_loss(codes)
    diversity: torch.Tensor  # codebook_diversity_loss_weight * diversity_loss(z, codes)


class QuantizeOutputWithBreakdown(NamedTuple):
    """``forward(..., return_loss_breakdown=True)``: ``(quantized, indices, loss, breakdown)``."""

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    breakdown: LossBreakdown


class QuantizeOutputFull(NamedTuple):
    """``forward(..., return_stats=True, return_loss_breakdown=True)``."""

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    stats: CodebookStats
    breakdown: LossBreakdown


def quantize_output(quantized, indices, loss, stats=None, breakdown=None):
    """The layer's return value: the three outputs, then ``stats`` and ``breakdown`` when not
    None (:class:`QuantizeOutput`, :class:`QuantizeOutputWithStats`,
    :class:`QuantizeOutputWithBreakdown` or :class:`QuantizeOutputFull`)."""
    if breakdown is None:
        if stats is None:
            return QuantizeOutput(quantized, indices, loss)
        return QuantizeOutputWithStats(quantized, indices, loss, stats)
    if stats is None:
        return QuantizeOutputWithBreakdown(quantized, indices, loss, breakdown)
    return QuantizeOutputFull(quantized, indices, loss, stats, breakdown)
