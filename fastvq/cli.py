"""The ``fastvq`` command line: ``train {ae,vae,vqvae,pixelcnn}``, ``sample``, ``demo``.

Examples::

    fastvq demo                                  # ~10 min on 2 CPU cores -> runs/demo/
    fastvq demo --quick                          # ~1-2 min smoke version
    fastvq train vqvae --out runs/vqvae --codebook-size 512 --ema
    fastvq train pixelcnn --vqvae runs/vqvae --out runs/prior
    fastvq sample runs/prior -n 64 --out samples.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from . import recipes as R
from . import train as T
from .data import DATASETS, DataNotFoundError, IDXError, load_dataset
from .figures import save_panels
from .models import AEConfig, PixelCNNConfig, VQVAEConfig
from .train import CheckpointError, RunLockedError


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and run")
    g.add_argument("--dataset", default="fashion-mnist", choices=sorted(DATASETS))
    g.add_argument(
        "--data-dir",
        default=None,
        help="folder with the IDX files (or torchvision's <dir>/<Name>/raw/); default: "
        "$FASTVQ_DATA_DIR, then /usr/share/datasets/<dataset>/",
    )
    g.add_argument("--data-prefix", default=None, help="file prefix, e.g. emnist-balanced-")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; 1 is faster on an oversubscribed box)",
    )


def _add_vq_options(p: argparse.ArgumentParser) -> None:
    """The VQ-VAE's options, for ``train vqvae`` and ``demo``."""
    g = p.add_argument_group(
        "VQ-VAE and its vector quantizer (unset = the model's/layer's defaults)"
    )
    g.add_argument(
        "--codebook-size", type=int, default=None, help=f"K (default {VQVAEConfig.codebook_size})"
    )
    g.add_argument(
        "--dim",
        type=int,
        default=None,
        help=f"encoder output channels fed to the layer (default {VQVAEConfig.dim})",
    )
    g.add_argument(
        "--codebook-dim",
        type=int,
        default=None,
        help="project to this dim before the search (layer option)",
    )
    g.add_argument(
        "--beta", type=float, default=None, help=f"commitment weight (default {VQVAEConfig.beta})"
    )
    g.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="EMA codebook updates (the layer's default); --no-ema: codebook by gradient",
    )
    g.add_argument("--decay", type=float, default=None, help="EMA decay")
    g.add_argument(
        "--kmeans-init",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="initialise the codebook by k-means on the first training batch",
    )
    g.add_argument("--kmeans-iters", type=int, default=None, help="Lloyd iterations of it")
    g.add_argument(
        "--dead-code-steps",
        type=int,
        default=None,
        help="re-seed a code unused for this many training steps (0 = never)",
    )
    g.add_argument(
        "--cosine",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="cosine-similarity codebook (l2-normalised inputs and codes)",
    )


# CLI options passed as-is to fastvq.VectorQuantizer; unset ones keep the layer's defaults
VQ_OPTIONS = (
    "codebook_dim",
    "ema",
    "decay",
    "kmeans_init",
    "kmeans_iters",
    "dead_code_steps",
    "cosine",
)


def vq_kwargs_from_args(args) -> dict:
    """The layer options set on the command line (:data:`VQ_OPTIONS`), for ``vq_kwargs``."""
    return {k: getattr(args, k) for k in VQ_OPTIONS if getattr(args, k, None) is not None}


def vqvae_options(args) -> dict:
    """The VQ-VAE config fields given on the command line; None keeps the model's default."""
    return {
        "codebook_size": args.codebook_size,
        "dim": args.dim,
        "beta": args.beta,
        "vq_kwargs": vq_kwargs_from_args(args),
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fastvq",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one model into a run directory")
    t.add_argument("kind", choices=["ae", "vae", "vqvae", "pixelcnn"])
    t.add_argument("--out", default=None, help="run directory (default runs/<kind>)")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 2 epochs)")
    t.add_argument("--epochs", type=float, default=None, help="epochs, instead of --steps")
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--eval-every", type=int, default=500, help="evaluate + checkpoint every N")
    t.add_argument("--eval-limit", type=int, default=None, help="test images for evaluation")
    t.add_argument("--resume", action="store_true", help="continue from the run directory")
    t.add_argument(
        "--latent-dim",
        type=int,
        default=None,
        help=f"ae/vae latent size (default {AEConfig.latent_dim})",
    )
    t.add_argument("--hidden", type=int, default=None, help="conv width (model default if unset)")
    t.add_argument("--vqvae", default=None, help="pixelcnn: the VQ-VAE run directory")
    t.add_argument(
        "--channels",
        type=int,
        default=None,
        help=f"pixelcnn width (default {PixelCNNConfig.channels})",
    )
    t.add_argument(
        "--layers",
        type=int,
        default=None,
        help=f"pixelcnn gated layers (default {PixelCNNConfig.n_layers})",
    )
    t.add_argument("--conditional", action="store_true", help="pixelcnn: condition on the class")
    _add_common(t)
    _add_vq_options(t)

    s = sub.add_parser("sample", help="draw samples from a trained run into a PNG grid")
    s.add_argument("run", help="run directory of a vae, ae or pixelcnn run")
    s.add_argument("-n", type=int, default=64)
    s.add_argument("--out", default=None, help="PNG path (default <run>/samples.png)")
    s.add_argument("--label", type=int, default=None, help="class for a conditional pixelcnn")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--device", default="cpu")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    d = sub.add_parser("demo", help="train AE, VAE, VQ-VAE + PixelCNN and write a report")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--quick", action="store_true", help="~1-2 minute smoke version")
    d.add_argument(
        "--epochs",
        type=float,
        default=None,
        help="epochs for each of the four models (overrides the default steps)",
    )
    d.add_argument("--scale", type=float, default=1.0, help="multiply every model's steps")
    d.add_argument(
        "--cache-dir",
        default=None,
        help="where the feature classifier is cached (default ~/.cache/fastvq)",
    )
    _add_common(d)
    _add_vq_options(d)
    return ap


