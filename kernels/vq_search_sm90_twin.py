"""The interpretable twin of kernels/vq_search_sm90.py: the same search, step for step, in Triton.

The Gluon kernel does not run under ``TRITON_INTERPRET``; this one does, so the CPU tests check
its algorithm: the norm term as three bf16 pieces in a 16-wide extra K step (rows past K padded
with -inf), code tiles taken in pairs with the odd one last, the per-row running state (the best
score, its tile, and that tile's scores) with strict > across tiles, the column found once after
the loop, Inf/NaN rows, split-K partials and the gather. What it cannot check is the Hopper
machinery (TMA, mbarrier phases, asynchronous MMAs): the CUDA tests compare the two kernels.

Launched by ``fastvq/_search_triton.py`` only under the interpreter, when
``FASTVQ_SEARCH_KERNEL=gluon`` asks for the Gluon kernel; operands are cast to fp32 (the
interpreter mishandles 16-bit dots), which holds bf16 and fp16 values exactly.
"""

import triton
import triton.language as tl

NORM_K = tl.constexpr(16)


@triton.jit
def _tile_scores(b_z, b_one, cs_ptr, pc_ptr, k0, K, D, stride_sk, stride_sd,
                 BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """[BN, BK] fp32 scores of the codes [k0, k0 + BLOCK_K): <z, c> + (sum of the norm pieces).

    Codes past K read as zeros (TMA's fill) and their pieces are -inf.
    """
    o_k = tl.arange(0, BLOCK_K)
    o_d = tl.arange(0, BLOCK_D)
    o_j = tl.arange(0, NORM_K)
    m_kd = (o_k < K - k0)[None, :] & (o_d < D)[:, None]
    p_c = cs_ptr + (k0 + o_k)[None, :].to(tl.int64) * stride_sk + o_d[:, None] * stride_sd
    b_c = tl.load(p_c, mask=m_kd, other=0.0).to(tl.float32)  # [BD, BK]
    b_acc = tl.dot(b_z, b_c)
    b_p = tl.load(pc_ptr + (k0 + o_k)[None, :].to(tl.int64) * NORM_K + o_j[:, None])  # [16, BK]
    return tl.dot(b_one, b_p.to(tl.float32), b_acc)


@triton.jit
def _keep_best(b_score, b_top, b_tile, b_best, tile):
    """The Gluon kernel's ``_keep_best``: row max, strict > against the running best, copy."""
    b_max = tl.max(b_score, axis=1)
    b_up = b_max > b_top
    b_best = tl.where(b_up[:, None], b_score, b_best)
    return tl.where(b_up, b_max, b_top), tl.where(b_up, tile, b_tile), b_best


@triton.jit
def vq_search_fwd_sm90_twin_kernel(
    zs_ptr,
    cs_ptr,
    pc_ptr,
    z_ptr,
    c_ptr,
    idx_ptr,
    zq_ptr,
    err_ptr,
    part_ptr,
    N,
    K,
    D,
    K_PER_SPLIT,
    stride_zsn,
    stride_zsd,
    stride_sk,
    stride_sd,
    stride_zn,
    stride_zd,
    stride_ck,
    stride_cd,
    stride_qn,
    stride_qd,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STORE_ZQ: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """One program: BLOCK_N rows x codes [split * K_PER_SPLIT, ...), as the Gluon kernel.

    ``zs_ptr`` / ``cs_ptr``: the searched (scaled) rows (N, D) and codes (K, D); ``pc_ptr``: the
    norm pieces, (K padded to whole tiles, 16) contiguous bf16; ``z_ptr`` / ``c_ptr``: the
    unscaled inputs the gather reads. K_PER_SPLIT is a multiple of BLOCK_K.
    """
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    row0 = pid * BLOCK_N
    k_lo = pid_s * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    n_tiles = tl.cdiv(k_hi - k_lo, BLOCK_K)
    tile0 = k_lo // BLOCK_K
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    o_kc = tl.arange(0, BLOCK_K)
    m_n = o_n < N - row0
    # the row tile as TMA gives it: zeros past N and past D
    p_zs = zs_ptr + (row0 + o_n).to(tl.int64)[:, None] * stride_zsn + o_d[None, :] * stride_zsd
    b_z = tl.load(p_zs, mask=m_n[:, None] & (o_d < D)[None, :], other=0.0).to(tl.float32)
    b_one = tl.zeros([BLOCK_N, NORM_K], tl.float32) + (tl.arange(0, NORM_K) < 3).to(tl.float32)
    b_best = tl.full([BLOCK_N, BLOCK_K], float("-inf"), tl.float32)
    b_top = tl.full([BLOCK_N], float("-inf"), tl.float32)
    b_tile = tl.zeros([BLOCK_N], tl.int32) + tile0
    for t in range(0, n_tiles - 1, 2):
        k0 = (tile0 + t) * BLOCK_K
        b_a = _tile_scores(b_z, b_one, cs_ptr, pc_ptr, k0, K, D, stride_sk, stride_sd,
                           BLOCK_K, BLOCK_D)  # fmt: skip
        b_b = _tile_scores(b_z, b_one, cs_ptr, pc_ptr, k0 + BLOCK_K, K, D, stride_sk, stride_sd,
                           BLOCK_K, BLOCK_D)  # fmt: skip
        b_top, b_tile, b_best = _keep_best(b_a, b_top, b_tile, b_best, tile0 + t)
        b_top, b_tile, b_best = _keep_best(b_b, b_top, b_tile, b_best, tile0 + t + 1)
    if n_tiles % 2 == 1:
        k0 = (tile0 + n_tiles - 1) * BLOCK_K
        b_a = _tile_scores(b_z, b_one, cs_ptr, pc_ptr, k0, K, D, stride_sk, stride_sd,
                           BLOCK_K, BLOCK_D)  # fmt: skip
        b_top, b_tile, b_best = _keep_best(b_a, b_top, b_tile, b_best, tile0 + n_tiles - 1)

    b_col = tl.min(tl.where(b_best == b_top[:, None], o_kc[None, :], BLOCK_K), axis=1)
    b_idx = tl.minimum(b_tile * BLOCK_K + b_col, K - 1)
    b_idx = tl.where(b_top < float("inf"), b_idx, tile0 * BLOCK_K)
    b_part = tl.where((b_top > float("-inf")) & (b_top < float("inf")), -2.0 * b_top,
                      float("inf"))  # fmt: skip
    if SPLIT_K:
        o_part = pid_s.to(tl.int64) * N + row0 + o_n
        tl.store(part_ptr + o_part, b_part, mask=m_n)
        tl.store(idx_ptr + o_part, b_idx.to(tl.int64), mask=m_n)
    else:
        tl.store(idx_ptr + row0 + o_n, b_idx.to(tl.int64), mask=m_n)
        m_nd = m_n[:, None] & (o_d < D)[None, :]
        p_z = z_ptr + (row0 + o_n).to(tl.int64)[:, None] * stride_zn + o_d[None, :] * stride_zd
        b_zz = tl.load(p_z, mask=m_nd, other=0.0).to(tl.float32)
        p_c = c_ptr + b_idx.to(tl.int64)[:, None] * stride_ck + o_d[None, :] * stride_cd
        b_q = tl.load(p_c, mask=m_nd, other=0.0)
        b_diff = b_zz - b_q.to(tl.float32)
        tl.store(err_ptr + row0 + o_n, tl.sum(b_diff * b_diff, axis=1), mask=m_n)
        if STORE_ZQ:
            p_q = zq_ptr + (row0 + o_n).to(tl.int64)[:, None] * stride_qn + o_d[None, :] * stride_qd
            tl.store(p_q, b_q.to(zq_ptr.dtype.element_ty), mask=m_nd)
