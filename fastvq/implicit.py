"""What the quantizers with an implicit codebook (FSQ, LFQ) share: their codes are a grid
computed from each index (``grid_codes``), nothing is learned, and around the grid they keep the
layer conventions of :class:`~fastvq.layer.VectorQuantizer` (projections, ``channel_first``,
``num_codebooks`` indices, usage statistics, decoding)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .codebook import perplexity, row_counts
from .layer_config import check_indices, check_mask
from .outputs import CodebookStats


class ImplicitQuantizer(nn.Module):
    """Base of :class:`~fastvq.fsq.FSQ` and :class:`~fastvq.lfq.LFQ`. A subclass sets
    ``project_in``/``project_out``, ``num_codebooks``, ``codebook_size``, ``channel_first`` and
    defines ``grid_codes(indices) -> fp32 (..., [C,] d)``."""

    @property
    def has_projections(self) -> bool:
        return isinstance(self.project_in, nn.Linear)

    def _proj_dtype(self, x: torch.Tensor) -> torch.dtype:
        w = getattr(self.project_in, "weight", None)
        return x.dtype if w is None else w.dtype

    def rows_in(self, x: torch.Tensor, mask: torch.Tensor | None):
        """``x`` (checked) to projected rows: ``(lead, keep, z)`` with ``lead`` x's shape without
        the channel dim, ``keep`` optional bool (N,) and ``z`` (N, C * d) ``project_in``'s
        output. Masked rows enter detached and finite, so no NaN reaches a gradient."""
        if self.channel_first:
            x = x.movedim(1, -1)  # (B, ..., dim)
        lead = x.shape[:-1]
        if mask is not None:
            check_mask(mask, lead)
        n = math.prod(lead)
        keep = None if mask is None else mask.reshape(n)
        x2 = x.reshape(n, self.dim)
        if keep is not None:
            x2 = torch.where(keep[:, None], x2, x2.detach().nan_to_num(0.0))
        pdt = self._proj_dtype(x2)
        if x2.dtype != pdt and not torch.is_autocast_enabled(x.device.type):
            x2 = x2.to(pdt)  # as autocast would: the projection runs in its weights' dtype
        return lead, keep, self.project_in(x2)

    def rows_out(self, q: torch.Tensor, z: torch.Tensor, x: torch.Tensor, lead) -> torch.Tensor:
        """Quantized rows ``q`` (N, C, d) back to the layer's output: ``project_out`` in
        ``z``'s dtype (``rows_in``'s), then ``x``'s dtype outside autocast and its layout."""
        q = self.project_out(q.reshape(-1, self.num_codebooks * self.codebook_dim).to(z.dtype))
        if q.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            q = q.to(x.dtype)
        quantized = q.reshape(*lead, self.dim)
        return quantized.movedim(-1, 1) if self.channel_first else quantized

    def layer_indices(self, idx: torch.Tensor, lead) -> torch.Tensor:
        """int64 (N, C) row indices in the layer's layout: ``lead`` (plus ``num_codebooks``)."""
        return (
            idx.reshape(*lead, self.num_codebooks) if self.num_codebooks > 1 else idx.reshape(lead)
        )

    def batch_stats(self, idx: torch.Tensor, keep: torch.Tensor | None) -> CodebookStats:
        """Usage of one batch: ``idx`` int64 (N, C), ``keep`` optional bool (N,)."""
        k = self.codebook_size
        if keep is not None:  # masked rows go to an extra bin, then dropped
            idx = torch.where(keep[:, None], idx, k)
        counts = torch.stack([row_counts(idx[:, c], k + 1)[:k] for c in range(idx.shape[1])])
        return CodebookStats(perplexity(counts), (counts > 0).float().mean(), counts)

    def check_indices(self, indices: torch.Tensor, check: bool = True) -> None:
        """TypeError/ValueError for indices :meth:`codes_from_indices` cannot decode."""
        check_indices(indices, 1, 0, check=False)  # a tensor of an integer dtype
        c = self.num_codebooks
        if c > 1 and (indices.dim() < 1 or indices.shape[-1] != c):
            raise ValueError(
                f"indices must have a trailing dim of size num_codebooks={c}, "
                f"got shape {tuple(indices.shape)}"
            )
        if check and indices.numel() > 0:
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi >= self.codebook_size:
                raise ValueError(
                    f"indices must lie in [0, {self.codebook_size}), got values in [{lo}, {hi}]"
                )

    def codes_from_indices(
        self, indices: torch.Tensor, *, dtype: torch.dtype | None = None, check: bool = True
    ) -> torch.Tensor:
        """Decode int ``indices`` (the layer's layout) to what the eval forward outputs for them
        (no noise: bit-identical): ``(..., dim)``, or ``(B, dim, ...)`` with ``channel_first``.
        ``dtype``: the input's dtype the output should match (default the projection's, or
        fp32); ``check``: ValueError on indices outside ``[0, codebook_size)`` (a host sync)."""
        self.check_indices(indices, check)
        codes = self.grid_codes(indices)  # (..., [C,] d) fp32
        if self.num_codebooks > 1:
            codes = codes.flatten(-2)
        w = getattr(self.project_in, "weight", None)
        inner = w.dtype if w is not None else (dtype or torch.float32)
        q = self.project_out(codes.to(inner))
        if dtype is not None:
            q = q.to(dtype)
        return q.movedim(-1, 1) if self.channel_first else q

    def get_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Indices of ``x`` (the layer's input layout) as in eval mode."""
        with torch.no_grad():
            was = self.training
            self.eval()
            try:
                return self(x).indices
            finally:
                self.train(was)
