"""Run test scenarios on every rank of a 2-process gloo group (CPU) and collect, per scenario and
rank, "ok" or the traceback. Each scenario is a function ``fn(rank)`` of a test module; a failed
scenario stops its rank (the ranks may be out of step then), so later ones read "not run"."""

from __future__ import annotations

import datetime
import importlib
import os
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def raises(match: str, fn) -> str:
    """Run ``fn``; AssertionError unless it raises a ValueError whose message holds ``match``."""
    try:
        fn()
    except ValueError as exc:
        if match not in str(exc):
            raise AssertionError(f"ValueError without {match!r}: {exc}") from exc
        return str(exc)
    raise AssertionError(f"no ValueError mentioning {match!r}")


def _worker(rank, store, out_dir, module: str, names: list, timeout_s: float):
    torch.set_num_threads(1)
    scenarios = [getattr(importlib.import_module(module), n) for n in names]
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=timeout_s),
    )  # fmt: skip
    try:
        for fn in scenarios:
            torch.manual_seed(0)
            try:
                fn(rank)
                msg = "ok"
            except BaseException:
                msg = traceback.format_exc()
            with open(os.path.join(out_dir, f"{fn.__name__}.{rank}"), "w") as f:
                f.write(msg)
            if msg != "ok":
                os._exit(1)  # the ranks may be out of step now: stop rather than hang
    finally:
        dist.destroy_process_group()


def run_scenarios(module: str, scenarios: list, d, timeout_s: float, preload=()) -> dict:
    """``{scenario name: [message of rank 0, of rank 1]}`` after running ``scenarios`` (functions
    of the test module ``module``) in folder ``d``, a collective timing out after
    ``timeout_s``."""
    mp.set_forkserver_preload(["torch", *preload, "torch.distributed", "fastvq", module])
    names = [fn.__name__ for fn in scenarios]
    try:
        mp.start_processes(
            _worker, args=(str(d / "store"), str(d), module, names, timeout_s), nprocs=WORLD,
            join=True, start_method="forkserver",
        )  # fmt: skip
    except Exception:  # the per-scenario files say which scenario failed
        pass
    return {
        n: [
            (d / f"{n}.{r}").read_text() if (d / f"{n}.{r}").exists()
            else "not run (an earlier scenario failed or a process died)"
            for r in range(WORLD)
        ]
        for n in names
    }  # fmt: skip
