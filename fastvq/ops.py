"""Backend dispatch and the primitives registered as torch custom ops.

``search`` and ``scatter_rows`` are the two primitives every part of fastvq builds on (the op's
forward and backward, the layer's EMA statistics, k-means and the distributed code). Each is a
``torch.library.custom_op`` so ``torch.compile`` traces models through them without a graph
break, with a fake (meta) implementation giving output shapes.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings

import torch

from ._checks import (
    check_float,
    check_int,
    check_rows_and_codebook,
    check_same_device,
    check_tensor,
)
from ._interpret import interpreting
from ._search_torch import search_graph, search_torch

BACKENDS = ("auto", "torch", "triton")


@functools.cache
def _triton_import_error() -> str | None:
    """None when the Triton launchers (and so ``fastvq.kernels`` and Triton) import, else why."""
    try:
        import fastvq._scatter_triton  # noqa: F401
        import fastvq._search_triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken Triton install failing at import
        return f"{type(exc).__name__}: {exc}"
    return None


@functools.cache
def _warn_triton_broken(reason: str) -> None:
    """Once per process: CUDA tensors would have used Triton, but the kernels do not import."""
    warnings.warn(
        f"fastvq: Triton is installed but fastvq's Triton kernels failed to import ({reason}); "
        "CUDA tensors use the much slower torch backend. Reinstall fastvq (pip install .) so that "
        "fastvq.kernels exists, or pass backend='torch' to silence this.",
        RuntimeWarning,
        stacklevel=3,
    )


def triton_available() -> bool:
    """True when the Triton kernels import on this machine."""
    return _triton_import_error() is None


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``"auto"`` to a concrete backend and check that the requested one can run here.

    ``"auto"`` is Triton for CUDA tensors when Triton imports, torch otherwise. ``"triton"`` needs
    Triton and CUDA tensors, or CPU tensors under the interpreter (``TRITON_INTERPRET=1``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        err = _triton_import_error()
        if err is None:
            return "triton"
        if importlib.util.find_spec("triton") is not None:
            _warn_triton_broken(err)  # never fall back silently from a broken install
        return "torch"
    if backend == "triton":
        err = _triton_import_error()
        if err is not None:
            raise ValueError(f"backend='triton' needs a working Triton install ({err}); "
                             "use backend='torch' or 'auto'")  # fmt: skip
        if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got device {device}); CPU tensors run "
                "only under Triton's interpreter (TRITON_INTERPRET=1 set before importing triton)"
            )
    return backend


# --- search -------------------------------------------------------------------------------------


@torch.library.custom_op("fastvq::search", mutates_args=())
def _search_op(
    z2d: torch.Tensor, codebook: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Autocast would turn the torch backend's fp32 addmm into bf16: the search sets its own dtype.
    with torch.autocast(z2d.device.type, enabled=False):
        if backend == "triton":
            from fastvq._search_triton import vq_search_triton

            if z2d.device.type == "cuda":
                with torch.cuda.device(z2d.device):
                    return vq_search_triton(z2d, codebook)
            return vq_search_triton(z2d, codebook)
        return search_torch(z2d, codebook)


@_search_op.register_fake
def _(z2d, codebook, backend):
    n = z2d.shape[0]
    return (
        z2d.new_empty((n,), dtype=torch.int64),
        z2d.new_empty(z2d.shape),
        z2d.new_empty((n,), dtype=torch.float32),
    )


def search(
    z2d: torch.Tensor, codebook: torch.Tensor, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest code for each row, without autograd.

    Args:
        z2d: (N, D) float32/float16/bfloat16 rows, N >= 0.
        codebook: (K, D) float32/float16/bfloat16 codes, K >= 1, same device.
        backend: "auto", "torch" or "triton".

    Returns:
        indices: int64 (N,), nearest code by squared L2, ties to the lowest index.
        z_q: (N, D) in ``z2d.dtype``, ``codebook[indices]``.
        err: fp32 (N,), ``sum_d (z - z_q)^2``.

    Raises:
        TypeError / ValueError naming the argument, as ``vector_quantize`` does: a non-tensor, an
        integer or fp64 dtype, a rank other than 2, D mismatch, K = 0, different devices.
    """
    check_rows_and_codebook(z2d, codebook, z_name="z2d", z_shape="(N, D)", z_ndim=2)
    if torch.compiler.is_exporting():
        # An exported program of aten ops runs without fastvq installed and converts to ONNX;
        # the custom op would stay opaque in it (and the CPU path's thread pool untraceable).
        if torch.is_autocast_enabled(z2d.device.type):  # the search sets its own dtype
            with torch.autocast(z2d.device.type, enabled=False):
                return search_graph(z2d.detach(), codebook.detach())
        return search_graph(z2d.detach(), codebook.detach())
    return _search_op(z2d.detach(), codebook.detach(), resolve_backend(backend, z2d.device))


# --- scatter ------------------------------------------------------------------------------------


