"""The fair CPU protocol against faiss (benchmarks/cpu_faiss.py), one tiny round: it cannot rot."""

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
