"""benchmarks/vqp_examples.py at the smallest size (2 steps, 1 round, 200 test images): it runs
both libraries in fresh processes, writes its JSON and prints the table, so it cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vector_quantize_pytorch")

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs dataset-fashion-mnist"
)


def test_vqp_examples_benchmark_smallest(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "benchmarks.vqp_examples", "--steps", "2", "--rounds", "1",
           "--test-images", "200", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["machine"] and doc["date"] and doc["command"].startswith("python -m benchmarks")
    for script in ("vqp_autoencoder.py", "vqp_autoencoder_sim_vq.py"):
        ref, ours = (doc["runs"][script][impl][0] for impl in ("vqp", "fastvq"))
        assert ours["test_l1"] == pytest.approx(ref["test_l1"], rel=1e-4)
        assert f"| {script} | fastvq |" in done.stdout


def test_straight_through_memory_smallest():
    """benchmarks/vqp_straight_through_memory.py runs both ways; the soft path's gradient to
    ``project_in`` is the same (printed norm)."""
    norms = []
    for impl in ("vqp", "fastvq"):
        cmd = [sys.executable, "-m", "benchmarks.vqp_straight_through_memory", impl, "64", "128"]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        norms.append(float(done.stdout.split("project_in_grad_norm=")[1].split()[0]))
    assert norms[1] == pytest.approx(norms[0], rel=1e-4) and norms[0] > 0
