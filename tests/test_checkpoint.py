"""Issue 11 item 2: checkpoints are atomic as a set, and one process at a time writes a run.

A training child process is killed (SIGKILL, by the fault-injection hook) between two checkpoint
writes; resuming must then give the uninterrupted run's weights, or refuse clearly.
"""

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from fastvq.app import checkpoint as C
from fastvq.app.cli import main
from fastvq.app.data import write_synthetic_dataset
from fastvq.app.loop import fit
from fastvq.models import AE, AEConfig

STEPS, EVERY = 6, 3  # checkpoints at steps 3 and 6, four writes each

_TRAIN = f"""
import sys, torch
from fastvq.app import checkpoint as C
from fastvq.app.loop import fit
from fastvq.models import AE, AEConfig

def run(run_dir, steps, resume=False):
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    data = (torch.rand(64, 28, 28, generator=g) * 255).to(torch.uint8)
    labels = torch.zeros(64, dtype=torch.long)
    torch.manual_seed(0)
    model = AE(AEConfig(hidden=8, latent_dim=4))
    fit(model, "ae", data, labels, steps=steps, batch_size=16, eval_every={EVERY},
          run_dir=run_dir, resume=resume)
    return model
"""

_CHILD = _TRAIN + f"\nrun(sys.argv[1], {STEPS})\n"

# Kill after the optimizer file of the second checkpoint is written, by wrapping save_file: no
# hook needed, so this also shows the torn set that the pre-fix code (files replaced one by one)
# left behind.
_CHILD_PATCHED = _TRAIN + textwrap.dedent(
    f"""
    import os, signal
    calls = []
    real = C.save_file
    def save_file_then_die(*a, **k):
        real(*a, **k)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    C.save_file = save_file_then_die
    run(sys.argv[1], {STEPS})
    """
)

ns: dict = {}
exec(_TRAIN, ns)  # the same training function, in this process
run = ns["run"]


def _child(code, run_dir, fault=None):
    env = {k: v for k, v in os.environ.items() if k != "FASTVQ_FAULT_AFTER_WRITE"}
    if fault is not None:
        env["FASTVQ_FAULT_AFTER_WRITE"] = fault
    return subprocess.run(
        [sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True, env=env,
        timeout=120,
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's weights."""
    return run(tmp_path_factory.mktemp("ref") / "run", STEPS).state_dict()


def _assert_same(model, reference):
    for name, t in model.state_dict().items():
        torch.testing.assert_close(t, reference[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    "fault",
    [
        "model.safetensors",  # inside the first checkpoint: nothing committed, resume from 0
        "optim.safetensors:2",  # inside the second: resume from step 3
        "run.json:2",
        "7",  # the 7th write: the second checkpoint's run.json
        "current:2",  # right after the second commit, before the tidy-up: step 6 is complete
    ],
)
def test_killed_between_writes_then_resume_matches_uninterrupted(tmp_path, reference, fault):
    proc = _child(_CHILD, tmp_path / "run", fault)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    _assert_same(run(tmp_path / "run", STEPS, resume=True), reference)
    meta = C.read_meta(tmp_path / "run")
    assert meta["step"] == STEPS
    assert [p.name for p in (tmp_path / "run").glob("ckpt-*")] == [
        os.readlink(tmp_path / "run" / "current")
    ]  # the resumed run's save removed the dead checkpoint directories


def test_killed_after_optimizer_write_then_resume_matches(tmp_path, reference):
    """The issue's reproduction: model and optimizer of step 6 on disk, run.json of step 3."""
    proc = _child(_CHILD_PATCHED, tmp_path / "run")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert C.read_meta(tmp_path / "run")["step"] == EVERY  # the last committed checkpoint
    _assert_same(run(tmp_path / "run", STEPS, resume=True), reference)


def test_inconsistent_checkpoint_is_refused(tmp_path):
    """A mix of two checkpoints (copied by hand here) is refused, not silently resumed."""
    run(tmp_path / "a", EVERY)
    run(tmp_path / "b", STEPS)
    a, b = C.checkpoint_dir(tmp_path / "a"), C.checkpoint_dir(tmp_path / "b")
    (a / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes())
    with pytest.raises(C.CheckpointError, match="saved at step 6 but run.json says step 3"):
        run(tmp_path / "a", STEPS, resume=True)
    with pytest.raises(C.CheckpointError, match="inconsistent checkpoint"):
        C.load_run(tmp_path / "a")
    os.unlink(tmp_path / "b" / "current")
    os.symlink("ckpt-gone", tmp_path / "b" / "current")
    with pytest.raises(C.CheckpointError, match="points to"):
        C.read_meta(tmp_path / "b")


def test_second_writer_is_refused(tmp_path, capsys):
    """Another process holding the run's lock: fit and the CLI refuse at once, clearly."""
    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a separate open file: another writer
    try:
        with pytest.raises(C.RunLockedError, match="another fastvq process"):
            fit(AE(AEConfig(hidden=8, latent_dim=4)), "ae",
                  torch.zeros(16, 28, 28, dtype=torch.uint8), torch.zeros(16, dtype=torch.long),
                  steps=1, batch_size=16, run_dir=out)  # fmt: skip
        data = write_synthetic_dataset(tmp_path / "idx", n_train=16, n_test=8)
        argv = ["train", "ae", "--data-dir", str(data), "--out", str(out), "--steps", "1"]
        assert main(argv) == 2
        assert "another fastvq process" in capsys.readouterr().err
    finally:
        os.close(fd)
    assert not (out / "run.json").exists()
    C.save_run(out, AE(AEConfig(hidden=8, latent_dim=4)), "ae", {"step": 0})  # lock released
    assert json.loads((out / "run.json").read_text())["step"] == 0
