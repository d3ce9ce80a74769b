"""What every before/after benchmark shares: the commit a result timed, and the timing
protocol's command-line options."""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path


def git_commit(repo: Path) -> str | None:
    """Short commit of a checkout, with "+changes" when its tracked files differ from it; None
    when it is not a git checkout (a result must say which code it timed)."""
    try:
        run = lambda *cmd: subprocess.run(  # noqa: E731
            ["git", "-C", str(repo), *cmd], capture_output=True, text=True, check=True
        ).stdout.strip()
        head = run("rev-parse", "--short", "HEAD")
        return head + ("+changes" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def add_protocol_args(ap: argparse.ArgumentParser) -> None:
    """``--threads``, ``--rounds``, ``--calls``, ``--min-time``: the fresh-process, alternated
    protocol of docs/benchmarks.md (each figure the minimum over at least ``--calls`` calls and
    ``--min-time`` seconds of calls)."""
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument(
        "--min-time",
        type=float,
        default=1.0,
        help="seconds: keep calling until both --calls calls and this much time",
    )
