"""The training loop: :func:`fit` trains a model with Adam, evaluates and checkpoints it.

Interrupts: during :func:`fit` the first Ctrl-C (SIGINT) lets the current step finish, saves a
checkpoint and raises :class:`TrainingInterrupted`; a second one interrupts at once. Every
checkpoint records the random states a step draws from (:mod:`fastvq.app.rng`), so
``resume=True`` continues bit-identically. ``FASTVQ_INTERRUPT_AT_STEP=N`` (tests) acts as a
Ctrl-C arriving during step N.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

import torch
from tqdm.auto import tqdm

from .checkpoint import checkpoint_dir, load_for_resume, run_lock, save_run
from .data import to_float
from .rng import rng_state, seed_everything, set_rng_state


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
    reset_optimizer: bool = False,
    desc: str | None = None,
    position: int | None = None,
) -> dict:
    """Train ``model`` for ``steps`` optimizer steps with Adam; returns the final meta dict.

    ``data``/``labels`` are whole training tensors (uint8 images, or int64 code maps with
    ``prepare=identity``); ``evaluate(model) -> dict`` runs every ``eval_every`` steps and at the
    end; with ``run_dir`` the run is checkpointed at each evaluation and at the end, holding the
    run directory's lock throughout (:class:`RunLockedError` if another process holds it).
    ``resume=True`` continues from the run directory's live checkpoint (from scratch if it has
    none) and raises :class:`CheckpointError` if that checkpoint is inconsistent, damaged or has
    no optimizer state; ``reset_optimizer=True`` resumes with a fresh Adam state instead.
    """
    lock = run_lock(run_dir) if run_dir is not None else contextlib.nullcontext()
    with lock:  # held from the resume read to the last checkpoint: one writer per run directory
        return _fit(
            model, kind, data, labels, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
            device=device, prepare=prepare, conditional=conditional, evaluate=evaluate,
            eval_every=eval_every, run_dir=run_dir, meta=meta, resume=resume,
            reset_optimizer=reset_optimizer, desc=desc, position=position,
        )  # fmt: skip


def _fit(
    model, kind, data, labels, *, steps, batch_size, lr, seed, device, prepare, conditional,
    evaluate, eval_every, run_dir, meta, resume, reset_optimizer, desc, position,
) -> dict:  # fmt: skip
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    meta = dict(meta or {})
    start = 0
    old = None
    if resume and run_dir is not None:
        old = load_for_resume(run_dir, model, opt, device, reset_optimizer=reset_optimizer)
    saved_rng = None
    if old is not None:
        start = int(old.get("step", 0))
        saved_rng = old.get("rng_state")
        meta = {**old, **meta, "history": old.get("history", [])}
    meta.setdefault("history", [])
    meta.update(steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    if saved_rng is not None:  # continue the interrupted run's random streams exactly
        set_rng_state(model, saved_rng, device, source=checkpoint_dir(run_dir) / "run.json")
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
