"""Choose ResidualVQ's defaults from measurements: one factor at a time, two kinds of data.

    python -m benchmarks.residual_defaults --out benchmarks/results/residual-defaults-DATE.json
    python -m benchmarks.residual_defaults --quick --out /tmp/rd.json    # a tiny run (the test)
    python -m benchmarks.residual_defaults --table benchmarks/results/residual-defaults-DATE-*.json

Two setups, each with a 4-depth :class:`fastvq.ResidualVQ` in the bottleneck:

* ``images``: Fashion-MNIST through the demo's VQ-VAE (:class:`fastvq.models.VQVAE`, its default
  config: 7x7 map of 16-d tokens, loss MSE / Var(x) + the quantizer's loss), K = 256 per depth;
* ``flat``: raw 784-pixel rows, ``Linear(784, 32)`` -> 4-depth stack with K = 1024 per depth ->
  ``Linear(32, 784)`` (a tiny linear autoencoder, loss MSE + the quantizer's loss).

Every configuration of :data:`CONFIGS` changes one thing from fastvq's defaults, plus the
vector-quantize-pytorch-like combination (rotation trick, decay 0.8, commitment 1) and
vector-quantize-pytorch's own ``ResidualVQ`` with its defaults as a reference column. For each
seed, every configuration starts from the same initial weights of the model around the stack and
sees the same batches (Adam, lr 1e-3). Runs go seed by seed, each seed through every configuration,
so the machine's load is spread over configurations alike.

Reported per run, over the whole test set (10,000 images): reconstruction MSE (pixels in [0, 1]),
the fraction of each depth's codes used, and the median seconds per training step (forward,
backward, optimizer step) with the peak RSS growth of the training loop.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fastvq
from fastvq._procmem import proc_status_kib, reset_peak_rss
from fastvq.app.data import load_dataset, to_float
from fastvq.app.recipes import data_variance
from fastvq.models import VQVAE
from fastvq.models.vqvae import VQVAEConfig

DEPTHS = 4

# fastvq's defaults when the study ran (2026-12-07), spelled out so that a re-run measures the
# same configurations should the defaults change
BASE = {
    "rotation_trick": False,
    "decay": 0.99,
    "beta": 0.25,
    "kmeans_init": True,
    "dead_code_steps": 20,
}

# (name, library, ResidualVQ keyword arguments); each "fastvq" row changes BASE in one place
CONFIGS = [
    ("fastvq defaults", "fastvq", BASE),
    ("rotation trick", "fastvq", {**BASE, "rotation_trick": True}),
    ("decay 0.8", "fastvq", {**BASE, "decay": 0.8}),
    ("beta 1", "fastvq", {**BASE, "beta": 1.0}),
    ("no k-means init", "fastvq", {**BASE, "kmeans_init": False}),
    ("no dead-code restart", "fastvq", {**BASE, "dead_code_steps": 0}),
    ("vqp-like (rotation, decay 0.8, beta 1)", "fastvq",
     {**BASE, "rotation_trick": True, "decay": 0.8, "beta": 1.0}),
    ("vqp defaults", "vqp", {}),
]  # fmt: skip

# per setup: token dim, K per depth, batch, steps (full study; --quick shrinks the steps)
SETUPS = {
    "images": {"dim": 16, "K": 256, "batch": 64, "steps": 300},
    "flat": {"dim": 32, "K": 1024, "batch": 256, "steps": 600},
}


class Stack(nn.Module):
    """Either library's stack on ``(B, N, D)`` tokens -> ``(quantized, indices (B, N, Q), loss)``
    (vqp's per-depth losses summed, as fastvq's loss is)."""

    def __init__(self, library: str, dim: int, k: int, kwargs: dict):
        super().__init__()
        self.library = library
        if library == "vqp":
            from vector_quantize_pytorch import ResidualVQ

            self.rvq = ResidualVQ(dim=dim, codebook_size=k, num_quantizers=DEPTHS, **kwargs)
        else:
            self.rvq = fastvq.ResidualVQ(dim, k, DEPTHS, backend="torch", **kwargs)

    def forward(self, tokens: torch.Tensor):
        q, idx, loss = self.rvq(tokens)
        return q, idx, loss.sum()


class ImageModel(nn.Module):
    """The demo's VQ-VAE encoder and decoder around a stack on its 7x7 map of tokens."""

    def __init__(self, stack: Stack, variance: float):
        super().__init__()
        vqvae = VQVAE(VQVAEConfig(data_variance=variance))
        self.encoder, self.decoder, self.stack = vqvae.encoder, vqvae.decoder, stack
        self.variance = variance

    def forward(self, x: torch.Tensor):
        z = self.encoder(x)  # (B, D, 7, 7)
        b, d, h, w = z.shape
        q, idx, loss = self.stack(z.permute(0, 2, 3, 1).reshape(b, h * w, d))
        x_hat = torch.sigmoid(self.decoder(q.reshape(b, h, w, d).permute(0, 3, 1, 2)))
        return x_hat, idx.reshape(b * h * w, DEPTHS), loss

    def objective(self, x_hat, x, vq_loss):
        return F.mse_loss(x_hat, x) / self.variance + vq_loss


