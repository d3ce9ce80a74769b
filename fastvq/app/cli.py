"""The ``fastvq`` command line: ``train {ae,vae,vqvae,pixelcnn}``, ``sample``, ``demo``.

Every argument is checked before any work starts: a bad one exits with status 2 and one line
naming it. ``train`` checkpoints into its run directory; Ctrl-C saves a checkpoint of the last
complete step and exits with status 130, and ``--resume`` continues it bit-identically with the
run's own arguments.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

from ..models import AEConfig, PixelCNNConfig, VQVAEConfig
from . import recipes as R
from .checkpoint import (
    CheckpointError,
    RunLockedError,
    build,
    checkpoint_dir,
    load_run,
    read_meta,
    run_lock,
)
from .data import DATASETS, DataNotFoundError, IDXError, load_dataset
from .figures import save_panels
from .loop import TrainingInterrupted
from .rng import seed_everything

EXAMPLES = """\
examples:
  fastvq demo                                  # ~10 min on 2 idle CPU cores -> runs/demo/
  fastvq demo --quick                          # ~1-2 min smoke version
  fastvq train vqvae --out runs/vqvae --codebook-size 512
  fastvq train pixelcnn --vqvae runs/vqvae --out runs/prior
  fastvq train vqvae --out runs/vqvae --resume # after Ctrl-C: continue where it stopped
  fastvq sample runs/prior -n 64 --out samples.png

`fastvq COMMAND --help` lists a command's options and their defaults."""