def _total_steps(args, n_train: int) -> int:
    if args.steps is not None:
        return args.steps
    epochs = 2.0 if args.epochs is None else args.epochs
    return max(1, math.ceil(epochs * n_train / args.batch_size))


def cmd_train(args) -> dict:
    """``fastvq train KIND``: one stage of :mod:`fastvq.recipes` into its run directory."""
    T.seed_everything(args.seed)
    ds = load_dataset(args.dataset, args.data_dir, prefix=args.data_prefix)
    out = Path(args.out or f"runs/{args.kind}")
    with T.run_lock(out):  # one writer per run directory, from the resume read to the last save
        return _train_locked(args, ds, out)


def _train_locked(args, ds, out: Path) -> dict:
    fit = dict(
        steps=_total_steps(args, len(ds.train)),
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        eval_every=args.eval_every,
        resume=args.resume,
        meta={"dataset": ds.name, "data_dir": args.data_dir},
    )
    resume_cfg = None
    if args.resume and T.checkpoint_dir(out) is not None:
        resume_cfg = T.read_meta(out)["config"]
    if args.kind != "pixelcnn":
        model = T.build(
            args.kind, resume_cfg or R.model_config(args.kind, ds, **_options(args, ds))
        )
        meta = R.train_images(args.kind, model, ds, out, eval_limit=args.eval_limit, **fit)
    else:
        if args.vqvae is None:
            raise SystemExit("fastvq train pixelcnn needs --vqvae RUN_DIR (a trained VQ-VAE)")
        vqvae, _ = T.load_run(args.vqvae, args.device)
        codes = R.encode_dataset(vqvae, ds, args.device, test_limit=args.eval_limit)
        options = dict(_options(args, ds), num_codes=vqvae.cfg.codebook_size)
        model = T.build("pixelcnn", resume_cfg or R.model_config("pixelcnn", ds, **options))
        meta = R.train_prior(model, codes, ds, out, args.vqvae, conditional=args.conditional, **fit)
    print(json.dumps({"run": str(out), "step": meta["step"], **meta.get("metrics", {})}))
    return meta


def _options(args, ds) -> dict:
    """The config fields of ``args.kind``'s model given on the command line (None: default)."""
    if args.kind in ("ae", "vae"):
        return {"latent_dim": args.latent_dim, "hidden": args.hidden}
    if args.kind == "vqvae":
        return {"hidden": args.hidden, **vqvae_options(args)}
    classes = ds.num_classes if args.conditional else None
    return {"channels": args.channels, "n_layers": args.layers, "num_classes": classes}


def cmd_sample(args) -> Path:
    """``fastvq sample RUN``: a PNG grid of samples from a vae, ae or pixelcnn run."""
    model, meta = T.load_run(args.run, args.device)
    g = torch.Generator().manual_seed(args.seed)
    kind = meta["kind"]
    if kind == "vae":
        images = R.sample_vae(model, args.n, g)
    elif kind == "ae":
        if "latent_mean" not in meta:
            raise SystemExit(f"{args.run}: AE run without latent statistics; retrain it")
        images = R.sample_ae(model, meta, args.n, g, args.device)
    elif kind == "pixelcnn":
        vqvae, _ = T.load_run(Path(args.run) / meta["vqvae"], args.device)
        y = None
        if model.cfg.num_classes:
            label = 0 if args.label is None else args.label
            y = torch.full((args.n,), label, dtype=torch.long, device=args.device)
        shape = tuple(meta["code_shape"])
        images = R.sample_prior(
            model, vqvae, args.n, shape, g, args.device, y=y, temperature=args.temperature
        )
    else:
        raise SystemExit(
            f"cannot sample from a {kind} run: use a vae, ae or pixelcnn run "
            "(a VQ-VAE needs a prior: `fastvq train pixelcnn --vqvae RUN`)"
        )
    out = Path(args.out or Path(args.run) / "samples.png")
    save_panels(out, [(f"{kind} samples", images)], nrow=8)
    print(out)
    return out


def cmd_demo(args) -> dict:
    """``fastvq demo``: :func:`fastvq.demo.run_demo`, then print its ``summary.md``."""
    from .demo import run_demo

    r = run_demo(
        args.out,
        dataset=args.dataset,
        data_dir=args.data_dir,
        data_prefix=args.data_prefix,
        quick=args.quick,
        epochs=args.epochs,
        scale=args.scale,
        seed=args.seed,
        device=args.device,
        cache=args.cache_dir,
        **vqvae_options(args),
    )
    print((Path(args.out) / "summary.md").read_text())
    return r


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        {"train": cmd_train, "sample": cmd_sample, "demo": cmd_demo}[args.command](args)
    except (DataNotFoundError, IDXError, CheckpointError, RunLockedError) as e:
        print(f"fastvq: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
