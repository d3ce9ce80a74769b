"""Training loops, checkpoints and evaluation for the models in ``fastvq.models``.

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

One process at a time writes a run directory: :func:`fit` and :func:`save_run` hold an exclusive
``flock`` on ``RUN/.lock``; a second writer gets :class:`RunLockedError` at once.

Fault injection for tests: ``FASTVQ_FAULT_AFTER_WRITE=N`` kills the process with SIGKILL right
after its N-th checkpoint write (a file, or the ``current`` pointer swap);
``FASTVQ_FAULT_AFTER_WRITE=NAME`` or ``NAME:K`` right after the first (K-th) write of ``NAME``
(``model.safetensors``, ``optim.safetensors``, ``run.json``, ``current``).

Interrupts: during :func:`fit` the first Ctrl-C (SIGINT) lets the current step finish, saves a
checkpoint and raises :class:`TrainingInterrupted`; a second one interrupts at once. Every
checkpoint records the random states a step draws from (torch, numpy, ``random`` and the
vector-quantizer layers' own generators), so ``resume=True`` continues bit-identically.
``FASTVQ_INTERRUPT_AT_STEP=N`` (tests) acts as a Ctrl-C arriving during step N.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from tqdm.auto import tqdm

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
from . import metrics as M
from .data import Split, to_float

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


class TrainingInterrupted(KeyboardInterrupt):
    """:func:`fit` stopped on Ctrl-C after a complete step; ``saved`` says whether a checkpoint
    of that step was written to ``run_dir``."""

    def __init__(self, kind: str, step: int, steps: int, run_dir, saved: bool):
        super().__init__(f"{kind}: interrupted at step {step}/{steps}")
        self.kind, self.step, self.steps, self.run_dir, self.saved = (
            kind,
            step,
            steps,
            run_dir,
            saved,
        )


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


# ---------------------------------------------------------------- training loop


def seed_everything(seed: int) -> None:
    """Seed the global RNGs a run may draw from: torch's (CPU and every CUDA device), numpy's
    and Python's ``random``. Called where a run starts and before a model is built."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy takes 32-bit seeds only
    torch.manual_seed(seed)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state(model: torch.nn.Module) -> dict:
    """The random states a training step of ``model`` draws from, as JSON (``run.json``'s
    ``rng_state``): Python's ``random``, numpy's and torch's global generators (CUDA's too, once
    initialised) and the generators that vector-quantizer layers keep for dead-code restart.
    Those live outside ``state_dict`` (a cache filled on first use), so they are read here."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
        "layers": {},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(t) for t in torch.cuda.get_rng_state_all()]
    for name, module in model.named_modules():
        gens = getattr(module, "_generators", None)
        if isinstance(gens, dict) and gens:
            state["layers"][name] = [
                [gen_name, dev, _b64(g.get_state())] for (gen_name, dev), g in gens.items()
            ]
    return state


def set_rng_state(model: torch.nn.Module, state: dict) -> None:
    """Restore what :func:`rng_state` recorded (the layers' generators into their caches)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(t) for t in state["cuda"]])
    modules = dict(model.named_modules())
    for name, gens in state.get("layers", {}).items():
        module = modules.get(name)
        if module is None or not isinstance(getattr(module, "_generators", None), dict):
            raise CheckpointError(f"rng_state names layer {name!r}, which the model lacks")
        for gen_name, dev, blob in gens:
            g = torch.Generator(device=dev)
            g.set_state(_unb64(blob))
            module._generators[(gen_name, dev)] = g


@contextlib.contextmanager
def _deferred_sigint():
    """Within ``fit``: the first SIGINT only sets ``flag["hit"]`` (the loop then finishes its
    step, saves and stops), and restores the previous handler, so a second Ctrl-C raises
    ``KeyboardInterrupt`` at once. A no-op off the main thread or under a custom handler."""
    flag = {"hit": False}
    prev = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or (
        prev is not signal.default_int_handler
    ):
        yield flag
        return

    def handler(signum, frame):
        flag["hit"] = True
        signal.signal(signal.SIGINT, prev)
        print(
            "\nfastvq: Ctrl-C: finishing this step and saving a checkpoint "
            "(Ctrl-C again to quit without saving)",
            file=sys.stderr,
            flush=True,
        )

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, prev)


def _interrupt_requested(flag: dict, step: int) -> bool:
    at = os.environ.get("FASTVQ_INTERRUPT_AT_STEP")
    return flag["hit"] or (at is not None and at.isdigit() and int(at) == step)


