"""`fastvq` CLI: the small things of "a newcomer's first hour, round 2" (--version, per-kind
help, a missing --data-dir, a locked run), on a tiny synthetic IDX dataset."""

import fcntl
import os

import pytest

import fastvq
from fastvq.app import cli
from fastvq.app.cli import main
from fastvq.app.data import write_synthetic_dataset
from fastvq.app.parser import KIND_OPTIONS, MODEL_OPTIONS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("idx"), n_train=96, n_test=48)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"fastvq {fastvq.__version__}\n"


@pytest.mark.parametrize("kind", sorted(KIND_OPTIONS))
def test_train_kind_help_lists_only_that_kinds_options(kind, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", kind, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: fastvq train {kind} ")
    words = set(text.replace("[", " ").replace("]", " ").replace(",", " ").split())
    for dest in MODEL_OPTIONS:
        assert (_flag(dest) in words) == (dest in KIND_OPTIONS[kind]), (kind, dest)
    assert {"--out", "--steps", "--resume", "--data-dir", "--seed"} <= words
    # without a kind, train's help still lists every kind's options
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    words = set(capsys.readouterr().out.replace("[", " ").replace("]", " ").split())
    assert {_flag(d) for d in MODEL_OPTIONS} <= words


@pytest.mark.parametrize("command", [["train", "ae", "--steps", "1"], ["demo", "--quick"]])
def test_missing_data_dir_is_one_line_and_leaves_nothing_behind(command, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    missing = tmp_path / "nonexistent"
    out = work / "runs" / "x"
    assert main([*command, "--data-dir", str(missing), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"fastvq: error: argument --data-dir: {missing} does not exist\n"
    assert list(work.iterdir()) == [] and not missing.exists()


def test_missing_data_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    """Data not found in an existing --data-dir: the error as before, but no --out left."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["train", "vae", "--data-dir", str(empty)]) == 2
    assert "fashion-mnist not found" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("resume", [False, True])
def test_a_locked_run_is_refused_at_once(resume, tmp_path, data_dir, capsys, monkeypatch):
    """Another process trains into --out: refused before the data set or the run is read."""
    run = tmp_path / "run"
    base = ["train", "ae", "--data-dir", str(data_dir), "--out", str(run), "--batch-size", "16"]
    if resume:
        assert main([*base, "--steps", "1", "--hidden", "8", "--eval-limit", "16"]) == 0
    run.mkdir(exist_ok=True)
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)  # another open file: another holder
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def no_reading(*args, **kwargs):
        raise AssertionError("read before the lock was checked")

    for name in ("load_dataset", "find_dataset", "read_meta", "checkpoint_dir"):
        monkeypatch.setattr(cli, name, no_reading, raising=False)
    try:
        capsys.readouterr()
        assert main([*base, "--steps", "2", *(["--resume"] if resume else [])]) == 2
    finally:
        os.close(fd)
    err = capsys.readouterr().err
    assert err.startswith("fastvq: error: ") and "another fastvq process" in err
    assert err.count("\n") == 1
