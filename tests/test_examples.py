"""Every script in examples/ runs, in a fresh process, as a user would run it.

vqp_*.py scripts (vector-quantize-pytorch's examples run both ways) have their own tests and are
not collected here."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# script -> whether it needs Fashion-MNIST on disk
SCRIPTS = {
    "quantize_tensor.py": False,
    "residual_fsq_lfq.py": False,
    "train_vqvae.py": True,
    "resume_checkpoint.py": True,
}


def _has_fashion_mnist() -> bool:
    from fastvq.app.data import DataNotFoundError, find_dataset

    try:
        find_dataset("fashion-mnist")
    except DataNotFoundError:
        return False
    return True


def test_every_example_is_run_here():
    found = {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("vqp_")}
    assert found == set(SCRIPTS), "add new examples to SCRIPTS (and to examples/README.md)"
    listed = (EXAMPLES / "README.md").read_text()
    assert all(f"({name})" in listed for name in SCRIPTS), "examples/README.md misses a script"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_example_runs(name, tmp_path):
    if SCRIPTS[name] and not _has_fashion_mnist():
        pytest.skip("needs Fashion-MNIST: apt-get install dataset-fashion-mnist")
    # One thread, as the examples promise "under a minute on one CPU thread"; the working
    # directory is a fresh folder, so a script cannot rely on being run from the clone.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
    assert done.stdout.strip(), f"{name} printed nothing"
