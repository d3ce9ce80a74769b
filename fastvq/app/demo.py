"""``fastvq demo``: AE, VAE, VQ-VAE and a PixelCNN prior, trained briefly on one dataset, with a
report folder of figures, ``metrics.json`` and ``summary.md``.

Every number in ``metrics.json`` is a function of the data, the options and ``--seed`` (and of
torch's thread count, which changes float summation order): each model and the feature
classifier are seeded before they are built, and every sample is drawn from its own seeded
generator. Wall times, the date and the machine go to ``run_info.json`` instead, so two runs
with the same seed write the same ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import metrics as M
from . import recipes as R
from .checkpoint import atomic_write, build
from .data import Dataset, load_dataset, to_float
from .evaluate import eval_prior, eval_recon, eval_vae, features, get_classifier
from .figures import save_panels, save_usage_histogram
from .rng import seed_everything

BATCH_SIZE = 128
FD_SEEDS = 3  # sample sets per generator behind each Fréchet distance's mean and spread
NAMES = {"ae": "AE", "vae": "VAE", "vqvae": "VQ-VAE"}  # stages 1-3, in order
STAGES = (*NAMES, "pixelcnn")  # the run directories under the demo's output folder
MARK = ".fastvq-demo"  # marks a folder as a demo's output, which a later demo may replace


@dataclass
class DemoSteps:
    """Optimizer steps per stage (batch 128) and the number of samples M for Fréchet distances."""

    classifier: int = 400
    ae: int = 800
    vae: int = 800
    vqvae: int = 1000
    pixelcnn: int = 1200
    fd_samples: int = 1000
    eval_limit: int | None = None  # test images used for reconstruction metrics (None = all)


FULL = DemoSteps()
QUICK = DemoSteps(
    classifier=150, ae=150, vae=150, vqvae=200, pixelcnn=200, fd_samples=250, eval_limit=2000
)


def steps_for(
    quick: bool, epochs: float | None, scale: float, n_train: int, batch_size: int
) -> DemoSteps:
    """The demo's steps: :data:`QUICK` or :data:`FULL`; ``epochs`` (if set) replaces each
    model's steps, then ``scale`` multiplies them (the classifier's stay as they are)."""
    s = DemoSteps(**vars(QUICK if quick else FULL))
    if epochs is not None:
        n = max(1, round(epochs * n_train / batch_size))
        s.ae = s.vae = s.vqvae = s.pixelcnn = n
    for k in ("ae", "vae", "vqvae", "pixelcnn"):
        setattr(s, k, max(1, round(getattr(s, k) * scale)))
    return s


# ---------------------------------------------------------------- the demo


def run_demo(
    out_dir="runs/demo",
    *,
    dataset: str = "fashion-mnist",
    data_dir=None,
    data_prefix: str | None = None,
    quick: bool = False,
    epochs: float | None = None,
    scale: float = 1.0,
    seed: int = 0,
    device: str = "cpu",
    cache: str | os.PathLike | None = None,
    steps: DemoSteps | None = None,
    **vqvae,
) -> dict:
    """Train the feature classifier and the four stages of :mod:`fastvq.app.recipes` on
    ``dataset``, one run directory each under ``out_dir``, then write ``reconstructions.png``,
    ``samples.png``, ``codebook_usage.png``, ``metrics.json`` and ``summary.md`` there.

    ``vqvae``: VQ-VAE config fields (``codebook_size``, ``dim``, ``beta``, ``vq_kwargs`` for the
    layer); unset or None ones keep the model's defaults. Returns ``metrics.json``'s content.
    """
    t_start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / MARK, lambda p: p.write_text(json.dumps({"fastvq_demo": 1}) + "\n"))
    ds: Dataset = load_dataset(dataset, data_dir, prefix=data_prefix)
    st = steps or steps_for(quick, epochs, scale, len(ds.train), BATCH_SIZE)
    result = _header(ds, st, seed, device)
    timings: dict[str, float] = {}
    common = dict(seed=seed, device=device, eval_limit=st.eval_limit)

    with _timed(timings, "classifier"):
        clf_cache = Path(cache) if cache is not None else None
        clf, clf_metrics = get_classifier(
            ds, device, steps=st.classifier, seed=seed, cache=clf_cache
        )
    result["classifier"] = {
        "test_acc": clf_metrics["test_acc"],
        "steps": st.classifier,
        "feature_dim": clf.cfg.feature_dim,
    }
    models, metas = {}, {}
    options = {"ae": {}, "vae": {}, "vqvae": vqvae}
    for i, (kind, name) in enumerate(NAMES.items(), 1):
        with _timed(timings, kind):
            seed_everything(seed)
            models[kind] = build(kind, R.model_config(kind, ds, **options[kind]))
            steps_k, desc = getattr(st, kind), f"{i}/4 {name}"
            metas[kind] = R.train_images(
                kind, models[kind], ds, out / kind, steps=steps_k, desc=desc, **common
            )
    with _timed(timings, "pixelcnn"):
        codes = R.encode_dataset(models["vqvae"], ds, device)
        seed_everything(seed)
        K = models["vqvae"].cfg.codebook_size
        prior = build("pixelcnn", R.model_config("pixelcnn", ds, num_codes=K))
        pixelcnn = dict(steps=st.pixelcnn, desc="4/4 PixelCNN", **common)
        R.train_prior(prior, codes, ds, out / "pixelcnn", out / "vqvae", **pixelcnn)
    with _timed(timings, "metrics"):
        fd_m = min(st.fd_samples, len(ds.test), len(ds.train))
        # sample seeds seed+1 .. seed+FD_SEEDS; each draws the samples, then the floor's images
        fd_seeds = [seed + 1 + i for i in range(FD_SEEDS)]
        # the longest stage after training (~2 min at M = 1000): one bar tick per task
        bar = tqdm(total=5 + 5 * FD_SEEDS, desc="5/5 metrics", dynamic_ncols=True, leave=True)
        usage = M.code_usage(codes.test, K)
        metrics = _model_metrics(models, prior, codes, usage, ds, clf, device, st.eval_limit, bar)
        result.update(metrics)
        runs = []
        for s in fd_seeds:
            g = torch.Generator().manual_seed(s)
            samples_s = _samples(models, metas["ae"], prior, codes, fd_m, g, device, bar, s)
            runs.append(_frechet(samples_s, ds, clf, fd_m, g, device, bar, s))
            if s == fd_seeds[0]:
                samples = samples_s  # what the figures show
        bar.close()
        result["frechet_distance"], result["frechet_distance_per_seed"] = _fd_spread(
            runs, fd_seeds, fd_m
        )
    with _timed(timings, "report"):
        _figures(out, models, samples, usage, ds, device)
    info = result.pop("run_info")
    info["seconds"] = {**timings, "total": round(time.time() - t_start, 1)}
    info["machine"]["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
    _write_text(out / "metrics.json", json.dumps(result, indent=2))
    _write_text(out / "run_info.json", json.dumps(info, indent=2))
    result.update(info)  # the caller and the summary see both
    _write_text(out / "summary.md", summary_markdown(result))
    return result


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str):
    t0 = time.time()
    yield
    timings[name] = round(time.time() - t0, 1)


def _header(ds: Dataset, st: DemoSteps, seed: int, device: str) -> dict:
    """The run's settings, first in ``metrics.json``; under ``run_info`` the machine and the
    date, which go to ``run_info.json``."""
    return {
        "dataset": ds.name,
        "data_root": str(ds.root),
        "n_train": len(ds.train),
        "n_test": len(ds.test),
        "steps": vars(st),
        "batch_size": BATCH_SIZE,
        "seed": seed,
        "device": device,
        # what varies between identical runs: written to run_info.json, not metrics.json
        "run_info": {
            "machine": {
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "platform": platform.platform(),
                "torch": torch.__version__,
                "loadavg_1min_start": round(os.getloadavg()[0], 2),
            },
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        },
    }


def _tick(bar, label: str, fn):
    """Run ``fn()`` as one task of the metrics stage's progress ``bar``."""
    bar.set_postfix_str(label, refresh=True)
    out = fn()
    bar.update(1)
    return out


