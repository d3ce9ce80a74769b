"""Triton kernels of fastvq, installed as ``fastvq.kernels`` (see pyproject's package-dir).

Kernels only (``@triton.jit`` functions): this package imports Triton and nothing from ``fastvq``,
so it sits at the bottom of the import graph. Their launchers are ``fastvq/_search_triton.py``,
``fastvq/_scatter_triton.py`` and ``fastvq/_soft_assign_triton.py``; ``fastvq`` imports them
lazily, so ``import fastvq`` works where Triton is absent (macOS, Windows) and falls back to the
torch backend. The Gluon search for sm_90 (``vq_search_sm90``, opt-in) is not imported here: only
its launch imports it, and with it ``triton.experimental.gluon``.
"""

from .soft_assign import (
    soft_assign_bwd_row_kernel,
    soft_assign_col_kernel,
    soft_assign_fwd_kernel,
)
from .vq_scatter import scatter_rows_atomic_kernel, scatter_rows_segment_kernel
from .vq_search import vq_search_fwd_kernel

__all__ = [
    "scatter_rows_atomic_kernel",
    "scatter_rows_segment_kernel",
    "soft_assign_bwd_row_kernel",
    "soft_assign_col_kernel",
    "soft_assign_fwd_kernel",
    "vq_search_fwd_kernel",
]