class FlatModel(nn.Module):
    """784-pixel rows -> Linear to ``dim`` -> stack (one token per row) -> Linear back."""

    def __init__(self, stack: Stack, dim: int):
        super().__init__()
        self.enc, self.dec, self.stack = nn.Linear(784, dim), nn.Linear(dim, 784), stack

    def forward(self, x: torch.Tensor):
        rows = x.reshape(x.shape[0], 784)
        q, idx, loss = self.stack(self.enc(rows)[:, None])
        return self.dec(q[:, 0]).reshape(x.shape), idx[:, 0], loss

    def objective(self, x_hat, x, vq_loss):
        return F.mse_loss(x_hat, x) + vq_loss


def build(setup: str, cfg, seed: int, variance: float) -> nn.Module:
    """The setup's model with config ``cfg``'s stack; the weights around the stack depend only
    on ``seed`` (drawn before the stack, whose own init draws come after)."""
    name, library, kwargs = cfg
    s = SETUPS[setup]
    torch.manual_seed(seed)
    if setup == "images":
        outer = ImageModel(nn.Identity(), variance)  # type: ignore[arg-type]
    else:
        outer = FlatModel(nn.Identity(), s["dim"])  # type: ignore[arg-type]
    torch.manual_seed(seed + 1000)
    extra = {} if library == "vqp" else {"seed": seed}
    outer.stack = Stack(library, s["dim"], s["K"], {**kwargs, **extra})
    return outer


@torch.no_grad()
def evaluate(model: nn.Module, test_u8: torch.Tensor, k: int) -> dict:
    """Whole-test-set reconstruction MSE and each depth's used fraction of its K codes."""
    model.eval()
    counts = torch.zeros(DEPTHS, k, dtype=torch.int64)
    se, n = 0.0, 0
    for i in range(0, len(test_u8), 1000):
        x = to_float(test_u8[i : i + 1000])
        x_hat, idx, _ = model(x)
        for d in range(DEPTHS):
            counts[d] += torch.bincount(idx[:, d], minlength=k)
        se += float((x_hat - x).square().sum())
        n += x.numel()
    model.train()
    return {"test_mse": se / n, "usage_per_depth": (counts > 0).float().mean(1).tolist()}


