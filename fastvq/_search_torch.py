"""Pure-torch nearest-code search: the readable twin of the Triton kernel and the CPU path.

The contract is the one of ``kernels/vq_search.py``: for ``z2d`` (N, D) and ``codebook`` (K, D)
return ``(indices, z_q, err)`` with ``indices`` int64 (N,), ``z_q = codebook[indices]`` in ``z2d``'s
dtype and ``err`` fp32 (N,) the squared error ``sum_d (z - z_q)^2``.

It never allocates an N x K tensor: rows are processed in blocks of ``block_n`` and codes in blocks
of ``block_k``, each (row block x code block) tile is one ``addmm`` into a reused buffer, and a
running (min, argmin) per row carries across code blocks. That is the same loop the kernel runs.
"""

from __future__ import annotations

import torch

# Tile sizes: a tile of 1024 x 512 fp32 distances (2 MiB) stays in the core's cache between the
# addmm that writes it and the min that reads it. Measured single-threaded on the 2-core AMD EPYC
# (N=16384, K=8192, D=64, 2026-11-26, machine shared with other jobs, so +-30% noise): 1024x512
# 470-740 ms, 4096x1024 (16 MiB) 670-1420 ms, faiss IndexFlatL2 470-590 ms. Row-only chunking
# (the whole K per row block) was 2.5x slower at K=65536 in earlier trials.
DEFAULT_BLOCK_N = 1024
DEFAULT_BLOCK_K = 512

# Tests set this to fill the index output with -1 before the loop, so a row block the loop
# forgets to write fails loudly.
POISON_OUTPUTS = False


def _row_absmax(x: torch.Tensor) -> torch.Tensor:
    """fp32 (rows,) max |x| per row; NaN or Inf exactly for the rows holding NaN/Inf."""
    if x.shape[0] == 0 or x.shape[1] == 0:
        return torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    lo, hi = torch.aminmax(x, dim=1)  # NaN/Inf propagate: a non-finite row stays non-finite
    return torch.maximum(hi, -lo).to(torch.float32)


