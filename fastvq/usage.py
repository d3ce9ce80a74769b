"""Codebook usage over an evaluation set (one batch uses at most N of K codes)."""

from __future__ import annotations

import torch

from .codebook import perplexity, row_counts


class UsageMeter:
    """Codebook usage over a fixed evaluation set: feed every batch's indices, then read.

    One batch can use at most N of K codes, so judge usage on a whole evaluation set::

        meter = UsageMeter(vq.codebook_size)
        for x in test_loader:
            meter.update(model.encode(x).indices)
        meter.used_fraction, meter.perplexity

    Counts accumulate on the indices' device (no host sync until read).

    Args:
        codebook_size: K, the number of codes; the counts, ``used_fraction`` and
            ``perplexity`` are over all K (indices must lie in ``[0, K)``).
    """

    def __init__(self, codebook_size: int):
        self.codebook_size = codebook_size
        self.counts: torch.Tensor | None = None

    def update(self, indices: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        idx = indices.reshape(-1)
        if mask is not None:  # indices of masked rows go to an extra bin, then dropped
            m = mask.reshape(mask.shape + (1,) * (indices.dim() - mask.dim())).expand_as(indices)
            idx = torch.where(m.reshape(-1), idx, self.codebook_size)
        c = row_counts(idx, self.codebook_size + 1)[: self.codebook_size]
        self.counts = c if self.counts is None else self.counts + c

    @property
    def used_fraction(self) -> float:
        return 0.0 if self.counts is None else float((self.counts > 0).float().mean())

    @property
    def perplexity(self) -> float:
        return 0.0 if self.counts is None else float(perplexity(self.counts[None]))


@torch.no_grad()
def codebook_usage(encode, batches, codebook_size: int) -> dict:
    """Usage of a codebook over an evaluation set.

    Args:
        encode: callable mapping a batch to indices (e.g. ``lambda x: model.encode(x)[1]``).
        batches: iterable of batches.
        codebook_size: K.

    Returns:
        ``{"used_fraction", "used", "perplexity"}`` over all batches.
    """
    meter = UsageMeter(codebook_size)
    for b in batches:
        meter.update(encode(b))
    used = 0 if meter.counts is None else int((meter.counts > 0).sum())
    return {"used_fraction": meter.used_fraction, "used": used, "perplexity": meter.perplexity}
