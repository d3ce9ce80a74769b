"""The CE-commitment and diversity losses, forward + backward, one checkout against another, on CPU.

    git worktree add --detach /tmp/old 203f07a              # the losses' own tiled torch code
    python -m benchmarks.loss_speed --ref /tmp/old --threads 1 --rounds 3
    python -m benchmarks.loss_speed --ref . --smoke         # one tiny round (CI)

Each step is ``fastvq.ce_commitment_loss(z, C, indices)`` (``ce``: indices the nearest codes, as
the layer passes them) or ``fastvq.diversity_loss(z, C)`` (``diversity``: vqp's default
temperature 100), each at its default chunk, then ``backward()`` to both ``z`` and ``C``: the
public API only, so any checkout can be timed. From commit 203f07a back the losses carry their own
tiled torch softmax; after it they run on ``fastvq.soft_assign``'s torch twin.

Protocol, as layer_speed.py's (docs/benchmarks.md): every (side, loss, shape, round) runs in a
fresh process with the same thread count, ``PYTHONPATH`` and working directory set to that side's
checkout (the worker reports the ``fastvq`` file it imported); inputs ``torch.manual_seed(0)``
randn; one warm-up call, then the minimum over at least ``--calls`` calls and ``--min-time``
seconds of calls. Sides alternate, the first side flipping every round. Peak memory: growth of
the RSS high-water mark over the RSS once the inputs were built. The report: every per-round
figure, the per-round ratios old/new (> 1: new faster), their median, peak memory per side and
the load average before each process. JSON and markdown under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
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
from ._timed_worker import timed_worker

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHAPES = [(4096, 16384, 64), (8192, 65536, 64)]
SMOKE_SHAPES = [(64, 300, 8)]
LOSSES = ("ce", "diversity")

WORKER = timed_worker(r"""
torch.manual_seed(0)
z = torch.randn(n, d, requires_grad=True)
codes = torch.randn(k, d, requires_grad=True)
with torch.no_grad():  # the nearest codes, in row blocks (no N x K matrix here either)
    idx = torch.cat([torch.cdist(b, codes).argmin(1) for b in z.split(256)])
reset = reset_peak_rss()
rss0 = status_kib("VmRSS")

def fn():
    if what == "ce":
        loss = fastvq.ce_commitment_loss(z, codes, idx)
    else:
        loss = fastvq.diversity_loss(z, codes)
    loss.backward()
    z.grad = codes.grad = None
