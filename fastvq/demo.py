"""``fastvq demo``: AE, VAE, VQ-VAE and a PixelCNN prior, trained briefly on one dataset, with a
report folder of figures, ``metrics.json`` and ``summary.md``."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import metrics as M
from . import train as T
from .data import Dataset, load_dataset, to_float
from .models import AE, VAE, VQVAE, AEConfig, PixelCNN, PixelCNNConfig, VAEConfig, VQVAEConfig


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
    s = DemoSteps(**vars(QUICK if quick else FULL))
    if epochs is not None:
        n = max(1, round(epochs * n_train / batch_size))
        s.ae = s.vae = s.vqvae = s.pixelcnn = n
    for k in ("ae", "vae", "vqvae", "pixelcnn"):
        setattr(s, k, max(1, round(getattr(s, k) * scale)))
    return s


# ---------------------------------------------------------------- figures


def _grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """(N, 1, H, W) in [0, 1] -> (rows*H + pad, nrow*W + pad) single-channel grid."""
    n, _, h, w = images.shape
    rows = math.ceil(n / nrow)
    g = torch.ones(rows * (h + 1) + 1, nrow * (w + 1) + 1)
    for k in range(n):
        r, c = divmod(k, nrow)
        g[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = images[
            k, 0
        ]
    return g


def save_panels(path, panels: list[tuple[str, torch.Tensor]], nrow: int, title: str | None = None):
    """One PNG with a titled grid per panel, stacked vertically (rows) or side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = [(name, _grid(imgs.cpu().float(), nrow)) for name, imgs in panels]
    side = all(g.shape[0] > 40 for _, g in grids)  # sample sets: side by side
    if side:
        fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.6))
    else:
        fig, axes = plt.subplots(len(grids), 1, figsize=(nrow * 0.5, 0.75 * len(grids) + 0.5))
    axes = [axes] if len(grids) == 1 else list(axes)
    for ax, (name, g) in zip(axes, grids, strict=True):
        ax.imshow(g.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_usage_histogram(path, counts: list[int], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = torch.tensor(counts, dtype=torch.float64)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    axes[0].bar(range(len(c)), c.numpy(), width=1.0)
    axes[0].set_xlabel("code index")
    axes[0].set_ylabel("count on test set")
    axes[1].plot(torch.sort(c, descending=True).values.numpy())
    axes[1].set_yscale("symlog")
    axes[1].set_xlabel("code rank")
    axes[1].set_ylabel("count (sorted)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- the demo


def _fmt(x, nd=3):
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


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
    vq_kwargs: dict | None = None,
    codebook_size: int = 256,
    steps: DemoSteps | None = None,
) -> dict:
    t_start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds: Dataset = load_dataset(dataset, data_dir, prefix=data_prefix)
    bs = 128
    st = steps or steps_for(quick, epochs, scale, len(ds.train), bs)
    C, H, W = ds.image_shape
    test = ds.test
    timings: dict[str, float] = {}
    result: dict = {
        "dataset": ds.name,
        "data_root": str(ds.root),
        "n_train": len(ds.train),
        "n_test": len(test),
        "steps": vars(st),
        "batch_size": bs,
        "seed": seed,
        "device": device,
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "loadavg_1min_start": round(os.getloadavg()[0], 2),
        },
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }

    def stage(name):
        timings[name] = time.time()

    def done(name):
        timings[name] = round(time.time() - timings[name], 1)

    # 1. feature classifier (cached)
    stage("classifier")
    clf_cache = Path(cache) if cache is not None else None
    clf, clf_metrics = T.get_classifier(ds, device, steps=st.classifier, seed=seed, cache=clf_cache)
    done("classifier")
    result["classifier"] = {
        "test_acc": clf_metrics["test_acc"],
        "steps": st.classifier,
        "feature_dim": clf.cfg.feature_dim,
    }
    lim = st.eval_limit
    fd_m = min(st.fd_samples, len(test), len(ds.train))

    # 2. AE
    stage("ae")
    torch.manual_seed(seed)
    ae = AE(AEConfig(in_channels=C, image_size=H))
    T.fit(
        ae,
        "ae",
        ds.train.images,
        ds.train.labels,
        steps=st.ae,
        seed=seed,
        device=device,
        run_dir=out / "ae",
        desc="1/4 AE",
        evaluate=lambda m: T.eval_recon(m, test, device, limit=lim),
    )
    with torch.no_grad():  # Gaussian fitted to the train latents, for "random latents"
        z = M.batched(lambda b: ae.encode(to_float(b).to(device)).cpu(), ds.train.images[:10000])
    ae_mu, ae_sd = z.mean(0), z.std(0)
    meta = T.read_meta(out / "ae")
    meta["latent_mean"], meta["latent_std"] = ae_mu.tolist(), ae_sd.tolist()
    T.save_run(out / "ae", ae, "ae", meta)
    done("ae")

    # 3. VAE
    stage("vae")
    torch.manual_seed(seed)
    vae = VAE(VAEConfig(in_channels=C, image_size=H))
    T.fit(
        vae,
        "vae",
        ds.train.images,
        ds.train.labels,
        steps=st.vae,
        seed=seed,
        device=device,
        run_dir=out / "vae",
        desc="2/4 VAE",
        evaluate=lambda m: T.eval_vae(m, test, device, limit=lim),
    )
    done("vae")

    # 4. VQ-VAE
    stage("vqvae")
    torch.manual_seed(seed)
    var = float(to_float(ds.train.images[:10000]).var())
    vqvae = VQVAE(
        VQVAEConfig(
            in_channels=C,
            codebook_size=codebook_size,
            data_variance=var,
            vq_kwargs=dict(vq_kwargs or {}),
        )
    )
    T.fit(
        vqvae,
        "vqvae",
        ds.train.images,
        ds.train.labels,
        steps=st.vqvae,
        seed=seed,
        device=device,
        run_dir=out / "vqvae",
        desc="3/4 VQ-VAE",
        evaluate=lambda m: T.eval_vqvae(m, test, device, limit=lim),
    )
    done("vqvae")

    # 5. PixelCNN prior on the VQ-VAE's code maps
    stage("pixelcnn")
    train_codes = T.encode_codes(vqvae, ds.train.images, device, desc="encode train codes")
    test_codes = T.encode_codes(vqvae, test.images, device)
    hw = tuple(train_codes.shape[1:])
    torch.manual_seed(seed)
    prior = PixelCNN(PixelCNNConfig(num_codes=codebook_size))
    prior_eval_codes = test_codes[:lim] if lim else test_codes
    T.fit(
        prior,
        "pixelcnn",
        train_codes,
        ds.train.labels,
        steps=st.pixelcnn,
        seed=seed,
        device=device,
        prepare=lambda c: c,
        run_dir=out / "pixelcnn",
        desc="4/4 PixelCNN",
        meta={"vqvae": os.path.relpath(out / "vqvae", out / "pixelcnn"), "code_shape": hw},
        evaluate=lambda m: T.eval_prior(m, prior_eval_codes, None, device),
    )
    done("pixelcnn")

    # 6. metrics
    stage("metrics")
    K = codebook_size
    usage = M.code_usage(test_codes, K)
    result["ae"] = T.eval_recon(ae, test, device, clf, limit=lim)
    result["vae"] = T.eval_vae(vae, test, device, limit=lim)
    result["vae"]["classifier_acc_on_recon"] = T.eval_recon(vae, test, device, clf, limit=lim)[
        "classifier_acc_on_recon"
    ]
    result["vae"]["likelihood"] = "discretized logistic over 256 levels per pixel"
    result["vqvae"] = T.eval_recon(vqvae, test, device, clf, limit=lim)
    result["vqvae"].update(
        codebook_size=K,
        code_map=list(hw),
        codes_used_test=usage["used"],
        codes_used_fraction=usage["used_fraction"],
        perplexity_test=usage["perplexity"],
        vq_kwargs=vqvae.cfg.vq_kwargs,
    )
    result["pixelcnn"] = {
        "test_nll_bits_per_code": T.eval_prior(prior, test_codes, None, device)[
            "nll_bits_per_code"
        ],
        "unigram_bits_per_code": M.unigram_cross_entropy_bits(train_codes, test_codes, K),
        "test_code_entropy_bits": usage["entropy_bits"],
        "uniform_bits_per_code": math.log2(K),
    }

    # samples: M of each kind, features, Fréchet distance against M test images
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        z = ae_mu + ae_sd * torch.randn(fd_m, ae_mu.numel(), generator=g)
        s_ae = M.batched(lambda b: ae.decode(b.to(device)).cpu(), z)
        s_vae = torch.cat(
            [vae.sample(min(500, fd_m - i), generator=g).cpu() for i in range(0, fd_m, 500)]
        )
        codes = prior.sample(fd_m, hw, generator=g)
        s_vq = M.batched(lambda c: vqvae.decode_indices(c.to(device)).cpu(), codes)
        p = M.unigram_probs(train_codes, K)
        uni = torch.multinomial(p, fd_m * hw[0] * hw[1], replacement=True, generator=g)
        s_uni = M.batched(lambda c: vqvae.decode_indices(c.to(device)).cpu(), uni.view(fd_m, *hw))
        perm = torch.randperm(len(ds.train), generator=g)[:fd_m]
        f_test = T.features(clf, to_float(test.images[:fd_m]), device)
        f_train = T.features(clf, to_float(ds.train.images[perm]), device)
        fd = {
            "floor_train_vs_test": M.frechet_distance(f_train, f_test),
            "ae_random_latents": M.frechet_distance(T.features(clf, s_ae, device), f_test),
            "vae_samples": M.frechet_distance(T.features(clf, s_vae, device), f_test),
            "vqvae_pixelcnn_samples": M.frechet_distance(T.features(clf, s_vq, device), f_test),
            "vqvae_unigram_codes": M.frechet_distance(T.features(clf, s_uni, device), f_test),
        }
    result["frechet_distance"] = {"M": fd_m, "features": "feature classifier penultimate", **fd}
    done("metrics")

    # 7. figures and report
    stage("report")
    x = to_float(test.images[:16]).to(device)
    with torch.no_grad():
        recon_panels = [
            ("test images", x.cpu()),
            ("AE", ae.reconstruct(x).cpu()),
            ("VAE (decoder mean)", vae.reconstruct(x).cpu()),
            (f"VQ-VAE (K={K})", vqvae.reconstruct(x).cpu()),
        ]
    save_panels(out / "reconstructions.png", recon_panels, nrow=16)
    save_panels(
        out / "samples.png",
        [
            ("AE: random latents", s_ae[:64]),
            ("VAE: z ~ N(0, I)", s_vae[:64]),
            ("VQ-VAE + PixelCNN", s_vq[:64]),
            ("VQ-VAE + unigram codes", s_uni[:64]),
        ],
        nrow=8,
    )
    save_usage_histogram(
        out / "codebook_usage.png",
        usage["counts"],
        f"VQ-VAE code usage on {len(test)} test images: {usage['used']}/{K} used, "
        f"perplexity {usage['perplexity']:.1f}",
    )
    done("report")
    result["seconds"] = {**timings, "total": round(time.time() - t_start, 1)}
    result["machine"]["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    (out / "summary.md").write_text(summary_markdown(result))
    return result


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
        f"Fréchet distance on classifier features, M = {fd['M']} (lower is better):",
        "",
        "| samples | FD |",
        "| --- | --- |",
        f"| train vs test (floor) | {fd['floor_train_vs_test']:.2f} |",
        f"| AE decoder on random latents | {fd['ae_random_latents']:.2f} |",
        f"| VAE samples | {fd['vae_samples']:.2f} |",
        f"| VQ-VAE + unigram codes (what the prior must beat) | {fd['vqvae_unigram_codes']:.2f} |",
        f"| VQ-VAE + PixelCNN prior | {fd['vqvae_pixelcnn_samples']:.2f} |",
        "",
        "Figures: `reconstructions.png`, `samples.png`, `codebook_usage.png`. Seconds per stage: "
        + ", ".join(f"{k} {v}" for k, v in r["seconds"].items())
        + ".",
        "",
    ]
    return "\n".join(lines)
