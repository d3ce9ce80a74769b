"""IDX loader: round trips, the three folder layouts, and clear errors on corrupt files."""

import gzip
import struct

import numpy as np
import pytest

from fastvq.app.data import (
    DEBIAN_ROOT,
    DataNotFoundError,
    IDXError,
    load_dataset,
    read_idx,
    write_idx,
    write_synthetic_dataset,
)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
    a = np.random.default_rng(0).integers(0, 256, (5, 3, 4), dtype=np.uint8)
    write_idx(tmp_path / f"x{suffix}", a)
    b = read_idx(tmp_path / f"x{suffix}", expect_ndim=3)
    assert b.dtype == np.uint8 and (a == b).all()


def _header(type_byte, dims):
    return bytes([0, 0, type_byte, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


@pytest.mark.parametrize(
    "name, data, match",
    [
        ("bad-magic", b"\x01\x02\x08\x03" + bytes(100), "magic"),
        ("bad-type", _header(0x07, [2, 2, 2]) + bytes(8), "magic"),
        ("short", b"\x00\x00", "too short"),
        ("cut-header", _header(0x08, [2, 2, 2])[:9], "truncated header"),
        ("truncated", _header(0x08, [2, 3, 3]) + bytes(17), "truncated"),
        ("trailing", _header(0x08, [2, 3, 3]) + bytes(19), "trailing"),
        ("wrong-ndim", _header(0x08, [4, 4]) + bytes(16), "dimensions"),
    ],
)
def test_corrupt_idx_rejected(tmp_path, name, data, match):
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(IDXError, match=match):
        read_idx(p, expect_ndim=3)


def test_truncated_gzip_rejected(tmp_path):
    p = tmp_path / "x.gz"
    write_idx(p, np.zeros((10, 28, 28), np.uint8))
    p.write_bytes(p.read_bytes()[:-20])
    with pytest.raises(IDXError, match="cannot read"):
        read_idx(p)


def test_load_user_dir_and_torchvision_layout(tmp_path):
    write_synthetic_dataset(tmp_path / "flat", n_train=20, n_test=10)
    ds = load_dataset("fashion-mnist", tmp_path / "flat")
    assert ds.train.images.shape == (20, 28, 28) and ds.test.labels.shape == (10,)
    assert ds.image_shape == (1, 28, 28) and ds.num_classes == 10
    raw = tmp_path / "tv" / "MNIST" / "raw"
    write_synthetic_dataset(raw, n_train=12, n_test=6)
    for f in raw.iterdir():  # torchvision keeps them uncompressed
        f.with_suffix("").write_bytes(gzip.decompress(f.read_bytes()))
        f.unlink()
    ds = load_dataset("mnist", tmp_path / "tv")
    assert len(ds.train) == 12 and ds.root == raw


def test_label_count_mismatch(tmp_path):
    write_synthetic_dataset(tmp_path, n_train=20, n_test=10)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(19, np.uint8))
    with pytest.raises(IDXError, match="20 images but"):
        load_dataset("fashion-mnist", tmp_path)


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        load_dataset("fashion-mnist", tmp_path)
    msg = str(e.value)
    assert "sudo apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg
    assert str(tmp_path) in msg


@pytest.mark.skipif(
    not (DEBIAN_ROOT / "fashion-mnist").is_dir(), reason="dataset-fashion-mnist not installed"
)
def test_debian_fashion_mnist():
    ds = load_dataset()
    assert ds.train.images.shape == (60000, 28, 28) and ds.test.images.shape == (10000, 28, 28)
    assert int(ds.train.labels.max()) == 9
