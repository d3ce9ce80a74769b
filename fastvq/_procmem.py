"""Process memory from Linux procfs: RSS, its high-water mark, and resetting that mark.

Shared by the benchmarks, the memory tests and the measurement scripts, which all measure a
step's peak RSS as the growth of ``VmHWM`` after writing 5 to ``/proc/self/clear_refs``.
"""

from __future__ import annotations


def proc_status_kib(field: str, *, required: bool = True) -> int | None:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``, ...).

    Raises KeyError when the field (or procfs) is missing and ``required``; else returns None.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        if required:
            raise KeyError(f"{field}: /proc/self/status is not readable") from None
        return None
    if required:
        raise KeyError(f"{field} not in /proc/self/status")
    return None


def reset_peak_rss(*, required: bool = False) -> bool:
    """Reset the kernel's RSS high-water mark (``VmHWM``) to the current RSS.

    Returns False where that is unsupported, or raises OSError if ``required``.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        if required:
            raise
        return False
