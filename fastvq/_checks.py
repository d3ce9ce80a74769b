"""Argument checks shared by the public entry points (``vector_quantize``, ``search``,
``scatter_rows``), so each raises the same ``TypeError``/``ValueError`` naming the argument.

None of these checks syncs with the device: they read shapes, dtypes and devices only. The one
data-dependent check (``scatter_rows``'s index range) lives beside ``scatter_rows``.
"""

from __future__ import annotations

import math
import operator

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_same_device(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(
            f"{name_a} and {name_b} must be on the same device, got {name_a} on {a.device} and "
            f"{name_b} on {b.device}"
        )


def check_rows_and_codebook(
    z, codebook, *, z_name: str = "z", z_shape: str = "(..., D)",
    z_ndim: int | tuple[int, ...] | None = None, codebook_name: str = "codebook",
) -> None:  # fmt: skip
    """Rows ``z`` against a ``(K, D)`` codebook: tensors, float dtypes, K >= 1, D >= 1, matching
    D, one device. ``z_ndim`` pins ``z``'s rank (``search`` takes ``(N, D)`` only; a tuple allows
    several); zero rows are valid. ``z_name`` / ``codebook_name`` name them in the messages."""
    c = codebook_name
    c_s = f"{c}'" if c.endswith("s") else f"{c}'s"
    check_tensor(z_name, z)
    check_tensor(c, codebook)
    check_float(z_name, z)
    check_float(c, codebook)
    if codebook.dim() != 2:
        raise ValueError(f"{c} must have shape (K, D), got shape {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError(f"{c} must hold at least one code (K >= 1), got K = 0")
    if codebook.shape[1] == 0:
        raise ValueError(f"{c} must have D >= 1, got D = 0")
    if z.dim() < 1:
        raise ValueError(f"{z_name} must have shape {z_shape}, got a 0-dim tensor")
    ndims = (z_ndim,) if isinstance(z_ndim, int) else z_ndim
    if ndims is not None and z.dim() not in ndims:
        raise ValueError(f"{z_name} must have shape {z_shape}, got shape {tuple(z.shape)}")
    if z.shape[-1] != codebook.shape[1]:
        raise ValueError(
            f"{z_name}'s last dim ({z.shape[-1]}) must equal {c_s} D ({codebook.shape[1]}); "
            f"got {z_name} {tuple(z.shape)} and {c} {tuple(codebook.shape)}"
        )
    check_same_device(z_name, z, c, codebook)


def is_int(v) -> bool:
    """A Python int, not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_real(v) -> bool:
    """A finite Python int or float, not a bool."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    """``value`` as an int in ``[lo, hi]``; TypeError for a non-int (bools included)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if v < lo or (hi is not None and v > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {bound}, got {v}")
    return v


def check_nonneg_real(name: str, value) -> None:
    """TypeError unless ``value`` is a finite real number, ValueError when it is negative.

    Comparisons only, no ``math.isfinite``: under ``torch.compile(dynamic=True)`` a Python float
    argument or module attribute becomes a SymFloat, which comparisons trace and
    ``math.isfinite`` does not (a graph break, an error with ``fullgraph=True``).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a finite float, got {value!r}")
    if not -math.inf < value < math.inf:  # False for NaN and +-inf
        raise TypeError(f"{name} must be a finite float, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
