"""Issue 13 item 6: the CLI never loses work and never hides an error.

Ctrl-C saves a checkpoint and exits 130; ``--resume`` restores the run's arguments, refuses what
cannot be resumed, and continues bit-identically for every model kind; every argument is checked
before any work, each error being one line that names it (exit status 2).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import one_line_error, rc
from safetensors.torch import load_file

from fastvq.app import demo
from fastvq.app.cli import auto_threads
from fastvq.app.data import write_synthetic_dataset
from fastvq.app.demo import DemoSteps, run_demo
from fastvq.app.parser import build_parser

pytestmark = pytest.mark.usefixtures("cli_env")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("idx"), n_train=96, n_test=32)


# small models; --dead-code-steps 2 so that dead-code restarts (the layer's own generators)
# happen within the few steps of a test
OPTIONS = {
    "ae": ["--hidden", "8", "--latent-dim", "4"],
    "vae": ["--hidden", "8", "--latent-dim", "4"],
    "vqvae": ["--hidden", "8", "--dim", "4", "--codebook-size", "16", "--dead-code-steps", "2"],
    "pixelcnn": ["--channels", "8", "--layers", "2", "--conditional"],
}


def _train(kind, data_dir, out, *extra) -> int:
    argv = ["train", kind, "--data-dir", str(data_dir), "--out", str(out), "--batch-size", "16"]
    return rc([*argv, "--eval-limit", "16", "--eval-every", "3", *OPTIONS[kind], *extra])


@pytest.fixture(scope="module")
def vqvae_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("vq") / "vqvae"
    n = torch.get_num_threads()
    try:
        assert _train("vqvae", data_dir, out, "--steps", "4") == 0
    finally:
        torch.set_num_threads(n)
    return out


def _kind_args(kind, vqvae_run):
    return ["--vqvae", str(vqvae_run)] if kind == "pixelcnn" else []


def _tensors(run: Path) -> dict:
    return {
        **{f"model.{k}": v for k, v in load_file(run / "model.safetensors").items()},
        **{f"optim.{k}": v for k, v in load_file(run / "optim.safetensors").items()},
    }


def _assert_same_run(a: Path, b: Path):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    ma, mb = (json.loads((r / "run.json").read_text()) for r in (a, b))
    assert ma["step"] == mb["step"] and ma["rng_state"] == mb["rng_state"]
    assert [h["step"] for h in ma["history"]] == [h["step"] for h in mb["history"]]


# ---------------------------------------------------------------- stop and resume


@pytest.mark.parametrize("kind", ["ae", "vae", "vqvae", "pixelcnn"])
def test_stop_mid_run_then_resume_is_bit_identical(kind, tmp_path, data_dir, vqvae_run, capsys,
                                                   monkeypatch):  # fmt: skip
    """Stopped at step 5 of 8 (as by Ctrl-C during step 5), then `--resume` with no other
    argument: weights, Adam state, RNG states (torch, numpy, random, the layer's generators)
    and the layer's usage counters equal those of the uninterrupted run."""
    extra = _kind_args(kind, vqvae_run)
    assert _train(kind, data_dir, tmp_path / "ref", "--steps", "8", *extra) == 0
    monkeypatch.setenv("FASTVQ_INTERRUPT_AT_STEP", "5")
    assert _train(kind, data_dir, tmp_path / "run", "--steps", "8", *extra) == 130
    err = capsys.readouterr().err
    assert f"fastvq train {kind} --out {tmp_path / 'run'} --resume" in err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["step"] == 5
    monkeypatch.delenv("FASTVQ_INTERRUPT_AT_STEP")
    assert rc(["train", kind, "--out", str(tmp_path / "run"), "--resume"]) == 0
    _assert_same_run(tmp_path / "ref", tmp_path / "run")
    if kind == "vqvae":  # the usage counters are buffers: compared above; check they moved
        w = load_file(tmp_path / "run" / "model.safetensors")
        assert float(w["vq.usage_counts"].sum()) > 0


def test_ctrl_c_saves_and_resume_matches_uninterrupted(tmp_path, data_dir):
    """A real SIGINT to a training child process: exit 130, no traceback, a checkpoint of the
    last complete step and the resume command; resuming gives the uninterrupted run's state."""
    out = tmp_path / "run"
    argv = ["train", "vae", "--data-dir", str(data_dir), "--out", str(out), "--batch-size", "16",
            "--eval-limit", "16", "--eval-every", "2", "--steps", "100000", "--threads", "1",
            *OPTIONS["vae"]]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTVQ_")}
    # A shell's background job (CI's runner may be one) starts with SIGINT ignored, and Python
    # then keeps ignoring it: give the child the default disposition, as a terminal would.
    child = subprocess.Popen(
        [sys.executable, "-m", "fastvq.app.cli", *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        deadline = time.time() + 90
        while not (out / "current").is_symlink():  # its first checkpoint (step 2) is written
            assert child.poll() is None and time.time() < deadline, child.communicate()
            time.sleep(0.1)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130, err
    assert "Traceback" not in err
    step = json.loads((out / "run.json").read_text())["step"]
    assert 2 <= step < 100000
    assert f"interrupted at step {step}/100000" in err
    assert f"fastvq train vae --out {out} --resume" in err
    assert rc(["train", "vae", "--out", str(out), "--resume", "--steps", str(step + 2)]) == 0
    ref = tmp_path / "ref"
    argv[argv.index("--out") + 1] = str(ref)
    argv[argv.index("--steps") + 1] = str(step + 2)
    assert rc(argv[:-4] + OPTIONS["vae"]) == 0  # the same command, uninterrupted
    _assert_same_run(ref, out)


def test_resume_restores_every_run_argument(tmp_path, data_dir):
    out = tmp_path / "run"
    args = ["--steps", "2", "--eval-every", "2", "--lr", "0.01", "--seed", "3"]
    assert _train("ae", data_dir, out, *args, "--batch-size", "8") == 0
    before = json.loads((out / "run.json").read_text())
    assert rc(["train", "ae", "--out", str(out), "--resume", "--steps", "6"]) == 0
    meta = json.loads((out / "run.json").read_text())
    assert meta["args"] == before["args"]
    assert (meta["batch_size"], meta["lr"], meta["seed"]) == (8, 0.01, 3)
    assert meta["args"]["data_dir"] == str(data_dir) and meta["args"]["eval_limit"] == 16
    assert [h["step"] for h in meta["history"]] == [2, 4, 6]  # --eval-every 2 was restored
    assert meta["config"]["hidden"] == 8 and meta["config"]["latent_dim"] == 4


@pytest.mark.parametrize(
    "given, flag",
    [
        (["--codebook-size", "32"], "--codebook-size"),
        (["--batch-size", "32"], "--batch-size"),
        (["--eval-every", "5"], "--eval-every"),
        (["--no-ema"], "--ema"),
        (["--seed", "1"], "--seed"),
    ],
)
def test_resume_rejects_a_conflicting_argument(tmp_path, data_dir, vqvae_run, capsys, given,
                                               flag):  # fmt: skip
    before = _tensors(vqvae_run)
    argv = ["train", "vqvae", "--out", str(vqvae_run), "--resume", "--steps", "6", *given]
    assert rc(argv) == 2
    one_line_error(capsys, flag, "conflicts with the run being resumed")
    after = _tensors(vqvae_run)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was trained
    # the same values as the run's are no conflict
    same = ["--codebook-size", "16", "--dim", "4", "--batch-size", "16", "--ema"]
    assert rc(["train", "vqvae", "--out", str(tmp_path / "x"), *same, "--steps", "1",
                "--data-dir", str(data_dir), "--eval-limit", "8"]) == 0  # fmt: skip


def test_resume_refuses_a_missing_directory(tmp_path, data_dir, capsys):
    out = tmp_path / "nope"
    assert rc(["train", "vae", "--data-dir", str(data_dir), "--out", str(out), "--resume"]) == 2
    one_line_error(capsys, "--resume", "does not exist")
    assert not out.exists()  # and started nothing there
    out.mkdir()
    assert rc(["train", "vae", "--data-dir", str(data_dir), "--out", str(out), "--resume"]) == 2
    one_line_error(capsys, "--resume", "no checkpoint")


def test_resume_refuses_another_model_kind(vqvae_run, capsys):
    assert rc(["train", "vae", "--out", str(vqvae_run), "--resume"]) == 2
    one_line_error(capsys, "--resume", "is a vqvae run, not vae")


def test_resume_refuses_steps_below_the_run(vqvae_run, capsys):
    assert rc(["train", "vqvae", "--out", str(vqvae_run), "--resume", "--steps", "2"]) == 2
    one_line_error(capsys, "--steps", "below the run's step 4")


# ---------------------------------------------------------------- validation before any work


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["train", "ae", "--steps", "-5"], "--steps"),
        (["train", "ae", "--steps", "0"], "--steps"),
        (["train", "ae", "--batch-size", "0"], "--batch-size"),
        (["train", "ae", "--batch-size", "-1"], "--batch-size"),
        (["train", "ae", "--epochs", "0"], "--epochs"),
        (["train", "ae", "--lr", "-1"], "--lr"),
        (["train", "vqvae", "--codebook-size", "0"], "--codebook-size"),
        (["train", "vqvae", "--decay", "1.5"], "--decay"),
        (["train", "ae", "--codebook-size", "8"], "--codebook-size"),  # not an AE option
        (["train", "ae", "--steps", "2", "--epochs", "1"], "--epochs"),
        (["train", "pixelcnn"], "--vqvae"),
        (["sample", "RUN", "-n", "0"], "-n"),
        (["sample", "RUN", "--temperature", "0"], "--temperature"),
        (["demo", "--scale", "0"], "--scale"),
    ],
)
def test_bad_argument_is_one_line_naming_it(tmp_path, data_dir, capsys, monkeypatch, argv,
                                            flag):  # fmt: skip
    monkeypatch.chdir(tmp_path)  # default --out runs/KIND would land here
    argv = [str(tmp_path) if a == "RUN" else a for a in argv]
    if argv[0] == "train":
        argv += ["--data-dir", str(data_dir)]
    assert rc(argv) == 2
    one_line_error(capsys, flag)
    assert not list(tmp_path.rglob("run.json"))  # no training happened


