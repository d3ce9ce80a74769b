"""Checkpoint a training run, stop it, resume it: the result equals an uninterrupted run.

    python examples/resume_checkpoint.py [--data-dir DIR]

Uses the application's training loop (`fastvq.train.fit`, what `fastvq train` runs): each
checkpoint is one atomic directory with weights, optimizer state and every random state, so a
resumed run continues bit for bit. On the command line the same is
`fastvq train vqvae --out RUN --steps N` and, after a stop, `fastvq train vqvae --out RUN --resume`.
"""

import argparse
import tempfile
from pathlib import Path

import torch

from fastvq.data import load_dataset
from fastvq.models import VQVAE, VQVAEConfig
from fastvq.train import fit, load_run

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--data-dir", default=None)
ap.add_argument("--steps", type=int, default=16)
args = ap.parse_args()

ds = load_dataset("fashion-mnist", args.data_dir)
data, labels = ds.train.images[:2048], ds.train.labels[:2048]
cfg = VQVAEConfig(hidden=16, res_hidden=8, n_res=1, dim=8, codebook_size=64)


def new_model():
    torch.manual_seed(0)
    return VQVAE(cfg)


with tempfile.TemporaryDirectory() as tmp:
    whole, stopped = Path(tmp, "whole"), Path(tmp, "stopped")
    common = dict(batch_size=32, seed=0, desc="vqvae")
    # One run straight through, and one that stops halfway (as after Ctrl-C) and resumes.
    fit(new_model(), "vqvae", data, labels, steps=args.steps, run_dir=whole, **common)
    fit(new_model(), "vqvae", data, labels, steps=args.steps // 2, run_dir=stopped, **common)
    resumed = new_model()  # a fresh process would build the model again: resume loads the rest
    meta = fit(resumed, "vqvae", data, labels, steps=args.steps, run_dir=stopped, resume=True,
               **common)  # fmt: skip
    print(f"resumed run finished at step {meta['step']}")

    a, _ = load_run(whole)  # the last checkpoint, as `fastvq sample` loads it
    b, _ = load_run(stopped)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), f"{name} differs"
    print(f"stopped + resumed == uninterrupted: all {len(a.state_dict())} tensors bit-identical")
