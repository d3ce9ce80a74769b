"""Fused nearest-code search: distance + running argmin + gather + squared error, one pass.

For ``z`` (N, D) and a codebook ``C`` (K, D), each program owns ``BLOCK_N`` rows and streams the
codebook in ``BLOCK_K`` tiles:

    dist[n, k] = ||C_k||^2 - 2 <z_n, C_k>          (fp32 accumulation; ||z_n||^2 is row-constant)
    idx[n]     = argmin_k dist[n, k]                (ties -> lowest k; NaN never wins)
    z_q[n]     = C[idx[n]]                          (cast to z's dtype)
    err[n]     = sum_d (z[n, d] - C[idx[n], d])^2   (fp32, from the gathered row, not from dist)

No N x K tensor exists anywhere: a tile of distances lives in registers only. This file holds the
kernel alone and imports nothing from ``fastvq``: the launcher that picks tiles, scales the inputs
and post-processes is ``fastvq/_search_triton.py``.
"""

import triton
import triton.language as tl


@triton.jit
def vq_search_fwd_kernel(
    # pointers
    z_ptr,
    c_ptr,
    zs_ptr,
    cs_ptr,
    cnorm_ptr,
    idx_ptr,
    zq_ptr,
    err_ptr,
    part_ptr,
    second_ptr,
    # sizes
    N,
    K,
    D,
    K_PER_SPLIT,
    # strides (elements)
    stride_zn,
    stride_zd,
    stride_ck,
    stride_cd,
    stride_zsn,
    stride_zsd,
    stride_sk,
    stride_sd,
    stride_qn,
    stride_qd,
    # meta-parameters
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_D: tl.constexpr,
    CAST_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    STORE_ZQ: tl.constexpr,
    SPLIT_K: tl.constexpr,
    TRACK_SECOND: tl.constexpr,
):
    """One program: BLOCK_N rows x the codes [split * K_PER_SPLIT, (split + 1) * K_PER_SPLIT).

    The search reads ``zs`` and ``cs`` (rows and codebook times the launcher's power-of-two scale
    s) and ``cnorm`` (``||s c||^2``), so it ranks ``s^2 dist``: the same order, with no overflow,
    underflow or flushed subnormal at any finite magnitude. The gather reads the unscaled ``z``
    and ``c``.

    SPLIT_K=False: the program sees every code, then gathers z_q and the squared error.
    SPLIT_K=True (small N, large K: too few row blocks to fill the GPU): it writes its partial
    (min distance, index) pair to ``part_ptr``/``idx_ptr`` [splits, N]; the launcher merges.
    TRACK_SECOND=True also keeps each row's second-best distance (``second_ptr``, [splits, N]):
    the launcher re-scores rows whose top-2 gap is within the fast mode's rounding bound.
    ONE_D=True (D <= BLOCK_D): the row tile is loaded once, outside the code loop.
    """
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    # int64 only in per-program (or per-tile) base offsets: N*D and K*D may exceed 2^31, while
    # in-tile offsets (< BLOCK * stride) stay int32 and cost half the registers.
    row0 = pid.to(tl.int64) * BLOCK_N
    n_rows = tl.minimum(N - row0, BLOCK_N).to(tl.int32)
    o_n = tl.arange(0, BLOCK_N)  # [BN] int32
    m_n = o_n < n_rows
    o_k = tl.arange(0, BLOCK_K)  # [BK] int32
    o_d = tl.arange(0, BLOCK_D)  # [BD] int32
    p_z0 = z_ptr + row0 * stride_zn
    p_zs0 = zs_ptr + row0 * stride_zsn
    k_lo = pid_s * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)

    if ONE_D:
        m_d = o_d < D
        p_z = p_zs0 + o_n[:, None] * stride_zsn + o_d[None, :] * stride_zsd
        b_z1 = tl.load(p_z, mask=m_n[:, None] & m_d[None, :], other=0.0)  # [BN, BD]
        if CAST_FP32:
            # The interpreter mishandles bf16 dot; mixed input dtypes also meet here in fp32.
            b_z1 = b_z1.to(tl.float32)

    b_best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    b_idx = tl.zeros([BLOCK_N], dtype=tl.int32) + k_lo
    b_second = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    # Every program walks the codebook in the same order, so programs resident at the same time
    # read the same code tiles and share them through L2.
    p_c0 = cs_ptr + k_lo.to(tl.int64) * stride_sk  # advanced one tile per step: 64-bit pointer
    for k0 in range(k_lo, k_hi, BLOCK_K):
        m_k = o_k < k_hi - k0
        b_acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        if ONE_D:
            p_c = p_c0 + o_k[None, :] * stride_sk + o_d[:, None] * stride_sd
            b_c = tl.load(p_c, mask=m_k[None, :] & m_d[:, None], other=0.0)  # [BD, BK]
            if CAST_FP32:
                b_c = b_c.to(tl.float32)
            b_acc = tl.dot(b_z1, b_c, b_acc, input_precision=INPUT_PRECISION)
        else:
            for d0 in range(0, D, BLOCK_D):
                m_d = o_d < D - d0
                p_z = p_zs0 + o_n[:, None] * stride_zsn + (d0 + o_d)[None, :] * stride_zsd
                b_z = tl.load(p_z, mask=m_n[:, None] & m_d[None, :], other=0.0)  # [BN, BD]
                p_c = p_c0 + o_k[None, :] * stride_sk + (d0 + o_d)[:, None] * stride_sd
                b_c = tl.load(p_c, mask=m_k[None, :] & m_d[:, None], other=0.0)  # [BD, BK]
                if CAST_FP32:
                    b_z = b_z.to(tl.float32)
                    b_c = b_c.to(tl.float32)
                b_acc = tl.dot(b_z, b_c, b_acc, input_precision=INPUT_PRECISION)
        b_cn = tl.load(cnorm_ptr + k0 + o_k, mask=m_k, other=float("inf"))  # [BK]
        b_dist = b_cn[None, :] - 2.0 * b_acc  # [BN, BK]
        # tl.min skips NaN (a NaN code never wins; an all-NaN row keeps k_lo) and NaN == x is
        # false, so no per-element NaN filter is needed in this loop.
        b_tmin = tl.min(b_dist, axis=1)  # [BN]
        # lowest in-tile index among the tile's minima: ties -> lowest k, whatever tl.argmin does
        b_targ = tl.min(tl.where(b_dist == b_tmin[:, None], o_k[None, :], BLOCK_K), axis=1)
        # strict < keeps the earlier tile on exact ties across tiles
        b_better = b_tmin < b_best
        if TRACK_SECOND:
            # tile runner-up: the smallest distance at any other index than the tile's argmin
            b_t2 = tl.min(tl.where(o_k[None, :] == b_targ[:, None], float("inf"), b_dist), axis=1)
            b_second = tl.where(b_better, tl.minimum(b_best, b_t2), tl.minimum(b_second, b_tmin))
        b_best = tl.where(b_better, b_tmin, b_best)
        b_idx = tl.where(b_better, k0 + b_targ, b_idx)
        p_c0 += BLOCK_K * stride_sk

    # -inf only comes from a row holding Inf (scaled finite inputs cannot overflow): such a row,
    # like a NaN row, gets k_lo, the torch backend's policy; partial minima stay comparable.
    b_idx = tl.where(b_best > float("-inf"), b_idx, k_lo)
    b_best = tl.where(b_best > float("-inf"), b_best, float("inf"))
    o_row = row0 + o_n  # [BN] int64, output rows
    if TRACK_SECOND:
        tl.store(second_ptr + pid_s.to(tl.int64) * N + o_row, b_second, mask=m_n)
        tl.store(part_ptr + pid_s.to(tl.int64) * N + o_row, b_best, mask=m_n)
    if SPLIT_K:
        tl.store(part_ptr + pid_s.to(tl.int64) * N + o_row, b_best, mask=m_n)
        tl.store(idx_ptr + pid_s.to(tl.int64) * N + o_row, b_idx.to(tl.int64), mask=m_n)
    else:
        tl.store(idx_ptr + o_row, b_idx.to(tl.int64), mask=m_n)
        # gather z_q = C[idx] and the per-row squared error from the gathered row
        b_err = tl.zeros([BLOCK_N], dtype=tl.float32)
        p_q0 = zq_ptr + row0 * stride_qn
        for d0 in range(0, D, BLOCK_D):
            m_d = o_d < D - d0
            m_nd = m_n[:, None] & m_d[None, :]
            p_z = p_z0 + o_n[:, None] * stride_zn + (d0 + o_d)[None, :] * stride_zd
            b_z = tl.load(p_z, mask=m_nd, other=0.0).to(tl.float32)
            p_c = c_ptr + b_idx.to(tl.int64)[:, None] * stride_ck + (d0 + o_d)[None, :] * stride_cd
            b_q = tl.load(p_c, mask=m_nd, other=0.0).to(tl.float32)
            b_diff = b_z - b_q
            b_err += tl.sum(b_diff * b_diff, axis=1)
            if STORE_ZQ:
                p_q = p_q0 + o_n[:, None] * stride_qn + (d0 + o_d)[None, :] * stride_qd
                tl.store(p_q, b_q.to(zq_ptr.dtype.element_ty), mask=m_nd)
        tl.store(err_ptr + o_row, b_err, mask=m_n)
