"""examples/vqp_autoencoder.py and examples/vqp_autoencoder_sim_vq.py run with vqp's import and
with fastvq's (the one line ``--impl`` switches), briefly, on Fashion-MNIST.

Both start from the same torch seed: the front end draws the same initial weights as vqp, and the
scripts draw their batches from their own generator. The arithmetic is the same up to fp32
rounding (fastvq's fused search and rotation trick give the code exactly where vqp's rotated
value differs in the last bits), so for 20 steps the training curves and the test metrics agree
to 1e-4 relative; a flipped near-tie of the nearest-code search would change a few codes' usage,
hence the usage tolerance of two codes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vector_quantize_pytorch")

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("/usr/share/datasets/fashion-mnist")
pytestmark = [
    pytest.mark.extras,
    pytest.mark.slow,
    pytest.mark.skipif(not DATA.is_dir(), reason="needs dataset-fashion-mnist"),
]
SCRIPTS = ["vqp_autoencoder.py", "vqp_autoencoder_sim_vq.py"]


def _run(script: str, impl: str) -> dict:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    cmd = [sys.executable, str(ROOT / "examples" / script), "--impl", impl, "--steps", "20",
           "--test-images", "1000", "--threads", "1"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_agrees_across_impls(script):
    ref, ours = _run(script, "vqp"), _run(script, "fastvq")
    assert (ref["impl"], ours["impl"]) == ("vqp", "fastvq")
    assert len(ours["train_rec_l1"]) == 20
    for key in ("train_rec_l1", "train_commit"):
        assert ours[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
    for key in ("test_l1", "test_mse", "test_perplexity"):
        assert ours[key] == pytest.approx(ref[key], rel=1e-4), key
    assert abs(ours["codebook_usage"] - ref["codebook_usage"]) <= 2 / 256
    # it trained: the reconstruction improved over the first steps
    assert ours["train_rec_l1"][-1] < ours["train_rec_l1"][0]


def test_example_rejects_bad_arguments():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "examples" / SCRIPTS[0]), "--steps", "0"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "--steps" in done.stderr
