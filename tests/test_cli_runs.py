"""Reliability round 3 (the CLI): a run is never lost or silently replaced, a copied run is
accepted, nothing is written outside a run, and every damaged run is a one-line error (exit 2).

Each test names the issue's item it covers; each failed on the code before the fix (c49eadf's
CLI: exit 0 with a wrong result, or a traceback).
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import one_line_error, rc
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fastvq.app import cli
from fastvq.app.data import write_synthetic_dataset

pytestmark = pytest.mark.usefixtures("cli_env")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("idx"), n_train=96, n_test=32)


OPTIONS = {
    "ae": ["--hidden", "8", "--latent-dim", "4"],
    "vqvae": ["--hidden", "8", "--dim", "4", "--codebook-size", "16", "--dead-code-steps", "2"],
    "pixelcnn": ["--channels", "8", "--layers", "2"],
}


def _train(kind, data_dir, out, *extra) -> int:
    argv = ["train", kind, "--data-dir", str(data_dir), "--out", str(out), "--batch-size", "16"]
    return rc([*argv, "--eval-limit", "16", "--eval-every", "2", *OPTIONS[kind], *extra])


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, symlinks=True)
    return dest


def _ckpt(run: Path) -> Path:
    return run / os.readlink(run / "current")


def _edit_meta(run: Path, fn) -> None:
    path = _ckpt(run) / "run.json"
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def _weights(run: Path) -> dict:
    return {
        **{f"model.{k}": v for k, v in load_file(run / "model.safetensors").items()},
        **{f"optim.{k}": v for k, v in load_file(run / "optim.safetensors").items()},
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """Finished runs to copy: ae (2 steps), vqvae (4 steps, 16 codes) and its prior (2 steps)."""
    root = tmp_path_factory.mktemp("runs")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _train("ae", data_dir, root / "ae", "--steps", "2") == 0
        assert _train("vqvae", data_dir, root / "vqvae", "--steps", "4") == 0
        vq = ["--vqvae", str(root / "vqvae")]
        assert _train("pixelcnn", data_dir, root / "prior", "--steps", "2", *vq) == 0
    finally:
        torch.set_num_threads(n)
    return root


# ---------------------------------------------------------------- item 1: the optimizer state


def test_resume_without_optimizer_state_is_refused(tmp_path, runs, capsys):
    run = _copy(runs / "ae", tmp_path / "ae")
    (_ckpt(run) / "optim.safetensors").unlink()
    (run / "optim.safetensors").unlink()
    before = load_file(run / "model.safetensors")
    assert rc(["train", "ae", "--out", str(run), "--resume", "--steps", "4"]) == 2
    one_line_error(capsys, "optim.safetensors", "--reset-optimizer")
    after = load_file(run / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was trained
    # the explicit flag continues with a fresh Adam state
    assert rc(["train", "ae", "--out", str(run), "--resume", "--steps", "4",
                "--reset-optimizer"]) == 0  # fmt: skip
    assert json.loads((run / "run.json").read_text())["step"] == 4
    assert (run / "optim.safetensors").is_file()
    capsys.readouterr()
    assert rc(["train", "ae", "--out", str(tmp_path / "new"), "--reset-optimizer"]) == 2
    one_line_error(capsys, "--reset-optimizer", "--resume")


# ---------------------------------------------------------------- item 2: a copied run


def test_run_copied_with_symlinks_dereferenced_resumes_and_saves(tmp_path, runs):
    """`cp -rL`/`scp -r`: `current` and the top-level names become a directory and plain
    files. The copy resumes, saves, and continues as the original does."""
    orig = _copy(runs / "ae", tmp_path / "orig")
    copy = tmp_path / "copy"
    shutil.copytree(orig, copy, symlinks=False)  # dereference every link
    assert (copy / "current").is_dir() and not (copy / "current").is_symlink()
    for run in (orig, copy):
        assert rc(["train", "ae", "--out", str(run), "--resume", "--steps", "4"]) == 0
    assert (copy / "current").is_symlink()  # migrated to the normal layout
    for name in ("model.safetensors", "optim.safetensors", "run.json"):
        assert os.readlink(copy / name) == f"current/{name}"
    a, b = _weights(orig), _weights(copy)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((copy / "run.json").read_text())["step"] == 4
    assert [p.name for p in copy.glob("ckpt-*")] == [os.readlink(copy / "current")]


# ---------------------------------------------------------------- item 3: never replace a run


def test_training_into_a_run_without_resume_is_refused(tmp_path, runs, data_dir, capsys):
    run = _copy(runs / "vqvae", tmp_path / "vqvae")
    before = _weights(run)
    assert _train("ae", data_dir, run, "--steps", "1") == 2
    one_line_error(capsys, "--out", "holds a vqvae run", "--resume", "--overwrite")
    assert _train("vqvae", data_dir, run, "--steps", "2") == 2
    one_line_error(capsys, "--out", "holds a vqvae run at step 4")
    after = _weights(run)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((run / "run.json").read_text())["step"] == 4
    # an explicit --overwrite replaces it
    assert _train("vqvae", data_dir, run, "--steps", "2", "--overwrite") == 0
    assert json.loads((run / "run.json").read_text())["step"] == 2
    capsys.readouterr()
    assert _train("ae", data_dir, run, "--steps", "1", "--resume", "--overwrite") == 2
    one_line_error(capsys, "--overwrite", "--resume")


def test_demo_owns_its_output_folder_only(tmp_path, runs, data_dir, capsys):
    """`fastvq demo` may replace its own earlier output, never a training run."""
    run = _copy(runs / "ae", tmp_path / "ae")
    assert rc(["demo", "--data-dir", str(data_dir), "--out", str(run)]) == 2
    one_line_error(capsys, "--out", "holds a ae run")
    foreign = tmp_path / "runs"
    _copy(runs / "vqvae", foreign / "vqvae")
    assert rc(["demo", "--data-dir", str(data_dir), "--out", str(foreign)]) == 2
    one_line_error(capsys, "--out", "vqvae", "--overwrite")
    (foreign / ".fastvq-demo").write_text("{}")  # the mark an earlier demo left there
    cli._check_demo_out(foreign, overwrite=False)  # its own output: accepted
    cli._check_demo_out(tmp_path / "fresh", overwrite=False)


# ---------------------------------------------------------------- item 4: writes stay in the run


def test_sample_replaces_a_planted_symlink_instead_of_writing_through_it(tmp_path, runs):
    run = _copy(runs / "prior", tmp_path / "prior")
    _copy(runs / "vqvae", tmp_path / "vqvae")  # the prior's VQ-VAE, at the same relative path
    victim = tmp_path / "foreign_run" / "notes.txt"
    victim.parent.mkdir()
    victim.write_text("keep me")
    os.symlink(victim, run / "samples.png")
    assert rc(["sample", str(run), "-n", "2"]) == 0
    assert victim.read_text() == "keep me"
    png = run / "samples.png"
    assert not png.is_symlink() and png.read_bytes()[:4] == b"\x89PNG"
    assert not list(run.glob(".*tmp*"))  # no temporary file left behind


def test_current_pointing_outside_the_run_is_refused(tmp_path, runs, capsys):
    run = _copy(runs / "ae", tmp_path / "ae")
    other = _copy(runs / "ae", tmp_path / "other")
    os.unlink(run / "current")
    os.symlink(_ckpt(other).resolve(), run / "current")
    assert rc(["sample", str(run)]) == 2
    one_line_error(capsys, "current", "outside")


def test_a_planted_lock_symlink_is_not_followed(tmp_path, runs, data_dir):
    run = _copy(runs / "ae", tmp_path / "ae")
    outside = tmp_path / "elsewhere" / "created-by-fastvq"
    outside.parent.mkdir()
    (run / ".lock").unlink()
    os.symlink(outside, run / ".lock")
    assert rc(["train", "ae", "--out", str(run), "--resume", "--steps", "3"]) == 0
    assert not outside.exists()


# ---------------------------------------------------------------- item 5: damaged runs


def _set(path: str, value):
    def edit(meta):
        d = meta
        *parents, last = path.split(".")
        for p in parents:
            d = d[p]
        d[last] = value

    return edit


@pytest.mark.parametrize(
    "field, value",
    [
        ("args.batch_size", 0),
        ("args.lr", -0.5),
        ("steps", float("inf")),
        ("args.seed", "HUGE"),
    ],
)
def test_damaged_run_json_field_is_one_line(tmp_path, runs, capsys, field, value):
    run = _copy(runs / "ae", tmp_path / "ae")
    if value == "HUGE":  # a 5000-digit integer, beyond Python's int() of a string
        path = _ckpt(run) / "run.json"
        meta = json.loads(path.read_text())
        meta["args"]["seed"] = 7
        path.write_text(json.dumps(meta).replace('"seed": 7', '"seed": ' + "9" * 5000))
    else:
        _edit_meta(run, _set(field, value))
    more = [] if field == "steps" else ["--steps", "3"]  # a run that would train on
    assert rc(["train", "ae", "--out", str(run), "--resume", *more]) == 2
    one_line_error(capsys, "run.json", field)


def test_missing_model_file_is_one_line(tmp_path, runs, capsys):
    run = _copy(runs / "ae", tmp_path / "ae")
    (_ckpt(run) / "model.safetensors").unlink()
    assert rc(["sample", str(run)]) == 2
    one_line_error(capsys, "model.safetensors", "missing")
    assert rc(["train", "ae", "--out", str(run), "--resume", "--steps", "3"]) == 2
    one_line_error(capsys, "model.safetensors", "missing")


def test_optimizer_state_of_the_wrong_shape_is_one_line(tmp_path, runs, capsys):
    run = _copy(runs / "ae", tmp_path / "ae")
    path = _ckpt(run) / "optim.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith(".exp_avg"))
    tensors[key] = torch.zeros(3, 5)
    save_file(tensors, str(path), metadata=meta)
    assert rc(["train", "ae", "--out", str(run), "--resume", "--steps", "3"]) == 2
    one_line_error(capsys, "optim.safetensors", key)


def test_run_trained_on_a_gpu_resumes_on_the_cpu(tmp_path, runs, capsys):
    """The layer's restart streams saved on cuda:0 (a GPU run) cannot be restored on the CPU; the
    CPU's own streams start from their seeds, and the run resumes (with a note). A device
    string that is no device at all is a damaged run.json."""
    run = _copy(runs / "vqvae", tmp_path / "vqvae")
    layers = json.loads((run / "run.json").read_text())["rng_state"]["layers"]
    assert any(dev == "cpu" for items in layers.values() for _, dev, _ in items)

    def on(device):
        def edit(meta):
            for items in meta["rng_state"]["layers"].values():
                for item in items:
                    item[1] = device

        return edit

    _edit_meta(run, on("cuda:0"))
    assert rc(["train", "vqvae", "--out", str(run), "--resume", "--steps", "6",
                "--device", "cpu"]) == 0  # fmt: skip
    assert "cuda:0" in capsys.readouterr().err
    assert json.loads((run / "run.json").read_text())["step"] == 6
    _edit_meta(run, on("warp-drive:0"))
    assert rc(["train", "vqvae", "--out", str(run), "--resume", "--steps", "8"]) == 2
    one_line_error(capsys, "run.json", "rng_state.layers")


# ---------------------------------------------------------------- item 6: damaged priors


def test_prior_with_a_smaller_vqvae_is_one_line(tmp_path, runs, data_dir, capsys):
    run = _copy(runs / "prior", tmp_path / "prior")
    small = tmp_path / "vqvae"
    assert _train("vqvae", data_dir, small, "--steps", "1", "--codebook-size", "8") == 0
    capsys.readouterr()
    assert rc(["sample", str(run), "-n", "2"]) == 2
    one_line_error(capsys, "run.json", "num_codes", "codebook_size")


@pytest.mark.parametrize("shape", [None, [100000, 100000], [7], [7, "x"]])
def test_prior_with_a_damaged_code_shape_is_one_line(tmp_path, runs, capsys, shape):
    run = _copy(runs / "prior", tmp_path / "prior")
    _copy(runs / "vqvae", tmp_path / "vqvae")
    if shape is None:
        _edit_meta(run, lambda m: m.pop("code_shape"))
    else:
        _edit_meta(run, _set("code_shape", shape))
    assert rc(["sample", str(run), "-n", "2"]) == 2
    one_line_error(capsys, "run.json", "code_shape")