def _model_metrics(models, prior, codes, usage, ds, clf, device, lim, bar) -> dict:
    """Test-set metrics of the four trained models (reconstructions on ``lim`` images)."""
    test, vqvae = ds.test, models["vqvae"]
    K = vqvae.cfg.codebook_size
    r = {"ae": _tick(bar, "AE recon", lambda: eval_recon(models["ae"], test, device, clf, lim))}
    r["vae"] = _tick(bar, "VAE ELBO", lambda: eval_vae(models["vae"], test, device, limit=lim))
    vae_recon = _tick(
        bar, "VAE recon", lambda: eval_recon(models["vae"], test, device, clf, limit=lim)
    )
    r["vae"]["classifier_acc_on_recon"] = vae_recon["classifier_acc_on_recon"]
    r["vae"]["likelihood"] = "discretized logistic over 256 levels per pixel"
    r["vqvae"] = _tick(bar, "VQ-VAE recon", lambda: eval_recon(vqvae, test, device, clf, lim))
    r["vqvae"].update(
        codebook_size=K,
        code_map=list(codes.shape),
        codes_used_test=usage["used"],
        codes_used_fraction=usage["used_fraction"],
        perplexity_test=usage["perplexity"],
        vq_kwargs=vqvae.cfg.vq_kwargs,
    )
    nll = _tick(bar, "PixelCNN NLL", lambda: eval_prior(prior, codes.test, None, device))
    nll = nll["nll_bits_per_code"]
    r["pixelcnn"] = {
        "test_nll_bits_per_code": nll,
        "unigram_bits_per_code": M.unigram_cross_entropy_bits(codes.train, codes.test, K),
        "test_code_entropy_bits": usage["entropy_bits"],
        "uniform_bits_per_code": math.log2(K),
    }
    return r


