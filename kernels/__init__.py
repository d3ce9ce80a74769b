"""Triton kernels of fastvq, installed as ``fastvq.kernels`` (see pyproject's package-dir).

Importing this package imports Triton; ``fastvq`` only does so lazily, so ``import fastvq`` works
where Triton is absent (macOS, Windows) and falls back to the torch backend.
"""

from .vq_scatter import scatter_rows_triton
from .vq_search import interpreting, vq_search_triton

__all__ = ["interpreting", "scatter_rows_triton", "vq_search_triton"]
