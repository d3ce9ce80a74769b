"""What every before/after benchmark shares: the commit a result timed, and the timing
protocol's command-line options."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
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


def alternated_rounds(names, rounds: int, run, label: str, unit=("s", 1.0)) -> list[dict]:
    """``rounds`` rounds of ``run(name) -> {"seconds", "peak_bytes", "calls", "load"}`` for each
    side in ``names``, the order reversed every other round (so neither side always runs on a
    machine the other just warmed or loaded). One dict per round: each side's seconds, and
    ``peak_bytes``, ``calls``, ``loads`` (in run order) and ``first``."""
    suffix, scale = unit
    per_round = []
    for r in range(rounds):
        order = tuple(names) if r % 2 == 0 else tuple(names)[::-1]
        got = {s: run(s) for s in order}
        per_round.append(
            {s: got[s]["seconds"] for s in names}
            | {"peak_bytes": {s: got[s]["peak_bytes"] for s in names}}
            | {"calls": {s: got[s]["calls"] for s in names}}
            | {"loads": [got[s]["load"] for s in order], "first": order[0]}
        )
        print(f"{label} round {r}: " + ", ".join(
            f"{s} {got[s]['seconds'] * scale:.3f} {suffix} {got[s]['peak_bytes'] / 2**20:.0f} MiB"
            for s in names) + f" (load {got[order[0]]['load']:.2f})",
            file=sys.stderr, flush=True)  # fmt: skip
    return per_round


def median_peaks(per_round: list[dict], names) -> dict:
    """Each side's median peak RSS growth over the rounds (bytes)."""
    return {s: statistics.median(p["peak_bytes"][s] for p in per_round) for s in names}


def parse_shapes(text: str | None, default):
    """``"N,K,D;N,K,D"`` as a list of int triples, or ``default`` when ``text`` is empty."""
    return [tuple(int(v) for v in s.split(",")) for s in text.split(";")] if text else default


def result_header(module: str, argv, threads: int, calls: int, min_time: float):
    """``(now, doc)``: the UTC time and the fields every result names (command, machine, date,
    torch, the protocol's threads / calls / min_time)."""
    import datetime
    import platform

    import torch

    now = datetime.datetime.now(datetime.timezone.utc)
    doc = {
        "command": f"python -m benchmarks.{module} " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.node()} ({os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()})",
        "date": now.strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
        "threads": threads, "calls": calls, "min_time": min_time,
    }  # fmt: skip
    return now, doc


def write_result(doc: dict, out: Path, markdown: str) -> None:
    """The JSON at ``out`` and its Markdown table beside it (``.md``)."""
    out.write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