def train(model: nn.Module, setup: str, seed: int, steps: int, train_u8) -> dict:
    """``steps`` Adam steps on seeded batches: total and median per-step seconds, and the peak
    RSS growth over the loop."""
    batch = SETUPS[setup]["batch"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    step_s = []
    reset_peak_rss()
    rss0 = proc_status_kib("VmHWM", required=False)
    t_all = time.perf_counter()
    for _ in range(steps):
        x = to_float(train_u8[torch.randint(len(train_u8), (batch,), generator=g)])
        t0 = time.perf_counter()
        x_hat, _, vq_loss = model(x)
        loss = model.objective(x_hat, x, vq_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step_s.append(time.perf_counter() - t0)
    rss1 = proc_status_kib("VmHWM", required=False)
    return {
        "train_s": time.perf_counter() - t_all,
        "step_s_median": statistics.median(step_s),
        "peak_rss_growth_mib": None if rss0 is None else (rss1 - rss0) / 1024,
    }


def run(setup: str, cfg, seed: int, steps: int, train_u8, test_u8, variance: float) -> dict:
    """Train one configuration for ``steps`` and evaluate it."""
    s = SETUPS[setup]
    model = build(setup, cfg, seed, variance)
    out = {"setup": setup, "name": cfg[0], "library": cfg[1], "kwargs": cfg[2], "seed": seed}
    out.update(steps=steps, batch=s["batch"], dim=s["dim"], K=s["K"])
    out.update(train(model, setup, seed, steps, train_u8))
    out.update(evaluate(model, test_u8, s["K"]))
    return out


def time_one(setup: str, name: str, steps: int) -> dict:
    """One fresh process's measurement for :func:`timing`: seed 1, ``steps`` steps."""
    (cfg,) = [c for c in CONFIGS if c[0] == name]
    ds = load_dataset("fashion-mnist")
    model = build(setup, cfg, 1, data_variance(ds.train.images))
    return train(model, setup, 1, steps, ds.train.images)


def timing(setup: str, names: list, rounds: int, steps: int, threads: int) -> dict:
    """Step time and peak RSS of configurations ``names``, each measured in a fresh process,
    alternating (the order reversed every other round); ratios against the first name."""
    per_round = []
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        got = {}
        for name in order:
            cmd = [sys.executable, "-m", "benchmarks.residual_defaults", "--time-one", setup,
                   name, str(steps), "--threads", str(threads)]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            got[name] = json.loads(done.stdout.strip().splitlines()[-1])
        per_round.append(got)
        ratios = {n: got[n]["step_s_median"] / got[names[0]]["step_s_median"] for n in names}
        print(f"{setup} round {r}: " + ", ".join(f"{n} x{v:.3f}" for n, v in ratios.items()))
    ratio = {
        n: statistics.median(
            g[n]["step_s_median"] / g[names[0]]["step_s_median"] for g in per_round
        )
        for n in names
    }
    return {"setup": setup, "steps": steps, "rounds": per_round, "median_ratio": ratio}


def _fmt_usage(runs: list) -> str:
    """Each depth's usage as ``lo-hi%`` over the seeds (one value where they agree)."""
    cells = []
    for d in range(DEPTHS):
        lo = round(100 * min(r["usage_per_depth"][d] for r in runs))
        hi = round(100 * max(r["usage_per_depth"][d] for r in runs))
        cells.append(f"{lo}" if lo == hi else f"{lo}-{hi}")
    return " / ".join(cells) + "%"


def table(docs: list) -> str:
    """The Markdown tables of one or more study JSONs, runs pooled per setup: per configuration,
    its seeds, test MSE per seed and their mean, the change against fastvq's defaults paired by
    seed (the mean of per-seed ratios) and in how many seeds it was lower, usage per depth (range
    over seeds) and the median over seeds of each run's median step time."""
    setups = {k: v for doc in docs for k, v in doc["meta"]["setups"].items()}
    runs_all = [r for doc in docs for r in doc["results"]]
    lines = []
    for setup, s in setups.items():
        runs = [r for r in runs_all if r["setup"] == setup]
        order = [c[0] for c in CONFIGS]
        names = sorted(dict.fromkeys(r["name"] for r in runs), key=order.index)
        by = {
            n: sorted((r for r in runs if r["name"] == n), key=lambda r: r["seed"]) for n in names
        }
        base = {r["seed"]: r["test_mse"] for r in by.get("fastvq defaults", [])}
        lines += [
            f"**{setup}** (D = {s['dim']}, K = {s['K']} x {DEPTHS} depths, batch {s['batch']}, "
            f"{s['steps']} steps)",
            "",
            "| configuration | seeds | test MSE per seed | mean MSE | vs defaults (paired) "
            "| lower in | usage per depth (min-max over seeds) | ms / step |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for n in names:
            mses = [r["test_mse"] for r in by[n]]
            ratios = [r["test_mse"] / base[r["seed"]] - 1 for r in by[n] if r["seed"] in base]
            step = statistics.median(r["step_s_median"] for r in by[n]) * 1e3
            seeds = ",".join(str(r["seed"]) for r in by[n])
            change = f"{100 * statistics.mean(ratios):+.1f}%" if ratios else "-"
            lower = f"{sum(x < 0 for x in ratios)}/{len(ratios)}" if ratios else "-"
            lines.append(
                f"| {n} | {seeds} | {' / '.join(f'{m:.5f}' for m in mses)} "
                f"| {statistics.mean(mses):.5f} | {change} | {lower} | {_fmt_usage(by[n])} "
                f"| {step:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 steps, 1 seed, 2 configs (a test)")
    ap.add_argument("--seeds", type=str, default="1,2,3")
    ap.add_argument("--setups", type=str, default="images,flat")
    ap.add_argument("--only", type=str, default=None, help="'|'-separated config names")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--steps", type=int, default=None, help="steps of every setup (default: its own)"
    )
    ap.add_argument("--timing", type=str, default=None,
                    help="'|'-separated config names: step time against fastvq's defaults in "
                    "fresh processes, alternating, per setup")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=5, help="--timing: rounds")
    ap.add_argument("--time-one", nargs=3, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=str, default=None, help="the JSON to write")
    ap.add_argument("--table", nargs="+", default=None, help="print the tables of these JSONs")
    args = ap.parse_args(argv)
    if args.table:
        print(table([json.loads(Path(p).read_text()) for p in args.table]))
        return 0
    if args.time_one:
        torch.set_num_threads(args.threads)
        setup, name, steps = args.time_one
        print(json.dumps(time_one(setup, name, int(steps))))
        return 0
    if args.out is None:
        ap.error("--out is required (or --table JSON)")
    torch.set_num_threads(args.threads)
    setups = args.setups.split(",")
    for name in setups:
        if name not in SETUPS:
            ap.error(f"--setups: unknown setup {name!r}; choose from {sorted(SETUPS)}")
    if args.timing:
        names = ["fastvq defaults", *args.timing.split("|")]
        for name in names:
            if name not in [c[0] for c in CONFIGS]:
                ap.error(f"--timing: unknown configuration {name!r}")
        steps = args.steps or 50
        doc = {
            "command": shlex.join(["python", "-m", "benchmarks.residual_defaults", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "threads": args.threads,
            "torch": torch.__version__,
            "results": [timing(s, names, args.rounds, steps, args.threads) for s in setups],
        }
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
        return 0
    seeds = [int(s) for s in args.seeds.split(",")]
    configs = [c for c in CONFIGS if not args.only or c[0] in args.only.split("|")]
    if args.quick:
        seeds, configs = seeds[:1], [CONFIGS[0], CONFIGS[-1]]
    ds = load_dataset("fashion-mnist")
    variance = data_variance(ds.train.images)
    test = ds.test.images[:2000] if args.quick else ds.test.images
    results = []
    out = Path(args.out)
    meta = {
        "command": shlex.join(
            [
                "python",
                "-m",
                "benchmarks.residual_defaults",
                *(sys.argv[1:] if argv is None else argv),
            ]
        ),
        "seeds": seeds,
        "setups": {
            k: {**SETUPS[k], "steps": 5 if args.quick else args.steps or SETUPS[k]["steps"]}
            for k in setups
        },
        "depths": DEPTHS,
        "test_images": len(test),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    for setup in setups:
        steps = meta["setups"][setup]["steps"]
        for seed in seeds:
            for cfg in configs:
                r = run(setup, cfg, seed, steps, ds.train.images, test, variance)
                results.append(r)
                use = " / ".join(f"{u:.0%}" for u in r["usage_per_depth"])
                print(
                    f"{setup:6s} seed {seed} {r['name']:40s} mse {r['test_mse']:.5f} "
                    f"use {use} step {r['step_s_median'] * 1e3:.1f} ms",
                    flush=True,
                )
                # written after every run: a stopped study keeps what it measured
                meta["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
