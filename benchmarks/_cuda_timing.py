"""Timing and memory of one GPU step, shared by the ``gpu_check.sh`` stage scripts.

``measure(step, device, reps)`` calls ``step()`` once to warm up (compiles kernels, allocates
lazily built state), then ``reps`` times: per call the wall time between two CUDA events
(``time.perf_counter`` on CPU, where only the dry runs go), and over the first timed call the
``torch.cuda.max_memory_allocated`` growth above what was allocated before it, so the inputs and
any module state made before the call are not counted.
"""

from __future__ import annotations

import statistics
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