@torch.library.custom_op("fastvq::scatter_rows", mutates_args=())
def _scatter_op(
    indices: torch.Tensor, rows: torch.Tensor, num_codes: int, backend: str, deterministic: bool
) -> torch.Tensor:
    if backend == "triton":
        from fastvq._scatter_triton import scatter_rows_triton

        return scatter_rows_triton(indices, rows, num_codes, deterministic=deterministic)
    # index_add_ on CUDA writes out of bounds for a bad index (on CPU it raises): send rows with
    # an index outside [0, K) to a spare bucket K, dropped below, so no index is ever trusted.
    valid = (indices >= 0) & (indices < num_codes)
    safe = torch.where(valid, indices, torch.full_like(indices, num_codes))
    out = torch.zeros((num_codes + 1, rows.shape[1]), dtype=torch.float32, device=rows.device)
    out.index_add_(0, safe, rows.to(torch.float32))
    return out[:num_codes]  # a contiguous view: no copy of the K x D sums


@_scatter_op.register_fake
def _(indices, rows, num_codes, backend, deterministic):
    return rows.new_empty((num_codes, rows.shape[1]), dtype=torch.float32)


def _scatter_rows_unchecked(
    indices: torch.Tensor,
    rows: torch.Tensor,
    num_codes: int,
    *,
    backend: str = "auto",
    deterministic: bool | None = None,
) -> torch.Tensor:
    """:func:`scatter_rows` without argument checks, for fastvq's own callers (the op's backward,
    EMA statistics, k-means, the sharded codebook), whose indices come from the search.

    No host sync and no graph break under ``torch.compile``. ``num_codes = 0`` gives a (0, D)
    result. Memory-safe whatever the indices: every kernel masks its stores to ``[0, K)``, so a
    row whose index lies outside is dropped (it adds to no code).
    """
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    be = resolve_backend(backend, rows.device)
    return _scatter_op(indices, rows, int(num_codes), be, bool(deterministic))


def _check_scatter_inputs(indices, rows, num_codes) -> int:
    """Shapes, dtypes, devices and ``num_codes`` of :func:`scatter_rows`; returns K as an int."""
    check_tensor("indices", indices)
    check_tensor("rows", rows)
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be int64, got {indices.dtype}")
    check_float("rows", rows)
    if indices.dim() != 1:
        raise ValueError(f"indices must have shape (N,), got shape {tuple(indices.shape)}")
    if rows.dim() != 2:
        raise ValueError(f"rows must have shape (N, D), got shape {tuple(rows.shape)}")
    if indices.shape[0] != rows.shape[0]:
        raise ValueError(
            f"indices and rows must have the same length N, got {indices.shape[0]} indices and "
            f"{rows.shape[0]} rows"
        )
    check_same_device("indices", indices, "rows", rows)
    k = check_int("num_codes", num_codes, 1)
    return k


def scatter_rows(
    indices: torch.Tensor,
    rows: torch.Tensor,
    num_codes: int,
    *,
    backend: str = "auto",
    deterministic: bool | None = None,
) -> torch.Tensor:
    """Sum rows into codes: ``out[k] = sum_{i: indices[i] == k} rows[i]``.

    Args:
        indices: int64 (N,) in ``[0, num_codes)``.
        rows: (N, D) float32/float16/bfloat16 rows on ``indices``' device, N >= 0.
        num_codes: K >= 1.
        backend: "auto", "torch" or "triton".
        deterministic: bitwise-reproducible summation order; default follows
            ``torch.are_deterministic_algorithms_enabled()``. The torch backend on CPU is always
            deterministic; on CUDA its ``index_add_`` uses atomics.

    Returns:
        fp32 (num_codes, D).

    Raises:
        TypeError / ValueError naming the argument: non-tensors, dtypes, ranks, ``len(indices) !=
        len(rows)``, different devices, ``num_codes < 1``, and an index outside
        ``[0, num_codes)``. The index-range check reads the indices on the host: on CUDA it is
        a device sync (and a graph break under ``torch.compile``).
    """
    k = _check_scatter_inputs(indices, rows, num_codes)
    # The range check is a host sync, so it lives here and not in the kernels; the kernels mask
    # their stores anyway, so a skipped or racing check can never write outside the output.
    bad = (indices < 0) | (indices >= k)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"indices must lie in [0, num_codes) = [0, {k}); got indices[{first}] = "
            f"{int(indices[first])} (min {int(indices.min())}, max {int(indices.max())})"
        )
    return _scatter_rows_unchecked(indices, rows, k, backend=backend, deterministic=deterministic)


def code_counts(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """fp32 (num_codes,) number of rows assigned to each code (no one-hot).

    An ``index_add_`` of ones rather than ``bincount``: bincount's output size depends on the
    data, which costs a host sync on CUDA and a graph break under ``torch.compile``. Counts stay
    exact in fp32 up to 2^24 rows per code.

    Args:
        indices: int64 (N,) in ``[0, num_codes)`` (not checked: callers pass search results).
        num_codes: K, the length of the result.
    """
    out = torch.zeros(num_codes, dtype=torch.float32, device=indices.device)
    return out.index_add_(0, indices, torch.ones_like(indices, dtype=torch.float32))