def epoch_batches(
    data: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, start_step: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless stream of shuffled mini-batches; the order depends only on (seed, step), so a
    resumed run sees the same batches as an uninterrupted one."""
    n = data.shape[0]
    per_epoch = max(1, n // batch_size)  # drop the last partial batch
    epoch, offset = divmod(start_step, per_epoch)
    while True:
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        order = torch.randperm(n, generator=g)
        for b in range(offset, per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            yield data[idx], labels[idx]
        epoch, offset = epoch + 1, 0


def fit(
    model: torch.nn.Module,
    kind: str,
    data: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    device="cpu",
    prepare: Callable[[torch.Tensor], torch.Tensor] = to_float,
    conditional: bool = False,
    evaluate: Callable[[torch.nn.Module], dict] | None = None,
    eval_every: int = 0,
    run_dir=None,
    meta: dict | None = None,
    resume: bool = False,
    desc: str | None = None,
    position: int | None = None,
) -> dict:
    """Train ``model`` for ``steps`` optimizer steps with Adam; returns the final meta dict.

    ``data``/``labels`` are whole training tensors (uint8 images, or int64 code maps with
    ``prepare=identity``); ``evaluate(model) -> dict`` runs every ``eval_every`` steps and at the
    end; with ``run_dir`` the run is checkpointed at each evaluation and at the end, holding the
    run directory's lock throughout (:class:`RunLockedError` if another process holds it).
    ``resume=True`` continues from the run directory's live checkpoint (from scratch if it has
    none) and raises :class:`CheckpointError` if that checkpoint is inconsistent.
    """
    lock = run_lock(run_dir) if run_dir is not None else contextlib.nullcontext()
    with lock:  # held from the resume read to the last checkpoint: one writer per run directory
        return _fit(
            model, kind, data, labels, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
            device=device, prepare=prepare, conditional=conditional, evaluate=evaluate,
            eval_every=eval_every, run_dir=run_dir, meta=meta, resume=resume, desc=desc,
            position=position,
        )  # fmt: skip


def _fit(
    model, kind, data, labels, *, steps, batch_size, lr, seed, device, prepare, conditional,
    evaluate, eval_every, run_dir, meta, resume, desc, position,
) -> dict:  # fmt: skip
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    meta = dict(meta or {})
    start = 0
    ckpt = checkpoint_dir(run_dir) if resume and run_dir is not None else None
    saved_rng = None
    if ckpt is not None:
        old = _read_json(ckpt / "run.json")
        _check_consistent(ckpt, old)
        _load_weights(model, ckpt / "model.safetensors", device)
        if (ckpt / "optim.safetensors").is_file():
            load_optimizer_state(opt, run_dir, old)
        start = int(old.get("step", 0))
        saved_rng = old.get("rng_state")
        meta = {**old, **meta, "history": old.get("history", [])}
    meta.setdefault("history", [])
    meta.update(steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    if saved_rng is not None:  # continue the interrupted run's random streams exactly
        set_rng_state(model, saved_rng)
    else:  # a fresh run, or a checkpoint from before rng_state was recorded
        seed_everything(seed + start)
    stream = epoch_batches(data, labels, batch_size, seed, start)
    t0 = time.time()
    elapsed0 = float(meta.get("train_seconds", 0.0))
    bar = tqdm(
        total=steps,
        initial=start,
        desc=desc or f"train {kind}",
        position=position,
        dynamic_ncols=True,
        mininterval=0.5,
        leave=True,
    )
    logs: dict = {}
    step = start

    def checkpoint(final: bool, run_eval: bool = True) -> None:
        model.eval()
        if evaluate is not None and run_eval:
            ev = evaluate(model)
            meta["metrics"] = ev
            meta["history"].append({"step": step, **{k: v for k, v in ev.items() if _scalar(v)}})
            bar.set_postfix({k: f"{v:.4g}" for k, v in ev.items() if _scalar(v)}, refresh=True)
        model.train()
        meta["step"] = step
        meta["train_seconds"] = elapsed0 + time.time() - t0
        # the state after `step`: evaluation draws nothing from it (eval_vae restores torch's)
        meta["rng_state"] = rng_state(model)
        if run_dir is not None:
            save_run(run_dir, model, kind, meta, opt)

    model.train()
    with _deferred_sigint() as sigint:
        while step < steps:
            x, y = next(stream)
            x = prepare(x).to(device)
            y = y.to(device)
            loss, logs = model.training_loss(x, y if conditional or kind == "classifier" else None)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"{kind}: loss became {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()}, refresh=False)
            if eval_every and step % eval_every == 0 and step < steps:
                checkpoint(final=False)
            if step < steps and _interrupt_requested(sigint, step):
                # no evaluation: the user asked to stop, and the next run evaluates anyway
                saved = meta.get("step") == step and run_dir is not None
                if run_dir is not None and not saved:
                    checkpoint(final=False, run_eval=False)
                    saved = True
                bar.close()
                raise TrainingInterrupted(kind, step, steps, run_dir, saved)
        checkpoint(final=True)
    bar.close()
    model.eval()
    meta["last_train_logs"] = logs
    return meta


def _scalar(v) -> bool:
    return isinstance(v, (int, float))


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def eval_recon(
    model,
    split: Split,
    device="cpu",
    classifier=None,
    limit: int | None = None,
    batch_size: int = 500,
) -> dict:
    """Reconstruction MSE / PSNR over the split (and classifier accuracy on reconstructions)."""
    n = len(split) if limit is None else min(limit, len(split))
    mse, psnr, correct = [], [], 0
    for i in range(0, n, batch_size):
        x = to_float(split.images[i : min(i + batch_size, n)]).to(device)
        x_hat = model.reconstruct(x)
        a, b = M.mse_psnr(x, x_hat)
        mse.append(a.cpu())
        psnr.append(b.cpu())
        if classifier is not None:
            y = split.labels[i : min(i + batch_size, n)].to(device)
            correct += int((classifier(x_hat).argmax(1) == y).sum())
    out = {"mse": float(torch.cat(mse).mean()), "psnr": float(torch.cat(psnr).mean())}
    if classifier is not None:
        out["classifier_acc_on_recon"] = correct / n
    return out


@torch.no_grad()
def eval_vae(
    model: VAE,
    split: Split,
    device="cpu",
    limit: int | None = None,
    batch_size: int = 500,
    seed: int = 0,
) -> dict:
    """Test negative ELBO in bits/dim (one z sample per image, fixed seed) plus recon metrics."""
    n = len(split) if limit is None else min(limit, len(split))
    g = torch.get_rng_state()
    torch.manual_seed(seed)
    bpd, kl = [], []
    for i in range(0, n, batch_size):
        x = to_float(split.images[i : min(i + batch_size, n)]).to(device)
        b, parts = model.neg_elbo_bits_per_dim(x)
        bpd.append(b.cpu())
        kl.append(parts["kl_bpd"].cpu())
    torch.set_rng_state(g)
    out = {"neg_elbo_bpd": float(torch.cat(bpd).mean()), "kl_bpd": float(torch.cat(kl).mean())}
    out.update(eval_recon(model, split, device, limit=limit))
    return out


@torch.no_grad()
def encode_codes(
    vqvae: VQVAE,
    images_u8: torch.Tensor,
    device="cpu",
    batch_size: int = 500,
    desc: str | None = None,
) -> torch.Tensor:
    """uint8 images (N, H, W) -> code maps (N, h, w) int64 on the CPU."""
    vqvae.eval()
    out = []
    it = range(0, images_u8.shape[0], batch_size)
    for i in tqdm(it, desc=desc, leave=False, disable=desc is None):
        out.append(vqvae.encode(to_float(images_u8[i : i + batch_size]).to(device))[1].cpu())
    return torch.cat(out)


@torch.no_grad()
def eval_vqvae(model: VQVAE, split: Split, device="cpu", limit: int | None = None) -> dict:
    n = len(split) if limit is None else min(limit, len(split))
    codes = encode_codes(model, split.images[:n], device)
    usage = M.code_usage(codes, model.cfg.codebook_size)
    out = eval_recon(model, split, device, limit=limit)
    out.update(codes_used=usage["used"], perplexity=usage["perplexity"])
    return out


@torch.no_grad()
def eval_prior(
    prior: PixelCNN,
    codes: torch.Tensor,
    labels: torch.Tensor | None,
    device="cpu",
    batch_size: int = 500,
) -> dict:
    nll = []
    for i in range(0, codes.shape[0], batch_size):
        c = codes[i : i + batch_size].to(device)
        y = labels[i : i + batch_size].to(device) if labels is not None else None
        nll.append(prior.nll_bits(c, y).cpu())
    return {"nll_bits_per_code": float(torch.cat(nll).mean())}


# ---------------------------------------------------------------- the feature classifier


def cache_dir() -> Path:
    return Path(os.environ.get("FASTVQ_CACHE", Path.home() / ".cache" / "fastvq"))


def get_classifier(
    dataset,
    device="cpu",
    steps: int = 600,
    seed: int = 0,
    cache: Path | None = None,
    position: int | None = None,
) -> tuple[Classifier, dict]:
    """The small feature classifier for ``dataset``, trained once with a fixed seed and cached
    on disk, keyed by dataset name, data size and training settings."""
    cfg = ClassifierConfig(
        in_channels=dataset.image_shape[0],
        image_size=dataset.image_shape[1],
        num_classes=dataset.num_classes,
    )
    key = f"classifier-{dataset.name}-n{len(dataset.train)}-s{steps}-seed{seed}"
    run_dir = (cache or cache_dir()) / key
    if (run_dir / "run.json").is_file():
        try:
            model, meta = load_run(run_dir, device)
            return model, meta["metrics"]
        except Exception:  # a stale or broken cache entry: retrain
            pass
    seed_everything(seed)  # before building: the initial weights are part of the fixed seed
    model = Classifier(cfg)

    def evaluate(m):
        with torch.no_grad():
            x = to_float(dataset.test.images).to(device)
            pred = M.batched(m, x).argmax(1).cpu()
        return {"test_acc": float((pred == dataset.test.labels).float().mean())}

    meta = fit(
        model,
        "classifier",
        dataset.train.images,
        dataset.train.labels,
        steps=steps,
        seed=seed,
        device=device,
        evaluate=evaluate,
        run_dir=run_dir,
        desc="feature classifier",
        position=position,
    )
    return model.eval(), meta["metrics"]


@torch.no_grad()
def features(classifier: Classifier, images: torch.Tensor, device="cpu") -> torch.Tensor:
    """float images (N, C, H, W) in [0, 1] -> (N, feature_dim) penultimate features."""
    return M.batched(lambda b: classifier.features(b.to(device)).cpu(), images)
