"""The measurement process: one per benchmark cell, so a peer that runs out of memory (or crashes)
takes down only its worker, and peak memory is measured in a clean process.

Protocol (over a multiprocessing Pipe, driven by ``_harness.Worker``); each reply is a dict with
``status`` in ``ok | skip | oom | error``:

- ``("setup", cell_dict)``: build inputs and the provider's step.
- ``("mem", warmup)``: ``warmup`` untimed calls, then one call with peak memory measured.
  CPU: RSS high-water mark (reset by writing "5" to /proc/self/clear_refs, read from VmHWM).
  CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
- ``("run",)``: one timed call; the reply's ``seconds`` is measured here, with CUDA synced
  before and after, so the pytest side's clock sees no IPC overhead.

On CPU the worker runs under ``RLIMIT_AS`` (address space), so an allocation beyond the limit
fails as an exception ("out of memory at X GiB") instead of the kernel OOM killer killing pytest.
"""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import time
import traceback

import torch

# Warm the forkserver: importing these once in the server makes each forked worker start fast.
for _mod in ("vector_quantize_pytorch", "faiss", "fastvq"):
    try:
        __import__(_mod)
    except Exception:  # absent or broken: the provider reports it when used
        pass

from fastvq._procmem import proc_status_kib, reset_peak_rss  # noqa: E402

from ._grid import Cell  # noqa: E402
from ._providers import Skip, build  # noqa: E402

# Forked workers share these objects: keep gc.collect() from walking (and copying) them.
gc.freeze()

_OOM_MARKERS = ("out of memory", "can't allocate memory", "bad_alloc", "cannot allocate memory")


def _rss_bytes() -> int:
    return proc_status_kib("VmRSS") * 1024


def _malloc_return_freed_memory():
    """Make glibc serve large blocks with mmap (and give them back on free) at a fixed 128 KiB
    threshold, so RSS falls after a call and the next call's high-water mark is its own."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (also disables the dynamic threshold)
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except OSError:
        pass


def _classify(exc: BaseException) -> str:
    if isinstance(exc, Skip):
        return "skip"
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return "oom"
    msg = str(exc).lower()
    return "oom" if any(m in msg for m in _OOM_MARKERS) else "error"


def _error_reply(exc: BaseException) -> dict:
    status = _classify(exc)
    reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    reply = {"status": status, "reason": f"{type(exc).__name__}: {reason}"}
    if status == "skip":
        reply["reason"] = str(exc)
    if status == "error":
        reply["traceback"] = traceback.format_exc()[-4000:]
    return reply


def serve(conn, mem_limit_bytes: int | None) -> None:
    """Worker main loop (runs in the forked child)."""
    cuda = False
    step = None
    info: dict = {}
    rss0 = 0
    _malloc_return_freed_memory()
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        try:
            if msg[0] == "setup":
                cell = Cell(**msg[1])
                cuda = cell.device == "cuda"
                if cuda:
                    torch.cuda.init()
                elif mem_limit_bytes:
                    resource.setrlimit(resource.RLIMIT_AS, (mem_limit_bytes, mem_limit_bytes))
                gc.collect()
                rss0 = _rss_bytes()
                step = build(cell, info)
                gc.collect()
                info["state_bytes"] = max(_rss_bytes() - rss0, 0) if not cuda else None
                conn.send({"status": "ok", "info": info})
            elif msg[0] == "mem":
                for _ in range(msg[1]):
                    step()
                if cuda:
                    torch.cuda.synchronize()
                gc.collect()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    t0 = time.perf_counter()
                    step()
                    torch.cuda.synchronize()
                    seconds = time.perf_counter() - t0
                    mem = {
                        "peak_mem_bytes": torch.cuda.max_memory_allocated(),
                        "peak_mem_method": "torch.cuda.max_memory_allocated (inputs included)",
                    }
                else:
                    reset = reset_peak_rss()
                    rss_pre = _rss_bytes()
                    t0 = time.perf_counter()
                    step()
                    seconds = time.perf_counter() - t0
                    hwm = proc_status_kib("VmHWM") * 1024
                    mem = {
                        # inputs/module state (RSS growth during setup) + the call's own growth
                        "peak_mem_bytes": info["state_bytes"] + max(hwm - rss_pre, 0),
                        "peak_mem_method": "RSS: setup growth + VmHWM growth during one call"
                        + ("" if reset else " (clear_refs unavailable: HWM since start)"),
                        "rss_hwm_bytes": hwm,
                        "rss_baseline_bytes": rss0,
                    }
                conn.send({"status": "ok", "seconds": seconds, "mem": mem})
            elif msg[0] == "run":
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                step()
                if cuda:
                    torch.cuda.synchronize()
                conn.send({"status": "ok", "seconds": time.perf_counter() - t0})
            elif msg[0] == "exit":
                return
        except BaseException as exc:  # noqa: BLE001 - every failure is a reportable result
            step = None
            gc.collect()
            try:
                conn.send(_error_reply(exc))
            except Exception:
                os._exit(3)
