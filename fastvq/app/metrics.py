"""Offline metrics: reconstruction error, code statistics, Fréchet distance on classifier features.

All functions take tensors already on the right device and return plain Python floats or small
CPU tensors, so results go straight into ``metrics.json``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch


def mse_psnr(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image MSE and PSNR in dB (peak 1.0) for images in [0, 1]; both (B,)."""
    mse = (x - x_hat).pow(2).flatten(1).mean(1)
    psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
    return mse, psnr


def code_usage(indices: torch.Tensor, num_codes: int) -> dict:
    """Histogram of code indices, number of codes used, and perplexity exp(H) of the histogram."""
    counts = torch.bincount(indices.flatten().cpu(), minlength=num_codes).double()
    p = counts / counts.sum()
    nz = p[p > 0]
    entropy_nats = float(-(nz * nz.log()).sum())
    return {
        "counts": counts.long().tolist(),
        "used": int((counts > 0).sum()),
        "used_fraction": float((counts > 0).double().mean()),
        "perplexity": math.exp(entropy_nats),
        "entropy_bits": entropy_nats / math.log(2),
    }


def unigram_cross_entropy_bits(
    train_indices: torch.Tensor, test_indices: torch.Tensor, num_codes: int
) -> float:
    """Bits/code of the test codes under the train-set unigram distribution (add-1/2 smoothing):
    what an i.i.d. prior achieves, the baseline a PixelCNN must beat."""
    counts = torch.bincount(train_indices.flatten().cpu(), minlength=num_codes).double() + 0.5
    logp = (counts / counts.sum()).log2()
    return float(-logp[test_indices.flatten().cpu()].mean())


def unigram_probs(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    counts = torch.bincount(indices.flatten().cpu(), minlength=num_codes).double()
    return (counts / counts.sum()).float()


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N1, F), (N2, F):
    ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), in float64."""
    a = f1.double().cpu().numpy()
    b = f2.double().cpu().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    r = _sqrt_psd(s1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


@torch.no_grad()
def batched(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 500
) -> torch.Tensor:
    """Apply ``fn`` to ``x`` in chunks along dim 0 and concatenate the results."""
    return torch.cat([fn(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