def scale_and_row_finite(
    z2d: torch.Tensor, codebook: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(magnitude_scale(z2d, codebook), bool (N,) rows of z2d without NaN/Inf)`` in one pass."""
    zmax, cmax = _row_absmax(z2d), _row_absmax(codebook)
    zero = torch.zeros((), device=z2d.device)
    row_finite = torch.isfinite(zmax)

    def finite_max(m: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        return torch.where(ok, m, zero).amax() if m.numel() else zero

    m = torch.maximum(finite_max(zmax, row_finite), finite_max(cmax, torch.isfinite(cmax)))
    _, e = torch.frexp(m)  # m = f 2^e, f in [0.5, 1); m = 0 gives e = 0
    # Built from its bits, so s is exactly 2^-e; the clamp keeps s and 1/s normal fp32 numbers.
    e = e.to(torch.int32).clamp(-126, 126)
    return ((127 - e) << 23).view(torch.float32), row_finite


def magnitude_scale(z2d: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """fp32 0-dim power of two ``s`` with ``max |x| * s`` in [0.5, 1) over the finite rows of both.

    Both backends search ``s^2 dist = ||s c||^2 - 2 (s z).(s c)``: multiplying by a power of two is
    exact, so the order of the distances is unchanged, while no product, sum or norm can overflow
    (huge inputs) or underflow (tiny or subnormal inputs). Rows or codes holding NaN/Inf are left
    out (they are never selected, or get index 0). Computed on the device, so no host sync.
    """
    return scale_and_row_finite(z2d, codebook)[0]


def code_norms(
    codebook: torch.Tensor, chunk_elems: int = 1 << 24, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """fp32 (K,) squared norms ``||scale c||^2``; +inf for a code holding NaN/Inf.

    Both backends take their norms from here, so they share the NaN policy (see
    ``fastvq.functional``): a code with an infinite norm is never selected. Computed in chunks of
    rows so that a bf16 codebook never gets a whole K x D fp32 copy (256 MiB at K = 262144,
    D = 256) just for its norms.
    """
    k, d = codebook.shape
    out = torch.empty(k, dtype=torch.float32, device=codebook.device)
    step = max(1, chunk_elems // max(d, 1))
    inf = torch.full((), float("inf"), device=codebook.device)
    for i in range(0, k, step):
        c = codebook[i : i + step].to(torch.float32)
        if scale is None:
            finite = torch.isfinite(c).all(dim=1)
            sq = c.square().sum(dim=1)
        else:
            # Scaled, a finite code's squares cannot overflow: its norm is finite exactly when the
            # code is, and no separate finiteness pass is needed.
            sq = (c * scale).square().sum(dim=1)
            finite = torch.isfinite(sq)
        out[i : i + step] = torch.where(finite, sq, inf)
    return out


def sanitize_codes(
    codebook32: torch.Tensor, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(scale codes, ||scale c||^2)`` in fp32; a non-finite code is never selected.

    A code with an infinite norm (it holds NaN or Inf) also gets zeroed values, so the GEMM stays
    finite and its distance to every row is +inf.
    """
    norms = code_norms(codebook32, scale=scale)
    zero = torch.zeros((), device=codebook32.device)
    codes = codebook32 if scale is None else codebook32 * scale
    return torch.where(torch.isfinite(norms)[:, None], codes, zero), norms


@torch.no_grad()
def search_torch(
    z2d: torch.Tensor,
    codebook: torch.Tensor,
    *,
    block_n: int = DEFAULT_BLOCK_N,
    block_k: int = DEFAULT_BLOCK_K,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest code by squared L2 for every row, tiled so that no N x K tensor exists.

    Args:
        z2d: (N, D) float tensor, any strides.
        codebook: (K, D) float tensor, K >= 1, same device.
        block_n, block_k: tile sizes (rows x codes) of one distance tile.

    Returns:
        indices: int64 (N,), ties to the lowest index.
        z_q: (N, D) in ``z2d.dtype``, exactly ``codebook[indices]`` cast.
        err: fp32 (N,), ``sum_d (z - z_q)^2`` computed from ``z`` and the gathered code directly
            (adding ``||z||^2`` back to the GEMM distance would cancel catastrophically).

    Distances are ``||c||^2 - 2 z.c`` in fp32 whatever the input dtype (``||z||^2`` is constant per
    row), ranked after an exact power-of-two rescaling (:func:`magnitude_scale`), so huge and tiny
    finite inputs rank correctly. A row holding NaN/Inf gets index 0; a non-finite code is never
    selected.
    """
    n, _ = z2d.shape
    k = codebook.shape[0]
    dev = z2d.device
    indices = torch.empty(n, dtype=torch.int64, device=dev)
    if POISON_OUTPUTS:
        indices.fill_(-1)
    if n == 0:
        return indices, z2d.new_empty(z2d.shape), torch.empty(0, dtype=torch.float32, device=dev)

    # s^2 dist with one power-of-two scale of both operands: exact, and no overflow, underflow
    # or flushed subnormal at any finite magnitude
    scale, row_finite = scale_and_row_finite(z2d, codebook)
    codes, norms = sanitize_codes(codebook.to(torch.float32), scale)
    codes_t = codes.t()  # (D, K) view: addmm reads it as a transposed operand, no copy
    z_in32 = z2d.to(torch.float32)
    z32 = z_in32 * scale  # the GEMM operand: non-finite rows zeroed (they get index 0 below)
    # On CPU the finiteness check costs no device sync; elsewhere always take the safe path.
    if dev.type != "cpu" or not bool(row_finite.all()):
        z32 = torch.where(row_finite[:, None], z32, torch.zeros((), device=dev))

    bn = min(block_n, n)
    bk = min(block_k, k)
    # nonzero() on an accelerator waits for it: there every row takes the argmin instead
    sync_free = dev.type != "cpu"
    buf = torch.empty(bn, bk, dtype=torch.float32, device=dev)
    for n0 in range(0, n, bn):
        n1 = min(n0 + bn, n)
        zb = z32[n0:n1]
        best = torch.full((n1 - n0,), float("inf"), device=dev)
        best_i = torch.zeros(n1 - n0, dtype=torch.int64, device=dev)
        for k0 in range(0, k, bk):
            k1 = min(k0 + bk, k)
            tile = buf[: n1 - n0, : k1 - k0]
            # tile = ||c||^2 - 2 z.c, one BLAS call writing into the reused buffer
            torch.addmm(norms[k0:k1], zb, codes_t[:, k0:k1], beta=1.0, alpha=-2.0, out=tile)
            # The tile's minimum alone is cheap (a vectorised amin); its index is not (min with
            # indices or argmin cost as much as the GEMM on CPU). Only rows whose best improved
            # need one, and after the first tiles those are few. strict < keeps the earlier
            # (lower-index) block on exact ties across blocks.
            tmin = tile.amin(dim=1)
            better = tmin < best
            if sync_free:
                targ = tile.argmin(dim=1)  # first occurrence on ties -> lowest index
                best_i = torch.where(better, targ + k0, best_i)
            else:
                rows = better.nonzero().squeeze(1)
                if rows.numel():
                    targ = tile.index_select(0, rows).argmin(dim=1)  # ties -> lowest index
                    best_i.index_copy_(0, rows, targ + k0)
            best = torch.where(better, tmin, best)
        indices[n0:n1] = best_i
    indices.masked_fill_(~row_finite, 0)

    z_q32 = codebook.index_select(0, indices).to(torch.float32)
    err = (z_in32 - z_q32).square().sum(dim=1)
    return indices, z_q32.to(z2d.dtype), err
