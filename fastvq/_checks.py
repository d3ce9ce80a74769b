"""Argument checks shared by the public entry points (``vector_quantize``, ``search``,
``scatter_rows``), so each raises the same ``TypeError``/``ValueError`` naming the argument.

None of these checks syncs with the device: they read shapes, dtypes and devices only. The one
data-dependent check (``scatter_rows``'s index range) lives beside ``scatter_rows``.
"""

from __future__ import annotations

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
    z, codebook, *, z_name: str = "z", z_shape: str = "(..., D)", z_ndim: int | None = None
) -> None:
    """Rows ``z`` against a ``(K, D)`` codebook: tensors, float dtypes, K >= 1, D >= 1, matching
    D, one device. ``z_ndim`` pins ``z``'s rank (``search`` takes ``(N, D)`` only); zero rows
    are valid."""
    check_tensor(z_name, z)
    check_tensor("codebook", codebook)
    check_float(z_name, z)
    check_float("codebook", codebook)
    if codebook.dim() != 2:
        raise ValueError(f"codebook must have shape (K, D), got shape {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError("codebook must hold at least one code (K >= 1), got K = 0")
    if codebook.shape[1] == 0:
        raise ValueError("codebook must have D >= 1, got D = 0")
    if z.dim() < 1:
        raise ValueError(f"{z_name} must have shape {z_shape}, got a 0-dim tensor")
    if z_ndim is not None and z.dim() != z_ndim:
        raise ValueError(f"{z_name} must have shape {z_shape}, got shape {tuple(z.shape)}")
    if z.shape[-1] != codebook.shape[1]:
        raise ValueError(
            f"{z_name}'s last dim ({z.shape[-1]}) must equal codebook's D ({codebook.shape[1]}); "
            f"got {z_name} {tuple(z.shape)} and codebook {tuple(codebook.shape)}"
        )
    check_same_device(z_name, z, "codebook", codebook)


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
