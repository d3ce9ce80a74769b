"""The ``fastvq`` command line's arguments: :func:`build_parser`, the argument types, the run
and layer defaults, and which model options each ``train KIND`` takes. Parsing only: the checks
that need the file system or a run directory, and the commands, are in :mod:`fastvq.app.cli`.
"""

from __future__ import annotations

import argparse
import math

from .. import __version__
from ..models import AEConfig, PixelCNNConfig, VQVAEConfig
from ..models.vqvae import QUANTIZERS
from .data import DATASETS

EXAMPLES = """\
examples:
  fastvq demo                                  # 4 min 35 s (--threads 2, 2 cores) -> runs/demo/
  fastvq demo --quick                          # ~2 CPU-minutes: the smoke version
  fastvq train vqvae --out runs/vqvae --codebook-size 512
  fastvq train vqvae --out runs/fsq --quantizer fsq --levels 8,5,5,5
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
REAL = _number(float, -math.inf)


def levels_list(text: str) -> list[int]:
    """An argparse ``type``: FSQ levels as comma-separated ints >= 2 (``8,5,5,5``)."""
    parts = text.split(",")
    if not all(p.strip().isdigit() and int(p) >= 2 for p in parts):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers >= 2 such as 8,5,5,5, got {text!r}"
        )
    return [int(p) for p in parts]


levels_list.__name__ = "levels"

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
        help="K, a power of 2 for lfq/bsq; fsq's is the product of its levels (default: 256)",
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
        help=f"commitment weight of vq, lfq and bsq (default: {VQVAEConfig.beta})",
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
        help=f"EMA decay (default: {VQ_DEFAULTS['decay']})",
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
        help=f"Lloyd iterations of it (default: {VQ_DEFAULTS['kmeans_iters']})",
    )
    g.add_argument(
        "--dead-code-steps",
        type=NON_NEGATIVE,
        default=None,
        help="re-seed a code unused for this many training steps, 0 = never "
        f"(default: {VQ_DEFAULTS['dead_code_steps']})",
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


# The layer options' defaults as fastvq.VectorQuantizer resolves them (without simvq), for the
# help texts and for runs saved with an option unset; tests/test_cli.py checks them against the
# layer's signature.
VQ_DEFAULTS = {
    "codebook_dim": None,
    "ema": True,
    "decay": 0.99,
    "kmeans_init": True,
    "kmeans_iters": 10,
    "dead_code_steps": 20,
    "cosine": False,
}

# `train vqvae`'s quantizer choice and the options of each family but vq (whose are VQ_OPTIONS
# and --beta): the CLI option -> the layer's argument in vq_kwargs. An option given to another
# family is an error.
QUANTIZER_OPTIONS = {
    "fsq": {"levels": "levels"},
    "lfq": {"entropy_weight": "entropy_loss_weight"},
    "bsq": {"entropy_weight": "entropy_loss_weight"},
    "ibq": {
        "entropy_weight": "entropy_loss_weight",
        "commitment_weight": "commitment_weight",
        "codebook_weight": "codebook_weight",
        "double_quant_weight": "double_quant_weight",
        "init_scale": "init_scale",
    },
    "simvq": {},
}
FSQ_DEFAULT_LEVELS = [8, 5, 5, 5]  # the paper's 1000-code set
LFQ_DEFAULTS = {"entropy_weight": 0.1}  # fastvq.LFQ's entropy_loss_weight
# fastvq.IBQ's (SEED-Voken's) weights; tests/test_cli_quantizers.py checks them against IBQConfig
IBQ_DEFAULTS = {
    "entropy_weight": 0.05,
    "commitment_weight": 1.0,
    "codebook_weight": 0.25,
    "double_quant_weight": 1.0,
    "init_scale": 1.0,
}
# each family's defaults of its options in QUANTIZER_OPTIONS (fsq's levels: FSQ_DEFAULT_LEVELS)
QUANTIZER_DEFAULTS = {
    "fsq": {"levels": FSQ_DEFAULT_LEVELS},
    "lfq": LFQ_DEFAULTS,
    "bsq": LFQ_DEFAULTS,
    "ibq": IBQ_DEFAULTS,
    "simvq": {},
}
# the options of the families but vq, in the order the CLI checks them
FAMILY_OPTIONS = tuple(dict.fromkeys(o for opts in QUANTIZER_OPTIONS.values() for o in opts))
# the families with no use for --beta (fsq has no loss; ibq's weights are its own options)
NO_BETA = ("fsq", "ibq")

# The model options each `train KIND` takes; any other one given is an error.
KIND_OPTIONS = {
    "ae": ("latent_dim", "hidden"),
    "vae": ("latent_dim", "hidden"),
    "vqvae": (
        "hidden",
        "codebook_size",
        "dim",
        "beta",
        *VQ_OPTIONS,
        "quantizer",
        *FAMILY_OPTIONS,
    ),  # fmt: skip
    "pixelcnn": ("vqvae", "channels", "layers", "conditional"),
}
MODEL_OPTIONS = tuple(dict.fromkeys(o for opts in KIND_OPTIONS.values() for o in opts))


def vq_kwargs_from_args(args) -> dict:
    """The layer options set on the command line, for ``vq_kwargs``: :data:`VQ_OPTIONS` for
    vq, :data:`QUANTIZER_OPTIONS` for the others (fsq's levels default to 8,5,5,5)."""
    quantizer = getattr(args, "quantizer", None) or "vq"
    if quantizer == "vq":
        return {k: getattr(args, k) for k in VQ_OPTIONS if getattr(args, k, None) is not None}
    kw = {
        arg: getattr(args, opt)
        for opt, arg in QUANTIZER_OPTIONS[quantizer].items()
        if getattr(args, opt, None) is not None
    }
    if quantizer == "fsq":
        kw.setdefault("levels", FSQ_DEFAULT_LEVELS)
    return kw


def vqvae_options(args) -> dict:
    """The VQ-VAE config fields given on the command line; None keeps the model's default
    (``quantizer`` only when given: the demo has no choice of family)."""
    options = {
        "codebook_size": args.codebook_size,
        "dim": args.dim,
        "beta": args.beta,
        "vq_kwargs": vq_kwargs_from_args(args),
    }
    if getattr(args, "quantizer", None) is not None:
        options["quantizer"] = args.quantizer
    return options


def _add_train_options(t: argparse.ArgumentParser, kind: str | None) -> None:
    """``train``'s options: the run's and the model options of ``kind``; ``kind`` None: of every
    kind (the parser takes them all, so that one given to the wrong kind is named in the error,
    while ``train KIND --help`` lists only that kind's)."""
    takes = MODEL_OPTIONS if kind is None else KIND_OPTIONS[kind]
    t.add_argument("--out", default=None, help=f"run directory (default: runs/{kind or 'KIND'})")
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
        "--reset-optimizer",
        action="store_true",
        help="with --resume: continue with a fresh Adam state (the run's optim.safetensors is "
        "missing or unwanted); without it, a run lacking its optimizer state is refused",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --out (its checkpoint is deleted at this run's first "
        "save); without it, training into a directory that holds a run needs --resume",
    )
    if "latent_dim" in takes:
        t.add_argument(
            "--latent-dim",
            type=POSITIVE,
            default=None,
            help=f"ae/vae latent size (default: {AEConfig.latent_dim})",
        )
    if "hidden" in takes:
        t.add_argument(
            "--hidden", type=POSITIVE, default=None, help="conv width (default: the model's)"
        )
    if "vqvae" in takes:
        t.add_argument(
            "--vqvae", default=None, help="pixelcnn: the VQ-VAE run directory (required)"
        )
    if "channels" in takes:
        t.add_argument(
            "--channels",
            type=POSITIVE,
            default=None,
            help=f"pixelcnn width (default: {PixelCNNConfig.channels})",
        )
    if "layers" in takes:
        t.add_argument(
            "--layers",
            type=POSITIVE,
            default=None,
            help=f"pixelcnn gated layers (default: {PixelCNNConfig.n_layers})",
        )
    if "conditional" in takes:
        t.add_argument(
            "--conditional",
            action="store_true",
            default=None,
            help="pixelcnn: condition on the class",
        )
    _add_common(t, train=True)
    if "codebook_size" in takes:
        _add_vq_options(t)
    if "quantizer" in takes:
        _add_quantizer_options(t)


def _add_quantizer_options(p: argparse.ArgumentParser) -> None:
    """``train vqvae``'s quantizer family and the options of fsq, lfq and bsq."""
    g = p.add_argument_group(
        "quantizer family (the VQ options above but --beta are vq's; the others take these)"
    )
    g.add_argument(
        "--quantizer",
        choices=QUANTIZERS,
        default=None,
        help="vq: VectorQuantizer; fsq: FSQ; lfq: LFQ; bsq: LFQ(spherical=True); ibq: IBQ; "
        "simvq: VectorQuantizer(simvq=True) (default: vq)",
    )
    g.add_argument(
        "--levels",
        type=levels_list,
        default=None,
        help="fsq: values per channel, comma-separated; K is their product (default: 8,5,5,5)",
    )
    g.add_argument(
        "--entropy-weight",
        type=REAL,
        default=None,
        help=f"lfq/bsq/ibq: entropy loss weight (default: lfq/bsq "
        f"{LFQ_DEFAULTS['entropy_weight']}, ibq {IBQ_DEFAULTS['entropy_weight']})",
    )
    for dest, what in (
        ("commitment_weight", "commitment, mean((sg(C[i]) - z)^2)"),
        ("codebook_weight", "codebook term, mean((C[i] - sg(z))^2), SEED-Voken's beta"),
        ("double_quant_weight", "double quantization term, mean((q - z)^2) through p"),
    ):
        g.add_argument(
            "--" + dest.replace("_", "-"),
            type=NON_NEGATIVE_FLOAT,
            default=None,
            help=f"ibq: weight of the {what} (default: {IBQ_DEFAULTS[dest]})",
        )
    g.add_argument(
        "--init-scale",
        type=POSITIVE_FLOAT,
        default=None,
        help="ibq: the initial codes' standard deviation (default: 1, SEED-Voken's N(0, 1); "
        "0.1 kept the demo's VQ-VAE from collapsing at K = 16384, docs/ibq.md)",
    )


TRAIN_NOTE = (
    "It checkpoints at every evaluation,\n"
    "at the end and on Ctrl-C; --resume continues a run with its own arguments."
)


class _KindHelp(argparse.Action):
    """``train``'s -h/--help: after a kind (``fastvq train vqvae --help``), only that kind's
    options; before one, every kind's."""

    def __init__(
        self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None
    ):
        super().__init__(option_strings, dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        kind = getattr(namespace, "kind", None)
        if kind in KIND_OPTIONS:
            parser = _Parser(
                prog=f"{parser.prog} {kind}",
                description=f"Train a {kind} model into a run directory. {TRAIN_NOTE}",
                formatter_class=_Formatter,
            )
            _add_train_options(parser, kind)
        parser.print_help()
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="fastvq",
        description="fastvq: train the AE, VAE, VQ-VAE and PixelCNN models, sample from them,\n"
        "or run the whole demo.",
        epilog=EXAMPLES,
        formatter_class=_Formatter,
    )
    ap.add_argument("--version", action="version", version=f"fastvq {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train one model into a run directory",
        description=f"Train one model into a run directory. {TRAIN_NOTE}\n"
        "`fastvq train KIND --help` lists only that kind's options.",
        formatter_class=_Formatter,
        add_help=False,
    )
    t.add_argument(
        "-h", "--help", action=_KindHelp, help="show this help (after KIND: only its options)"
    )
    t.add_argument("kind", choices=["ae", "vae", "vqvae", "pixelcnn"], help="the model to train")
    _add_train_options(t, None)

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
        "on one data set, then write figures, metrics.json and summary.md into --out.\n"
        "Measured: 4 min 35 s wall at --threads 2 on a 2-core CPU (2026-11-27). Without\n"
        "--threads it uses fewer threads when the load average says the cores are busy: slower\n"
        "on an idle machine, and metrics.json differs by float rounding (docs/models.md).",
        formatter_class=_Formatter,
    )
    d.add_argument("--out", default="runs/demo", help="report folder")
    d.add_argument("--quick", action="store_true", help="smoke version (~2 CPU-minutes, 1 thread)")
    d.add_argument(
        "--overwrite",
        action="store_true",
        help="replace training runs found in --out's ae/ vae/ vqvae/ pixelcnn/ (an earlier "
        "demo's own output is replaced without it)",
    )
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
