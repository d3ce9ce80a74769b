"""Peak-RSS guards: run a step in a fresh Python process and return its peak RSS growth.

A fresh process keeps earlier tests' allocations and the allocator's caches out of the figure;
``fastvq._procmem`` resets the kernel's high-water mark just before the measured step.
"""

from __future__ import annotations

import subprocess
import sys


def step_peak_rss_mib(setup: str, step: str, *, timeout: float = 300) -> float:
    """Peak RSS growth in MiB of the Python statements ``step``, run after ``setup`` (which
    builds the layer and inputs and warms up first-call allocations) in a new process that has
    ``torch`` and ``fastvq`` imported."""
    code = (
        "import torch, fastvq\n"
        "from fastvq._procmem import proc_status_kib, reset_peak_rss\n"
        f"{setup}\n"
        "reset_peak_rss(required=True)\n"
        "base = proc_status_kib('VmRSS')\n"
        f"{step}\n"
        "print((proc_status_kib('VmHWM') - base) / 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr
    return float(out.stdout.split()[-1])
