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
import math
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
    path = os.path.join(os.path.realpath(run_dir), ".lock")
    if path in _held_locks:
        _held_locks[path][1] += 1
        try:
            yield
        finally:
            _held_locks[path][1] -= 1
        return
    if os.path.islink(path):  # never create or open a file outside the run through it
        os.unlink(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _locked(run_dir, path) from None
    _held_locks[path] = [fd, 1]
    try:
        yield
    finally:
        del _held_locks[path]
        os.close(fd)  # releases the flock


def check_unlocked(run_dir) -> None:
    """Raise :class:`RunLockedError` at once if another process holds ``RUN/.lock``; creates
    nothing. A check before any work (the CLI's, before it reads the run or the data): the lock
    that guards the writes is still :func:`run_lock`'s."""
    path = os.path.join(os.path.realpath(run_dir), ".lock")
    if path in _held_locks or os.path.islink(path):  # ours, or run_lock replaces it anyway
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:  # no lock file (or none we may read): nobody holds it
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _locked(run_dir, path) from None
    finally:
        os.close(fd)  # releases the probe's flock, if it got one


def _locked(run_dir, path) -> RunLockedError:
    return RunLockedError(
        f"{run_dir}: another fastvq process is writing this run directory (lock {path} is "
        "held); wait for it to finish or choose another --out"
    )


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


def atomic_write(path, write) -> None:
    """Write the file ``path`` as a new file renamed into place: ``write(tmp_path)`` writes a
    temporary file beside it, which ``os.replace`` then puts at ``path``. A symlink (or anything
    else) at ``path`` is replaced, never written through, and a reader sees the old file or the
    new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


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
        real = os.path.realpath(target)
        if os.path.dirname(real) != os.path.realpath(run_dir) or os.path.islink(target):
            raise CheckpointError(
                f"{run_dir}: {CURRENT} points to {os.readlink(cur)}, outside the run directory; "
                "the run directory was modified by hand. Refusing to load it"
            )
        if not (target / "run.json").is_file():
            raise CheckpointError(
                f"{run_dir}: {CURRENT} points to {target}, which holds no run.json; the run "
                "directory was modified by hand. Refusing to load it"
            )
        return target
    if cur.is_dir() and (cur / "run.json").is_file():
        return cur  # a copy that dereferenced the links (cp -rL, scp -r); see migrate_layout
    if (run_dir / "run.json").is_symlink():
        raise CheckpointError(
            f"{run_dir}: run.json links through a missing {CURRENT} symlink; the run directory "
            "was modified by hand. Refusing to load it"
        )
    if (run_dir / "run.json").is_file():
        return run_dir
    return None


def migrate_layout(run_dir) -> None:
    """Bring a run directory copied with its symlinks dereferenced (``cp -rL``, ``scp -r``, many
    sync tools: ``current`` a directory, the top-level names plain files) back to the checkpoint
    layout: ``current`` is renamed to a fresh ``ckpt-*`` directory, then linked as ``current``.
    Every step is a rename, and each intermediate state loads as the same checkpoint. Call with
    the run's lock held."""
    run_dir = Path(run_dir)
    cur = run_dir / CURRENT
    if cur.is_symlink() or not cur.is_dir():
        return
    try:
        step = _read_json(cur / "run.json").get("step")
    except CheckpointError:  # damaged: migrated all the same (only the directory name needs it)
        step = 0
    step = step if type(step) is int and 0 <= step < 10**8 else 0
    moved = run_dir / f"ckpt-{step:08d}-{uuid.uuid4().hex[:8]}"
    os.rename(cur, moved)  # now the top-level plain files are the live checkpoint
    _swap_symlink(cur, moved.name)
    _fsync(run_dir)
    for name in FILES:
        link = run_dir / name
        if (moved / name).is_file():
            _swap_symlink(link, f"{CURRENT}/{name}")
        elif os.path.lexists(link):
            os.unlink(link)


def save_run(run_dir, model, kind: str, meta: dict, optimizer=None) -> None:
    """Write weights, optimizer tensors and ``run.json`` as one checkpoint (module docstring).

    Without ``optimizer`` the previous checkpoint's optimizer state is carried over (so adding
    metadata after training keeps ``--resume`` working).
    """
    run_dir = Path(run_dir)
    with run_lock(run_dir):
        migrate_layout(run_dir)
        prev = checkpoint_dir(run_dir) if optimizer is None else None
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
            if old_dir.is_symlink():  # never delete through a link
                old_dir.unlink()
            elif old_dir.name != new.name:
                shutil.rmtree(old_dir, ignore_errors=True)
        for tmp in run_dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def _damaged(path, e: Exception) -> CheckpointError:
    """A one-line :class:`CheckpointError` for a file that cannot be parsed (the library's
    message may span lines)."""
    what = " ".join(str(e).split()) or type(e).__name__
    return CheckpointError(f"{path}: damaged checkpoint file ({what}); retrain or restore it")


class _HugeInt(str):
    """An integer literal of ``run.json`` too long to be any real value (see :func:`_read_json`)."""


def _parse_int(text: str):
    return _HugeInt(text) if len(text) > 40 else int(text)


def _find_huge(value, where: str = ""):
    """The field path of the first :class:`_HugeInt` in ``value`` (``args.seed``,
    ``history[3].step``), or None."""
    if isinstance(value, _HugeInt):
        return where or "(top level)"
    if isinstance(value, dict):
        items = [(f"{where}.{k}" if where else str(k), v) for k, v in value.items()]
    elif isinstance(value, list):
        items = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    else:
        return None
    for field, v in items:
        found = _find_huge(v, field)
        if found is not None:
            return found
    return None


def _bad_field(path, field: str, why: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: field {field}: {why}; the run is damaged or was edited by hand"
    )


# run.json's run arguments: (test, what it must be); at the top level and under "args"
_FIELDS = {
    "step": (lambda v: type(v) is int and 0 <= v < 2**62, "an integer >= 0"),
    "steps": (lambda v: type(v) is int and 1 <= v < 2**62, "an integer >= 1"),
    "batch_size": (lambda v: type(v) is int and 1 <= v < 2**62, "an integer >= 1"),
    "eval_every": (lambda v: type(v) is int and 0 <= v < 2**62, "an integer >= 0"),
    "eval_limit": (
        lambda v: v is None or (type(v) is int and 1 <= v < 2**62),
        "null or an integer >= 1",
    ),
    "seed": (lambda v: type(v) is int and 0 <= v < 2**63, "an integer >= 0"),
    "lr": (lambda v: type(v) in (int, float) and math.isfinite(v) and v > 0, "a number > 0"),
}


def check_meta(path, meta: dict) -> dict:
    """Refuse a ``run.json`` whose run arguments cannot drive a run (:data:`_FIELDS`: a batch
    size of 0, a negative or infinite lr, ...), naming the file and the field."""
    for where, d in (("", meta), ("args.", meta.get("args"))):
        if not isinstance(d, dict):
            if where and d is not None:
                raise _bad_field(path, "args", "not an object")
            continue
        for name, (ok, what) in _FIELDS.items():
            if name in d and not ok(d[name]):
                raise _bad_field(path, where + name, f"{d[name]!r} is not {what}")
    return meta


def _read_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(), parse_int=_parse_int)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError included
        raise _damaged(path, e) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not isinstance(meta, dict):
        raise _damaged(path, TypeError("run.json does not hold an object"))
    huge = _find_huge(meta)
    if huge is not None:
        raise _bad_field(path, huge, "an integer of thousands of digits")
    return check_meta(path, meta)


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
    model = build_checked(ckpt / "run.json", meta)
    _load_weights(model, ckpt / "model.safetensors", device)
    return model.to(device).eval(), meta


