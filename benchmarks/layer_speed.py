"""VectorQuantizer training step (forward + backward), one checkout against another, on CPU.

    git worktree add /tmp/old c49eadf                           # the code before a change
    python -m benchmarks.layer_speed --ref /tmp/old             # this checkout vs /tmp/old
    python -m benchmarks.layer_speed --ref /tmp/old --new /other/checkout
    python -m benchmarks.layer_speed --ref . --smoke            # one tiny round (CI)

``benchmarks/cpu_faiss.py --op fwdbwd`` times the op (``fastvq.vector_quantize``) and ``--op ema``
one EMA layer setup at fixed defaults, without memory; this times the layer, public API only,
for both kinds of codebook:

- ``ema``: ``VectorQuantizer(D, K, kmeans_init=False)`` (EMA codebook, dead-code restart at its
  default), a training forward (search, EMA update, restart bookkeeping) and the backward of
  ``mean(quantized^2) + loss`` to ``x``;
- ``grad``: ``VectorQuantizer(D, K, ema=False, kmeans_init=False)``, the same forward and backward,
  the codebook gradient included (grads dropped after each call, no optimizer step).

Protocol, as cpu_faiss.py's: every (side, step, shape, round) runs in a fresh process with the same
thread count (``torch.set_num_threads``, ``OMP_NUM_THREADS``), ``PYTHONPATH`` and working directory
set to that side's checkout (the worker reports the ``fastvq`` file it imported); inputs are
``torch.manual_seed(0)`` randn; one warm-up call, then the minimum over at least ``--calls`` calls
and ``--min-time`` seconds of calls. Sides alternate, the first side flipping every round.
Peak memory: growth of the RSS high-water mark (``VmHWM``, glibc's mmap threshold fixed at
128 KiB) over the RSS before the layer and input were built, through the warm-up and timed calls.
The report: every per-round figure, the per-round ratios old/new (> 1: new faster), their median,
peak memory per side and the load average before each process. JSON and markdown under
benchmarks/results/.
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
SHAPES = [(16384, 8192, 64), (256, 1024, 64)]
SMOKE_SHAPES = [(256, 128, 16)]
STEPS = ("ema", "grad")

WORKER = timed_worker(r"""
reset = reset_peak_rss()
rss0 = status_kib("VmRSS")
torch.manual_seed(0)
layer = fastvq.VectorQuantizer(d, k, ema=what == "ema", kmeans_init=False, backend="torch")
layer.train()
x = torch.randn(n, d, requires_grad=True)
params = list(layer.parameters())

def fn():
    out = layer(x)
    (out.quantized.square().mean() + out.loss).backward()
    x.grad = None
    for p in params:
        p.grad = None
