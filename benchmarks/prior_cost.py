"""What a PixelCNN prior's training step costs as the number of codes grows (an FSQ [8,8,8,5,5,5]
VQ-VAE has 64,000): seconds per step and peak RSS growth, one fresh process per size, on random
7x7 code maps (the step's cost does not depend on the codes' values).

    python -m benchmarks.prior_cost --codes 1000 16384 64000 --batch-size 16 32
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(codes: int, batch_size: int, steps: int) -> dict:
    """One size in this process: the median step time and the peak RSS growth over the steps."""
    import torch

    from fastvq._procmem import proc_status_kib, reset_peak_rss
    from fastvq.models import PixelCNN, PixelCNNConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = PixelCNN(PixelCNNConfig(num_codes=codes))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    maps = torch.randint(0, codes, (batch_size, 7, 7))
    reset_peak_rss()
    base = proc_status_kib("VmRSS")
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss, _ = model.training_loss(maps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return {
        "num_codes": codes,
        "batch_size": batch_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "step_seconds": sorted(times)[len(times) // 2],
        "step_seconds_all": times,
        "peak_rss_growth_mib": (proc_status_kib("VmHWM") - base) / 1024,
        "logits_mib": batch_size * 49 * codes * 4 / 2**20,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--codes", type=int, nargs="+", default=[1000, 16384, 64000])
    ap.add_argument("--batch-size", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--worker", type=int, nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps)))
        return 0
    rows = []
    for b in args.batch_size:
        for k in args.codes:
            cmd = [sys.executable, "-m", "benchmarks.prior_cost", "--worker", str(k), str(b),
                   "--steps", str(args.steps)]  # fmt: skip
            run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
            rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"K={k} batch {b}: {r['step_seconds']:.3f} s/step, peak RSS +"
                  f"{r['peak_rss_growth_mib']:.0f} MiB, logits {r['logits_mib']:.0f} MiB",
                  flush=True)  # fmt: skip
    if args.out:
        doc = {
            "command": "python -m benchmarks.prior_cost " + " ".join(argv or sys.argv[1:]),
            "machine": "2-core CPU machine, shared",
            "date": time.strftime("%Y-%m-%d"),
            "rows": rows,
        }
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
