"""fastvq.app.recipes, the stages shared by `fastvq demo` and `fastvq train`, and their seeding."""

import json
import random

import numpy as np
import pytest
import torch

from fastvq.app import recipes as R
from fastvq.app.checkpoint import build
from fastvq.app.data import load_dataset, write_synthetic_dataset
from fastvq.app.evaluate import get_classifier
from fastvq.app.parser import build_parser, vqvae_options
from fastvq.app.rng import seed_everything


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return load_dataset(data_dir=write_synthetic_dataset(tmp_path_factory.mktemp("idx"), 96, 48))


def test_seed_everything_seeds_torch_numpy_and_random():
    draws = []
    for _ in range(2):
        seed_everything(7)
        draws.append((torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()))
    assert draws[0] == draws[1]


def test_classifier_is_seeded_whatever_the_global_rng(ds, tmp_path):
    weights = []
    for prior_seed in (1, 2):
        torch.manual_seed(prior_seed)
        clf, _ = get_classifier(ds, steps=2, seed=0, cache=tmp_path / str(prior_seed))
        weights.append(clf.state_dict())
    for name, w in weights[0].items():
        assert torch.equal(w, weights[1][name]), name


def test_model_config_keeps_defaults_for_unset_options(ds):
    cfg = R.model_config("vqvae", ds, codebook_size=None, dim=8, vq_kwargs={"ema": False})
    assert cfg["codebook_size"] == 256 and cfg["dim"] == 8 and cfg["vq_kwargs"] == {"ema": False}
    assert cfg["data_variance"] == R.data_variance(ds.train.images)
    assert R.model_config("ae", ds, latent_dim=None)["latent_dim"] == 16
    assert R.model_config("pixelcnn", ds, num_codes=16)["num_codes"] == 16


def test_demo_takes_the_train_vq_options():
    vq = ["--codebook-size", "64", "--dim", "8", "--no-ema", "--dead-code-steps", "0"]
    demo = vqvae_options(build_parser().parse_args(["demo", *vq]))
    train = vqvae_options(build_parser().parse_args(["train", "vqvae", *vq]))
    assert (
        demo
        == train
        == {
            "codebook_size": 64,
            "dim": 8,
            "beta": None,
            "vq_kwargs": {"ema": False, "dead_code_steps": 0},
        }
    )


def test_ae_stage_records_latent_stats_and_samples_from_them(ds, tmp_path):
    seed_everything(0)
    ae = build("ae", R.model_config("ae", ds, hidden=8))
    meta = R.train_images("ae", ae, ds, tmp_path / "ae", steps=2, batch_size=16, eval_limit=8)
    stats = R.latent_stats(ae, ds.train.images)
    saved = json.loads((tmp_path / "ae" / "run.json").read_text())
    assert saved["latent_mean"] == meta["latent_mean"] == stats["latent_mean"]
    assert saved["latent_std"] == meta["latent_std"] == stats["latent_std"]
    images = R.sample_ae(ae, saved, 5, torch.Generator().manual_seed(0))
    assert images.shape == (5, 1, 28, 28) and 0 <= images.min() <= images.max() <= 1
