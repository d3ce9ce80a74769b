"""CPU nearest-code search, fastvq's torch backend against faiss-cpu, by a fair protocol.

    python -m benchmarks.cpu_faiss                              # docs/benchmarks.md's table
    python -m benchmarks.cpu_faiss --threads 1                  # the single-thread table
    python -m benchmarks.cpu_faiss --smoke                      # one tiny round (CI)
    python -m benchmarks.cpu_faiss --ref /path/to/old/checkout  # fastvq before/after a change
    python -m benchmarks.cpu_faiss --ref OLD --op fwdbwd        # ... for forward+backward
    python -m benchmarks.cpu_faiss --ref OLD --op ema           # ... for an EMA layer step

Protocol:

- Each measurement runs in a fresh process with the same thread count on both sides
  (`torch.set_num_threads`, `faiss.omp_set_num_threads` and `OMP_NUM_THREADS`).
- Inputs are `torch.manual_seed(0)` randn, N×D rows and K×D codes, fp32.
- One warm-up call, then the minimum over at least `--calls` calls (5) and at least `--min-time`
  seconds of calls (1 s): a call of 30 ms is timed ~30 times, so a burst of load from outside
  (seconds long on the shared host) does not decide a whole process's figure:
  - fastvq: `fastvq.search(z, c, backend="torch")`, whose result also holds `z_q` and the
    squared error;
  - faiss: `IndexFlatL2(D).add(c)` outside the timed calls, then `search(z, 1)`.
- The sides alternate, the starting side flipping each round, over `--rounds` rounds.
- The report gives every per-round figure, the median of the per-round ratios
  (faiss time / fastvq time: above 1 means fastvq is faster), and the load average before each
  process.

Results go to JSON and markdown under benchmarks/results/, stamped with the command, the machine,
the date and the loads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from ._stamp import add_protocol_args, git_commit

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(16384, 1024, 64), (16384, 8192, 64), (16384, 8192, 256), (8192, 65536, 64),
          (1024, 8192, 64), (16384, 8192, 16), (16384, 8192, 32)]  # fmt: skip
SMOKE_SHAPES = [(256, 128, 16)]

WORKER = r"""
import json, os, sys, time
threads = int(sys.argv[4])
import torch
torch.set_num_threads(threads)
n, k, d = (int(x) for x in sys.argv[1:4])
side, calls, op, min_time = sys.argv[5], int(sys.argv[6]), sys.argv[7], float(sys.argv[8])
torch.manual_seed(0)
z, c = torch.randn(n, d), torch.randn(k, d)
if side == "faiss":
    import faiss
    faiss.omp_set_num_threads(threads)
    index = faiss.IndexFlatL2(d)
    index.add(c.numpy())
    zn = z.numpy()
    fn = lambda: index.search(zn, 1)
elif op == "search":
    import fastvq
    fn = lambda: fastvq.search(z, c, backend="torch")
elif op == "fwdbwd":
    import fastvq
    z.requires_grad_(True)
    c.requires_grad_(True)
    def fn():
        q, _, loss = fastvq.vector_quantize(z, c, backend="torch")
        (q.square().mean() + loss).backward()
else:  # ema: one training step of the EMA layer (search, EMA update, backward)
    import fastvq
    layer = fastvq.VectorQuantizer(d, k, kmeans_init=False, dead_code_steps=None,
                                   backend="torch").train()
    z.requires_grad_(True)
    def fn():
        q, _, loss = layer(z)
        (q.square().mean() + loss).backward()
fn()
best, done, start = float("inf"), 0, time.perf_counter()
while done < calls or time.perf_counter() - start < min_time:
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
    done += 1
