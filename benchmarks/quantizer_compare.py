"""FSQ, LFQ and BSQ against the VQ recipe on Fashion-MNIST, in the demo's VQ-VAE.

Each (configuration, seed) trains the demo's VQ-VAE encoder and decoder (``fastvq.app``'s
``model_config("vqvae", ...)``: hidden 64, dim 16, the quantizer projecting where its width
differs) with ``fastvq.app.loop.fit`` for the same steps and batch, in a fresh process on one
thread, then evaluates on the whole test split: MSE (per image, averaged), the codes used and
the perplexity of their histogram. The runs go one after another, seed by seed, each seed
alternating the configurations, so load drift on a shared machine spreads over all of them.

    python -m benchmarks.quantizer_compare --out benchmarks/results/quantizers-2026-12-07.json
    python -m benchmarks.quantizer_compare --table benchmarks/results/quantizers-2026-12-07.json \\
        --doc docs/quantizers.md      # the table and plot, from the JSON
    python -m benchmarks.quantizer_compare --quick --out /tmp/q.json   # tiny, synthetic data

The JSON is rewritten after every run and a rerun skips the runs it already holds, so an
interrupted comparison continues.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MACHINE = "2-core CPU machine, shared"

# name -> (family, VQ-VAE config fields, note). LFQ/BSQ at 2**14 compute their entropies on a
# tenth of each batch's rows (frac_per_sample_entropy): the codebook entropy is N x 2**14 per
# step, 6-7x the step's time on all rows (benchmarks/lfq_vqvae_probe.py, docs/quantizers.md).
CONFIGS = {
    "vq-1024": ("vq", {"codebook_size": 1024}, ""),
    "fsq-1000": ("fsq", {"quantizer": "fsq", "vq_kwargs": {"levels": [8, 5, 5, 5]}}, ""),
    "lfq-1024": ("lfq", {"quantizer": "lfq", "codebook_size": 2**10}, ""),
    "vq-16384": ("vq", {"codebook_size": 16384}, ""),
    "lfq-16384": (
        "lfq",
        {"quantizer": "lfq", "codebook_size": 2**14, "vq_kwargs": {"frac_per_sample_entropy": 0.1}},
        "entropies on 10% of rows",
    ),
    "bsq-16384": (
        "bsq",
        {"quantizer": "bsq", "codebook_size": 2**14, "vq_kwargs": {"frac_per_sample_entropy": 0.1}},
        "entropies on 10% of rows",
    ),
    "fsq-64000": (
        "fsq",
        {"quantizer": "fsq", "vq_kwargs": {"levels": [8, 8, 8, 5, 5, 5]}},
        "",
    ),  # fmt: skip
    "vq-65536": ("vq", {"codebook_size": 65536}, ""),
    # issue 27 item 5 (quantizers-ibq-2026-12-07.json): IBQ with SEED-Voken's weights, and
    # SimVQ, against the vq rows above
    "ibq-16384": ("ibq", {"quantizer": "ibq", "codebook_size": 2**14}, ""),
    "simvq-16384": ("simvq", {"quantizer": "simvq", "codebook_size": 2**14}, ""),
    "ibq-65536": ("ibq", {"quantizer": "ibq", "codebook_size": 2**16}, ""),
    # issue 27's collapse (docs/ibq.md, "Why it collapsed"): the same with codes drawn at
    # std 0.1 (IBQ's init_scale), so the entropy softmax at 0.01 reaches every code
    "ibq-init0.1-16384": (
        "ibq-init0.1",
        {"quantizer": "ibq", "codebook_size": 2**14, "vq_kwargs": {"init_scale": 0.1}},
        "codes N(0, 0.1^2)",
    ),
    "ibq-init0.1-65536": (
        "ibq-init0.1",
        {"quantizer": "ibq", "codebook_size": 2**16, "vq_kwargs": {"init_scale": 0.1}},
        "codes N(0, 0.1^2)",
    ),
    # 0.1 left seed 2 collapsed at 2**16 (its entropy softmax saturated again): smaller codes
    "ibq-init0.03-65536": (
        "ibq-init0.03",
        {"quantizer": "ibq", "codebook_size": 2**16, "vq_kwargs": {"init_scale": 0.03}},
        "codes N(0, 0.03^2)",
    ),
}
QUICK_MODEL = {"hidden": 8, "res_hidden": 4, "n_res": 1}


def worker(name: str, seed: int, steps: int, batch_size: int, data_dir, quick: bool) -> dict:
    """Train and evaluate one configuration in this process; the run's result row."""
    import torch

    from fastvq.app import metrics as M
    from fastvq.app import recipes as R
    from fastvq.app.checkpoint import build
    from fastvq.app.data import load_dataset, to_float
    from fastvq.app.loop import fit
    from fastvq.app.rng import seed_everything

    torch.set_num_threads(1)
    ds = load_dataset("fashion-mnist", data_dir)
    family, fields, note = CONFIGS[name]
    cfg = R.model_config("vqvae", ds, **fields, **(QUICK_MODEL if quick else {}))
    seed_everything(seed)  # before building: the initial weights belong to the seed
    model = build("vqvae", cfg)
    meta = fit(model, "vqvae", ds.train.images, ds.train.labels, steps=steps,
               batch_size=batch_size, seed=seed, desc=f"{name} seed {seed}")  # fmt: skip
    model.eval()
    t0 = time.perf_counter()
    mse, codes = [], []
    with torch.no_grad():
        for i in range(0, len(ds.test), 500):
            x = to_float(ds.test.images[i : i + 500])
            quantized, indices, _ = model.encode(x)
            mse.append(M.mse_psnr(x, model.decode(quantized))[0])
            codes.append(indices)
    usage = M.code_usage(torch.cat(codes), model.cfg.codebook_size)
    return {
        "config": name,
        "family": family,
        "codebook_size": model.cfg.codebook_size,
        "note": note,
        "seed": seed,
        "test_images": len(ds.test),
        "test_mse": float(torch.cat(mse).mean()),
        "codes_used": usage["used"],
        "usage_fraction": usage["used_fraction"],
        "perplexity": usage["perplexity"],
        "train_seconds": meta["train_seconds"],
        "seconds_per_step": meta["train_seconds"] / steps,
        "eval_seconds": time.perf_counter() - t0,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "last_train_logs": meta["last_train_logs"],
    }


