"""Timing and memory of one GPU step, shared by the ``gpu_check.sh`` stage scripts.

``measure(step, device, reps)`` calls ``step()`` once to warm up (compiles kernels, allocates
lazily built state), then ``reps`` times: per call the wall time between two CUDA events
(``time.perf_counter`` on CPU, where only the dry runs go), and over the first timed call the
``torch.cuda.max_memory_allocated`` growth above what was allocated before it, so the inputs and
any module state made before the call are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, device: torch.device, reps: int):
    """(median seconds, per-call seconds, peak growth in bytes or None on CPU, last result)."""
    res = step()  # warm-up
    del res
    sync(device)
    growth = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            res = step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            res = step()
            times.append(time.perf_counter() - t0)
        if device.type == "cuda" and growth is None:
            growth = torch.cuda.max_memory_allocated(device) - base
    return statistics.median(times), times, growth, res


def mib(nbytes: int | None) -> float | None:
    return None if nbytes is None else round(nbytes / 2**20, 1)


DRY_TAG = "[dry run, times mean nothing] "


def stage_cli(description: str, per: str, argv):
    """Parse a stage script's ``--dry-run`` / ``--reps``: ``(args, device)``, or ``None`` after
    saying why it cannot run here (no CUDA without ``--dry-run``; a CPU dry run needs
    ``TRITON_INTERPRET=1`` set before Triton loads)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--dry-run", action="store_true", help="CPU, interpreted Triton, tiny sizes")
    ap.add_argument("--reps", type=int, help=f"timed calls per {per} (3; dry run: 1)")
    a = ap.parse_args(argv)
    a.reps = a.reps or (1 if a.dry_run else 3)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda" and not a.dry_run:
        print("needs a CUDA GPU (or --dry-run)", file=sys.stderr)
        return None
    if dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        print("--dry-run on CPU needs TRITON_INTERPRET=1 (set before Triton loads)",
              file=sys.stderr)  # fmt: skip
        return None
    return a, dev


class StageResults:
    """A stage's JSON document (``$OUT/NAME.json``): the run's provenance, then one record per
    case, rewritten after every case so that a stage cut by its time limit keeps what it ran."""

    def __init__(self, name: str, argv, args, device: torch.device, **about):
        import triton

        self.path = os.path.join(os.environ.get("OUT", "."), f"{name}.json")
        self.doc = {
            "produced_by": f"python -m benchmarks.{name} " + " ".join(argv or sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else "cpu (dry run)",
            "torch": torch.__version__, "triton": triton.__version__, "reps": args.reps,
            **about, "cases": [],
        }  # fmt: skip
        if args.dry_run:
            self.doc["note"] = "dry run: code path only; interpreted kernels' times mean nothing"
        self.tag = DRY_TAG if args.dry_run else ""

    def add(self, rec: dict, line: str) -> None:
        """Append ``rec``, rewrite the file, print ``line`` (tagged in a dry run)."""
        self.doc["cases"].append(rec)
        with open(self.path, "w") as f:
            json.dump(self.doc, f, indent=1)
        print(self.tag + line, flush=True)
