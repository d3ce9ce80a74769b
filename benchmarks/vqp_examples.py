"""vqp's two example scripts, run with vqp's import and with fastvq's: fresh processes,
alternating the library's order every round, each running its full training.

    python -m benchmarks.vqp_examples [--steps 200] [--rounds 3] [--threads 1]

For each script and library: test reconstruction L1 and MSE, codebook usage and perplexity on
the 10000 test images (the same in every round: same seed, same batches), and the median step
time per round; the speed ratio (vqp's median step time over fastvq's) per round and its median.
Writes benchmarks/results/vqp-examples-<date>.json and prints the markdown table that
docs/vqp-examples.md keeps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._stamp import git_commit

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("vqp_autoencoder.py", "vqp_autoencoder_sim_vq.py")
IMPLS = ("vqp", "fastvq")


def run_once(script: str, impl: str, args) -> dict:
    """One fresh process of ``examples/<script>``; its JSON report without the per-step curves,
    plus the process's wall time."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    cmd = [sys.executable, str(ROOT / "examples" / script), "--impl", impl]
    cmd += ["--steps", str(args.steps), "--seed", str(args.seed), "--threads", str(args.threads)]
    cmd += ["--test-images", str(args.test_images)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["final_train_rec_l1"] = report.pop("train_rec_l1")[-1]
    report.pop("train_commit")
    report["wall_s"] = time.perf_counter() - t0
    return report


def table(result: dict) -> str:
    """The markdown comparison table of a result."""
    lines = [
        "| script | library | test L1 | test MSE | codebook usage | test perplexity | "
        "step ms (median of rounds) | per-round step ms | speed vs vqp: median (per round) | "
        "peak RSS MiB (max of rounds) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for script in SCRIPTS:
        runs = result["runs"][script]
        vqp_ms = [r["step_ms_median"] for r in runs["vqp"]]
        for impl in IMPLS:
            rs = runs[impl]
            ms = [r["step_ms_median"] for r in rs]
            ratios = [a / b for a, b in zip(vqp_ms, ms, strict=True)]
            first = rs[0]
            speed = (
                f"{statistics.median(ratios):.2f}x ({', '.join(f'{x:.2f}' for x in ratios)})"
                if impl == "fastvq"
                else "1"
            )
            lines.append(
                f"| {script} | {impl} | {first['test_l1']:.4f} | {first['test_mse']:.4f} | "
                f"{first['codebook_usage']:.3f} | {first['test_perplexity']:.1f} | "
                f"{statistics.median(ms):.0f} | {', '.join(f'{x:.0f}' for x in ms)} | {speed} | "
                f"{max(r['peak_rss_mib'] for r in rs):.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--test-images", type=int, default=10000)
    ap.add_argument("--date", default=time.strftime("%Y-%m-%d", time.gmtime()))
    ap.add_argument("--machine", default="2-core CPU machine, shared")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default under results/)")
    args = ap.parse_args()
    runs = {s: {i: [] for i in IMPLS} for s in SCRIPTS}
    for rnd in range(args.rounds):
        order = IMPLS if rnd % 2 == 0 else IMPLS[::-1]
        for script in SCRIPTS:
            for impl in order:
                r = run_once(script, impl, args)
                runs[script][impl].append(r)
                print(f"round {rnd} {script} {impl}: {r['step_ms_median']:.0f} ms/step, "
                      f"test L1 {r['test_l1']:.4f}", file=sys.stderr, flush=True)  # fmt: skip
    import torch  # the versions only; the runs are separate processes

    try:
        import vector_quantize_pytorch as vqp

        vqp_version = getattr(vqp, "__version__", None) or "1.32.0"
    except ImportError:
        vqp_version = None
    result = {
        "command": "python -m benchmarks.vqp_examples " + " ".join(sys.argv[1:]),
        "machine": args.machine, "date": args.date, "commit": git_commit(ROOT),
        "platform": platform.platform(), "torch": torch.__version__, "vqp": vqp_version,
        "steps": args.steps, "rounds": args.rounds, "seed": args.seed, "threads": args.threads,
        "test_images": args.test_images,
        "protocol": "fresh process per run; the library order alternates every round",
        "runs": runs,
    }  # fmt: skip
    out = args.out or ROOT / "benchmarks" / "results" / f"vqp-examples-{args.date}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
