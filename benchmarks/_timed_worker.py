"""The fresh-process timing worker that ``sampling_speed`` and ``layer_speed`` run with
``python -c``: one copy of the allocator settings, the RSS high-water mark and the timing loop.

:func:`timed_worker` wraps a body that must define ``fn`` (the call to time), ``reset`` (whether
the high-water mark was reset) and ``rss0`` (the RSS in KiB before the measured allocations); the
worker prints one JSON line: the best time over at least ``calls`` calls and ``min_time``
seconds, the peak RSS growth, and which ``fastvq`` it imported (old checkouts are timed too, so
the body may use only what every compared checkout has: ``fastvq._procmem`` is in all of them).
"""

PRELUDE = r"""
import ctypes, json, sys, time
try:  # fixed mmap threshold: RSS falls after a call, so the high-water mark is the call's own
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
except OSError:
    pass
n, k, d, threads = (int(v) for v in sys.argv[1:5])
what, calls, min_time = sys.argv[5], int(sys.argv[6]), float(sys.argv[7])
import torch
torch.set_num_threads(threads)
import fastvq
from fastvq._procmem import proc_status_kib as status_kib, reset_peak_rss
"""

TIMING = r"""
fn()
best, done, start = float("inf"), 0, time.perf_counter()
while done < calls or time.perf_counter() - start < min_time:
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
    done += 1
peak = (status_kib("VmHWM") - rss0) * 1024
print(json.dumps({"seconds": best, "calls": done, "peak_bytes": peak, "hwm_reset": reset,
                  "fastvq": fastvq.__file__}))
"""


def timed_worker(body: str) -> str:
    """The worker's source: argv ``n k d threads what calls min_time``, then ``body``."""
    return PRELUDE + body + TIMING
