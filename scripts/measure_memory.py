"""Peak host memory of one VQ training step (forward + backward) on CPU, one process per case.

Checks the CPU side of the memory model in docs/scale.md: each case runs in its own subprocess,
builds its inputs, resets the kernel's RSS high-water mark (writes "5" to /proc/self/clear_refs),
runs one step and reads VmHWM from /proc/self/status. Reported: the growth of the high-water mark
above the RSS after the inputs were built (so inputs are excluded; the step's outputs, saved
tensors and the codebook's .grad are included), next to the model's prediction.

Usage:
    python scripts/measure_memory.py                 # the default grid, a markdown table
    python scripts/measure_memory.py --case fastvq 8192 65536 64 float32   # one case, JSON
    python scripts/measure_memory.py --sharded 2 8192 1048576 64           # per-rank, gloo

Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MIB = 1 << 20


def predicted_bytes(
    impl: str, n: int, k: int, d: int, dtype: str, world: int = 1, tile: int = 16 * MIB
) -> int:
    """The model of docs/scale.md for the measured quantity (CPU, torch backend), leading terms.

    fastvq (torch backend): the forward's fp32 code copy + squared codes for the norms
    (+ the fp32 cast of a bf16 codebook) and the backward's fp32 scatter sums + scaled gradient;
    the rows cost about 20 bytes per element of z (z_q, and in backward the gathered codes, the
    difference and grad_z, in fp32; 24 for bf16). Naive: a one-hot int64 (8 B) and its float
    copy per (row, code), the copy saved for backward.
    """
    b = 4 if dtype == "float32" else 2
    if impl == "naive":
        return n * k * (8 + b) + k * d * 4
    kd = k * d * (8 if b == 4 else 12)
    nd = n * d * (20 if b == 4 else 24)
    if impl == "sharded":  # per rank: its shard, plus every rank's rows gathered
        s = -(-k // world)
        nt = n * world
        return s * d * (8 if b == 4 else 12) + nt * d * (3 * b + 12) + nt * 48 + n * d * 20
    return kd + nd + tile  # + the torch backend's fp32 distance tile (block_n x block_k)


def run_case(impl: str, n: int, k: int, d: int, dtype: str) -> dict:
    import torch
    import torch.nn.functional as F

    import fastvq
    from fastvq._procmem import proc_status_kib, reset_peak_rss

    torch.set_num_threads(1)
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n, d, generator=gen).to(dt).requires_grad_(True)
    cb = torch.randn(k, d, generator=gen).to(dt).requires_grad_(True)
    g = torch.randn(n, d, generator=gen).to(dt)
    if impl == "naive":

        def step():
            idx = torch.cdist(z.float(), cb.float()).argmin(dim=1)  # (N, K) distances
            onehot = F.one_hot(idx, k).to(dt)  # (N, K): int64, then its float copy
            z_q = onehot @ cb
            loss = F.mse_loss(z_q, z.detach()) + 0.25 * F.mse_loss(z, z_q.detach())
            q = z + (z_q - z).detach()
            torch.autograd.backward([q, loss], [g, torch.ones((), dtype=loss.dtype)])

    else:

        def step():
            q, _, loss = fastvq.vector_quantize(z, cb, backend="torch")
            torch.autograd.backward([q, loss], [g, torch.ones(())])

    # Warm up at a tiny size so one-off allocations (dispatcher, BLAS buffers) are not counted.
    small = fastvq.vector_quantize(z[:8].detach(), cb[:8].detach(), backend="torch")
    del small
    base = proc_status_kib("VmRSS")
    reset_peak_rss(required=True)
    step()
    hwm = proc_status_kib("VmHWM")
    from fastvq import _search_torch as st

    tile = min(n, st.DEFAULT_BLOCK_N) * min(k, st.DEFAULT_BLOCK_K) * 4
    return {"impl": impl, "n": n, "k": k, "d": d, "dtype": dtype, "tile_bytes": tile,
            "peak_growth_bytes": (hwm - base) * 1024,
            "predicted_bytes": predicted_bytes(impl, n, k, d, dtype, tile=tile)}  # fmt: skip


def _sharded_worker(rank, world, n, k, d, store, out):
    import torch
    import torch.distributed as dist

    from fastvq._procmem import proc_status_kib, reset_peak_rss
    from fastvq.sharded import shard_range, sharded_vector_quantize

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    s, e = shard_range(k, rank, world)
    gen = torch.Generator().manual_seed(rank)
    z = torch.randn(n, d, generator=gen).requires_grad_(True)
    shard = torch.randn(e - s, d, generator=gen).requires_grad_(True)
    g = torch.randn(n, d, generator=gen)
    sharded_vector_quantize(z[:8], shard, num_codes=k, backend="torch")  # warm-up
    dist.barrier()
    base = proc_status_kib("VmRSS")
    reset_peak_rss(required=True)
    q, _, loss = sharded_vector_quantize(z, shard, num_codes=k, backend="torch")
    torch.autograd.backward([q, loss], [g, torch.ones(())])
    hwm = proc_status_kib("VmHWM")
    dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"rank": rank, "peak_growth_bytes": (hwm - base) * 1024}, f)


def run_sharded(world: int, n: int, k: int, d: int) -> dict:
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "peak")
        mp.spawn(_sharded_worker, args=(world, n, k, d, os.path.join(tmp, "store"), out),
                 nprocs=world)  # fmt: skip
        peaks = [json.load(open(f"{out}.{r}"))["peak_growth_bytes"] for r in range(world)]
    return {"impl": f"sharded R={world}", "n": n, "k": k, "d": d, "dtype": "float32",
            "peak_growth_bytes": max(peaks),
            "predicted_bytes": predicted_bytes("sharded", n, k, d, "float32", world)}  # fmt: skip


DEFAULT_GRID = [
    ("fastvq", 8192, 4096, 64, "float32"),
    ("fastvq", 8192, 65536, 64, "float32"),
    ("fastvq", 8192, 1048576, 64, "float32"),
    ("fastvq", 8192, 1048576, 64, "bfloat16"),
    ("fastvq", 65536, 16384, 256, "float32"),
    ("naive", 8192, 4096, 64, "float32"),
    ("naive", 8192, 16384, 64, "float32"),
    ("naive", 8192, 32768, 64, "float32"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", nargs=5, metavar=("IMPL", "N", "K", "D", "DTYPE"))
    p.add_argument("--sharded", nargs=4, type=int, metavar=("R", "N_PER_RANK", "K", "D"))
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--table", help="only print the table of rows saved with --json")
    a = p.parse_args()
    if a.table:
        with open(a.table) as f:
            _print_table(json.load(f))
        return
    if a.case:
        impl, n, k, d, dtype = a.case
        print(json.dumps(run_case(impl, int(n), int(k), int(d), dtype)))
        return
    if a.sharded:
        print(json.dumps(run_sharded(*a.sharded)))
        return
    rows = []
    cases = [["--case", *map(str, c)] for c in DEFAULT_GRID]
    cases += [["--sharded", "2", "4096", "262144", "64"]]
    for args in cases:
        res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
        if res.returncode != 0:
            print(f"{args}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    _print_table(rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


def _print_table(rows: list[dict]) -> None:
    """Markdown table; the model column is recomputed from the current formulas."""
    for r in rows:
        impl, world = r["impl"], 1
        if impl.startswith("sharded"):
            impl, world = "sharded", int(impl.split("=")[1])
        tile = r.get("tile_bytes", 16 * MIB)  # rows measured before tile_bytes: 4096 x 1024
        r["predicted_bytes"] = predicted_bytes(
            impl, r["n"], r["k"], r["d"], r["dtype"], world, tile
        )
    print("| impl | N | K | D | dtype | measured peak growth (MiB) | model (MiB) |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for r in rows:
        mib = r["peak_growth_bytes"] / MIB, r["predicted_bytes"] / MIB
        print(f"| {r['impl']} | {r['n']} | {r['k']} | {r['d']} | {r['dtype']} | "
              f"{mib[0]:.0f} | {mib[1]:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
