"""The VQ layer's loss terms beyond the fused op's codebook and commitment terms.

The fused op (:func:`fastvq.functional.quantize_rows`) gives ``codebook_weight * mse(sg(z), z_q)
+ beta * mse(z, sg(z_q))``; the layer's options add, per codebook, the cross-entropy commitment
(which replaces the MSE commitment) and the diversity loss, and once over all codebooks the
orthogonal regulariser (:mod:`fastvq.codebook_losses`, none of them builds an N x K tensor).
:func:`breakdown_terms` and :func:`loss_breakdown` give the detached terms for logging.
"""

from __future__ import annotations

import torch

from .codebook_losses import _diversity, ce_commitment_loss, orthogonal_loss
from .functional import vq_loss
from .outputs import LossBreakdown
from .sampling import check_rows_codes
from .streams import per_call_generator


def aux_terms(layer, zg, cg, idx, keep) -> tuple:
    """One codebook's loss terms besides the fused op's, with their gradients (None when off):
    ``beta * ce_commitment_loss`` and the weighted ``diversity_loss``.

    Args:
        layer: the layer's options (``beta``, ``cosine``, ``commitment_use_cross_entropy_loss``,
            ``codebook_diversity_loss_weight``, ``codebook_diversity_temperature``).
        zg: (M, D) rows; cg: (K, D) codes; idx: int64 (M,) their codes; keep: bool (M,) or None.
    """
    ce = div = None
    if layer.commitment_use_cross_entropy_loss:
        # masked rows are ignored (-1) inside the loss: no host sync
        target = idx if keep is None else torch.where(keep, idx, -1)
        ce = layer.beta * ce_commitment_loss(zg, cg.detach(), target, cosine=layer.cosine)
    if layer.codebook_diversity_loss_weight > 0:
        # masked rows weigh 0 (no boolean selection: no host sync, and torch.compile traces it)
        check_rows_codes(zg, cg)
        div = layer.codebook_diversity_loss_weight * _diversity(
            zg, cg, keep, layer.codebook_diversity_temperature, 4096, layer.cosine
        )
    return ce, div


def orthogonal_term(layer, codes: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | None:
    """``orthogonal_reg_weight * orthogonal_loss`` of ``codes`` (G, K, D) (None when off); with
    ``orthogonal_reg_active_codes_only`` over the codes with ``counts`` (G, K) > 0 (every
    rank's rows after a training step's all-reduce)."""
    if layer.orthogonal_reg_weight == 0:
        return None
    active = None
    if layer.orthogonal_reg_active_codes_only:
        active = counts[0] > 0 if codes.shape[0] == 1 else counts > 0
    gen = None
    if layer.orthogonal_reg_max_codes is not None:
        gen = per_call_generator("orthogonal-subset", codes.device)
    reg = orthogonal_loss(
        codes[0] if codes.shape[0] == 1 else codes, active=active,
        max_codes=layer.orthogonal_reg_max_codes, generator=gen,
    )  # fmt: skip
    return layer.orthogonal_reg_weight * reg


def breakdown_terms(err, dim: int, keep, ce_term, div_term, beta: float, w_cb: float):
    """One codebook's detached ``(commitment, codebook, diversity)`` fp32 (3,), as they enter
    the loss: ``err`` (M,) the rows' squared errors, ``dim`` their size."""
    mse = vq_loss(err.detach(), dim, 1.0, 0.0, keep)[0]
    commit = ce_term.detach() if ce_term is not None else beta * mse
    div = div_term.detach() if div_term is not None else torch.zeros_like(mse)
    return torch.stack([commit, w_cb * mse, div])


def loss_breakdown(terms: list, orth: torch.Tensor | None) -> LossBreakdown:
    """The :class:`LossBreakdown` from every codebook's :func:`breakdown_terms`, averaged over
    codebooks like the loss, and the orthogonal term (once)."""
    t = torch.stack(terms).mean(0)
    orth = torch.zeros_like(t[0]) if orth is None else orth.detach()
    return LossBreakdown(t[0], t[1], orth, t[2])
