"""The checkpoint store of training runs: atomic checkpoints, one writer per run directory.

A checkpoint is three files:
  * ``model.safetensors``: the weights (``safetensors.torch.save_model``);
  * ``optim.safetensors``: the optimizer's tensors, for ``--resume``;
  * ``run.json``: kind, model config, optimizer hyper-parameters, step, settings and metrics.

They are written as one unit: into a fresh directory ``RUN/ckpt-<step>-<id>/``, then the symlink
``RUN/current`` is swapped to it with one atomic ``rename``, so a reader (or a process killed at
any point) sees the previous checkpoint or the new one, never a mix. ``RUN/model.safetensors``,
``RUN/optim.safetensors`` and ``RUN/run.json`` are symlinks through ``current`` for convenience;
the loaders go through ``current`` itself. Each safetensors file also records the step it was
saved at, and loading refuses a set whose steps disagree (:class:`CheckpointError`).

One process at a time writes a run directory: :func:`fastvq.app.loop.fit` and :func:`save_run`
hold an exclusive ``flock`` on ``RUN/.lock``; a second writer gets :class:`RunLockedError` at once.

Fault injection for tests: ``FASTVQ_FAULT_AFTER_WRITE=N`` kills the process with SIGKILL right
after its N-th checkpoint write (a file, or the ``current`` pointer swap);
``FASTVQ_FAULT_AFTER_WRITE=NAME`` or ``NAME:K`` right after the first (K-th) write of ``NAME``
(``model.safetensors``, ``optim.safetensors``, ``run.json``, ``current``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from ..models import (
    AE,
    VAE,
    VQVAE,
    AEConfig,
    Classifier,
    ClassifierConfig,
    PixelCNN,
    PixelCNNConfig,
    VAEConfig,
    VQVAEConfig,
)

MODELS = {
    "ae": (AE, AEConfig),
    "vae": (VAE, VAEConfig),
    "vqvae": (VQVAE, VQVAEConfig),
    "pixelcnn": (PixelCNN, PixelCNNConfig),
    "classifier": (Classifier, ClassifierConfig),
}


def build(kind: str, config: dict) -> torch.nn.Module:
    model_cls, cfg_cls = MODELS[kind]
    return model_cls(cfg_cls(**config))


# ---------------------------------------------------------------- checkpoints


class CheckpointError(RuntimeError):
    """A run directory whose checkpoint cannot be loaded as one consistent state."""


class RunLockedError(RuntimeError):
    """Another process holds the run directory's lock (it is training or saving there)."""


CURRENT = "current"  # the symlink naming the live checkpoint directory
FILES = ("model.safetensors", "optim.safetensors", "run.json")
_STEP_KEY = "fastvq_step"  # safetensors metadata: the step the file was saved at

# lock path -> [fd, depth]: flock conflicts between two open() of one file even inside one
# process, so nested holders (fit -> save_run) share the first holder's descriptor.
_held_locks: dict[str, list[int]] = {}
_write_counts: dict[str, int] = {}


@contextlib.contextmanager
def run_lock(run_dir):
    """Hold ``RUN/.lock`` exclusively (``fcntl.flock``, released when the process dies);
    re-entrant within a process. Raises :class:`RunLockedError` at once if another holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = os.path.realpath(run_dir / ".lock")
    if path in _held_locks:
        _held_locks[path][1] += 1
        try:
            yield
        finally:
            _held_locks[path][1] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunLockedError(
            f"{run_dir}: another fastvq process is writing this run directory (lock {path} is "
            "held); wait for it to finish or choose another --out"
        ) from None
    _held_locks[path] = [fd, 1]
    try:
        yield
    finally:
        del _held_locks[path]
        os.close(fd)  # releases the flock


def _after_write(name: str) -> None:
    """The fault-injection hook (see the module docstring): SIGKILL, so nothing is cleaned up or
    flushed, as when the machine kills a job."""
    _write_counts[name] = _write_counts.get(name, 0) + 1
    _write_counts[""] = _write_counts.get("", 0) + 1
    spec = os.environ.get("FASTVQ_FAULT_AFTER_WRITE")
    if not spec:
        return
    if spec.isdigit():  # N: the N-th write of any name ("" counts them all)
        target, nth = "", int(spec)
    else:  # NAME or NAME:K
        target, _, k = spec.partition(":")
        nth = int(k) if k else 1
    if target in ("", name) and _write_counts[target] == nth:
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_symlink(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` atomically: a fresh symlink renamed over the old name."""
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}.tmp")
    os.symlink(target, tmp)
    os.replace(tmp, link)