""")


def _run(checkout: Path, shape, step: str, threads: int, calls: int, min_time: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop("TRITON_INTERPRET", None)
    # the checkout's fastvq before any installed one (an editable install's finder comes last)
    env["PYTHONPATH"] = str(checkout) + os.pathsep + env.get("PYTHONPATH", "")
    load = os.getloadavg()[0]
    args = [*map(str, shape), str(threads), step, str(calls), str(min_time)]
    out = subprocess.run([sys.executable, "-c", WORKER, *args], capture_output=True, text=True,
                         env=env, cwd=checkout, timeout=1800)  # fmt: skip
    if out.returncode:
        raise RuntimeError(f"{checkout} {step} {shape}: {out.stderr[-2000:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    want = (checkout / "fastvq").resolve()
    if Path(got["fastvq"]).resolve().parent != want:
        raise RuntimeError(f"the worker for {checkout} imported {got['fastvq']}, not {want}")
    return got | {"load": load}


def measure(sides: dict, shapes, steps, rounds, threads, calls, min_time) -> list[dict]:
    """``sides``: {"new": Path, "old": Path}. One row per (step, shape)."""
    rows = []
    names = tuple(sides)
    for step in steps:
        for shape in shapes:
            per_round = alternated_rounds(
                names, rounds,
                lambda s, shape=shape, step=step: _run(
                    sides[s], shape, step, threads, calls, min_time
                ),
                f"{step} {shape}", unit=("ms", 1e3),
            )  # fmt: skip
            ratios = [p["old"] / p["new"] for p in per_round]
            rows.append({
                "step": step, "n": shape[0], "k": shape[1], "d": shape[2], "rounds": per_round,
                "ratios_old_over_new": ratios,
                "median_ratio_old_over_new": statistics.median(ratios),
                "median_peak_bytes": median_peaks(per_round, names),
            })  # fmt: skip
    return rows


def markdown(doc: dict) -> str:
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    lines = [
        f"# CPU VectorQuantizer training step: new ({doc['new_commit']}) vs old "
        f"({doc['old_commit']}), {doc['threads']} thread(s)", "",
        f"`{doc['command']}` on {doc['machine']}, {doc['date']}; torch {doc['torch']}. Each "
        f"figure: the minimum over at least {doc['calls']} calls and at least "
        f"{doc['min_time']:g} s of calls, in a fresh process after one warm-up; sides alternate "
        "every round. Ratio: old time / new time (> 1: new faster). Peak: RSS high-water growth "
        "over the process's RSS before the layer and input were built (MiB, median of rounds).",
        "", "| step | N × K × D | new ms per round | old ms per round | ratios | median ratio | "
        "peak new / old MiB | load average per round |", "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in doc["rows"]:
        new = ", ".join(f"{p['new'] * 1e3:.1f}" for p in r["rounds"])
        old = ", ".join(f"{p['old'] * 1e3:.1f}" for p in r["rounds"])
        rat = ", ".join(f"{x:.2f}" for x in r["ratios_old_over_new"])
        loads = ", ".join(f"{max(p['loads']):.2f}" for p in r["rounds"])
        peak = r["median_peak_bytes"]
        lines.append(f"| {r['step']} | {r['n']} × {r['k']} × {r['d']} | {new} | {old} | {rat} | "
                     f"**{r['median_ratio_old_over_new']:.2f}** | {mib(peak['new'])} / "
                     f"{mib(peak['old'])} | {loads} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref", type=Path, required=True, help="the old checkout (e.g. a worktree)")
    ap.add_argument("--new", type=Path, default=ROOT, help="the new checkout (default: this one)")
    add_protocol_args(ap)
    ap.add_argument("--steps", default=",".join(STEPS), help="ema,grad (default both)")
    ap.add_argument("--shapes", help="N,K,D;N,K,D... (default 16384,8192,64;256,1024,64)")
    ap.add_argument("--smoke", action="store_true", help="one tiny round (CI)")
    ap.add_argument("--out", type=Path, help="JSON path (markdown beside it); --smoke: none")
    a = ap.parse_args(argv)
    steps = a.steps.split(",")
    if any(s not in STEPS for s in steps):
        ap.error(f"--steps must be among {STEPS}, got {a.steps}")
    shapes = parse_shapes(a.shapes, SMOKE_SHAPES if a.smoke else SHAPES)
    rounds, calls, min_time = (1, 1, 0.0) if a.smoke else (a.rounds, a.calls, a.min_time)
    sides = {"new": a.new.resolve(), "old": a.ref.resolve()}
    for side, path in sides.items():
        if not (path / "fastvq" / "__init__.py").is_file():
            ap.error(f"{side} checkout {path} has no fastvq/__init__.py")
    now, doc = result_header("layer_speed", argv, a.threads, calls, min_time)
    doc |= {
        "new": str(sides["new"]), "old": str(sides["old"]),
        "new_commit": git_commit(sides["new"]) or "unknown",
        "old_commit": git_commit(sides["old"]) or "unknown",
    }  # fmt: skip
    doc["rows"] = measure(sides, shapes, steps, rounds, a.threads, calls, min_time)
    print(markdown(doc))
    if a.out or not a.smoke:
        stamp = now.strftime("%Y-%m-%d")
        out = a.out or RESULTS / (
            f"cpu-layer-step-{stamp}-{doc['new_commit']}-vs-{doc['old_commit']}"
            f"-threads{a.threads}.json"
        )
        write_result(doc, out, markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
