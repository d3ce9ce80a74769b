"""Per-batch codebook statistics: rows per code, their sums, perplexity (no host sync)."""

from __future__ import annotations

import torch

from ..ops import _scatter_rows_unchecked


def in_backward() -> bool:
    """True while autograd's engine runs (e.g. activation checkpointing recomputes a forward):
    no state update then, so a recomputed forward does not update twice."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def row_counts(idx: torch.Tensor, num_bins: int) -> torch.Tensor:
    """fp32 (num_bins,) rows per code: an index_add of ones. ``fastvq.code_counts`` is a bincount,
    which syncs the host on CUDA and breaks ``torch.compile`` graphs (data-dependent shape)."""
    ones = torch.ones(idx.shape, dtype=torch.float32, device=idx.device)
    return torch.zeros(num_bins, dtype=torch.float32, device=idx.device).index_add_(0, idx, ones)


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of each row of ``counts`` (G, K), averaged over G."""
    p = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
    return torch.exp(-torch.special.xlogy(p, p).sum(-1)).mean()


def batch_statistics(
    idx: torch.Tensor, ok: torch.Tensor, rows: torch.Tensor | None, num_codes: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Counts ``n_k`` fp32 (K,) and, when ``rows`` (M, D) is given, sums ``s_k`` fp32 (K, D) of
    the rows with ``ok`` (M,) bool. Other rows (masked, non-finite) go to an extra bin K, dropped,
    and are zeroed before the scatter: a NaN never enters a sum."""
    idx_stat = torch.where(ok, idx, num_codes)
    counts = row_counts(idx_stat, num_codes + 1)[:num_codes]
    if rows is None:
        return counts, None
    zs = torch.where(ok[:, None], rows.detach(), 0.0)
    sums = _scatter_rows_unchecked(idx_stat, zs, num_codes + 1, backend=backend)[:num_codes]
    return counts, sums
