"""PNG figures shared by ``fastvq demo`` and ``fastvq sample``: image grids and a code-usage
histogram. matplotlib is imported on first use, with the Agg backend (no display needed). Each
file is written as a new file renamed into place (never through a symlink at its path)."""

from __future__ import annotations

import math

import torch

from .checkpoint import atomic_write


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
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)


def save_usage_histogram(path, counts: list[int], title: str):
    """One PNG: code counts by index (left) and sorted, on a symlog scale (right)."""
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
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