def build_checked(path, meta: dict) -> torch.nn.Module:
    """:func:`build` from ``meta`` (the ``run.json`` at ``path``); a kind or config that no
    model takes (edited by hand, another version, a size the allocator refuses) is a
    :class:`CheckpointError` naming the field."""
    if meta.get("kind") not in MODELS:
        raise _bad_field(path, "kind", f"{meta.get('kind')!r} is not one of {', '.join(MODELS)}")
    if not isinstance(meta.get("config"), dict):
        raise _bad_field(path, "config", "missing, or not an object")
    try:
        return build(meta["kind"], meta["config"])
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError, MemoryError) as e:
        what = " ".join(str(e).split()) or type(e).__name__
        raise _bad_field(
            path, "config", f"no {meta['kind']} model can be built from it ({what})"
        ) from None


def _load_weights(model, path: Path, device) -> None:
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing; the checkpoint is incomplete. Retrain or restore it"
        )
    try:
        load_model(model, str(path), device=str(device))
    except (
        SafetensorError,
        RuntimeError,
        OSError,
    ) as e:  # unparsable, or keys/shapes that do not fit
        raise _damaged(path, e) from None


def load_optimizer_state(optimizer, run_dir, meta) -> None:
    """Load ``optim.safetensors`` of the live checkpoint into ``optimizer``, checking first that
    every tensor fits its parameter (a state that would fail at the first step is refused now,
    as a :class:`CheckpointError` naming the file and the tensor)."""
    ckpt = checkpoint_dir(run_dir) or Path(run_dir)
    path = ckpt / "optim.safetensors"
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise _damaged(path, e) from None
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict = {}
    for key, t in tensors.items():
        pid, _, name = key.partition(".")
        if not pid.isdigit() or int(pid) >= len(params) or not name:
            raise _bad_field(path, key, f"names no parameter of the model ({len(params)} of them)")
        shape = tuple(params[int(pid)].shape) if name != "step" else ()
        if tuple(t.shape) != shape:
            raise _bad_field(path, key, f"shape {tuple(t.shape)}, but its parameter's is {shape}")
        state.setdefault(int(pid), {})[name] = t
    groups = (meta.get("optimizer") or {}).get("param_groups")
    runjson = ckpt / "run.json"
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise _bad_field(runjson, "optimizer.param_groups", "missing, or not a list of objects")
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"]) if isinstance(g["betas"], list) else g["betas"]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (KeyError, TypeError, ValueError) as e:
        what = " ".join(str(e).split()) or type(e).__name__
        raise _bad_field(
            runjson, "optimizer.param_groups", f"does not fit the model ({what})"
        ) from None