def _samples(models, ae_stats, prior, codes, n, g, device, bar, seed) -> dict[str, torch.Tensor]:
    """``n`` images of each generator, keyed like ``metrics.json``'s Fréchet distances, drawn
    in this order from the generator ``g`` (seeded ``seed``)."""
    vqvae = models["vqvae"]
    at = f" (seed {seed})"
    s = {
        "ae_random_latents": _tick(
            bar, "AE samples" + at, lambda: R.sample_ae(models["ae"], ae_stats, n, g, device)
        ),
        "vae_samples": _tick(bar, "VAE samples" + at, lambda: R.sample_vae(models["vae"], n, g)),
        "vqvae_pixelcnn_samples": _tick(
            bar,
            "PixelCNN samples" + at,
            lambda: R.sample_prior(prior, vqvae, n, codes.shape, g, device),
        ),
    }

    def unigram():
        # The baseline the prior must beat: codes drawn i.i.d. from their train-set frequencies.
        p = M.unigram_probs(codes.train, vqvae.cfg.codebook_size)
        uni = torch.multinomial(p, n * math.prod(codes.shape), replacement=True, generator=g)
        return R.decode_codes(vqvae, uni.view(n, *codes.shape), device)

    s["vqvae_unigram_codes"] = _tick(bar, "unigram samples" + at, unigram)
    return s


@torch.no_grad()
def _frechet(samples, ds, clf, n, g, device, bar, seed) -> dict:
    """Fréchet distances of each sample set's classifier features to ``n`` test images', with
    the floor: ``n`` train images drawn with ``g`` against the same test images."""

    def run():
        perm = torch.randperm(len(ds.train), generator=g)[:n]
        f_test = features(clf, to_float(ds.test.images[:n]), device)
        f_train = features(clf, to_float(ds.train.images[perm]), device)
        fd = {"floor_train_vs_test": M.frechet_distance(f_train, f_test)}
        for name, images in samples.items():
            fd[name] = M.frechet_distance(features(clf, images, device), f_test)
        return fd

    return _tick(bar, f"Fréchet distances (seed {seed})", run)


def _fd_spread(runs: list[dict], seeds: list[int], m: int) -> tuple[dict, dict]:
    """``metrics.json``'s ``frechet_distance`` (each set's mean over the sample seeds, and its
    sample standard deviation as ``<name>_std``) and ``frechet_distance_per_seed``."""
    fd = {"M": m, "features": "feature classifier penultimate", "sample_seeds": len(seeds)}
    per_seed = {"seeds": seeds}
    for name in runs[0]:
        values = [r[name] for r in runs]
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
        fd[name], fd[f"{name}_std"] = mean, math.sqrt(var)
        per_seed[name] = values
    return fd, per_seed


