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
