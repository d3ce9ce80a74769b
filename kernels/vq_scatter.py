"""Scatter-add of rows into codes: the codebook gradient and the EMA sums share it.

    out[k, :] = sum_{i : idx[i] == k} rows[i, :]      (fp32 accumulation)

Two kernels:
- ``scatter_rows_atomic_kernel``: one program per (row block, D block), fp32 ``tl.atomic_add``.
  Fast when codes are spread; the summation order (and so the last bits) varies run to run.
- ``scatter_rows_segment_kernel``: rows sorted by code, one program per (code, D block) sums its
  contiguous segment in a fixed order: bitwise deterministic.

Memory safety: neither kernel trusts an index. The atomic kernel masks every store to
``0 <= idx < K``; the segment kernel runs one program per code of ``[0, K)`` over segment bounds
found by a binary search for each code, so a row whose index lies outside ``[0, K)`` falls in no
segment. Either way such a row is dropped: nothing is written outside the (K, D) output, whoever
calls the kernel (the public ``fastvq.scatter_rows`` rejects such indices before launching).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def scatter_rows_atomic_kernel(
    idx_ptr,
    rows_ptr,
    out_ptr,
    N,
    K,
    D,
    stride_rn,
    stride_rd,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # int64 only in the per-program row base (N * stride may exceed 2^31) and in the code index
    # (K * D may); in-tile offsets stay int32, which keeps the unaligned-D binaries spill-free.
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_N
    n_rows = tl.minimum(N - row0, BLOCK_N).to(tl.int32)
    o_n = tl.arange(0, BLOCK_N)  # [BN] int32
    o_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD] int32
    m_n = o_n < n_rows
    b_idx = tl.load(idx_ptr + row0 + o_n, mask=m_n, other=0).to(tl.int64)  # [BN]
    # a row whose index lies outside [0, K) is dropped: its store would land outside the output
    m_k = m_n & (b_idx >= 0) & (b_idx < K)
    m = m_k[:, None] & (o_d < D)[None, :]  # [BN, BD]
    p_r = rows_ptr + row0 * stride_rn + o_n[:, None] * stride_rn + o_d[None, :] * stride_rd
    b_r = tl.load(p_r, mask=m, other=0.0).to(tl.float32)
    tl.atomic_add(out_ptr + b_idx[:, None] * D + o_d[None, :], b_r, mask=m)


@triton.jit
def scatter_rows_segment_kernel(
    perm_ptr,
    offsets_ptr,
    rows_ptr,
    out_ptr,
    D,
    stride_rn,
    stride_rd,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    code = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    o_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    m_d = o_d < D
    start = tl.load(offsets_ptr + code)
    end = tl.load(offsets_ptr + code + 1)
    b_acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        o_r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        m_r = o_r < end
        b_row = tl.load(perm_ptr + o_r, mask=m_r, other=0)
        p_r = rows_ptr + b_row[:, None] * stride_rn + o_d[None, :] * stride_rd
        b_acc += tl.load(p_r, mask=m_r[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + code * D + o_d, tl.sum(b_acc, axis=0), mask=m_d)


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
