"""The documented path of the IDX dataset reader, which lives in :mod:`fastvq.app.data`.

A shim kept so ``from fastvq.data import load_dataset`` (docs/models.md) keeps working; it is
application code, listed as such in ``tests/test_import_graph.py``."""

from .app.data import (
    DATASETS,
    DEBIAN_ROOT,
    DataNotFoundError,
    Dataset,
    IDXError,
    Split,
    batches,
    load_dataset,
    read_idx,
    to_float,
    write_idx,
    write_synthetic_dataset,
)

__all__ = [
    "DATASETS",
    "DEBIAN_ROOT",
    "DataNotFoundError",
    "Dataset",
    "IDXError",
    "Split",
    "batches",
    "load_dataset",
    "read_idx",
    "to_float",
    "write_idx",
    "write_synthetic_dataset",
]
