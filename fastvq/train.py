"""The documented path of the training loop, checkpoints and evaluation, which live in
:mod:`fastvq.app` (``checkpoint``, ``rng``, ``loop``, ``evaluate``).

A shim kept so ``from fastvq.train import load_run, seed_everything, fit`` (docs/models.md) keeps
working; it is application code, listed as such in ``tests/test_import_graph.py``."""

from .app.checkpoint import (
    MODELS,
    CheckpointError,
    RunLockedError,
    build,
    checkpoint_dir,
    load_optimizer_state,
    load_run,
    read_meta,
    run_lock,
    save_run,
)
from .app.evaluate import (
    cache_dir,
    encode_codes,
    eval_prior,
    eval_recon,
    eval_vae,
    eval_vqvae,
    features,
    get_classifier,
)
from .app.loop import TrainingInterrupted, epoch_batches, fit
from .app.rng import rng_state, seed_everything, set_rng_state

__all__ = [
    "MODELS",
    "CheckpointError",
    "RunLockedError",
    "TrainingInterrupted",
    "build",
    "cache_dir",
    "checkpoint_dir",
    "encode_codes",
    "epoch_batches",
    "eval_prior",
    "eval_recon",
    "eval_vae",
    "eval_vqvae",
    "features",
    "fit",
    "get_classifier",
    "load_optimizer_state",
    "load_run",
    "read_meta",
    "rng_state",
    "run_lock",
    "save_run",
    "seed_everything",
    "set_rng_state",
]
