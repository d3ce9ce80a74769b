"""Issue 11 item 6: a corrupted deflate stream is the reader's own error, naming the file."""

import numpy as np
import pytest

from fastvq.app.cli import main
from fastvq.app.data import IDXError, read_idx, write_idx, write_synthetic_dataset


def _corrupt_deflate(path):
    """Flip bytes inside the deflate body (after gzip's 10-byte header, before its 8-byte
    trailer), so gzip raises zlib.error rather than a CRC or EOF error."""
    raw = bytearray(path.read_bytes())
    for i in range(12, min(len(raw) - 8, 60)):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_corrupt_deflate_names_the_file(tmp_path):
    p = tmp_path / "x-images-idx3-ubyte.gz"
    write_idx(p, np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8))
    _corrupt_deflate(p)
    with pytest.raises(IDXError, match="cannot read") as e:
        read_idx(p)
    assert str(p) in str(e.value)


def test_corrupt_deflate_cli_exits_2(tmp_path, capsys):
    write_synthetic_dataset(tmp_path, n_train=16, n_test=8)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    _corrupt_deflate(p)
    assert main(["train", "ae", "--data-dir", str(tmp_path), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "fastvq: error:" in err and str(p) in err