def _git_commit() -> str | None:
    from benchmarks._stamp import git_commit

    return git_commit(ROOT)


def run_all(args) -> dict:
    """Every (configuration, seed) not yet in ``args.out``, each in a fresh process."""
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else None
    settings = {"steps": args.steps, "batch_size": args.batch_size, "lr": 1e-3, "threads": 1}
    if doc is None or doc.get("settings") != settings:
        doc = {
            "command": shlex.join(["python", "-m", "benchmarks.quantizer_compare", *sys.argv[1:]]),
            "machine": MACHINE,
            "date": time.strftime("%Y-%m-%d"),
            "commit": _git_commit(),
            "settings": settings,
            "quick": args.quick,
            "runs": [],
        }
    done = {(r["config"], r["seed"]) for r in doc["runs"]}
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=str(ROOT))
    for seed in args.seeds:
        for name in args.configs:
            if (name, seed) in done:
                continue
            cmd = [sys.executable, "-m", "benchmarks.quantizer_compare", "--worker", name,
                   "--seed", str(seed), "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size)]  # fmt: skip
            if args.data_dir:
                cmd += ["--data-dir", str(args.data_dir)]
            if args.quick:
                cmd.append("--quick")
            run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            if run.returncode != 0:
                sys.exit(f"{name} seed {seed} failed:\n{run.stderr[-3000:]}")
            row = dict(json.loads(run.stdout.strip().splitlines()[-1]), commit=_git_commit())
            doc["runs"].append(row)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(doc, indent=1) + "\n")
            print(
                f"{name} seed {seed}: mse {row['test_mse']:.5f} used {row['codes_used']} "
                f"ppl {row['perplexity']:.1f} {row['train_seconds']:.1f}s",
                flush=True,
            )
    return doc


# ---------------------------------------------------------------- table and plot


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(doc: dict) -> list[dict]:
    """One row per configuration (in :data:`CONFIGS` order): means, spreads, per-seed values."""
    rows = []
    for name in [n for n in CONFIGS if any(r["config"] == n for r in doc["runs"])]:
        runs = sorted((r for r in doc["runs"] if r["config"] == name), key=lambda r: r["seed"])
        row = {"config": name, "family": runs[0]["family"], "K": runs[0]["codebook_size"],
               "note": runs[0]["note"], "seeds": [r["seed"] for r in runs]}  # fmt: skip
        for key in ("test_mse", "codes_used", "usage_fraction", "perplexity",
                    "seconds_per_step", "peak_rss_mib"):  # fmt: skip
            row[key] = [r[key] for r in runs]
        rows.append(row)
    return rows


