"""Launcher of the Triton scatter kernels (``kernels/vq_scatter.py``): tiles, sort, grid."""

from __future__ import annotations

import torch
import triton

from fastvq.kernels.vq_scatter import scatter_rows_atomic_kernel, scatter_rows_segment_kernel


def scatter_rows_triton(
    indices: torch.Tensor,
    rows: torch.Tensor,
    num_codes: int,
    *,
    deterministic: bool = False,
) -> torch.Tensor:
    """Sum ``rows`` (N, D) into ``num_codes`` buckets by ``indices`` (N,) int64.

    Returns a new fp32 (num_codes, D) tensor. ``deterministic=True`` sorts the indices and reduces
    each code's segment in a fixed order (bitwise reproducible); the default uses fp32 atomics.
    No argument checks (``fastvq.scatter_rows`` does them); a row whose index lies outside
    ``[0, num_codes)`` is dropped, never written out of bounds.
    """
    n, d = rows.shape
    out = torch.zeros((num_codes, d), dtype=torch.float32, device=rows.device)
    if n == 0 or d == 0 or num_codes == 0:
        return out
    block_d = max(16, min(128, triton.next_power_of_2(d)))
    if not deterministic:
        # 32 rows: at 64, ptxas spills (sm_80 fp32; unaligned D's scalar loads and atomics on
        # sm_90); the atomics' count, not the tile, sets this kernel's speed
        block_n = 32
        if block_n * abs(rows.stride(0)) >= 2**31:
            rows = rows.contiguous()  # in-tile row offsets are int32
        grid = (triton.cdiv(n, block_n), triton.cdiv(d, block_d))
        scatter_rows_atomic_kernel[grid](
            indices, rows, out, n, num_codes, d, rows.stride(0), rows.stride(1),
            BLOCK_N=block_n, BLOCK_D=block_d,
        )  # fmt: skip
        return out
    sorted_idx, perm = torch.sort(indices, stable=True)
    # offsets[k] = first sorted position holding an index >= k, for k in [0, K]: code k's segment
    # is [offsets[k], offsets[k + 1]). Rows indexed < 0 sort before offsets[0] and rows >= K after
    # offsets[K], so they fall in no segment. (bincount would fail on a negative index, allocate
    # max(index) + 1 counts for a huge one, and sync with the host on CUDA.)
    codes = torch.arange(num_codes + 1, dtype=sorted_idx.dtype, device=rows.device)
    offsets = torch.searchsorted(sorted_idx, codes)
    grid = (num_codes, triton.cdiv(d, block_d))
    scatter_rows_segment_kernel[grid](
        perm, offsets, rows, out, d, rows.stride(0), rows.stride(1),
        BLOCK_R=16, BLOCK_D=block_d,
    )  # fmt: skip
    return out
