"""The ``fastvq`` command line: ``train {ae,vae,vqvae,pixelcnn}``, ``sample``, ``demo``.

Every argument is checked before any work starts: a bad one exits with status 2 and one line
naming it. ``train`` checkpoints into its run directory; Ctrl-C saves a checkpoint of the last
complete step and exits with status 130, and ``--resume`` continues it bit-identically with the
run's own arguments.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

from . import recipes as R
from .checkpoint import (
    CheckpointError,
    RunLockedError,
    build,
    check_unlocked,
    checkpoint_dir,
    load_run,
    missing_optimizer,
    read_meta,
    run_lock,
)
from .data import DataNotFoundError, IDXError, find_dataset, load_dataset
from .figures import save_panels
from .loop import TrainingInterrupted
from .parser import (
    FAMILY_OPTIONS,
    KIND_OPTIONS,
    MODEL_OPTIONS,
    NO_BETA,
    PLACE_DEFAULTS,
    QUANTIZER_DEFAULTS,
    QUANTIZER_OPTIONS,
    RUN_DEFAULTS,
    VQ_DEFAULTS,
    VQ_OPTIONS,
    UsageError,
    build_parser,
    vqvae_options,
)
from .rng import seed_everything

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


def _held_run(path: Path) -> str | None:
    """What run ``path`` holds, as words ("a vqvae run at step 4"), or None if it holds no
    completed checkpoint (a run killed before its first one has nothing to lose)."""
    if not path.is_dir():
        return None
    try:
        if checkpoint_dir(path) is None:
            return None
        meta = read_meta(path)
    except CheckpointError:
        return "a damaged run"
    return f"a {meta.get('kind')} run at step {meta.get('step')}"


def _config_value(dest: str, cfg: dict):
    """The value the run's model config holds for the CLI option ``dest``."""
    if dest == "layers":
        return cfg.get("n_layers")
    if dest == "conditional":
        return cfg.get("num_classes") is not None
    quantizer = cfg.get("quantizer", "vq")  # runs saved before the choice are vq runs
    if dest == "quantizer":
        return quantizer
    if dest == "beta":  # the commitment weight of the families but fsq's and ibq's
        return None if quantizer in NO_BETA else cfg.get(dest)
    if dest in VQ_OPTIONS:  # vq's options: a run of another family has none
        if quantizer != "vq":
            return None
        return cfg.get("vq_kwargs", {}).get(dest, VQ_DEFAULTS[dest])
    if dest in FAMILY_OPTIONS:
        arg = QUANTIZER_OPTIONS.get(quantizer, {}).get(dest)
        if arg is None:
            return None
        return cfg.get("vq_kwargs", {}).get(arg, QUANTIZER_DEFAULTS[quantizer][dest])
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
    check_unlocked(args.out)  # a run being trained: refused at once, before reading it or the data
    args.resume_meta = None
    if args.reset_optimizer and not args.resume:
        raise UsageError("argument --reset-optimizer: only with --resume")
    if args.overwrite and args.resume:
        raise UsageError(
            "argument --overwrite: --resume continues the run, --overwrite replaces it; give one"
        )
    if args.resume:
        _resolve_resume(args)
    if args.kind == "vqvae":
        _check_quantizer(args)
    if not args.resume and not args.overwrite:
        held = _held_run(args.out)
        if held is not None:
            raise UsageError(
                f"argument --out: {args.out} holds {held}; continue it with --resume, replace "
                "it with --overwrite, or choose another --out"
            )
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
    _check_data(args)
    _check_writable_dir(args.out, "--out")


def _check_quantizer(args) -> None:
    """``train vqvae``: each option belongs to the chosen family (vq's VQ options, fsq's
    --levels, lfq's, bsq's and ibq's --entropy-weight, ibq's other weights; --beta, the
    commitment weight, to all but fsq and ibq),
    and the family's layer accepts the values (fsq: no --codebook-size, it is the product of
    the levels; lfq/bsq: a power of 2). The layer is built once here, before any work, so that
    its own check names the problem."""
    from ..models.vqvae import VQVAEConfig, make_quantizer

    quantizer = args.quantizer or "vq"
    own = QUANTIZER_OPTIONS.get(quantizer, {})
    for dest in ("beta", *VQ_OPTIONS, *FAMILY_OPTIONS):
        mine = dest in own or (quantizer == "vq" and dest in VQ_OPTIONS)
        mine = mine or (dest == "beta" and quantizer not in NO_BETA)
        if getattr(args, dest) is not None and not mine:
            raise UsageError(f"argument {_flag(dest)}: not an option of --quantizer {quantizer}")
    if quantizer == "fsq" and args.codebook_size is not None:
        raise UsageError(
            "argument --codebook-size: fsq's codebook size is the product of --levels; "
            "drop --codebook-size"
        )
    if quantizer == "vq" or args.resume:  # vq's values: the parser's types; a resume: the run's
        return
    options = vqvae_options(args)
    try:
        cfg = VQVAEConfig(**{k: v for k, v in options.items() if v is not None})
        make_quantizer(cfg)
    except (TypeError, ValueError) as e:
        flag = "--levels" if quantizer == "fsq" else "--codebook-size"
        raise UsageError(f"argument {flag}: {' '.join(str(e).split())}") from None


