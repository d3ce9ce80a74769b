"""Evaluation of the trained models (reconstruction, bits/dim, code usage, prior likelihood) and
the small feature classifier behind the Fréchet distances, trained once and cached on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..models import VAE, VQVAE, Classifier, ClassifierConfig, PixelCNN
from . import metrics as M
from .checkpoint import load_run
from .data import Split, to_float
from .loop import fit
from .rng import seed_everything


@torch.no_grad()
def eval_recon(
    model,
    split: Split,
    device="cpu",
    classifier=None,
    limit: int | None = None,
    batch_size: int = 500,
) -> dict:
    """Reconstruction MSE / PSNR over the split (and classifier accuracy on reconstructions)."""
    n = len(split) if limit is None else min(limit, len(split))
    mse, psnr, correct = [], [], 0
    for i in range(0, n, batch_size):
        x = to_float(split.images[i : min(i + batch_size, n)]).to(device)
        x_hat = model.reconstruct(x)
        a, b = M.mse_psnr(x, x_hat)
        mse.append(a.cpu())
        psnr.append(b.cpu())
        if classifier is not None:
            y = split.labels[i : min(i + batch_size, n)].to(device)
            correct += int((classifier(x_hat).argmax(1) == y).sum())
    out = {"mse": float(torch.cat(mse).mean()), "psnr": float(torch.cat(psnr).mean())}
    if classifier is not None:
        out["classifier_acc_on_recon"] = correct / n
    return out


@torch.no_grad()
def eval_vae(
    model: VAE,
    split: Split,
    device="cpu",
    limit: int | None = None,
    batch_size: int = 500,
    seed: int = 0,
) -> dict:
    """Test negative ELBO in bits/dim (one z sample per image, fixed seed) plus recon metrics."""
    n = len(split) if limit is None else min(limit, len(split))
    g = torch.get_rng_state()
    torch.manual_seed(seed)
    bpd, kl = [], []
    for i in range(0, n, batch_size):
        x = to_float(split.images[i : min(i + batch_size, n)]).to(device)
        b, parts = model.neg_elbo_bits_per_dim(x)
        bpd.append(b.cpu())
        kl.append(parts["kl_bpd"].cpu())
    torch.set_rng_state(g)
    out = {"neg_elbo_bpd": float(torch.cat(bpd).mean()), "kl_bpd": float(torch.cat(kl).mean())}
    out.update(eval_recon(model, split, device, limit=limit))
    return out


@torch.no_grad()
def encode_codes(
    vqvae: VQVAE,
    images_u8: torch.Tensor,
    device="cpu",
    batch_size: int = 500,
    desc: str | None = None,
) -> torch.Tensor:
    """uint8 images (N, H, W) -> code maps (N, h, w) int64 on the CPU."""
    vqvae.eval()
    out = []
    it = range(0, images_u8.shape[0], batch_size)
    for i in tqdm(it, desc=desc, leave=False, disable=desc is None):
        out.append(vqvae.encode(to_float(images_u8[i : i + batch_size]).to(device))[1].cpu())
    return torch.cat(out)


@torch.no_grad()
def eval_vqvae(model: VQVAE, split: Split, device="cpu", limit: int | None = None) -> dict:
    n = len(split) if limit is None else min(limit, len(split))
    codes = encode_codes(model, split.images[:n], device)
    usage = M.code_usage(codes, model.cfg.codebook_size)
    out = eval_recon(model, split, device, limit=limit)
    out.update(codes_used=usage["used"], perplexity=usage["perplexity"])
    return out


@torch.no_grad()
def eval_prior(
    prior: PixelCNN,
    codes: torch.Tensor,
    labels: torch.Tensor | None,
    device="cpu",
    batch_size: int = 500,
) -> dict:
    nll = []
    for i in range(0, codes.shape[0], batch_size):
        c = codes[i : i + batch_size].to(device)
        y = labels[i : i + batch_size].to(device) if labels is not None else None
        nll.append(prior.nll_bits(c, y).cpu())
    return {"nll_bits_per_code": float(torch.cat(nll).mean())}


def cache_dir() -> Path:
    return Path(os.environ.get("FASTVQ_CACHE", Path.home() / ".cache" / "fastvq"))


def get_classifier(
    dataset,
    device="cpu",
    steps: int = 600,
    seed: int = 0,
    cache: Path | None = None,
    position: int | None = None,
) -> tuple[Classifier, dict]:
    """The small feature classifier for ``dataset``, trained once with a fixed seed and cached
    on disk, keyed by dataset name, data size and training settings."""
    cfg = ClassifierConfig(
        in_channels=dataset.image_shape[0],
        image_size=dataset.image_shape[1],
        num_classes=dataset.num_classes,
    )
    key = f"classifier-{dataset.name}-n{len(dataset.train)}-s{steps}-seed{seed}"
    run_dir = (cache or cache_dir()) / key
    if (run_dir / "run.json").is_file():
        try:
            model, meta = load_run(run_dir, device)
            return model, meta["metrics"]
        except Exception:  # a stale or broken cache entry: retrain
            pass
    seed_everything(seed)  # before building: the initial weights are part of the fixed seed
    model = Classifier(cfg)

    def evaluate(m):
        with torch.no_grad():
            x = to_float(dataset.test.images).to(device)
            pred = M.batched(m, x).argmax(1).cpu()
        return {"test_acc": float((pred == dataset.test.labels).float().mean())}

    meta = fit(
        model,
        "classifier",
        dataset.train.images,
        dataset.train.labels,
        steps=steps,
        seed=seed,
        device=device,
        evaluate=evaluate,
        run_dir=run_dir,
        desc="feature classifier",
        position=position,
    )
    return model.eval(), meta["metrics"]


@torch.no_grad()
def features(classifier: Classifier, images: torch.Tensor, device="cpu") -> torch.Tensor:
    """float images (N, C, H, W) in [0, 1] -> (N, feature_dim) penultimate features."""
    return M.batched(lambda b: classifier.features(b.to(device)).cpu(), images)
