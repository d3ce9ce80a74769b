"""The CPU benchmarks against faiss (cpu_faiss.py, cpu_search_parts.py), one tiny round each: they
cannot rot."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_faiss_protocol_smoke():
    pytest.importorskip("faiss")
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.cpu_faiss", "--smoke", "--threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| 256 × 128 × 16 |" in out.stdout


@pytest.mark.parametrize("op", ["fwdbwd", "ema"])
def test_training_step_before_after_smoke(op):
    """--op times the training step of two checkouts (here the same one twice)."""
    cmd = [sys.executable, "-m", "benchmarks.cpu_faiss", "--smoke", "--threads", "1", "--op", op]
    out = subprocess.run(cmd + ["--ref", str(ROOT)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| 256 × 128 × 16 |" in out.stdout and "vs fastvq-ref" in out.stdout
    bad = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "give --ref" in bad.stderr


@pytest.mark.parametrize("shape", ["300,1024,16", "200,2500,8"])  # one code block; several
def test_cpu_search_parts_smoke(shape, tmp_path):
    """benchmarks/cpu_search_parts.py runs (with or without faiss) and writes its figures."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.cpu_search_parts", "--shape", shape, "--reps", "3",
         "--out", str(tmp_path / "parts.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| search |" in out.stdout and "eq/amin first match" in out.stdout
    assert (tmp_path / "parts.json").read_text().count("slot 512 x 128") == 2