def load_for_resume(
    run_dir, model, optimizer, device, reset_optimizer: bool = False
) -> dict | None:
    """Load the live checkpoint of ``run_dir`` into ``model`` and ``optimizer`` -> its
    ``run.json``, or None if ``run_dir`` has no checkpoint yet. Raises :class:`CheckpointError`
    if the checkpoint is inconsistent or damaged, or has no ``optim.safetensors`` (a fresh Adam
    state would silently change the run) unless ``reset_optimizer``, which keeps ``optimizer``
    fresh. A run copied with its symlinks dereferenced is migrated first (:func:`migrate_layout`;
    call with the run's lock held)."""
    ckpt = checkpoint_dir(run_dir)
    if ckpt is None:
        return None
    migrate_layout(run_dir)
    ckpt = checkpoint_dir(run_dir)
    meta = _read_json(ckpt / "run.json")
    _check_consistent(ckpt, meta)
    _load_weights(model, ckpt / "model.safetensors", device)
    if reset_optimizer:
        return meta
    if not (ckpt / "optim.safetensors").is_file():
        raise missing_optimizer(ckpt)
    load_optimizer_state(optimizer, run_dir, meta)
    return meta


def missing_optimizer(ckpt: Path) -> CheckpointError:
    return CheckpointError(
        f"{ckpt / 'optim.safetensors'}: missing, so the run cannot continue as it would have; "
        "restore it, or pass --reset-optimizer to continue with a fresh Adam state"
    )
