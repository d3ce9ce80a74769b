"""Where the CPU search's time goes: its pieces timed in isolation, one process, CPU time.

    python -m benchmarks.cpu_search_parts                 # 16384 x 1024 x 64, one thread
    python -m benchmarks.cpu_search_parts --shape 16384,8192,64 --out results/parts.json

Each figure is the minimum of ``--reps`` calls in ``time.thread_time`` (CPU time of the calling
thread, so one thread only): on the shared host, outside load stretches wall time in bursts, and
CPU time moves much less, which is what comparing pieces of one search needs. The fair
side-by-side comparison with faiss is ``benchmarks/cpu_faiss.py``, in wall time.

Rows:

- ``search``: ``fastvq.search(z, c, backend="torch")``; ``faiss``: ``IndexFlatL2.search(z, 1)``
  (when faiss-cpu is installed), the two alternated call by call;
- ``gemms``: only the search's distance tiles (its own tile sizes, GEMM operands and GEMM, over
  its row blocks), then ``gemms + chunk amin``;
- per slot of ``rows`` x 128 (one row block's best chunks): ``argmin`` against the ``eq_`` /
  ``amin`` first-match the search uses.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path


def _min_time(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="16384,1024,64", help="N,K,D")
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--out", type=Path, help="also write the figures as JSON here")
    a = ap.parse_args(argv)
    n, k, d = (int(x) for x in a.shape.split(","))
    import torch

    import fastvq
    from fastvq import _search_torch as st

    torch.set_num_threads(1)
    torch.manual_seed(0)
    z, c = torch.randn(n, d), torch.randn(k, d)
    scale = st.magnitude_scale(z, c)
    # the search's own tiles, operands and GEMM at one thread (see _search_cpu)
    bn, bk, wide = st._cpu_tiles(n, k, d, 1, None, None)
    kp = -(-k // bk) * bk
    ops = st._Codes(c, scale, kp, bk, bn, wide, codes_finite=True)
    buf = torch.empty(0 if wide else bn * bk)

    def gemms(with_amin: bool):
        def run():
            for n0 in range(0, n, bn):
                zb = z[n0 : n0 + bn] * scale
                for _, op, nb in ops.blocks:
                    t = ops.tile(zb, op, nb, buf)
                    if with_amin:
                        t.view(-1, math.gcd(bk, st._CHUNK)).amin(dim=1)

        return run

    rows = []
    fns = {"search": lambda: fastvq.search(z, c, backend="torch")}
    try:
        import faiss

        faiss.omp_set_num_threads(1)
        index = faiss.IndexFlatL2(d)
        index.add(c.numpy())
        zn = z.numpy()
        fns["faiss"] = lambda: index.search(zn, 1)
    except ImportError:
        pass
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(a.reps):
        for name, fn in fns.items():
            t0 = time.thread_time()
            fn()
            times[name].append(time.thread_time() - t0)
    for name, v in times.items():
        rows.append((name, min(v) * 1e3, "ms"))
    gemm = f"gemms ({bn} x {bk} tiles{', oneDNN' if wide else ''})"
    rows.append((gemm, _min_time(gemms(False), a.reps // 3) * 1e3, "ms"))
    rows.append(("gemms + chunk amin", _min_time(gemms(True), a.reps // 3) * 1e3, "ms"))

    slot = torch.randn(512, st._CHUNK)
    best = slot.amin(dim=1)
    neg_iota = torch.arange(st._CHUNK, dtype=torch.float32) - st._CHUNK
    work = torch.empty_like(slot)

    def first_match():  # the search's own, into a second buffer so the slot survives
        return st._first_match(slot, best, neg_iota, out=work)

    assert torch.equal(first_match().long() + st._CHUNK, slot.argmin(dim=1))
    for name, fn in (("argmin", lambda: slot.argmin(dim=1)), ("eq/amin first match", first_match)):
        rows.append((f"slot 512 x 128: {name}", _min_time(fn, a.reps * 5) * 1e6, "us"))

    from benchmarks._stamp import git_commit

    now = datetime.datetime.now(datetime.timezone.utc)
    commit = git_commit(Path(__file__).resolve().parents[1]) or "unknown"
    head = (f"`python -m benchmarks.cpu_search_parts {' '.join(argv or sys.argv[1:])}` on "
            f"{platform.node()} ({os.cpu_count()} cores), {now:%Y-%m-%d %H:%M} UTC, commit "
            f"{commit}, torch "
            f"{torch.__version__}, one thread, N x K x D = {n} x {k} x {d}; minimum CPU time "
            f"(time.thread_time) of {a.reps} calls (search and faiss alternated).")  # fmt: skip
    print(head + "\n\n| piece | time |\n|---|---:|")
    for name, v, unit in rows:
        print(f"| {name} | {v:.2f} {unit} |")
    if a.out:
        a.out.write_text(json.dumps({"head": head, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
