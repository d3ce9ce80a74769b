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

from .data import DATASETS, DataNotFoundError, IDXError, load_dataset
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
    g = p.add_argument_group("vector quantizer (unset = the layer's defaults)")
    g.add_argument("--codebook-size", type=int, default=256, help="K (default 256)")
    g.add_argument("--dim", type=int, default=16, help="encoder output channels fed to the layer")
    g.add_argument(
        "--codebook-dim",
        type=int,
        default=None,
        help="project to this dim before the search (layer option)",
    )
    g.add_argument("--beta", type=float, default=0.25, help="commitment weight")
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
    return {k: getattr(args, k) for k in VQ_OPTIONS if getattr(args, k, None) is not None}


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
    t.add_argument("--latent-dim", type=int, default=16, help="ae/vae latent size")
    t.add_argument("--hidden", type=int, default=None, help="conv width (model default if unset)")
    t.add_argument("--vqvae", default=None, help="pixelcnn: the VQ-VAE run directory")
    t.add_argument("--channels", type=int, default=32, help="pixelcnn width")
    t.add_argument("--layers", type=int, default=6, help="pixelcnn gated layers")
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
    d.add_argument("--codebook-size", type=int, default=256)
    d.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None)
    _add_common(d)
    return ap


def _total_steps(args, n_train: int) -> int:
    if args.steps is not None:
        return args.steps
    epochs = 2.0 if args.epochs is None else args.epochs
    return max(1, math.ceil(epochs * n_train / args.batch_size))


def cmd_train(args) -> dict:
    from . import train as T

    torch.manual_seed(args.seed)
    ds = load_dataset(args.dataset, args.data_dir, prefix=args.data_prefix)
    out = Path(args.out or f"runs/{args.kind}")
    with T.run_lock(out):  # one writer per run directory, from the resume read to the last save
        return _train_locked(args, ds, out)


def _train_locked(args, ds, out: Path) -> dict:
    from . import train as T
    from .models import AEConfig, PixelCNNConfig, VAEConfig, VQVAEConfig

    C, H, _ = ds.image_shape
    steps = _total_steps(args, len(ds.train))
    test, dev, lim = ds.test, args.device, args.eval_limit
    hidden = {} if args.hidden is None else {"hidden": args.hidden}
    common = dict(
        steps=steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=dev,
        eval_every=args.eval_every,
        run_dir=out,
        resume=args.resume,
        meta={"dataset": ds.name, "data_dir": args.data_dir},
    )
    resume_cfg = None
    if args.resume and T.checkpoint_dir(out) is not None:
        resume_cfg = T.read_meta(out)["config"]

    if args.kind in ("ae", "vae"):
        cfg_cls = AEConfig if args.kind == "ae" else VAEConfig
        cfg = resume_cfg or vars(
            cfg_cls(in_channels=C, image_size=H, latent_dim=args.latent_dim, **hidden)
        )
        model = T.build(args.kind, cfg)
        ev = (
            (lambda m: T.eval_recon(m, test, dev, limit=lim))
            if args.kind == "ae"
            else (lambda m: T.eval_vae(m, test, dev, limit=lim))
        )
        meta = T.fit(model, args.kind, ds.train.images, ds.train.labels, evaluate=ev, **common)
        if args.kind == "ae":  # latent statistics, for `fastvq sample` on an AE
            from .data import to_float
            from .metrics import batched

            with torch.no_grad():
                z = batched(
                    lambda b: model.encode(to_float(b).to(dev)).cpu(), ds.train.images[:10000]
                )
            meta["latent_mean"], meta["latent_std"] = z.mean(0).tolist(), z.std(0).tolist()
            T.save_run(out, model, "ae", meta)
    elif args.kind == "vqvae":
        var = float(ds.train.images[:10000].float().div(255).var())
        cfg = resume_cfg or dict(
            vars(
                VQVAEConfig(
                    in_channels=C,
                    codebook_size=args.codebook_size,
                    dim=args.dim,
                    beta=args.beta,
                    data_variance=var,
                    **hidden,
                )
            ),
            vq_kwargs=vq_kwargs_from_args(args),
        )
        model = T.build("vqvae", cfg)
        meta = T.fit(
            model,
            "vqvae",
            ds.train.images,
            ds.train.labels,
            evaluate=lambda m: T.eval_vqvae(m, test, dev, limit=lim),
            **common,
        )
    else:  # pixelcnn
        if args.vqvae is None:
            raise SystemExit("fastvq train pixelcnn needs --vqvae RUN_DIR (a trained VQ-VAE)")
        vqvae, _ = T.load_run(args.vqvae, dev)
        train_codes = T.encode_codes(vqvae, ds.train.images, dev, desc="encode train codes")
        test_codes = T.encode_codes(vqvae, test.images[:lim] if lim else test.images, dev)
        test_labels = test.labels[: test_codes.shape[0]] if args.conditional else None
        cfg = resume_cfg or vars(
            PixelCNNConfig(
                num_codes=vqvae.cfg.codebook_size,
                channels=args.channels,
                n_layers=args.layers,
                num_classes=ds.num_classes if args.conditional else None,
            )
        )
        model = T.build("pixelcnn", cfg)
        import os

        common["meta"].update(
            vqvae=os.path.relpath(Path(args.vqvae), out), code_shape=list(train_codes.shape[1:])
        )
        meta = T.fit(
            model,
            "pixelcnn",
            train_codes,
            ds.train.labels,
            prepare=lambda c: c,
            conditional=args.conditional,
            evaluate=lambda m: T.eval_prior(m, test_codes, test_labels, dev),
            **common,
        )
    print(json.dumps({"run": str(out), "step": meta["step"], **meta.get("metrics", {})}))
    return meta


def cmd_sample(args) -> Path:
    from . import train as T
    from .demo import save_panels

    model, meta = T.load_run(args.run, args.device)
    g = torch.Generator().manual_seed(args.seed)
    kind = meta["kind"]
    with torch.no_grad():
        if kind == "vae":
            images = model.sample(args.n, generator=g)
        elif kind == "ae":
            if "latent_mean" not in meta:
                raise SystemExit(f"{args.run}: AE run without latent statistics; retrain it")
            mu, sd = torch.tensor(meta["latent_mean"]), torch.tensor(meta["latent_std"])
            images = model.decode(
                (mu + sd * torch.randn(args.n, mu.numel(), generator=g)).to(args.device)
            )
        elif kind == "pixelcnn":
            vq_dir = Path(args.run) / meta["vqvae"]
            vqvae, _ = T.load_run(vq_dir, args.device)
            y = None
            if model.cfg.num_classes:
                label = 0 if args.label is None else args.label
                y = torch.full((args.n,), label, dtype=torch.long, device=args.device)
            codes = model.sample(
                args.n, tuple(meta["code_shape"]), y=y, temperature=args.temperature, generator=g
            )
            images = vqvae.decode_indices(codes)
        else:
            raise SystemExit(
                f"cannot sample from a {kind} run: use a vae, ae or pixelcnn run "
                "(a VQ-VAE needs a prior: `fastvq train pixelcnn --vqvae RUN`)"
            )
    out = Path(args.out or Path(args.run) / "samples.png")
    save_panels(out, [(f"{kind} samples", images.cpu())], nrow=8)
    print(out)
    return out


def cmd_demo(args) -> dict:
    from .demo import run_demo

    vq = {} if args.ema is None else {"ema": args.ema}
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
        vq_kwargs=vq,
        codebook_size=args.codebook_size,
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
