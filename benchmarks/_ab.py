"""What the side-by-side CPU benchmarks (``loss_speed``, ``layer_speed``, ``sampling_speed``)
share: the fresh worker process per (side, case, round), the per-round rows and their Markdown
table, the ``--smoke`` / ``--out`` options and where a result goes; and, for the two that time one
checkout against another, the whole command (:class:`OldNew`, :func:`old_new_main`).

The protocol is docs/benchmarks.md's; ``_stamp.py`` holds its timing and stamping helpers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ._stamp import (
    add_protocol_args,
    alternated_rounds,
    git_commit,
    median_peaks,
    parse_shapes,
    result_header,
    write_result,
)  # fmt: skip

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def run_worker(worker: str, checkout: Path, shape, what: str, threads: int, calls: int,
               min_time: float, timeout: float = 3600) -> dict:  # fmt: skip
    """One fresh ``python -c worker`` for ``shape`` ``(N, K, D)`` and the case ``what``, with
    ``checkout`` its working directory and first on ``PYTHONPATH``: the worker's JSON line plus
    ``load`` (the load average before it started). RuntimeError when the worker fails or imported
    a ``fastvq`` other than ``checkout``'s (a result must time the code it names)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop("TRITON_INTERPRET", None)
    # the checkout's fastvq before any installed one (an editable install's finder comes last)
    env["PYTHONPATH"] = str(checkout) + os.pathsep + env.get("PYTHONPATH", "")
    load = os.getloadavg()[0]
    args = [*map(str, shape), str(threads), what, str(calls), str(min_time)]
    out = subprocess.run([sys.executable, "-c", worker, *args], capture_output=True, text=True,
                         env=env, cwd=checkout, timeout=timeout)  # fmt: skip
    if out.returncode:
        raise RuntimeError(f"{checkout} {what} {shape}: {out.stderr[-2000:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    want = (checkout / "fastvq").resolve()
    if Path(got["fastvq"]).resolve().parent != want:
        raise RuntimeError(f"the worker for {checkout} imported {got['fastvq']}, not {want}")
    return got | {"load": load}


def ab_rows(names, cases, rounds: int, run, row, unit=("s", 1.0)) -> list[dict]:
    """For each case ``(what, shape)`` in order: :func:`alternated_rounds` of
    ``run(side, shape, what)`` over the sides ``names``, and ``row(what, shape, per_round)`` its
    result row (``what`` may be ``""`` where a script has only shapes)."""
    rows = []
    for what, shape in cases:
        per_round = alternated_rounds(
            names, rounds,
            lambda s, shape=shape, what=what: run(s, shape, what),
            f"{what} {shape}".strip(), unit=unit,
        )  # fmt: skip
        rows.append(row(what, shape, per_round))
    return rows


def ratio_stats(per_round: list[dict], names, num: str, den: str):
    """``(ratios, median ratio, median peaks)``: per round ``num``'s time over ``den``'s."""
    ratios = [p[num] / p[den] for p in per_round]
    return ratios, statistics.median(ratios), median_peaks(per_round, names)


def ab_markdown(doc: dict, title: str, sides, peak_over: str, *, case: str | None = None,
                unit=("s", 1.0, 2), mib_digits: int = 0, calls_word: str = "calls",
                ratios_key: str = "ratios_old_over_new",
                median_key: str = "median_ratio_old_over_new") -> str:  # fmt: skip
    """The result's Markdown: ``title``, the command, machine and protocol, and one table line per
    row of ``doc["rows"]`` (``case``: the row field of its first column, if any), the sides
    ``(a, b)`` side by side, the ratio ``b / a``. ``unit``: (suffix, scale, decimals) of times;
    ``peak_over``: what the peak RSS grows over."""
    a, b = sides
    suffix, scale, digits = unit
    mib = lambda v: f"{v / 2**20:.{mib_digits}f}"  # noqa: E731
    cols = [*([case] if case else []), "N × K × D", f"{a} {suffix} per round",
            f"{b} {suffix} per round", "ratios", "median ratio", f"peak {a} / {b} MiB",
            "load average per round"]  # fmt: skip
    lines = [
        title, "",
        f"`{doc['command']}` on {doc['machine']}, {doc['date']}; torch {doc['torch']}. Each "
        f"figure: the minimum over at least {doc['calls']} {calls_word} and at least "
        f"{doc['min_time']:g} s of calls, in a fresh process after one warm-up; sides alternate "
        f"every round. Ratio: {b} time / {a} time (> 1: {a} faster). Peak: RSS high-water "
        f"growth over the process's RSS {peak_over} (MiB, median of rounds).",
        "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
    ]  # fmt: skip
    for r in doc["rows"]:
        times = [", ".join(f"{p[s] * scale:.{digits}f}" for p in r["rounds"]) for s in (a, b)]
        cells = [*([str(r[case])] if case else []), f"{r['n']} × {r['k']} × {r['d']}", *times,
                 ", ".join(f"{x:.2f}" for x in r[ratios_key]), f"**{r[median_key]:.2f}**",
                 f"{mib(r['median_peak_bytes'][a])} / {mib(r['median_peak_bytes'][b])}",
                 ", ".join(f"{max(p['loads']):.2f}" for p in r["rounds"])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def add_output_args(ap: argparse.ArgumentParser) -> None:
    """``--smoke`` (one tiny round, CI) and ``--out`` (the JSON path)."""
    ap.add_argument("--smoke", action="store_true", help="one tiny round (CI)")
    ap.add_argument("--out", type=Path, help="JSON path (markdown beside it); --smoke: none")


def smoke_protocol(a: argparse.Namespace, shapes, smoke_shapes):
    """``(shapes, rounds, calls, min_time)``: ``--shapes`` or the defaults, and under
    ``--smoke`` one round of one call (the tiny shapes unless ``--shapes`` names others)."""
    shapes = parse_shapes(a.shapes, smoke_shapes if a.smoke else shapes)
    return (shapes, *((1, 1, 0.0) if a.smoke else (a.rounds, a.calls, a.min_time)))


def finish(doc: dict, markdown: str, a: argparse.Namespace, now, name) -> None:
    """Print ``markdown``; then, unless this is a ``--smoke`` run without ``--out``, write ``doc``
    and it to ``--out`` or to benchmarks/results/``name(date)``."""
    print(markdown)
    if a.out or not a.smoke:
        write_result(doc, a.out or RESULTS / name(now.strftime("%Y-%m-%d")), markdown)


@dataclass(frozen=True)
class OldNew:
    """One checkout (``--new``, default this one) timed against another (``--ref``) on the cases
    ``cases`` (chosen with ``--<option>``) at the shapes ``(N, K, D)``."""

    module: str  # benchmarks.<module>, the command the result names
    description: str
    worker: str  # a _timed_worker.timed_worker body
    option: str  # the cases' option and JSON field: "losses" / "loss"
    field: str
    cases: tuple
    shapes: list
    smoke_shapes: list
    shapes_first: bool  # rows ordered by shape, then case (else case, then shape)
    title: str  # the Markdown heading, before ": new (...) vs old (...)"
    peak_over: str
    result: str  # the result file's name before its date
    unit: tuple = ("s", 1.0, 2)  # times: suffix, scale, decimals
    timeout: float = 3600


def old_new_main(spec: OldNew, argv=None) -> int:
    """The command of ``spec``: parse ``argv``, time both checkouts, print the Markdown table and
    write the result (JSON and Markdown) unless ``--smoke`` without ``--out``."""
    fmt = lambda shapes: ";".join(",".join(map(str, s)) for s in shapes)  # noqa: E731
    ap = argparse.ArgumentParser(description=spec.description)
    ap.add_argument("--ref", type=Path, required=True, help="the old checkout (e.g. a worktree)")
    ap.add_argument("--new", type=Path, default=ROOT, help="the new checkout (default: this one)")
    add_protocol_args(ap)
    ap.add_argument(f"--{spec.option}", default=",".join(spec.cases),
                    help=",".join(spec.cases) + " (default both)")  # fmt: skip
    ap.add_argument("--shapes", help=f"N,K,D;N,K,D... (default {fmt(spec.shapes)})")
    add_output_args(ap)
    a = ap.parse_args(argv)
    chosen = getattr(a, spec.option).split(",")
    if any(c not in spec.cases for c in chosen):
        ap.error(f"--{spec.option} must be among {spec.cases}, got {getattr(a, spec.option)}")
    shapes, rounds, calls, min_time = smoke_protocol(a, spec.shapes, spec.smoke_shapes)
    sides = {"new": a.new.resolve(), "old": a.ref.resolve()}
    for side, path in sides.items():
        if not (path / "fastvq" / "__init__.py").is_file():
            ap.error(f"{side} checkout {path} has no fastvq/__init__.py")
    now, doc = result_header(spec.module, argv, a.threads, calls, min_time)
    doc |= {
        "new": str(sides["new"]), "old": str(sides["old"]),
        "new_commit": git_commit(sides["new"]) or "unknown",
        "old_commit": git_commit(sides["old"]) or "unknown",
    }  # fmt: skip
    if spec.shapes_first:
        cases = [(c, s) for s in shapes for c in chosen]
    else:
        cases = [(c, s) for c in chosen for s in shapes]
    run = lambda s, shape, what: run_worker(  # noqa: E731
        spec.worker, sides[s], shape, what, a.threads, calls, min_time, spec.timeout
    )

    def row(what, shape, per_round):
        ratios, median, peaks = ratio_stats(per_round, tuple(sides), "old", "new")
        return {spec.field: what, "n": shape[0], "k": shape[1], "d": shape[2],
                "rounds": per_round, "ratios_old_over_new": ratios,
                "median_ratio_old_over_new": median, "median_peak_bytes": peaks}  # fmt: skip

    doc["rows"] = ab_rows(tuple(sides), cases, rounds, run, row, unit=spec.unit[:2])
    finish(doc, old_new_markdown(spec, doc), a, now, lambda date: f"{spec.result}-{date}-"
           f"{doc['new_commit']}-vs-{doc['old_commit']}-threads{a.threads}.json")  # fmt: skip
    return 0


def old_new_markdown(spec: OldNew, doc: dict) -> str:
    """The Markdown of an :func:`old_new_main` result ``doc``: one line per (case, shape)."""
    title = (f"# {spec.title}: new ({doc['new_commit']}) vs old ({doc['old_commit']}), "
             f"{doc['threads']} thread(s)")  # fmt: skip
    return ab_markdown(doc, title, ("new", "old"), spec.peak_over, case=spec.field, unit=spec.unit)