def checkpoint_dir(run_dir) -> Path | None:
    """The directory holding the live checkpoint of ``run_dir``: ``RUN/current``'s target, or
    ``RUN`` itself for a run written by fastvq before checkpoint directories; None if no
    checkpoint was ever completed there."""
    run_dir = Path(run_dir)
    cur = run_dir / CURRENT
    if cur.is_symlink():
        target = run_dir / os.readlink(cur)
        if not (target / "run.json").is_file():
            raise CheckpointError(
                f"{run_dir}: {CURRENT} points to {target}, which holds no run.json; the run "
                "directory was modified by hand. Refusing to load it"
            )
        return target
    if (run_dir / "run.json").is_symlink():
        raise CheckpointError(
            f"{run_dir}: run.json links through a missing {CURRENT} symlink; the run directory "
            "was modified by hand. Refusing to load it"
        )
    if (run_dir / "run.json").is_file():
        return run_dir
    return None


def save_run(run_dir, model, kind: str, meta: dict, optimizer=None) -> None:
    """Write weights, optimizer tensors and ``run.json`` as one checkpoint (module docstring).

    Without ``optimizer`` the previous checkpoint's optimizer state is carried over (so adding
    metadata after training keeps ``--resume`` working).
    """
    run_dir = Path(run_dir)
    with run_lock(run_dir):
        prev = checkpoint_dir(run_dir)
        step = meta.get("step")
        tag = {_STEP_KEY: str(step)}
        new = run_dir / f"ckpt-{int(step or 0):08d}-{uuid.uuid4().hex[:8]}"
        new.mkdir()
        save_model(model, str(new / "model.safetensors"), metadata=tag)
        _fsync(new / "model.safetensors")
        _after_write("model.safetensors")
        meta = dict(meta, kind=kind, config=dataclasses.asdict(model.cfg))
        if optimizer is not None:
            sd = optimizer.state_dict()
            tensors = {
                f"{pid}.{name}": t.detach().contiguous()
                for pid, st in sd["state"].items()
                for name, t in st.items()
                if torch.is_tensor(t)
            }
            save_file(tensors, str(new / "optim.safetensors"), metadata=tag)
            _fsync(new / "optim.safetensors")
            _after_write("optim.safetensors")
            meta["optimizer"] = {"param_groups": sd["param_groups"]}
        elif prev is not None and (prev / "optim.safetensors").is_file():
            # keep the saved optimizer state usable for --resume (checked against the step)
            shutil.copy2(prev / "optim.safetensors", new / "optim.safetensors")
            old = json.loads((prev / "run.json").read_text())
            if "optimizer" in old:
                meta["optimizer"] = old["optimizer"]
        (new / "run.json").write_text(json.dumps(meta, indent=2, default=str))
        _fsync(new / "run.json")
        _after_write("run.json")
        _fsync(new)
        # The commit point: before this rename readers see the previous checkpoint, after it
        # the new one.
        _swap_symlink(run_dir / CURRENT, new.name)
        _fsync(run_dir)
        _after_write(CURRENT)
        # Conveniences and clean-up; a kill here leaves a loadable run that the next save tidies.
        for name in FILES:
            link = run_dir / name
            if (new / name).is_file():
                if not (link.is_symlink() and os.readlink(link) == f"{CURRENT}/{name}"):
                    _swap_symlink(link, f"{CURRENT}/{name}")
            elif link.is_symlink() or link.exists():
                link.unlink()
        for old_dir in run_dir.glob("ckpt-*"):
            if old_dir.name != new.name:
                shutil.rmtree(old_dir, ignore_errors=True)
        for tmp in run_dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def _damaged(path, e: Exception) -> CheckpointError:
    """A one-line :class:`CheckpointError` for a file that cannot be parsed (the library's
    message may span lines)."""
    what = " ".join(str(e).split()) or type(e).__name__
    return CheckpointError(f"{path}: damaged checkpoint file ({what}); retrain or restore it")