print(json.dumps({"seconds": best, "calls": done}))
"""


def _run(
    side: str, shape, threads: int, calls: int, min_time: float, ref: str | None, op: str
) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop("TRITON_INTERPRET", None)
    if side == "fastvq-ref":
        env["PYTHONPATH"] = ref + os.pathsep + env.get("PYTHONPATH", "")
    load = os.getloadavg()[0]
    worker_side = "faiss" if side == "faiss" else "fastvq"
    args = [*map(str, shape), str(threads), worker_side, str(calls), op, str(min_time)]
    cwd = ref if side == "fastvq-ref" else None
    out = subprocess.run([sys.executable, "-c", WORKER, *args], capture_output=True, text=True,
                         env=env, cwd=cwd, timeout=1800)  # fmt: skip
    if out.returncode:
        raise RuntimeError(f"{side} {shape}: {out.stderr[-2000:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return {"seconds": got["seconds"], "calls": got["calls"], "load": load}


def measure(
    shapes, rounds: int, threads: int, calls: int, min_time: float, ref: str | None,
    op: str = "search",
) -> list[dict]:  # fmt: skip
    sides = ("fastvq", "fastvq-ref" if ref else "faiss")
    rows = []
    for shape in shapes:
        per_round = []
        for r in range(rounds):
            order = sides if r % 2 == 0 else sides[::-1]
            got = {s: _run(s, shape, threads, calls, min_time, ref, op) for s in order}
            per_round.append(
                {s: got[s]["seconds"] for s in sides}
                | {"loads": [got[s]["load"] for s in order], "first": order[0]}
                | {"calls": {s: got[s]["calls"] for s in sides}}
            )
            print(f"{shape} round {r}: " + ", ".join(
                f"{s} {got[s]['seconds'] * 1e3:.1f} ms" for s in sides)
                + f" (load {got[order[0]]['load']:.2f})", file=sys.stderr, flush=True)  # fmt: skip
        ratios = [p[sides[1]] / p["fastvq"] for p in per_round]
        rows.append({"n": shape[0], "k": shape[1], "d": shape[2], "other": sides[1],
                     "rounds": per_round, "median_ratio_other_over_fastvq":
                     statistics.median(ratios), "ratios": ratios})  # fmt: skip
    return rows


def markdown(doc: dict) -> str:
    other = doc["rows"][0]["other"] if doc["rows"] else "faiss"
    what = {"fwdbwd": "forward+backward", "ema": "EMA layer training step"}.get(
        doc.get("op", "search"), "search"
    )
    lines = [f"# CPU {what}: fastvq (torch backend) vs {other}, {doc['threads']} thread(s)", "",
             f"`{doc['command']}` on {doc['machine']}, {doc['date']}, commit "
             f"{doc.get('commit') or 'unknown'}"
             + (f" (ref {doc['ref_commit']})" if doc.get("ref_commit") else "")
             + f"; torch {doc['torch']}, "
             f"faiss {doc.get('faiss', '-')}. Each figure: the minimum over at least "
             f"{doc['calls']} calls and at least {doc.get('min_time', 0):g} s of calls, in a "
             "fresh process after one warm-up; sides alternate every round. Ratio: "
             f"{other} time / fastvq time (> 1: fastvq faster).", "",
             f"| N × K × D | fastvq ms per round | {other} ms per round | ratios | median "
             "ratio | load average per round |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in doc["rows"]:
        f = ", ".join(f"{p['fastvq'] * 1e3:.0f}" for p in r["rounds"])
        o = ", ".join(f"{p[other] * 1e3:.0f}" for p in r["rounds"])
        rat = ", ".join(f"{x:.2f}" for x in r["ratios"])
        loads = ", ".join(f"{max(p['loads']):.2f}" for p in r["rounds"])
        lines.append(f"| {r['n']} × {r['k']} × {r['d']} | {f} | {o} | {rat} | "
                     f"**{r['median_ratio_other_over_fastvq']:.2f}** | {loads} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_protocol_args(ap)
    ap.add_argument("--smoke", action="store_true", help="one tiny round (CI)")
    ap.add_argument("--ref", help="another fastvq checkout: compare against it instead of faiss")
    ap.add_argument("--shapes", help="N,K,D;N,K,D... (default: the issue's list)")
    ap.add_argument("--op", choices=("search", "fwdbwd", "ema"), default="search",
                    help="fwdbwd: vector_quantize forward+backward; ema: one EMA layer training "
                    "step (both need --ref: faiss has neither)")  # fmt: skip
    ap.add_argument("--out", type=Path, help="JSON path; no file is written by --smoke otherwise")
    a = ap.parse_args(argv)
    if a.op != "search" and not a.ref:
        ap.error(f"--op {a.op} compares two fastvq checkouts: give --ref")
    shapes = SMOKE_SHAPES if a.smoke else SHAPES
    if a.shapes:
        shapes = [tuple(int(x) for x in s.split(",")) for s in a.shapes.split(";")]
    rounds, calls, min_time = (1, 1, 0.0) if a.smoke else (a.rounds, a.calls, a.min_time)
    import torch

    cpu = platform.processor() or platform.machine()
    now = datetime.datetime.now(datetime.timezone.utc)
    doc = {"command": "python -m benchmarks.cpu_faiss " + " ".join(argv or sys.argv[1:]),
           "machine": f"{platform.node()} ({os.cpu_count()} cores, {cpu})",
           "date": now.strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
           "threads": a.threads, "calls": calls, "min_time": min_time, "ref": a.ref,
           "commit": git_commit(Path(__file__).resolve().parents[1]),
           "ref_commit": git_commit(Path(a.ref)) if a.ref else None}  # fmt: skip
    try:
        import faiss

        doc["faiss"] = faiss.__version__
    except ImportError:
        if not a.ref:
            print("faiss-cpu is not installed (pip install faiss-cpu)", file=sys.stderr)
            return 2
    doc["op"] = a.op
    doc["rows"] = measure(shapes, rounds, a.threads, calls, min_time, a.ref, a.op)
    print(markdown(doc))
    if a.out or not a.smoke:
        stamp = datetime.date.today().isoformat()
        out = a.out or RESULTS / f"cpu-faiss-{stamp}-threads{a.threads}.json"
        out.write_text(json.dumps(doc, indent=1))
        out.with_suffix(".md").write_text(markdown(doc))
        print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
