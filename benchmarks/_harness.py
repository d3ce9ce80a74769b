"""The pytest side: run one cell in a worker process and hand its timings to pytest-benchmark.

``run_cell(benchmark, cell, mode)``:

1. forks a worker (``_worker.serve``) from a forkserver that has torch and the peers imported;
2. ``setup`` then ``mem`` (warmup calls, then one call with peak memory measured). A skip, an
   out-of-memory (``RLIMIT_AS`` on CPU, ``OutOfMemoryError`` on CUDA), a peer error, a timeout or
   a dead worker becomes a recorded *outcome* (``OUTCOMES``, written into the JSON as
   ``fastvq_outcomes`` by conftest) and ``pytest.skip(reason)``; an error in fastvq's own
   providers fails the test;
3. ``benchmark.pedantic`` over rounds of ``run``: each round's duration is the one the worker
   measured (CUDA-synced, no IPC), fed to pytest-benchmark through a replay clock.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import signal
from importlib.metadata import PackageNotFoundError, version

import pytest
import torch

from ._grid import OWN_PROVIDERS, Cell, settings_for

GiB = 1 << 30

# Outcomes without timings (skip / oom / error / timeout), written into the JSON by conftest.
OUTCOMES: list[dict] = []

_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["benchmarks._worker"])
    return _CTX


def mem_limit_bytes() -> int:
    """RLIMIT_AS for CPU workers: FASTVQ_BENCH_MEM_LIMIT_GB (default 16 GiB)."""
    return int(float(os.environ.get("FASTVQ_BENCH_MEM_LIMIT_GB", "16")) * GiB)


def call_timeout_s() -> float:
    return float(os.environ.get("FASTVQ_BENCH_CALL_TIMEOUT_S", "600"))


def _pkg_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def environment_info(device: str) -> dict:
    return {
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": _pkg_version("triton"),
        "cuda": torch.version.cuda,
    }


class WorkerDied(Exception):
    pass


class WorkerTimeout(Exception):
    pass


class Worker:
    """One forked measurement process; ``call`` sends a message and waits for the reply."""

    def __init__(self, mem_limit: int | None):
        ctx = _context()
        from . import _worker

        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker.serve, args=(child, mem_limit), daemon=True)
        self.proc.start()
        child.close()

    def call(self, *msg, timeout: float | None = None) -> dict:
        self.conn.send(msg)
        timeout = call_timeout_s() if timeout is None else timeout
        if not self.conn.poll(timeout):
            raise WorkerTimeout(f"no reply to {msg[0]!r} within {timeout:.0f} s")
        try:
            return self.conn.recv()
        except EOFError:
            self.proc.join(5)
            raise WorkerDied(self._death()) from None

    def _death(self) -> str:
        code = self.proc.exitcode
        if code is not None and code < 0:
            try:
                return f"worker killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"worker killed by signal {-code}"
        return f"worker exited with code {code}"

    def close(self):
        if self.proc.is_alive():
            try:
                self.conn.send(("exit",))
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()


class _ReplayClock:
    """A clock that only advances by the durations the worker reports (pytest-benchmark timer)."""

    __name__ = "fastvq-worker-clock"

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _record(benchmark, cell: Cell, status: str, reason: str, extra: dict):
    entry = {
        "group": cell.group,
        "name": cell.id,
        "status": status,
        "reason": reason,
        "extra_info": dict(benchmark.extra_info, **extra, status=status, reason=reason),
    }
    OUTCOMES.append(entry)
    benchmark.extra_info.update(status=status, reason=reason)
    return entry


def _fail_or_skip(benchmark, cell: Cell, reply: dict, stage: str):
    status, reason = reply["status"], reply.get("reason", "")
    limit = benchmark.extra_info.get("mem_limit_bytes")
    if status == "oom":
        where = f"{limit / GiB:.0f} GiB (RLIMIT_AS)" if limit else "device memory"
        if cell.device == "cuda" and torch.cuda.is_available():
            where = f"{torch.cuda.get_device_properties(0).total_memory / GiB:.0f} GiB (GPU)"
        reason = f"out of memory at {where} during {stage}: {reason}"
    elif status == "error":
        if cell.provider in OWN_PROVIDERS:
            pytest.fail(f"{cell.id} {stage} raised {reason}\n{reply.get('traceback', '')}")
        reason = f"{cell.provider} raised during {stage}: {reason}"
    _record(benchmark, cell, status, reason, {})
    pytest.skip(f"[{status}] {reason}")


def run_cell(benchmark, cell: Cell, mode: str) -> None:
    """Measure ``cell`` (see module docstring)."""
    settings = settings_for(mode, cell)
    benchmark.group = cell.group
    limit = mem_limit_bytes() if cell.device == "cpu" else None
    benchmark.extra_info.update(
        cell.to_dict(),
        **environment_info(cell.device),
        search_flops=cell.search_flops,
        mem_limit_bytes=limit,
        grid=mode,
        loadavg_1m_at_start=round(os.getloadavg()[0], 2),
    )
    if cell.device == "cuda" and not torch.cuda.is_available():
        _fail_or_skip(benchmark, cell, {"status": "skip", "reason": "CUDA not available"}, "setup")
    if cell.provider == "naive-compile" and mode in ("smoke", "gpu-check-dry"):
        if os.environ.get("FASTVQ_BENCH_COMPILE") != "1":
            reason = (
                "torch.compile skipped in smoke mode (compiling takes tens of seconds on CPU); "
                "set FASTVQ_BENCH_COMPILE=1 to include it"
            )
            _fail_or_skip(benchmark, cell, {"status": "skip", "reason": reason}, "setup")

    worker = Worker(limit)
    try:
        stage = "setup"
        try:
            reply = worker.call("setup", cell.to_dict())
            if reply["status"] == "ok":
                benchmark.extra_info.update(reply["info"])
                stage = "first calls"
                reply = worker.call("mem", settings.warmup)
        except WorkerTimeout as exc:
            reply = {"status": "timeout", "reason": str(exc)}
        except WorkerDied as exc:
            oomish = "SIGKILL" in str(exc) or limit is not None
            reply = {"status": "oom" if oomish else "error", "reason": str(exc)}
        if reply["status"] != "ok":
            _fail_or_skip(benchmark, cell, reply, stage)

        benchmark.extra_info.update(reply["mem"])
        one = max(reply["seconds"], 1e-9)
        rounds = int(min(settings.max_rounds, max(settings.min_rounds, settings.budget_s / one)))
        benchmark.extra_info.update(first_call_s=one, rounds=rounds, status="ok")

        clock = _ReplayClock()

        def timed():
            r = worker.call("run")
            if r["status"] != "ok":
                raise RuntimeError(f"{cell.id}: {r['status']} during timing: {r.get('reason')}")
            clock.now += r["seconds"]

        if hasattr(benchmark, "_timer"):  # pytest-benchmark's timer: replace by the worker's
            benchmark._timer = clock
            benchmark.extra_info["timing"] = "worker-side perf_counter (CUDA synced)"
        else:
            benchmark.extra_info["timing"] = "pytest-side wall clock (includes IPC)"
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=0, iterations=1)
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        if stats is not None and stats.median > 0:
            benchmark.extra_info["tflops"] = cell.search_flops / stats.median / 1e12
    finally:
        worker.close()