def _check_data(args) -> None:
    """The data set is where the arguments say, checked before anything is written (a failed
    command leaves no folder behind); a missing --data-dir is a one-line error."""
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        what = "is not a directory" if Path(args.data_dir).exists() else "does not exist"
        raise UsageError(f"argument --data-dir: {args.data_dir} {what}")
    find_dataset(args.dataset, args.data_dir, prefix=args.data_prefix)


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
    ckpt = checkpoint_dir(out)
    if not (ckpt / "model.safetensors").is_file():
        raise CheckpointError(
            f"{ckpt / 'model.safetensors'}: missing; the checkpoint is incomplete. Retrain or "
            "restore it"
        )
    if not args.reset_optimizer and not (ckpt / "optim.safetensors").is_file():
        raise missing_optimizer(ckpt)
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
    if args.kind == "vqvae" and args.quantizer is None:  # the family of its other options
        args.quantizer = _config_value("quantizer", cfg)
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
        _check_prior(run, meta)
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


MAX_CODE_SIDE = 256  # a code map side no real run has (28x28 images give 7x7 maps)


def _check_prior(run: Path, meta: dict) -> None:
    """What ``fastvq sample`` needs of a prior's ``run.json`` before any work: a VQ-VAE run
    with at least the prior's codes, and a usable ``code_shape``; CheckpointError naming the
    file and the field."""
    path = checkpoint_dir(run) / "run.json"
    if not isinstance(meta.get("vqvae"), str):
        raise CheckpointError(f"{path}: field vqvae: missing; the prior's VQ-VAE run is unknown")
    vq = _run_meta(run / meta["vqvae"], "run (its VQ-VAE run)")
    if vq.get("kind") != "vqvae":
        raise CheckpointError(f"{path}: field vqvae: {meta['vqvae']} is a {vq.get('kind')} run")
    shape = meta.get("code_shape")
    if not (
        isinstance(shape, list)
        and len(shape) == 2
        and all(type(v) is int and 1 <= v <= MAX_CODE_SIDE for v in shape)
    ):
        raise CheckpointError(
            f"{path}: field code_shape: {shape!r} is not a code map shape [h, w] with sides "
            f"1..{MAX_CODE_SIDE}; the run is damaged or was edited by hand"
        )
    codes = meta.get("config", {}).get("num_codes")
    book = vq.get("config", {}).get("codebook_size")
    if type(codes) is not int or type(book) is not int or codes > book:
        raise CheckpointError(
            f"{path}: field config.num_codes: the prior draws {codes!r} codes but its VQ-VAE "
            f"{run / meta['vqvae']} has codebook_size {book!r}; it was replaced by another "
            "VQ-VAE. Retrain the prior on it"
        )


def _check_demo_out(out: Path, overwrite: bool) -> None:
    """``fastvq demo`` owns its output folder: it replaces what an earlier demo wrote there
    (marked by ``.fastvq-demo``), but never a training run: ``--out`` itself may not be a run
    directory, and runs in its ``ae/ vae/ vqvae/ pixelcnn/`` that no demo wrote need
    ``--overwrite``."""
    from .demo import MARK, STAGES

    held = _held_run(out)
    if held is not None:
        raise UsageError(f"argument --out: {out} holds {held}; give the demo its own folder")
    if overwrite or (out / MARK).is_file():
        return
    for stage in STAGES:
        held = _held_run(out / stage)
        if held is not None:
            raise UsageError(
                f"argument --out: {out / stage} holds {held} that no demo wrote; choose "
                "another --out, or replace it with --overwrite"
            )


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
    """``fastvq train KIND``: one stage of :mod:`fastvq.app.recipes` into its run directory."""
    # One writer per run directory, from the resume read to the last save; taken before the data
    # is read, so that a second trainer is refused at once, not after loading the data set.
    with run_lock(args.out):
        seed_everything(args.seed)
        ds = load_dataset(args.dataset, args.data_dir, prefix=args.data_prefix)
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
        reset_optimizer=args.reset_optimizer,
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
    """``fastvq demo``: :func:`fastvq.app.demo.run_demo`, then print its ``summary.md`` and where
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
        _check_demo_out(Path(args.out), args.overwrite)
        _check_data(args)
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