def _read_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _damaged(path, e) from None
    if not isinstance(meta, dict):
        raise _damaged(path, TypeError("run.json does not hold an object"))
    return meta


def _saved_step(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(_STEP_KEY)
    except SafetensorError as e:
        raise _damaged(path, e) from None


def _check_consistent(ckpt: Path, meta: dict) -> None:
    """Refuse a checkpoint whose files were saved at different steps. Files from before the
    step tag carry none and cannot be checked."""
    want = str(meta.get("step"))
    for name in ("model.safetensors", "optim.safetensors"):
        if not (ckpt / name).is_file():
            continue
        got = _saved_step(ckpt / name)
        if got is not None and got != want:
            raise CheckpointError(
                f"{ckpt}: inconsistent checkpoint: {name} was saved at step {got} but run.json "
                f"says step {want}; refusing to load a mix of two checkpoints"
            )


def read_meta(run_dir) -> dict:
    """``run.json`` of the live checkpoint of ``run_dir``."""
    ckpt = checkpoint_dir(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: no run.json; not a fastvq run directory")
    return _read_json(ckpt / "run.json")


def load_run(run_dir, device="cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the model from ``run.json`` and load its weights -> (model in eval mode, meta)."""
    ckpt = checkpoint_dir(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: no run.json; not a fastvq run directory")
    meta = _read_json(ckpt / "run.json")
    _check_consistent(ckpt, meta)
    try:
        model = build(meta["kind"], meta["config"])
    except (KeyError, TypeError) as e:  # a run.json edited by hand or from another version
        raise _damaged(ckpt / "run.json", e) from None
    _load_weights(model, ckpt / "model.safetensors", device)
    return model.to(device).eval(), meta


def _load_weights(model, path: Path, device) -> None:
    try:
        load_model(model, str(path), device=str(device))
    except (SafetensorError, RuntimeError) as e:  # unparsable, or keys/shapes that do not fit
        raise _damaged(path, e) from None


def load_optimizer_state(optimizer, run_dir, meta) -> None:
    ckpt = checkpoint_dir(run_dir) or Path(run_dir)
    try:
        tensors = load_file(str(ckpt / "optim.safetensors"))
    except SafetensorError as e:
        raise _damaged(ckpt / "optim.safetensors", e) from None
    state: dict = {}
    for key, t in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = t
    groups = meta["optimizer"]["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def load_for_resume(run_dir, model, optimizer, device) -> dict | None:
    """Load the live checkpoint of ``run_dir`` into ``model`` and ``optimizer`` (when it saved
    optimizer state) -> its ``run.json``, or None if ``run_dir`` has no checkpoint yet. Raises
    :class:`CheckpointError` if the checkpoint is inconsistent or damaged."""
    ckpt = checkpoint_dir(run_dir)
    if ckpt is None:
        return None
    meta = _read_json(ckpt / "run.json")
    _check_consistent(ckpt, meta)
    _load_weights(model, ckpt / "model.safetensors", device)
    if (ckpt / "optim.safetensors").is_file():
        load_optimizer_state(optimizer, run_dir, meta)
    return meta
