"""Stochastic code sampling on CPU: ``fastvq.sample_codes`` against the dense reference.

    python -m benchmarks.sampling_speed                  # 5 rounds, 1 thread, the default shapes
    python -m benchmarks.sampling_speed --smoke          # one tiny round (CI)
    python -m benchmarks.sampling_speed --sides layer-sampled,layer --shapes 16384,65536,64

The dense side is what vqp's ``stochastic_sample_codes`` does in plain torch: the full N x K
``-torch.cdist(z, codes)``, Gumbel noise ``-log(-log(uniform.clamp(1e-20)).clamp(1e-20))`` on the
whole matrix, then ``argmax(logits / t + noise)``. The fastvq side is
``fastvq.sample_codes(z, codes, temperature=t, generator=...)`` (tiled, no N x K tensor); both at
``t = 1``, inputs ``torch.manual_seed(0)`` randn (codes times 0.5). Two more sides time the
layer: ``layer`` is one training step (forward + backward of ``mean(quantized^2) + loss``) of
``VectorQuantizer(D, K, kmeans_init=False)``, ``layer-sampled`` the same with
``stochastic_sample_codes=True`` (issue 26's comparison).

Protocol (docs/benchmarks.md): every (side, shape, round) runs in a fresh process with the same
thread count (``torch.set_num_threads``, ``OMP_NUM_THREADS``) and this checkout's ``fastvq``
first on ``PYTHONPATH``; one warm-up call, then the minimum over at least ``--calls`` calls and
``--min-time`` seconds of calls. The sides alternate, the first one flipping every round. Peak
memory: growth of the RSS high-water mark (``VmHWM``, glibc's mmap threshold fixed at 128 KiB)
over the RSS after the inputs were built, through the warm-up and timed calls. The report: every
per-round figure, the per-round ratios second side / first side (default dense / fastvq: > 1,
fastvq faster), their median, the
median peak per side and the load average before each process. JSON and markdown under
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
SHAPES = [(4100, 16384, 64), (4100, 16384, 256), (16384, 16384, 64)]
SMOKE_SHAPES = [(64, 300, 8)]
SIDES = ("fastvq", "dense")
ALL_SIDES = (*SIDES, "layer", "layer-sampled")

WORKER = timed_worker(r"""
torch.manual_seed(0)
z = torch.randn(n, d)
codes = torch.randn(k, d) * 0.5
gen = torch.Generator().manual_seed(1)

def dense():
    logits = -torch.cdist(z, codes)
    noise = -torch.log(-torch.log(torch.rand(logits.shape).clamp(min=1e-20)).clamp(min=1e-20))
    return (logits / 1.0 + noise).argmax(dim=-1)

def tiled():
    return fastvq.sample_codes(z, codes, temperature=1.0, generator=gen)

def layer_step(sampled):
    layer = fastvq.VectorQuantizer(d, k, kmeans_init=False, stochastic_sample_codes=sampled)
    x = torch.randn(n, d, requires_grad=True)

    def step():
        out = layer(x)
        (out.quantized.square().mean() + out.loss).backward()
        x.grad = None
        for p in layer.parameters():
            p.grad = None
    return step

fns = {"fastvq": lambda: tiled, "dense": lambda: dense,
       "layer": lambda: layer_step(False), "layer-sampled": lambda: layer_step(True)}
