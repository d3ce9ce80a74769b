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
        assert torch.equal(got[key], value), key