""")


def _run(checkout: Path, shape, loss: str, threads: int, calls: int, min_time: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop("TRITON_INTERPRET", None)
    # the checkout's fastvq before any installed one (an editable install's finder comes last)
    env["PYTHONPATH"] = str(checkout) + os.pathsep + env.get("PYTHONPATH", "")
    load = os.getloadavg()[0]
    args = [*map(str, shape), str(threads), loss, str(calls), str(min_time)]
    out = subprocess.run([sys.executable, "-c", WORKER, *args], capture_output=True, text=True,
                         env=env, cwd=checkout, timeout=3600)  # fmt: skip
    if out.returncode:
        raise RuntimeError(f"{checkout} {loss} {shape}: {out.stderr[-2000:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    want = (checkout / "fastvq").resolve()
    if Path(got["fastvq"]).resolve().parent != want:
        raise RuntimeError(f"the worker for {checkout} imported {got['fastvq']}, not {want}")
    return got | {"load": load}


def measure(sides: dict, shapes, losses, rounds, threads, calls, min_time) -> list[dict]:
    """``sides``: {"new": Path, "old": Path}. One row per (loss, shape)."""
    rows = []
    names = tuple(sides)
    for shape in shapes:
        for loss in losses:
            per_round = alternated_rounds(
                names, rounds,
                lambda s, shape=shape, loss=loss: _run(
                    sides[s], shape, loss, threads, calls, min_time
                ),
                f"{loss} {shape}",
            )  # fmt: skip
            ratios = [p["old"] / p["new"] for p in per_round]
            rows.append({
                "loss": loss, "n": shape[0], "k": shape[1], "d": shape[2], "rounds": per_round,
                "ratios_old_over_new": ratios,
                "median_ratio_old_over_new": statistics.median(ratios),
                "median_peak_bytes": median_peaks(per_round, names),
            })  # fmt: skip
    return rows


def markdown(doc: dict) -> str:
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    lines = [
        f"# CPU CE-commitment and diversity losses, forward + backward: new ({doc['new_commit']})"
        f" vs old ({doc['old_commit']}), {doc['threads']} thread(s)", "",
        f"`{doc['command']}` on {doc['machine']}, {doc['date']}; torch {doc['torch']}. Each "
        f"figure: the minimum over at least {doc['calls']} calls and at least "
        f"{doc['min_time']:g} s of calls, in a fresh process after one warm-up; sides alternate "
        "every round. Ratio: old time / new time (> 1: new faster). Peak: RSS high-water growth "
        "over the process's RSS once the inputs were built (MiB, median of rounds).",
        "", "| loss | N × K × D | new s per round | old s per round | ratios | median ratio | "
        "peak new / old MiB | load average per round |", "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in doc["rows"]:
        new = ", ".join(f"{p['new']:.2f}" for p in r["rounds"])
        old = ", ".join(f"{p['old']:.2f}" for p in r["rounds"])
        rat = ", ".join(f"{x:.2f}" for x in r["ratios_old_over_new"])
        loads = ", ".join(f"{max(p['loads']):.2f}" for p in r["rounds"])
        peak = r["median_peak_bytes"]
        lines.append(f"| {r['loss']} | {r['n']} × {r['k']} × {r['d']} | {new} | {old} | {rat} | "
                     f"**{r['median_ratio_old_over_new']:.2f}** | {mib(peak['new'])} / "
                     f"{mib(peak['old'])} | {loads} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref", type=Path, required=True, help="the old checkout (e.g. a worktree)")
    ap.add_argument("--new", type=Path, default=ROOT, help="the new checkout (default: this one)")
    add_protocol_args(ap)
    ap.add_argument("--losses", default=",".join(LOSSES), help="ce,diversity (default both)")
    ap.add_argument("--shapes", help="N,K,D;N,K,D... (default 4096,16384,64;8192,65536,64)")
    ap.add_argument("--smoke", action="store_true", help="one tiny round (CI)")
    ap.add_argument("--out", type=Path, help="JSON path (markdown beside it); --smoke: none")
    a = ap.parse_args(argv)
    losses = a.losses.split(",")
    if any(s not in LOSSES for s in losses):
        ap.error(f"--losses must be among {LOSSES}, got {a.losses}")
    shapes = parse_shapes(a.shapes, SMOKE_SHAPES if a.smoke else SHAPES)
    rounds, calls, min_time = (1, 1, 0.0) if a.smoke else (a.rounds, a.calls, a.min_time)
    sides = {"new": a.new.resolve(), "old": a.ref.resolve()}
    for side, path in sides.items():
        if not (path / "fastvq" / "__init__.py").is_file():
            ap.error(f"{side} checkout {path} has no fastvq/__init__.py")
    now, doc = result_header("loss_speed", argv, a.threads, calls, min_time)
    doc |= {
        "new": str(sides["new"]), "old": str(sides["old"]),
        "new_commit": git_commit(sides["new"]) or "unknown",
        "old_commit": git_commit(sides["old"]) or "unknown",
    }  # fmt: skip
    doc["rows"] = measure(sides, shapes, losses, rounds, a.threads, calls, min_time)
    print(markdown(doc))
    if a.out or not a.smoke:
        stamp = now.strftime("%Y-%m-%d")
        out = a.out or RESULTS / (
            f"cpu-losses-{stamp}-{doc['new_commit']}-vs-{doc['old_commit']}-threads{a.threads}.json"
        )
        write_result(doc, out, markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