fn = fns[what]()
reset = reset_peak_rss()
rss0 = status_kib("VmRSS")
""")


def _run(side: str, shape, threads: int, calls: int, min_time: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    load = os.getloadavg()[0]
    args = [*map(str, shape), str(threads), side, str(calls), str(min_time)]
    out = subprocess.run([sys.executable, "-c", WORKER, *args], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=3600)  # fmt: skip
    if out.returncode:
        raise RuntimeError(f"{side} {shape}: {out.stderr[-2000:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if Path(got["fastvq"]).resolve().parent != (ROOT / "fastvq").resolve():
        raise RuntimeError(f"the worker imported {got['fastvq']}, not this checkout's fastvq")
    return got | {"load": load}


def measure(shapes, rounds, threads, calls, min_time, sides=SIDES) -> list[dict]:
    """One row per shape: per-round seconds and peaks of both sides, ratios second / first."""
    rows = []
    for shape in shapes:
        per_round = alternated_rounds(
            sides,
            rounds,
            lambda s, shape=shape: _run(s, shape, threads, calls, min_time),
            str(shape),
        )
        ratios = [p[sides[1]] / p[sides[0]] for p in per_round]
        rows.append({
            "n": shape[0], "k": shape[1], "d": shape[2], "rounds": per_round, "sides": sides,
            "ratios": ratios, "ratio": f"{sides[1]} / {sides[0]}",
            "median_ratio": statistics.median(ratios),
            "median_peak_bytes": median_peaks(per_round, sides),
        })  # fmt: skip
    return rows


def markdown(doc: dict) -> str:
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    a, b = doc["sides"]
    lines = [
        f"# CPU stochastic sampling ({doc['commit']}): {a} vs {b}, {doc['threads']} thread(s)",
        "", f"`{doc['command']}` on {doc['machine']}, {doc['date']}; torch {doc['torch']}. Each "
        f"figure: the minimum over at least {doc['calls']} call(s) and at least "
        f"{doc['min_time']:g} s of calls, in a fresh process after one warm-up; sides alternate "
        f"every round. Ratio: {b} time / {a} time (> 1: {a} faster). Peak: RSS high-water "
        "growth over the process's RSS after the inputs were built (MiB, median of rounds).", "",
        f"| N × K × D | {a} s per round | {b} s per round | ratios | median ratio | "
        f"peak {a} / {b} MiB | load average per round |", "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in doc["rows"]:
        new = ", ".join(f"{p[a]:.3f}" for p in r["rounds"])
        old = ", ".join(f"{p[b]:.3f}" for p in r["rounds"])
        rat = ", ".join(f"{x:.2f}" for x in r["ratios"])
        loads = ", ".join(f"{max(p['loads']):.2f}" for p in r["rounds"])
        peak = r["median_peak_bytes"]
        lines.append(f"| {r['n']} × {r['k']} × {r['d']} | {new} | {old} | {rat} | "
                     f"**{r['median_ratio']:.2f}** | {mib(peak[a])} / {mib(peak[b])} | "
                     f"{loads} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_protocol_args(ap)
    # one call of the dense side at 16384 x 16384 takes tens of seconds: one timed call each
    ap.set_defaults(threads=1, calls=1, min_time=0.0)
    ap.add_argument("--shapes", help="N,K,D;N,K,D... (default 4100,16384,64;4100,16384,256;"
                    "16384,16384,64)")  # fmt: skip
    ap.add_argument("--sides", default=",".join(SIDES), help=f"two of {ALL_SIDES}")
    ap.add_argument("--smoke", action="store_true", help="one tiny round (CI)")
    ap.add_argument("--out", type=Path, help="JSON path (markdown beside it); --smoke: none")
    a = ap.parse_args(argv)
    sides = tuple(a.sides.split(","))
    if len(sides) != 2 or len(set(sides)) != 2 or any(x not in ALL_SIDES for x in sides):
        ap.error(f"--sides must be two different sides of {ALL_SIDES}, got {a.sides}")
    shapes = parse_shapes(a.shapes, SMOKE_SHAPES if a.smoke else SHAPES)
    rounds, calls, min_time = (1, 1, 0.0) if a.smoke else (a.rounds, a.calls, a.min_time)
    now, doc = result_header("sampling_speed", argv, a.threads, calls, min_time)
    doc |= {"commit": git_commit(ROOT) or "unknown", "sides": sides}
    doc["rows"] = measure(shapes, rounds, a.threads, calls, min_time, sides)
    print(markdown(doc))
    if a.out or not a.smoke:
        stamp = now.strftime("%Y-%m-%d")
        tag = "" if sides == SIDES else "-" + "-vs-".join(sides)
        out = a.out or RESULTS / (
            f"cpu-sampling{tag}-{stamp}-{doc['commit']}-threads{a.threads}.json"
        )
        write_result(doc, out, markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