class UsageError(Exception):
    """A command-line argument that cannot work; the message names it (exit status 2)."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks and appends each option's default to its help, unless
    the help states it already or there is none to show (None, or a flag's False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            "default" in text
            or not action.option_strings
            or action.default in (None, False, argparse.SUPPRESS)
        ):
            return text
        return f"{text} (default: %(default)s)".lstrip()


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error printed as one line (argparse prints the whole usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind, lo, *, strict=False, hi=None):
    """An argparse ``type``: ``kind`` (int or float) >= ``lo`` (> when ``strict``), < ``hi``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if not math.isfinite(value) or (value <= lo if strict else value < lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {lo}, got {text}")
        if hi is not None and value >= hi:
            raise argparse.ArgumentTypeError(f"must be < {hi}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


POSITIVE = _number(int, 1)
NON_NEGATIVE = _number(int, 0)
POSITIVE_FLOAT = _number(float, 0.0, strict=True)
NON_NEGATIVE_FLOAT = _number(float, 0.0)

# `train`'s run arguments: their parser default is None so that --resume can tell a given one
# (checked against the run) from an unset one (restored from the run); these are the defaults of
# a fresh run.
RUN_DEFAULTS = {
    "dataset": "fashion-mnist",
    "data_prefix": None,
    "batch_size": 128,
    "lr": 1e-3,
    "eval_every": 500,
    "eval_limit": None,
    "seed": 0,
}
# Where the run reads data and computes: restored by --resume unless given, and may change.
PLACE_DEFAULTS = {"data_dir": None, "device": "cpu"}


def _add_common(p: argparse.ArgumentParser, train: bool = False) -> None:
    """Data, device, seed and threads; for ``train`` their defaults live in RUN_DEFAULTS."""

    def default(name, value):
        return None if train else value

    g = p.add_argument_group("data and run")
    g.add_argument(
        "--dataset",
        default=default("dataset", "fashion-mnist"),
        choices=sorted(DATASETS),
        help="IDX data set (default: fashion-mnist)",
    )
    g.add_argument(
        "--data-dir",
        default=None,
        help="folder with the IDX files (or torchvision's DIR/<Name>/raw/); default: "
        "$FASTVQ_DATA_DIR, then /usr/share/datasets/<dataset>/",
    )
    g.add_argument("--data-prefix", default=None, help="file prefix, e.g. emnist-balanced-")
    g.add_argument("--device", default=default("device", "cpu"), help="torch device (default: cpu)")
    g.add_argument(
        "--seed",
        type=NON_NEGATIVE,
        default=default("seed", 0),
        help="seed of every random draw (default: 0)",
    )
    g.add_argument(
        "--threads",
        type=POSITIVE,
        default=None,
        help="torch CPU threads (default: torch's choice, or fewer when the load average "
        "says the machine is oversubscribed)",
    )


def _add_vq_options(p: argparse.ArgumentParser) -> None:
    """The VQ-VAE's options, for ``train vqvae`` and ``demo``."""
    g = p.add_argument_group(
        "VQ-VAE and its vector quantizer (unset: the model's and the layer's defaults)"
    )
    g.add_argument(
        "--codebook-size",
        type=POSITIVE,
        default=None,
        help=f"K (default: {VQVAEConfig.codebook_size})",
    )
    g.add_argument(
        "--dim",
        type=POSITIVE,
        default=None,
        help=f"encoder output channels fed to the layer (default: {VQVAEConfig.dim})",
    )
    g.add_argument(
        "--codebook-dim",
        type=POSITIVE,
        default=None,
        help="project to this dim before the search (default: no projection)",
    )
    g.add_argument(
        "--beta",
        type=NON_NEGATIVE_FLOAT,
        default=None,
        help=f"commitment weight (default: {VQVAEConfig.beta})",
    )
    g.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="EMA codebook updates; --no-ema: codebook by gradient (default: --ema)",
    )
    g.add_argument(
        "--decay",
        type=_number(float, 0.0, strict=True, hi=1.0),
        default=None,
        help=f"EMA decay (default: {_LAYER_DEFAULTS['decay']})",
    )
    g.add_argument(
        "--kmeans-init",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="initialise the codebook by k-means on the first training batch "
        "(default: --kmeans-init)",
    )
    g.add_argument(
        "--kmeans-iters",
        type=POSITIVE,
        default=None,
        help=f"Lloyd iterations of it (default: {_LAYER_DEFAULTS['kmeans_iters']})",
    )
    g.add_argument(
        "--dead-code-steps",
        type=NON_NEGATIVE,
        default=None,
        help="re-seed a code unused for this many training steps, 0 = never "
        f"(default: {_LAYER_DEFAULTS['dead_code_steps']})",
    )
    g.add_argument(
        "--cosine",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="cosine-similarity codebook: l2-normalised inputs and codes (default: --no-cosine)",
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


def _layer_defaults() -> dict:
    from ..layer import VectorQuantizer, resolve_simvq

    params = inspect.signature(VectorQuantizer).parameters
    out = {k: params[k].default for k in VQ_OPTIONS}
    # None in the signature: resolved by the layer (SimVQ turns them off); the CLI's are these
    out["ema"], out["kmeans_init"], out["dead_code_steps"] = resolve_simvq(
        False, out["ema"], out["kmeans_init"], out["dead_code_steps"]
    )
    return out


_LAYER_DEFAULTS = _layer_defaults()

# The model options each `train KIND` takes; any other one given is an error.
KIND_OPTIONS = {
    "ae": ("latent_dim", "hidden"),
    "vae": ("latent_dim", "hidden"),
    "vqvae": ("hidden", "codebook_size", "dim", "beta", *VQ_OPTIONS),
    "pixelcnn": ("vqvae", "channels", "layers", "conditional"),
}
MODEL_OPTIONS = tuple(dict.fromkeys(o for opts in KIND_OPTIONS.values() for o in opts))


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
    ap = _Parser(
        prog="fastvq",
        description="fastvq: train the AE, VAE, VQ-VAE and PixelCNN models, sample from them,\n"
        "or run the whole demo.",
        epilog=EXAMPLES,
        formatter_class=_Formatter,
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train one model into a run directory",
        description="Train one model into a run directory. It checkpoints at every evaluation,\n"
        "at the end and on Ctrl-C; --resume continues a run with its own arguments.",
        formatter_class=_Formatter,
    )
    t.add_argument("kind", choices=["ae", "vae", "vqvae", "pixelcnn"], help="the model to train")
    t.add_argument("--out", default=None, help="run directory (default: runs/KIND)")
    t.add_argument(
        "--steps", type=POSITIVE, default=None, help="optimizer steps in all (default: 2 epochs)"
    )
    t.add_argument("--epochs", type=POSITIVE_FLOAT, default=None, help="epochs, instead of --steps")
    t.add_argument(
        "--batch-size", type=POSITIVE, default=None, help="images per step (default: 128)"
    )
    t.add_argument(
        "--lr", type=POSITIVE_FLOAT, default=None, help="Adam learning rate (default: 0.001)"
    )
    t.add_argument(
        "--eval-every",
        type=NON_NEGATIVE,
        default=None,
        help="evaluate and checkpoint every N steps, 0 = only at the end (default: 500)",
    )
    t.add_argument(
        "--eval-limit",
        type=POSITIVE,
        default=None,
        help="test images used for evaluation (default: all)",
    )
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint, with its arguments; "
        "--steps/--epochs set a new end",
    )
    t.add_argument(
        "--latent-dim",
        type=POSITIVE,
        default=None,
        help=f"ae/vae latent size (default: {AEConfig.latent_dim})",
    )
    t.add_argument(
        "--hidden", type=POSITIVE, default=None, help="conv width (default: the model's)"
    )
    t.add_argument("--vqvae", default=None, help="pixelcnn: the VQ-VAE run directory (required)")
    t.add_argument(
        "--channels",
        type=POSITIVE,
        default=None,
        help=f"pixelcnn width (default: {PixelCNNConfig.channels})",
    )
    t.add_argument(
        "--layers",
        type=POSITIVE,
        default=None,
        help=f"pixelcnn gated layers (default: {PixelCNNConfig.n_layers})",
    )
    t.add_argument(
        "--conditional",
        action="store_true",
        default=None,
        help="pixelcnn: condition on the class",
    )
    _add_common(t, train=True)
    _add_vq_options(t)

    s = sub.add_parser(
        "sample",
        help="draw samples from a trained run into a PNG grid",
        description="Draw samples from a vae, ae or pixelcnn run into a PNG grid.",
        formatter_class=_Formatter,
    )
    s.add_argument("run", help="run directory of a vae, ae or pixelcnn run")
    s.add_argument("-n", type=POSITIVE, default=64, help="number of samples")
    s.add_argument("--out", default=None, help="PNG path (default: RUN/samples.png)")
    s.add_argument(
        "--label",
        type=NON_NEGATIVE,
        default=None,
        help="class for a conditional pixelcnn (default: 0)",
    )
    s.add_argument("--temperature", type=POSITIVE_FLOAT, default=1.0, help="pixelcnn sampling")
    s.add_argument("--device", default="cpu", help="torch device")
    s.add_argument("--seed", type=NON_NEGATIVE, default=0)
    s.add_argument("--threads", type=POSITIVE, default=None, help="torch CPU threads")

    d = sub.add_parser(
        "demo",
        help="train AE, VAE, VQ-VAE + PixelCNN and write a report",
        description="Train the feature classifier, an AE, a VAE, a VQ-VAE and a PixelCNN prior\n"
        "on one data set, then write figures, metrics.json and summary.md into --out.",
        formatter_class=_Formatter,
    )
    d.add_argument("--out", default="runs/demo", help="report folder")
    d.add_argument("--quick", action="store_true", help="~1-2 minute smoke version")
    d.add_argument(
        "--epochs",
        type=POSITIVE_FLOAT,
        default=None,
        help="epochs for each of the four models (default: the demo's fixed steps)",
    )
    d.add_argument("--scale", type=POSITIVE_FLOAT, default=1.0, help="multiply every model's steps")
    d.add_argument(
        "--cache-dir",
        default=None,
        help="where the feature classifier is cached (default: $FASTVQ_CACHE or ~/.cache/fastvq)",
    )
    _add_common(d)
    _add_vq_options(d)
    return ap


# ---------------------------------------------------------------- checks before any work


def _check_writable_dir(path: Path, arg: str) -> None:
    """Create ``path`` if needed and write a probe file into it, so that a bad ``arg`` fails
    now rather than after training."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".fastvq-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"argument {arg}: cannot write to {path}: {e.strerror or e}") from None


def _run_meta(path: Path, arg: str) -> dict:
    """``run.json`` of the run directory ``path`` given as ``arg``; UsageError if there is none
    (a damaged one raises CheckpointError, also exit status 2)."""
    if not path.is_dir():
        raise UsageError(f"argument {arg}: {path} does not exist")
    if checkpoint_dir(path) is None:
        raise UsageError(f"argument {arg}: {path} holds no checkpoint (not a fastvq run)")
    return read_meta(path)


def _config_value(dest: str, cfg: dict):
    """The value the run's model config holds for the CLI option ``dest``."""
    if dest == "layers":
        return cfg.get("n_layers")
    if dest == "conditional":
        return cfg.get("num_classes") is not None
    if dest in VQ_OPTIONS:
        return cfg.get("vq_kwargs", {}).get(dest, _LAYER_DEFAULTS[dest])
    return cfg.get(dest)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _prepare_train(args) -> None:
    """Check every ``train`` argument and resolve the run arguments (from ``RUN_DEFAULTS``, or
    from the run being resumed); raise UsageError naming the first bad one."""
    for dest in MODEL_OPTIONS:
        if getattr(args, dest) is not None and dest not in KIND_OPTIONS[args.kind]:
            raise UsageError(f"argument {_flag(dest)}: not an option of `fastvq train {args.kind}`")
    if args.steps is not None and args.epochs is not None:
        raise UsageError("argument --epochs: give --steps or --epochs, not both")
    args.out = Path(args.out or f"runs/{args.kind}")
    args.resume_meta = None
    if args.resume:
        _resolve_resume(args)
    for k, v in {**RUN_DEFAULTS, **PLACE_DEFAULTS}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.kind == "pixelcnn":
        args.conditional = bool(args.conditional)
        if args.vqvae is None:
            raise UsageError("argument --vqvae: `fastvq train pixelcnn` needs a VQ-VAE run")
        kind = _run_meta(Path(args.vqvae), "--vqvae").get("kind")
        if kind != "vqvae":
            raise UsageError(f"argument --vqvae: {args.vqvae} is a {kind} run, not a vqvae run")
    _check_writable_dir(args.out, "--out")


def _resolve_resume(args) -> None:
    """``--resume``: the run must exist and be of this kind; every run argument not given is
    taken from it, and a given one must agree with it."""
    out = args.out
    if not out.is_dir():
        raise UsageError(
            f"argument --resume: {out} does not exist, so there is nothing to resume "
            "(drop --resume to start a new run)"
        )
    if checkpoint_dir(out) is None:
        raise UsageError(
            f"argument --resume: {out} holds no checkpoint yet, so there is nothing to resume "
            "(drop --resume to start a new run)"
        )
    meta = read_meta(out)
    if meta.get("kind") != args.kind:
        raise UsageError(
            f"argument --resume: {out} is a {meta.get('kind')} run, not {args.kind} "
            f"(`fastvq train {meta.get('kind')} --out {out} --resume` continues it)"
        )
    # runs saved before run.json recorded "args" hold some of them at the top level
    saved = meta.get("args") or {
        k: meta[k] for k in ("dataset", "data_dir", "batch_size", "lr", "seed") if k in meta
    }

    def conflict(flag, given, had):
        raise UsageError(
            f"argument {flag}: {given} conflicts with the run being resumed ({out} was trained "
            f"with {flag} {had}); drop {flag} to keep the run's value, or train into a new --out"
        )

    for k in RUN_DEFAULTS:
        given = getattr(args, k)
        if k not in saved:
            continue
        if given is not None and given != saved[k]:
            conflict(_flag(k), given, saved[k])
        setattr(args, k, saved[k])
    for k in PLACE_DEFAULTS:  # where the data and the compute are may change between sessions
        if getattr(args, k) is None and k in saved:
            setattr(args, k, saved[k])
    cfg = meta.get("config", {})
    for dest in KIND_OPTIONS[args.kind]:
        given = getattr(args, dest)
        if dest == "vqvae":
            had = os.path.normpath(out / meta["vqvae"]) if "vqvae" in meta else None
            if given is not None and had is not None:
                if os.path.realpath(given) != os.path.realpath(had):
                    conflict("--vqvae", given, had)
            args.vqvae = given or had
            continue
        had = _config_value(dest, cfg)
        if given is not None and given != had:
            conflict(_flag(dest), given, had)
    args.conditional = bool(cfg.get("num_classes") is not None) if args.kind == "pixelcnn" else None
    if args.steps is None and args.epochs is None:
        args.steps = int(meta.get("steps", meta.get("step", 0)))
    if args.steps is not None and args.steps < int(meta.get("step", 0)):
        raise UsageError(
            f"argument --steps: {args.steps} is below the run's step {meta['step']}; "
            "resume to at least that step"
        )
    args.resume_meta = meta


def _prepare_sample(args) -> None:
    run = Path(args.run)
    meta = _run_meta(run, "run")
    kind = meta.get("kind")
    if kind not in ("vae", "ae", "pixelcnn"):
        raise UsageError(
            f"argument run: cannot sample from a {kind} run; use a vae, ae or pixelcnn run "
            "(a VQ-VAE needs a prior: `fastvq train pixelcnn --vqvae RUN`)"
        )
    if kind == "ae" and "latent_mean" not in meta:
        raise UsageError(f"argument run: {run} is an AE run without latent statistics; retrain it")
    if kind == "pixelcnn":
        _run_meta(run / meta.get("vqvae", ""), "run (its VQ-VAE run)")
        classes = meta.get("config", {}).get("num_classes")
        if args.label is not None and not classes:
            raise UsageError(f"argument --label: {run} is an unconditional prior")
        if args.label is not None and args.label >= classes:
            raise UsageError(f"argument --label: must be < {classes} (the run's classes)")
    elif args.label is not None:
        raise UsageError("argument --label: only a conditional pixelcnn run takes a label")
    args.out = Path(args.out) if args.out else run / "samples.png"
    if args.out.is_dir():
        raise UsageError(f"argument --out: {args.out} is a directory; give a PNG file path")
    _check_writable_dir(args.out.parent, "--out")


def auto_threads(cores: int | None = None, load: float | None = None) -> tuple[int, str | None]:
    """torch CPU threads for this machine and a note when they are fewer than torch's default.

    On a machine whose cores are busy with other jobs, each extra OpenMP thread waits for the
    slowest one at every op: the measured demo ran 3-4x slower with 2 threads than with 1 on a
    2-core box with load average 5-10. So use the cores the 1-minute load average leaves free,
    at least one.
    """
    default = torch.get_num_threads()
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (OSError, AttributeError):  # no load average on this platform
            return default, None
    n = max(1, min(default, math.floor(cores - load + 0.5)))
    if n >= default:
        return default, None
    return n, (
        f"fastvq: load average {load:.1f} on {cores} cores: using {n} torch thread"
        f"{'s' if n > 1 else ''} instead of {default} (--threads N to choose)"
    )


# ---------------------------------------------------------------- commands


def _total_steps(args, n_train: int) -> int:
    if args.steps is not None:
        return args.steps
    epochs = 2.0 if args.epochs is None else args.epochs
    return max(1, math.ceil(epochs * n_train / args.batch_size))


def cmd_train(args) -> dict:
    """``fastvq train KIND``: one stage of :mod:`fastvq.recipes` into its run directory."""
    seed_everything(args.seed)
    ds = load_dataset(args.dataset, args.data_dir, prefix=args.data_prefix)
    with run_lock(args.out):  # one writer per run directory, from the resume read to the last save
        return _train_locked(args, ds, args.out)


def _run_args(args, cfg: dict) -> dict:
    """What ``run.json`` records for ``--resume`` to restore: the run arguments, and the model
    options as the model's config ``cfg`` resolved them (the VQ-VAE run of a prior is recorded
    as ``run.json``'s ``vqvae``)."""
    run = {k: getattr(args, k) for k in (*RUN_DEFAULTS, *PLACE_DEFAULTS)}
    return {**run, **{k: _config_value(k, cfg) for k in KIND_OPTIONS[args.kind] if k != "vqvae"}}


def _train_locked(args, ds, out: Path) -> dict:
    steps = _total_steps(args, len(ds.train))
    if args.resume_meta is not None and steps < args.resume_meta.get("step", 0):
        raise UsageError(f"argument --epochs: {steps} steps is below the run's step")
    fit = dict(
        steps=steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        eval_every=args.eval_every,
        resume=args.resume,
    )
    resume_cfg = args.resume_meta["config"] if args.resume_meta else None
    if args.kind != "pixelcnn":
        cfg = resume_cfg or R.model_config(args.kind, ds, **_options(args, ds))
        fit["meta"] = {"dataset": ds.name, "data_dir": args.data_dir, "args": _run_args(args, cfg)}
        model = build(args.kind, cfg)
        meta = R.train_images(args.kind, model, ds, out, eval_limit=args.eval_limit, **fit)
    else:
        vqvae, _ = load_run(args.vqvae, args.device)
        codes = R.encode_dataset(vqvae, ds, args.device, test_limit=args.eval_limit)
        options = dict(_options(args, ds), num_codes=vqvae.cfg.codebook_size)
        cfg = resume_cfg or R.model_config("pixelcnn", ds, **options)
        fit["meta"] = {"dataset": ds.name, "data_dir": args.data_dir, "args": _run_args(args, cfg)}
        model = build("pixelcnn", cfg)
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
    model, meta = load_run(args.run, args.device)
    g = torch.Generator().manual_seed(args.seed)
    kind = meta["kind"]
    if kind == "vae":
        images = R.sample_vae(model, args.n, g)
    elif kind == "ae":
        images = R.sample_ae(model, meta, args.n, g, args.device)
    else:
        vqvae, _ = load_run(Path(args.run) / meta["vqvae"], args.device)
        y = None
        if model.cfg.num_classes:
            label = 0 if args.label is None else args.label
            y = torch.full((args.n,), label, dtype=torch.long, device=args.device)
        shape = tuple(meta["code_shape"])
        images = R.sample_prior(
            model, vqvae, args.n, shape, g, args.device, y=y, temperature=args.temperature
        )
    save_panels(args.out, [(f"{kind} samples", images)], nrow=8)
    print(args.out)
    return args.out


def cmd_demo(args) -> dict:
    """``fastvq demo``: :func:`fastvq.demo.run_demo`, then print its ``summary.md`` and where
    its outputs are."""
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
    out = Path(args.out)
    print((out / "summary.md").read_text())
    print(
        f"fastvq demo: wrote {out.resolve()}/: summary.md, metrics.json, reconstructions.png, "
        "samples.png, codebook_usage.png, and the run directories ae/ vae/ vqvae/ pixelcnn/ "
        f"(`fastvq sample {out / 'pixelcnn'}` draws more samples)"
    )
    return r


def _prepare(args) -> None:
    """Every check that can run before any work, per command."""
    if args.command == "train":
        _prepare_train(args)
    elif args.command == "sample":
        _prepare_sample(args)
    else:
        _check_writable_dir(Path(args.out), "--out")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _prepare(args)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        elif args.command in ("train", "demo"):
            n, note = auto_threads()
            if note:
                print(note, file=sys.stderr)
                torch.set_num_threads(n)
        {"train": cmd_train, "sample": cmd_sample, "demo": cmd_demo}[args.command](args)
    except (UsageError, DataNotFoundError, IDXError, CheckpointError, RunLockedError) as e:
        print(f"fastvq: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        if e.saved:
            print(
                f"fastvq: interrupted at step {e.step}/{e.steps}; saved a checkpoint in "
                f"{e.run_dir}. Continue with: fastvq train {e.kind} --out {e.run_dir} --resume",
                file=sys.stderr,
            )
        else:
            print(f"fastvq: interrupted at step {e.step}/{e.steps}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before training started: nothing to save
        print("\nfastvq: interrupted (nothing to save yet)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
