"""`fastvq` CLI smoke tests on a tiny synthetic IDX dataset written into tmp_path."""

import dataclasses
import json

import pytest
import torch

from fastvq.app.cli import main
from fastvq.app.data import write_synthetic_dataset
from fastvq.app.demo import DemoSteps, run_demo
from fastvq.app.parser import VQ_DEFAULTS, VQ_OPTIONS
from fastvq.layer_config import VQConfig, resolve_simvq


@pytest.fixture(autouse=True)
def _one_thread():
    """See tests/test_models.py: tiny tensors, single-threaded is much faster on a busy box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("idx"), n_train=96, n_test=48)


def _train(kind, data_dir, out, *extra):
    args = ["train", kind, "--data-dir", str(data_dir), "--out", str(out), "--batch-size", "16"]
    return main(args + ["--eval-limit", "32", *extra])


def test_train_resume_and_sample_ae_vae(tmp_path, data_dir):
    for kind in ("ae", "vae"):
        out = tmp_path / kind
        assert _train(kind, data_dir, out, "--steps", "3", "--hidden", "8") == 0
        assert _train(kind, data_dir, out, "--steps", "5", "--resume") == 0
        meta = json.loads((out / "run.json").read_text())
        assert meta["step"] == 5 and meta["config"]["hidden"] == 8
        assert (out / "model.safetensors").is_file() and (out / "optim.safetensors").is_file()
        assert "mse" in meta["metrics"]
        assert main(["sample", str(out), "-n", "4", "--out", str(tmp_path / f"{kind}.png")]) == 0
        assert (tmp_path / f"{kind}.png").stat().st_size > 0


def test_train_vqvae_then_pixelcnn_then_sample(tmp_path, data_dir):
    vq = tmp_path / "vq"
    opts = ["--steps", "4", "--hidden", "16", "--codebook-size", "16", "--dim", "8"]
    assert _train("vqvae", data_dir, vq, *opts, "--no-ema", "--dead-code-steps", "0") == 0
    meta = json.loads((vq / "run.json").read_text())
    assert meta["config"]["vq_kwargs"] == {"ema": False, "dead_code_steps": 0}
    assert 1 <= meta["metrics"]["codes_used"] <= 16
    prior = tmp_path / "prior"
    extra = ["--steps", "3", "--vqvae", str(vq), "--channels", "8", "--layers", "2"]
    assert _train("pixelcnn", data_dir, prior, *extra, "--conditional") == 0
    assert json.loads((prior / "run.json").read_text())["code_shape"] == [7, 7]
    png = tmp_path / "s.png"
    assert main(["sample", str(prior), "-n", "3", "--label", "2", "--out", str(png)]) == 0
    assert png.stat().st_size > 0


def test_missing_data_exit_code(tmp_path, capsys):
    assert main(["train", "ae", "--data-dir", str(tmp_path), "--steps", "1"]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_demo_tiny(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("FASTVQ_CACHE", str(tmp_path / "cache"))
    steps = DemoSteps(classifier=5, ae=3, vae=3, vqvae=4, pixelcnn=3, fd_samples=24, eval_limit=32)
    r = run_demo(tmp_path / "demo", data_dir=data_dir, steps=steps, codebook_size=16)
    for f in ("reconstructions.png", "samples.png", "codebook_usage.png", "summary.md"):
        assert (tmp_path / "demo" / f).stat().st_size > 0
    saved = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert saved["pixelcnn"]["uniform_bits_per_code"] == 4.0
    fd = r["frechet_distance"]
    assert fd["M"] == 24 and all(v >= 0 for k, v in fd.items() if k not in ("M", "features"))
    assert any((tmp_path / "cache").iterdir())  # the feature classifier was cached
    assert main(["sample", str(tmp_path / "demo" / "pixelcnn"), "-n", "2"]) == 0


def test_cli_layer_defaults_are_the_layers():
    """The CLI keeps VectorQuantizer's defaults as a literal (help texts, runs saved with an
    option unset); they must stay the layer's. None in VQConfig is resolved by the layer."""
    assert tuple(VQ_DEFAULTS) == VQ_OPTIONS
    defaults = {f.name: f.default for f in dataclasses.fields(VQConfig)}
    layer = {k: defaults[k] for k in VQ_OPTIONS}
    layer["ema"], layer["kmeans_init"], layer["dead_code_steps"] = resolve_simvq(
        False, layer["ema"], layer["kmeans_init"], layer["dead_code_steps"]
    )
    assert VQ_DEFAULTS == layer
