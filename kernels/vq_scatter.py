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
The launcher is ``fastvq/_scatter_triton.py``; this file imports nothing from ``fastvq``.
"""

from __future__ import annotations

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