def _figures(out: Path, models, samples, usage, ds, device) -> None:
    """``reconstructions.png``, ``samples.png`` and ``codebook_usage.png``."""
    x = to_float(ds.test.images[:16]).to(device)
    K = models["vqvae"].cfg.codebook_size
    recon = [("AE", "ae"), ("VAE (decoder mean)", "vae"), (f"VQ-VAE (K={K})", "vqvae")]
    with torch.no_grad():
        panels = [(title, models[k].reconstruct(x).cpu()) for title, k in recon]
    save_panels(out / "reconstructions.png", [("test images", x.cpu()), *panels], nrow=16)
    titles = {
        "ae_random_latents": "AE: random latents",
        "vae_samples": "VAE: z ~ N(0, I)",
        "vqvae_pixelcnn_samples": "VQ-VAE + PixelCNN",
        "vqvae_unigram_codes": "VQ-VAE + unigram codes",
    }
    save_panels(out / "samples.png", [(titles[k], s[:64]) for k, s in samples.items()], nrow=8)
    save_usage_histogram(
        out / "codebook_usage.png",
        usage["counts"],
        f"VQ-VAE code usage on {len(ds.test)} test images: {usage['used']}/{K} used, "
        f"perplexity {usage['perplexity']:.1f}",
    )


def summary_markdown(r: dict) -> str:
    fd = r["frechet_distance"]
    pc = r["pixelcnn"]
    lines = [
        f"# fastvq demo on {r['dataset']}",
        "",
        f"{r['n_train']} train / {r['n_test']} test images; steps (batch {r['batch_size']}): "
        + ", ".join(f"{k} {v}" for k, v in r["steps"].items() if k not in ("eval_limit",))
        + f"; wall time {r['seconds']['total']:.0f} s on {r['machine']['cpu_count']} CPU cores "
        f"({r['date_utc']} UTC).",
        "",
        "| model | test MSE | PSNR (dB) | classifier acc. on recon |",
        "| --- | --- | --- | --- |",
    ]
    for k, name in (("ae", "AE"), ("vae", "VAE"), ("vqvae", "VQ-VAE")):
        m = r[k]
        lines.append(
            f"| {name} | {m['mse']:.4f} | {m['psnr']:.2f} | {m['classifier_acc_on_recon']:.3f} |"
        )
    lines += [
        "",
        f"Feature classifier test accuracy on real images: {r['classifier']['test_acc']:.3f}.",
        "",
        f"VAE test negative ELBO: **{r['vae']['neg_elbo_bpd']:.3f} bits/dim** "
        f"(KL part {r['vae']['kl_bpd']:.3f}; {r['vae']['likelihood']}).",
        "",
        f"VQ-VAE codebook: {r['vqvae']['codes_used_test']}/{r['vqvae']['codebook_size']} codes "
        f"used on the test set, perplexity {r['vqvae']['perplexity_test']:.1f}.",
        "",
        f"PixelCNN prior, test NLL: **{pc['test_nll_bits_per_code']:.3f} bits/code** vs "
        f"unigram {pc['unigram_bits_per_code']:.3f} vs uniform log2 K = "
        f"{pc['uniform_bits_per_code']:.3f}.",
        "",
        f"Fréchet distance on classifier features, M = {fd['M']} (lower is better); mean ± "
        f"standard deviation over {fd['sample_seeds']} sample seeds "
        f"({', '.join(map(str, r['frechet_distance_per_seed']['seeds']))}):",
        "",
        "| samples | FD |",
        "| --- | --- |",
        f"| train vs test (floor) | {_fd(fd, 'floor_train_vs_test')} |",
        f"| AE decoder on random latents | {_fd(fd, 'ae_random_latents')} |",
        f"| VAE samples | {_fd(fd, 'vae_samples')} |",
        f"| VQ-VAE + unigram codes (what the prior must beat) | {_fd(fd, 'vqvae_unigram_codes')} |",
        f"| VQ-VAE + PixelCNN prior | {_fd(fd, 'vqvae_pixelcnn_samples')} |",
        "",
        "Figures: `reconstructions.png`, `samples.png`, `codebook_usage.png`. Seconds per stage: "
        + ", ".join(f"{k} {v}" for k, v in r["seconds"].items())
        + f" ({r['machine']['torch_threads']} torch threads, 1-min load average "
        f"{r['machine']['loadavg_1min_start']} at the start; `run_info.json`).",
        "",
    ]
    return "\n".join(lines)


def _fd(fd: dict, name: str) -> str:
    return f"{fd[name]:.2f} ± {fd[name + '_std']:.2f}"
