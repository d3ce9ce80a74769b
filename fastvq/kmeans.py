"""k-means for codebook initialisation, on the fused search (no N x K distance matrix).

Seeding is k-means++ (D^2 sampling) for K <= ``PLUSPLUS_MAX_K`` and K distinct random samples
above (k-means++ needs K sequential passes over the data: too slow for K = 65536); then Lloyd
steps assign with :func:`fastvq.search` and average with :func:`fastvq.scatter_rows`.
A cluster that loses all its points keeps its previous centre. Rows holding NaN/Inf are left out
(one would make a NaN centre).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import _scatter_rows_unchecked, code_counts, search

# k-means++ costs K sequential O(M D) passes: fine up to a few thousand codes.
PLUSPLUS_MAX_K = 2048


def _plusplus(x: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to D(x)^2."""
    m = x.shape[0]
    u = torch.rand(k, generator=generator).to(x.device)
    first = int(u[0] * m) % m
    centres = x.new_empty((k, x.shape[1]))
    centres[0] = x[first]
    d2 = (x - x[first]).square().sum(1)
    for i in range(1, k):
        cdf = torch.cumsum(d2, 0)
        j = torch.searchsorted(cdf, u[i] * cdf[-1], right=True).clamp_max(m - 1)
        centres[i] = x[j]
        d2 = torch.minimum(d2, (x - x[j]).square().sum(1))
    return centres


@torch.no_grad()
def kmeans(
    x: torch.Tensor,
    num_clusters: int,
    *,
    iters: int = 10,
    cosine: bool = False,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the rows of ``x``.

    Args:
        x: (M, D) float samples, at least one of them finite; rows holding NaN/Inf are ignored.
        num_clusters: K.
        iters: Lloyd steps after seeding.
        cosine: spherical k-means (rows and centres l2-normalised).
        generator: for the seeding (a CPU generator; pass the same seed on every rank).
        backend: search/scatter backend.
        init: fp32 (K, D) the starting centres (the Lloyd steps' only seeding; e.g. vqp's
            sampled rows, :func:`fastvq.codebook.vqp_rules.kmeans_init_`); None seeds from
            ``x`` with ``generator``.

    Returns:
        centres: fp32 (K, D). With fewer samples than clusters, samples are reused with a little
            noise so that centres stay distinct.
        counts: fp32 (K,) points per centre at the last assignment.
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"x must have shape (M, D) with M >= 1, got {tuple(x.shape)}")
    x = x.to(torch.float32)
    finite = torch.isfinite(x).all(1)
    if not bool(finite.all()):  # a host sync, like the seeding's; k-means runs once per layer
        x = x[finite]
        if x.shape[0] == 0:
            raise ValueError("x holds no finite row (every row has a NaN or Inf)")
    if cosine:
        x = F.normalize(x, dim=-1)
    m, _ = x.shape
    k = int(num_clusters)
    if init is not None:
        pick, centres = None, init.to(x)
    elif k <= PLUSPLUS_MAX_K and m >= k:
        pick = None
        centres = _plusplus(x, k, generator)
    elif m >= k:
        pick = torch.randperm(m, generator=generator)[:k]
    else:
        pick = torch.randint(m, (k,), generator=generator)
    if pick is not None:
        centres = x[pick.to(x.device)].clone()
    if m < k and init is None:  # duplicated samples: jitter the copies so no two centres coincide
        noise = torch.randn(centres.shape, generator=generator).to(x.device)
        centres += 1e-3 * noise * x.pow(2).mean().sqrt()
    if cosine:
        centres = F.normalize(centres, dim=-1)
    counts = torch.zeros(k, device=x.device)
    for _ in range(iters):
        idx, _, _ = search(x, centres, backend)
        sums = _scatter_rows_unchecked(idx, x, k, backend=backend)
        counts = code_counts(idx, k)
        new = sums / counts.clamp_min(1.0)[:, None]
        if cosine:
            new = F.normalize(new, dim=-1)
        centres = torch.where(counts[:, None] > 0, new, centres)
    if iters == 0:
        counts = code_counts(search(x, centres, backend)[0], k)
    return centres, counts
