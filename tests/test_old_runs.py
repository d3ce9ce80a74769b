"""A training run written by fastvq before the Codebook refactor (c49eadf) resumes with today's
code and continues bit for bit as that code continued it.

Fixture, made with the old code (``git worktree add /tmp/old c49eadf`` and run there)::

    python -c "from fastvq.data import write_synthetic_dataset as w; w('/tmp/syn', 96, 32)"
    python -m fastvq.cli train vqvae --data-dir /tmp/syn --out RUN --batch-size 16 \\
        --eval-limit 16 --eval-every 3 --hidden 8 --dim 4 --codebook-size 16 \\
        --dead-code-steps 2 --steps 4 --threads 1          # -> tests/fixtures/run_vqvae_c49eadf
    cp -a RUN RUN8 && python -m fastvq.cli train vqvae --data-dir /tmp/syn --out RUN8 \\
        --steps 8 --threads 1 --resume    # RUN8/model.safetensors -> ..._step8_model.safetensors

The old run saved its layer's restart generators under the layer's name (``vq``); today they
live on its codebook (``vq.book``), and the resume must find them there.

Bit for bit on the machine that made the fixture. torch picks its CPU kernels by the machine's
vector capability, and on an AVX2-only AMD EPYC the same steps differ from the fixture by float
rounding (20 of 36 tensors, at most 1.2e-7 absolute, on ``vq.embed_avg`` of magnitude 2.1;
2026-12-07), so the comparison allows 1e-6: far below what a wrong resume changes (one that
restores no random state ends 3.06 off in ``vq.cluster_size``, measured the same day).
"""

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from fastvq.app.cli import main
from fastvq.app.data import write_synthetic_dataset

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_old_vqvae_run_resumes_bit_identically(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "run_vqvae_c49eadf", run, symlinks=True)
    data = write_synthetic_dataset(tmp_path / "data", n_train=96, n_test=32)
    argv = ["train", "vqvae", "--data-dir", str(data), "--out", str(run), "--steps", "8"]
    assert main([*argv, "--threads", "1", "--resume"]) == 0
    got = load_file(run / "model.safetensors")
    want = load_file(FIXTURES / "run_vqvae_c49eadf_step8_model.safetensors")
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        # float rounding of other CPU kernels only: about 1e-7 relative where it differs
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-6, msg=key)
