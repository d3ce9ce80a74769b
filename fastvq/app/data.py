"""IDX datasets (MNIST, Fashion-MNIST, KMNIST, EMNIST) read from local files only.

Nothing is ever downloaded. Files are looked up, in order, in
  1. ``data_dir`` itself, ``data_dir/<TorchvisionName>/raw/`` and ``data_dir/<name>/``;
  2. ``$FASTVQ_DATA_DIR`` (same three layouts);
  3. the Debian default ``/usr/share/datasets/<name>/`` (``apt-get install dataset-fashion-mnist``).

Each split needs ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (optionally ``.gz``; the
``.``-separated variant ``train-images.idx3-ubyte`` and EMNIST's ``emnist-<split>-`` prefix are
accepted too). Headers, sizes and image/label counts are validated; a corrupt or truncated file
raises :class:`IDXError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEBIAN_ROOT = Path("/usr/share/datasets")

# name -> (torchvision folder name, Debian package or None, number of classes)
DATASETS = {
    "fashion-mnist": ("FashionMNIST", "dataset-fashion-mnist", 10),
    "mnist": ("MNIST", None, 10),
    "kmnist": ("KMNIST", None, 10),
    "emnist": ("EMNIST", None, None),
}

# IDX type byte -> numpy big-endian dtype
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class IDXError(ValueError):
    """A file that is not a valid IDX file (bad magic, dims, size, or truncated)."""


class DataNotFoundError(FileNotFoundError):
    """The requested dataset is not on disk; the message says how to get it."""


def read_idx(path: str | os.PathLike, *, expect_ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (raw or gzip) into a numpy array, validating header and size.

    The format: two zero bytes, a type byte (0x08 = uint8, ...), a byte with the number of
    dimensions ``n``, ``n`` big-endian uint32 sizes, then ``prod(sizes)`` items, nothing after.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    # OSError/EOFError: unreadable or truncated; BadGzipFile: not gzip; zlib.error: a corrupted
    # deflate stream inside a valid gzip header
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise IDXError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    if len(raw) < 4:
        raise IDXError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    zero0, zero1, type_byte, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or type_byte not in _IDX_DTYPES:
        raise IDXError(
            f"{path}: bad magic number 0x{raw[:4].hex()} (expected 0x0000TTNN with type TT in "
            f"{{08,09,0B,0C,0D,0E}}); not an IDX file"
        )
    if ndim == 0 or (expect_ndim is not None and ndim != expect_ndim):
        raise IDXError(f"{path}: {ndim} dimensions in the header, expected {expect_ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXError(f"{path}: truncated header ({len(raw)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[type_byte]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise IDXError(
            f"{path}: {what}: header says dims {dims} ({expected} data bytes), file has {got}"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))
    )


@dataclass
class Split:
    """One split held in memory: ``images`` uint8 ``(N, H, W)``, ``labels`` int64 ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class Dataset:
    name: str
    root: Path
    train: Split
    test: Split
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, *self.train.images.shape[1:])


def _candidates(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    tv_name = DATASETS[name][0]
    bases = []
    if data_dir is not None:
        bases.append(Path(data_dir))
    elif os.environ.get("FASTVQ_DATA_DIR"):
        bases.append(Path(os.environ["FASTVQ_DATA_DIR"]))
    dirs = []
    for b in bases:
        dirs += [b, b / tv_name / "raw", b / name]
    if data_dir is None:
        dirs.append(DEBIAN_ROOT / name)
    return dirs


def _find_file(folder: Path, stem: str, prefix: str | None) -> Path | None:
    """``stem`` like ``train-images-idx3-ubyte``; also accept ``.gz``, ``train-images.idx3-ubyte``
    and a prefix such as ``emnist-balanced-``."""
    dotted = stem.replace("-idx", ".idx")
    names = []
    for s in (stem, dotted):
        p = (prefix or "") + s
        names += [p, p + ".gz"]
    for n in names:
        if (folder / n).is_file():
            return folder / n
    if prefix is None:  # a single prefixed match is unambiguous (e.g. one EMNIST split)
        hits = sorted(p for p in folder.glob(f"*-{stem}*") if p.is_file())
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise DataNotFoundError(
                f"{folder}: several candidates for {stem}: {[h.name for h in hits]}; "
                "choose one with prefix= (CLI: --data-prefix, e.g. emnist-balanced-)"
            )
    return None


def _how_to_get(name: str, looked: list[Path]) -> str:
    tv_name, deb, _ = DATASETS[name]
    lines = [f"{name} not found; looked in: " + ", ".join(str(p) for p in looked) + "."]
    if deb:
        lines.append(
            f"Install it with `sudo apt-get install {deb}` (puts the IDX files in "
            f"{DEBIAN_ROOT / name}/), or"
        )
    lines.append(
        "pass --data-dir DIR (Python: data_dir=DIR) where DIR holds train-images-idx3-ubyte, "
        "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (raw or .gz), "
        f"or torchvision's layout DIR/{tv_name}/raw/. Nothing is downloaded by fastvq."
    )
    return "\n".join(lines)


def _load_split(folder: Path, which: str, prefix: str | None, transpose: bool) -> Split:
    img_path = _find_file(folder, f"{which}-images-idx3-ubyte", prefix)
    lab_path = _find_file(folder, f"{which}-labels-idx1-ubyte", prefix)
    if img_path is None or lab_path is None:
        missing = "images" if img_path is None else "labels"
        raise DataNotFoundError(f"{folder}: has no {which} {missing} file")
    images = read_idx(img_path, expect_ndim=3)
    labels = read_idx(lab_path, expect_ndim=1)
    if images.dtype != np.uint8:
        raise IDXError(f"{img_path}: images must be uint8 (type 0x08), got {images.dtype}")
    if images.shape[0] != labels.shape[0]:
        raise IDXError(
            f"{img_path} has {images.shape[0]} images but {lab_path} has {labels.shape[0]} labels"
        )
    if transpose:  # EMNIST stores images transposed
        images = images.transpose(0, 2, 1)
    return Split(
        torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64))
    )