def table(doc: dict) -> str:
    """The markdown table of ``doc`` (mean ± sd over seeds; per-seed MSE), with its stamp."""
    s = doc["settings"]
    lines = [
        f"Command: `{doc['command']}`; {doc['machine']}; {doc['date']}; commit "
        f"{', '.join(sorted({r.get('commit') or doc['commit'] or '?' for r in doc['runs']}))}; "
        f"{s['steps']} steps of batch {s['batch_size']} (Adam, lr {s['lr']}), {s['threads']} "
        f"thread, evaluated on all {doc['runs'][0]['test_images']} test images.",
        "",
        "| quantizer | K | seeds | test MSE (mean ± sd) | MSE per seed | codes used | usage "
        "| perplexity | s/step | peak RSS MiB | note |",
        "|---|---:|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in summarize(doc):
        mse, mse_sd = _mean_sd(r["test_mse"])
        used, used_sd = _mean_sd(r["codes_used"])
        frac, _ = _mean_sd(r["usage_fraction"])
        ppl, ppl_sd = _mean_sd(r["perplexity"])
        step = statistics.median(r["seconds_per_step"])
        per_seed = " / ".join(f"{v:.4f}" for v in r["test_mse"])
        lines.append(
            f"| {r['config']} | {r['K']} | {','.join(map(str, r['seeds']))} | {mse:.4f} ± "
            f"{mse_sd:.4f} | {per_seed} | {used:.0f} ± {used_sd:.0f} | {100 * frac:.1f}% | "
            f"{ppl:.0f} ± {ppl_sd:.0f} | {step:.3f} | {max(r['peak_rss_mib']):.0f} | "
            f"{r['note']} |"
        )
    return "\n".join(lines) + "\n"


MARKS = "o^sD"  # one marker per results file in a plot (each its own steps and batch)


def plot(docs: list[dict], path: Path) -> None:
    """Test MSE, usage over the test set and perplexity against codebook size: one point per
    run, one colour per family, one marker shape per results file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    colours = {"vq": "tab:blue", "fsq": "tab:orange", "lfq": "tab:green", "bsq": "tab:red",
               "ibq": "tab:purple", "simvq": "tab:brown", "ibq-init0.1": "tab:pink",
               "ibq-init0.03": "tab:olive"}  # fmt: skip
    keys = ("test_mse", "usage_fraction", "perplexity")
    for i, doc in enumerate(docs):
        s = doc["settings"]
        for family, colour in colours.items():
            runs = [r for r in doc["runs"] if r["family"] == family]
            if not runs:
                continue
            label = family + (f", {s['steps']} x {s['batch_size']}" if len(docs) > 1 else "")
            k = [r["codebook_size"] for r in runs]
            for ax, key in zip(axes, keys, strict=True):
                ax.scatter(k, [r[key] for r in runs], c=colour, marker=MARKS[i % len(MARKS)],
                           label=label, s=18)  # fmt: skip
    for ax, ylabel in zip(axes, ("test MSE", "codes used / K", "perplexity"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("codebook size K")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    steps = ", ".join(f"{d['settings']['steps']} steps x batch {d['settings']['batch_size']}"
                      for d in docs)  # fmt: skip
    fig.suptitle(f"Fashion-MNIST VQ-VAE, {steps}, {docs[0]['date']}, {docs[0]['machine']}",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_doc(docs: list[dict], doc_path: Path, marker: str = "quantizer-table",
              plot_path: Path | None = None) -> None:  # fmt: skip
    """Put the :func:`table` of each of ``docs`` between the ``<!-- marker:start/end -->``
    comments of ``doc_path``, and the plot at ``plot_path`` (default: the doc's name, .png)."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    text = doc_path.read_text()
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    if not rest:
        raise SystemExit(f"{doc_path}: no {start} ... {end} markers")
    tables = "\n".join(table(d) for d in docs)
    doc_path.write_text(f"{head}{start}\n{tables}{end}{tail}")
    plot(docs, plot_path or doc_path.with_suffix(".png"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="the results JSON (rewritten after each run)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder (default: system)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny: synthetic data, a narrow model, 2 steps, 1 seed")  # fmt: skip
    ap.add_argument("--table", nargs="+", default=None,
                    help="print the table of these results JSONs")  # fmt: skip
    ap.add_argument("--doc", default=None, help="with --table: write it (and the plot) here")
    ap.add_argument("--marker", default="quantizer-table",
                    help="with --doc: the table's place, <!-- MARKER:start/end -->")  # fmt: skip
    ap.add_argument("--plot", default=None, help="with --doc: the plot's path (default: DOC.png)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.seed, args.steps, args.batch_size,
                                args.data_dir, args.quick)))  # fmt: skip
        return 0
    if args.table:
        docs = [json.loads(Path(t).read_text()) for t in args.table]
        if args.doc:
            write_doc(docs, Path(args.doc), args.marker, args.plot and Path(args.plot))
        print("\n".join(table(d) for d in docs), end="")
        return 0
    if args.out is None:
        ap.error("--out is required (or --table)")
    with tempfile.TemporaryDirectory(prefix="fastvq-quantizers-") as tmp:
        if args.quick:
            from fastvq.app.data import write_synthetic_dataset

            args.steps, args.batch_size, args.seeds = 2, 8, args.seeds[:1]
            if args.data_dir is None:
                args.data_dir = str(write_synthetic_dataset(tmp, n_train=32, n_test=16))
        doc = run_all(args)
    print(table(doc), end="")
    return 0 if math.isfinite(sum(r["test_mse"] for r in doc["runs"])) else 1


if __name__ == "__main__":
    sys.exit(main())
