"""Whether Triton runs its CPU interpreter: read by the backend choice (``fastvq.ops``) and the
search launcher (``fastvq._search_triton``), so neither imports the other for it."""

from __future__ import annotations

import os


def interpreting() -> bool:
    """True when Triton runs kernels with its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