def test_unwritable_out_fails_before_training(tmp_path, data_dir, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for argv in (
        ["train", "ae", "--data-dir", str(data_dir), "--out", str(blocker / "run")],
        ["demo", "--data-dir", str(data_dir), "--out", str(blocker / "demo")],
    ):
        t0 = time.time()
        assert rc(argv) == 2
        one_line_error(capsys, "--out", "cannot write")
        assert time.time() - t0 < 5  # refused at once, not after training


def test_sample_needs_an_existing_run(tmp_path, capsys):
    assert rc(["sample", str(tmp_path / "nonexistent")]) == 2
    one_line_error(capsys, "argument run", "does not exist")
    assert rc(["sample", str(tmp_path)]) == 2
    one_line_error(capsys, "argument run", "no checkpoint")


def test_sample_refuses_what_it_cannot_do(tmp_path, vqvae_run, data_dir, capsys):
    assert rc(["sample", str(vqvae_run)]) == 2
    one_line_error(capsys, "argument run", "cannot sample from a vqvae run")
    prior = tmp_path / "prior"
    assert _train("pixelcnn", data_dir, prior, "--steps", "1", "--vqvae", str(vqvae_run)) == 0
    png = prior / "samples.png"
    assert rc(["sample", str(prior), "-n", "2"]) == 0
    stamp = png.stat().st_mtime_ns
    capsys.readouterr()  # the training's progress bars
    assert rc(["sample", str(prior), "-n", "0"]) == 2
    one_line_error(capsys, "-n")
    assert rc(["sample", str(prior), "--label", "10"]) == 2
    one_line_error(capsys, "--label", "< 10")
    assert png.stat().st_mtime_ns == stamp  # not overwritten


def test_pixelcnn_vqvae_must_be_a_vqvae_run(tmp_path, data_dir, capsys):
    ae = tmp_path / "ae"
    assert _train("ae", data_dir, ae, "--steps", "1") == 0
    capsys.readouterr()
    assert _train("pixelcnn", data_dir, tmp_path / "p", "--vqvae", str(ae)) == 2
    one_line_error(capsys, "--vqvae", "is a ae run, not a vqvae run")
    assert _train("pixelcnn", data_dir, tmp_path / "p", "--vqvae", str(tmp_path / "none")) == 2
    one_line_error(capsys, "--vqvae", "does not exist")


def test_damaged_checkpoint_is_one_line(tmp_path, data_dir, capsys):
    run = tmp_path / "ae"
    assert _train("ae", data_dir, run, "--steps", "1") == 0
    capsys.readouterr()
    ckpt = run / os.readlink(run / "current")
    weights = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(b"garbage" * 10)
    assert rc(["sample", str(run)]) == 2
    one_line_error(capsys, "model.safetensors", "damaged checkpoint")
    assert rc(["train", "ae", "--out", str(run), "--resume", "--steps", "2"]) == 2
    one_line_error(capsys, "damaged checkpoint")
    (ckpt / "model.safetensors").write_bytes(weights)
    (ckpt / "run.json").write_text('{"kind": "ae", "step": ')
    assert rc(["sample", str(run)]) == 2
    one_line_error(capsys, "run.json", "damaged checkpoint")
    assert _train("pixelcnn", data_dir, tmp_path / "p", "--vqvae", str(run)) == 2
    one_line_error(capsys, "run.json", "damaged checkpoint")


# ---------------------------------------------------------------- help and threads


@pytest.mark.parametrize("command", [[], ["train"], ["sample"], ["demo"]])
def test_help_is_plain_text_with_defaults(command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and "::" not in text
    if command == ["train"]:
        for default in ("(default: 128)", "(default: 0.001)", "(default: 500)", "(default: 256)"):
            assert default in text
    if command == ["sample"]:
        assert "(default: 64)" in text


def test_auto_threads_backs_off_on_a_loaded_machine():
    torch.set_num_threads(4)  # torch's default on a 4-core machine (the fixture restores it)
    default = torch.get_num_threads()
    n, note = auto_threads(cores=2, load=10.8)
    assert n == 1 and "--threads" in note and "10.8" in note
    assert auto_threads(cores=64, load=0.0) == (default, None)  # idle: torch's choice


# ---------------------------------------------------------------- the demo (issue 13 item 5)

TINY = DemoSteps(classifier=4, ae=3, vae=3, vqvae=4, pixelcnn=3, fd_samples=24, eval_limit=16)


def test_demo_metrics_are_identical_for_the_same_seed(tmp_path, data_dir):
    """Two demo runs with one seed, each training its own feature classifier (separate caches),
    write byte-identical metrics.json; the Fréchet distances come with their spread over 3
    sample seeds, and the times and machine go to run_info.json."""
    texts = []
    for run in ("a", "b"):
        out = tmp_path / run
        run_demo(out, data_dir=data_dir, steps=TINY, codebook_size=16, cache=tmp_path / f"c{run}")
        texts.append((out / "metrics.json").read_text())
        info = json.loads((out / "run_info.json").read_text())
        assert info["seconds"]["total"] > 0 and "torch_threads" in info["machine"]
    assert texts[0] == texts[1]
    m = json.loads(texts[0])
    assert "seconds" not in m and "machine" not in m and "date_utc" not in m
    fd, per_seed = m["frechet_distance"], m["frechet_distance_per_seed"]
    assert fd["sample_seeds"] == len(per_seed["seeds"]) == 3
    # (the tiny VQ-VAE may use one code only, which makes its unigram samples all alike)
    for name in ("floor_train_vs_test", "ae_random_latents", "vae_samples"):
        values = per_seed[name]
        assert len(values) == 3 and len(set(values)) == 3  # three different sample sets
        assert fd[name] == pytest.approx(sum(values) / 3) and fd[f"{name}_std"] > 0
    assert "±" in (tmp_path / "a" / "summary.md").read_text()


def test_demo_cli_says_where_it_wrote(tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.setattr(demo, "QUICK", TINY)  # `--quick`, test-sized
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--data-dir", str(data_dir), "--out", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--codebook-size", "16"]  # fmt: skip
    assert rc(argv) == 0
    captured = capsys.readouterr()
    assert f"wrote {out.resolve()}/" in captured.out
    assert "5/5 metrics" in captured.err  # the metrics stage shows progress
    assert (out / "metrics.json").is_file() and (out / "pixelcnn" / "run.json").is_file()
    # the demo owns its output folder: a second demo there replaces the first one's output
    first = (out / "metrics.json").read_text()
    assert rc(argv) == 0
    assert (out / "metrics.json").read_text() == first