def load_dataset(
    name: str = "fashion-mnist",
    data_dir: str | os.PathLike | None = None,
    *,
    prefix: str | None = None,
) -> Dataset:
    """Load train and test splits of an IDX dataset from local disk (see module docstring)."""
    name = name.lower()
    folder = find_dataset(name, data_dir, prefix=prefix)
    train = _load_split(folder, "train", prefix, transpose=name == "emnist")
    test = _load_split(folder, "t10k", prefix, transpose=name == "emnist")
    if train.images.shape[1:] != test.images.shape[1:]:
        raise IDXError(
            f"{folder}: train images {tuple(train.images.shape[1:])} and test images "
            f"{tuple(test.images.shape[1:])} differ in size"
        )
    n_cls = DATASETS[name][2] or int(max(train.labels.max(), test.labels.max())) + 1
    return Dataset(name, folder, train, test, n_cls)


def find_dataset(
    name: str = "fashion-mnist",
    data_dir: str | os.PathLike | None = None,
    *,
    prefix: str | None = None,
) -> Path:
    """The folder :func:`load_dataset` reads, found without reading it (the CLI checks this
    before it writes anything); DataNotFoundError where there is none."""
    name = name.lower()
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    looked = _candidates(name, data_dir)
    for folder in looked:
        if folder.is_dir() and _find_file(folder, "train-images-idx3-ubyte", prefix) is not None:
            return folder
    raise DataNotFoundError(_how_to_get(name, looked))


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, H, W)`` -> float ``(B, 1, H, W)`` in [0, 1] (exact multiples of 1/255)."""
    return images_u8.unsqueeze(1).float().div_(255.0)


def batches(
    split: Split, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None
):
    """Yield ``(images float (B,1,H,W) in [0,1], labels (B,))`` over one epoch."""
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        yield to_float(split.images[idx]), split.labels[idx]


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` (uint8 or int32) as an IDX file, gzip-compressed if ``path`` ends in .gz.
    Used by the tests to build small datasets."""
    array = np.asarray(array)
    type_byte = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}[array.dtype]
    header = bytes([0, 0, type_byte, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_synthetic_dataset(
    folder: str | os.PathLike, n_train: int = 256, n_test: int = 128, size: int = 28, seed: int = 0
) -> Path:
    """Write a tiny learnable IDX dataset (10 classes of blurred bars/blobs) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)

    def make(n):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        imgs = np.empty((n, size, size), np.uint8)
        for i, c in enumerate(labels):
            ang = np.pi * c / 10
            cx, cy = 0.5 + 0.08 * rng.standard_normal(2)
            d = np.abs((xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang))
            img = np.exp(-((d / 0.08) ** 2)) * (np.hypot(xx - cx, yy - cy) < 0.4)
            imgs[i] = np.clip(img * 255 + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        return imgs, labels

    for which, n in (("train", n_train), ("t10k", n_test)):
        imgs, labels = make(n)
        write_idx(folder / f"{which}-images-idx3-ubyte.gz", imgs)
        write_idx(folder / f"{which}-labels-idx1-ubyte.gz", labels)
    return folder
