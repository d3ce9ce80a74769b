"""The codebook: :class:`Codebook` owns the codes and their state, :mod:`.rules` holds the
learning rules it applies (EMA, dead-code restart, k-means init), :mod:`.stats` the per-batch
statistics layers hand it."""

from .module import Codebook
from .stats import batch_statistics, in_backward, perplexity, row_counts

__all__ = ["Codebook", "batch_statistics", "in_backward", "perplexity", "row_counts"]
