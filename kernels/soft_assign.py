"""Fused soft assignment: the softmax of each row over the codebook, forward and backward.

For rows ``z`` (N, D), codes ``C`` (K, D), similarity ``s`` (SIM 0: ``z.c``; 1: ``-||z - c||^2``;
2: ``-sqrt(max(||z - c||^2, eps^2))``) and ``x = s * INV_TAU``, ``p = softmax_k(x)``:

    soft_assign_fwd_kernel       one program per BLOCK_N rows and D chunk, online softmax
                                 over code tiles: lse, argmax (ties -> lowest k),
                                 the entropy lse - sum_k p x, q = p @ C
    soft_assign_col_kernel       one program per BLOCK_K codes (and D chunk), over row tiles:
                                 BWD=False: col_k = sum_n w_n p_nk
                                 BWD=True:  dC from G = w p (a + g_e (x - lse) + g_q . c
                                 + g_col), a holding g_e (1 + lse - e)
    soft_assign_bwd_row_kernel   one program per BLOCK_N rows and D chunk: the row constant
                                 a = a0 - sum_k w p g_col (stored for the column kernel), then dz

D: with ``D_CHUNK`` 0 one BLOCK_D >= D tile holds the whole row (z, or C in the column kernels)
across the loop. With ``D_CHUNK`` > 0 (the D loop), program axis 1 owns the D chunk
``[pid_1 * BLOCK_D, +BLOCK_D)`` of the D-sized output (q, dz, dC), and each tile's dots over all
of D are summed ``D_CHUNK`` columns at a time (the last chunk ragged): no register tile is wider
than BLOCK_D whatever D is. Each output chunk's program recomputes the logits (cdiv(D, BLOCK_D)
times the dot work of one pass): the price of a spill-free binary at large or unaligned D.
Per-row outputs (lse, argmax, e, a) are stored by chunk 0 only.

Flash-attention style: no N x K tensor is written; the backward recomputes ``p`` per tile from
the saved ``lse``. All arithmetic in fp32 (the launcher passes fp32 ``z`` and ``C``, contiguous,
and their squared norms). Kernels only: imports nothing from ``fastvq``; the launcher is
``fastvq/_soft_assign_triton.py``.
"""

import triton
import triton.language as tl


@triton.jit
def _sim_tile(b_dot, b_zsq, b_csq, EPS, SIM: tl.constexpr):
    """Similarity ``s`` [BN, BK] from the tile's dot ``z.c``, and the squared distance ``d2``
    (SIM 1, 2; the dot for SIM 0) for the neg_dist clamp's slope."""
    if SIM == 0:
        b_s = b_dot
        b_d2 = b_dot
    else:
        b_d2 = (b_zsq[:, None] + b_csq[None, :]) - 2.0 * b_dot
        if SIM == 1:
            b_s = -b_d2
        else:
            b_s = -tl.sqrt_rn(tl.maximum(b_d2, EPS * EPS))
    return b_s, b_d2


@triton.jit
def _p_tile(b_dot, b_zsq, b_csq, b_lse, b_w, m_k, INV_TAU, EPS, SIM: tl.constexpr):
    """The backward's weighted ``w p`` [BN, BK] of one tile (0 past K) from its dot, with the
    similarity ``s``, ``d2`` (see :func:`_sim_tile`) and the logits ``x`` the chain reads."""
    b_sim, b_d2 = _sim_tile(b_dot, b_zsq, b_csq, EPS, SIM)
    b_x = b_sim * INV_TAU
    b_p = tl.where(m_k[None, :], tl.exp(b_x - b_lse[:, None]) * b_w[:, None], 0.0)
    return b_sim, b_d2, b_x, b_p


@triton.jit
def _dots_over_d(z_ptr, g_ptr, c_ptr, o_row, m_n, o_code, m_k, D, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, CHUNK: tl.constexpr, WITH_G: tl.constexpr,
                 PRECISION: tl.constexpr):  # fmt: skip
    """``z.c`` [BN, BK] (and ``g.c`` with WITH_G; g has z's layout) summed over D in CHUNK-wide
    pieces: only one [BN, CHUNK] and one [BK, CHUNK] piece live at a time. ``o_row``/``o_code`` are
    int64 row and code indices, ``m_n``/``m_k`` their bounds."""
    o_d = tl.arange(0, CHUNK)
    b_zc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    b_gc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, CHUNK):
        m_d = o_d < D - d0
        o_rd = o_row[:, None] * D + d0 + o_d[None, :]
        b_c = tl.load(c_ptr + o_code[:, None] * D + d0 + o_d[None, :],
                      mask=m_k[:, None] & m_d[None, :], other=0.0)  # fmt: skip
        b_z = tl.load(z_ptr + o_rd, mask=m_n[:, None] & m_d[None, :], other=0.0)
        b_zc = tl.dot(b_z, tl.trans(b_c), b_zc, input_precision=PRECISION)
        if WITH_G:
            b_g = tl.load(g_ptr + o_rd, mask=m_n[:, None] & m_d[None, :], other=0.0)
            b_gc = tl.dot(b_g, tl.trans(b_c), b_gc, input_precision=PRECISION)
    return b_zc, b_gc


@triton.jit
def _dot_and_gq(b_z, b_gq, b_c, z_ptr, gq_ptr, c_ptr, o_row, m_n, o_code, m_k, D,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, D_CHUNK: tl.constexpr,
                PRECISION: tl.constexpr):  # fmt: skip
    """``z.c`` and ``gq.c`` [BN, BK] of one code tile: from the held row tiles ``b_z``, ``b_gq``
    and code tile ``b_c``, or summed over D in D_CHUNK-wide pieces with the D loop (the held
    tiles are then not read)."""
    if D_CHUNK > 0:
        b_dot, b_gqc = _dots_over_d(z_ptr, gq_ptr, c_ptr, o_row, m_n, o_code, m_k, D, BLOCK_N,
                                    BLOCK_K, D_CHUNK, True, PRECISION)  # fmt: skip
    else:
        b_dot = tl.dot(b_z, tl.trans(b_c), input_precision=PRECISION)
        b_gqc = tl.dot(b_gq, tl.trans(b_c), input_precision=PRECISION)
    return b_dot, b_gqc


@triton.jit
def soft_assign_fwd_kernel(
    # pointers
    z_ptr,
    c_ptr,
    zsq_ptr,
    csq_ptr,
    lse_ptr,
    lo_ptr,
    idx_ptr,
    e_ptr,
    q_ptr,
    # sizes and scalars
    N,
    K,
    D,
    INV_TAU,
    EPS,
    # meta-parameters
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SIM: tl.constexpr,
    PRECISION: tl.constexpr,
    D_CHUNK: tl.constexpr,
):
    """Per row: running max ``m``, rescaled sums of ``exp(x - m)``, of ``exp(x - m) (x - m)``
    and of ``exp(x - m) c`` (this program's D chunk) over the code tiles; ``lse = m + log(sum)``
    and its rounding error (``lo_ptr``),
    ``e_ptr`` takes the entropy ``(lse - m) - E_p[x - m]`` and ``q`` the last sum over the
    first."""
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_N
    dc0 = tl.program_id(1) * BLOCK_D  # this program's D chunk (0 without the D loop)
    o_n = tl.arange(0, BLOCK_N)
    o_k = tl.arange(0, BLOCK_K)
    o_d = dc0 + tl.arange(0, BLOCK_D)
    o_row = row0 + o_n
    m_n = o_n < N - row0
    m_d = o_d < D
    m_nd = m_n[:, None] & m_d[None, :]
    if D_CHUNK == 0:
        b_z = tl.load(z_ptr + o_row[:, None] * D + o_d[None, :], mask=m_nd, other=0.0)  # [BN, BD]
    b_zsq = tl.load(zsq_ptr + o_row, mask=m_n, other=0.0)
    b_m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    b_s = tl.zeros([BLOCK_N], dtype=tl.float32)
    b_se = tl.zeros([BLOCK_N], dtype=tl.float32)
    b_sq = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_best = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    b_idx = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        m_k = o_k < K - k0
        o_code = (k0 + o_k).to(tl.int64)
        b_c = tl.load(c_ptr + o_code[:, None] * D + o_d[None, :],
                      mask=m_k[:, None] & m_d[None, :], other=0.0)  # [BK, BD]  # fmt: skip
        b_csq = tl.load(csq_ptr + k0 + o_k, mask=m_k, other=0.0)
        if D_CHUNK > 0:
            b_dot, _ = _dots_over_d(z_ptr, z_ptr, c_ptr, o_row, m_n, o_code, m_k, D, BLOCK_N,
                                    BLOCK_K, D_CHUNK, False, PRECISION)  # fmt: skip
        else:
            b_dot = tl.dot(b_z, tl.trans(b_c), input_precision=PRECISION)
        b_sim, _ = _sim_tile(b_dot, b_zsq, b_csq, EPS, SIM)
        b_x = tl.where(m_k[None, :], b_sim * INV_TAU, float("-inf"))  # [BN, BK]
        b_tmax = tl.max(b_x, axis=1)
        # lowest in-tile index among the tile's maxima; strict > keeps an earlier tile's tie
        b_targ = tl.min(tl.where(b_x == b_tmax[:, None], o_k[None, :], BLOCK_K), axis=1)
        b_better = b_tmax > b_best
        b_best = tl.where(b_better, b_tmax, b_best)
        b_idx = tl.where(b_better, k0 + b_targ, b_idx)
        b_mnew = tl.maximum(b_m, b_tmax)
        b_alpha = tl.exp(b_m - b_mnew)  # 0 on the first tile (m = -inf)
        b_xm = b_x - b_mnew[:, None]
        b_pe = tl.exp(b_xm)  # 0 for codes past K
        # sum exp(x - m) (x - m), rebased on the new max (the first tile has s = 0, m = -inf):
        # relative to the row max, the entropy lse - E_p[x] keeps its digits when p is one-hot
        b_shift = tl.where(b_s > 0, (b_m - b_mnew) * b_s, 0.0)
        b_se = (b_se + b_shift) * b_alpha + tl.sum(b_pe * tl.where(m_k[None, :], b_xm, 0.0), 1)
        b_s = b_s * b_alpha + tl.sum(b_pe, axis=1)
        b_sq = b_sq * b_alpha[:, None] + tl.dot(b_pe, b_c, input_precision=PRECISION)
        b_m = b_mnew
    if dc0 == 0:  # the per-row outputs: one writer
        b_lg = tl.log(b_s)
        b_lse = b_m + b_lg
        tl.store(lse_ptr + o_row, b_lse, mask=m_n)
        # lse's fp32 rounding error, exact when |log(sum)| <= |m| (Fast2Sum): the launcher folds
        # exp(-lo) into the row weights, so p rounds as with the max and the log-sum kept apart
        tl.store(lo_ptr + o_row, (b_m - b_lse) + b_lg, mask=m_n)
        tl.store(idx_ptr + o_row, b_idx.to(tl.int64), mask=m_n)
        # the row entropy lse - E_p[x] = (lse - m) - E_p[x - m]; lse - m is exact
        tl.store(e_ptr + o_row, (b_lse - b_m) - b_se / b_s, mask=m_n)
    tl.store(q_ptr + o_row[:, None] * D + o_d[None, :], b_sq / b_s[:, None], mask=m_nd)


@triton.jit
def soft_assign_col_kernel(
    # pointers
    z_ptr,
    c_ptr,
    zsq_ptr,
    csq_ptr,
    w_ptr,
    lse_ptr,
    col_ptr,
    a_ptr,
    ge_ptr,
    gq_ptr,
    gcol_ptr,
    dc_ptr,
    # sizes and scalars
    N,
    K,
    D,
    INV_TAU,
    EPS,
    # meta-parameters
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SIM: tl.constexpr,
    PRECISION: tl.constexpr,
    BWD: tl.constexpr,
    HAS_GCOL: tl.constexpr,
    VALUE_GRAD: tl.constexpr,
    D_CHUNK: tl.constexpr,
):
    """One program owns BLOCK_K codes (and, BWD with the D loop, one D chunk of their
    gradient)
    and walks every row tile: no atomics, a fixed summation order. BWD=False stores the column
    sums; BWD=True the codes' gradient (the similarity's chain plus ``p^T g_q``, q's own
    term)."""
    code0 = tl.program_id(0).to(tl.int64) * BLOCK_K
    dc0 = tl.program_id(1) * BLOCK_D
    o_n = tl.arange(0, BLOCK_N)
    o_k = tl.arange(0, BLOCK_K)
    o_d = dc0 + tl.arange(0, BLOCK_D)
    o_code = code0 + o_k
    m_k = o_k < K - code0
    m_d = o_d < D
    m_kd = m_k[:, None] & m_d[None, :]
    if BWD or D_CHUNK == 0:
        b_c = tl.load(c_ptr + o_code[:, None] * D + o_d[None, :], mask=m_kd, other=0.0)  # [BK, BD]
    b_csq = tl.load(csq_ptr + o_code, mask=m_k, other=0.0)
    b_col = tl.zeros([BLOCK_K], dtype=tl.float32)
    b_dc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    b_gcol = tl.zeros([BLOCK_K], dtype=tl.float32)
    if HAS_GCOL:
        b_gcol = tl.load(gcol_ptr + o_code, mask=m_k, other=0.0)
    for n0 in range(0, N, BLOCK_N):
        m_n = o_n < N - n0
        m_nd = m_n[:, None] & m_d[None, :]
        o_row = (n0 + o_n).to(tl.int64)
        o_nd = o_row[:, None] * D + o_d[None, :]
        b_zsq = tl.load(zsq_ptr + o_row, mask=m_n, other=0.0)
        b_lse = tl.load(lse_ptr + o_row, mask=m_n, other=0.0)
        b_w = tl.load(w_ptr + o_row, mask=m_n, other=0.0)
        if BWD:
            b_z = tl.load(z_ptr + o_nd, mask=m_nd, other=0.0)  # [BN, BD]
            b_gq = tl.load(gq_ptr + o_nd, mask=m_nd, other=0.0)  # [BN, BD]
            b_dot, b_gqc = _dot_and_gq(b_z, b_gq, b_c, z_ptr, gq_ptr, c_ptr, o_row, m_n, o_code,
                                       m_k, D, BLOCK_N, BLOCK_K, D_CHUNK, PRECISION)  # fmt: skip
        elif D_CHUNK > 0:
            b_dot, _ = _dots_over_d(z_ptr, z_ptr, c_ptr, o_row, m_n, o_code, m_k, D, BLOCK_N,
                                    BLOCK_K, D_CHUNK, False, PRECISION)  # fmt: skip
        else:
            b_z = tl.load(z_ptr + o_nd, mask=m_nd, other=0.0)
            b_dot = tl.dot(b_z, tl.trans(b_c), input_precision=PRECISION)
        b_sim, b_d2, b_x, b_p = _p_tile(b_dot, b_zsq, b_csq, b_lse, b_w, m_k, INV_TAU, EPS, SIM)
        if BWD:
            b_a = tl.load(a_ptr + o_row, mask=m_n, other=0.0)
            b_ge = tl.load(ge_ptr + o_row, mask=m_n, other=0.0)
            b_in = b_a[:, None] + b_ge[:, None] * (b_x - b_lse[:, None]) + b_gcol[None, :] + b_gqc
            b_h = b_p * b_in * INV_TAU  # dL/ds [BN, BK]
            if SIM == 0:
                b_dc += tl.dot(tl.trans(b_h), b_z, input_precision=PRECISION)
            elif SIM == 1:  # ds/dc = 2 (z - c)
                b_zh = tl.dot(tl.trans(b_h), b_z, input_precision=PRECISION)
                b_dc += 2.0 * (b_zh - b_c * tl.sum(b_h, axis=0)[:, None])
            else:  # ds/dc = (c - z) / s, zero slope under the floor
                b_h = tl.where(b_d2 < EPS * EPS, 0.0, b_h / b_sim)
                b_zh = tl.dot(tl.trans(b_h), b_z, input_precision=PRECISION)
                b_dc += b_c * tl.sum(b_h, axis=0)[:, None] - b_zh
            if VALUE_GRAD:  # q = p C: the codes' own term (off: the gradient of p @ sg(C))
                b_dc += tl.dot(tl.trans(b_p), b_gq, input_precision=PRECISION)
        else:
            b_col += tl.sum(b_p, axis=0)
    if BWD:
        tl.store(dc_ptr + o_code[:, None] * D + o_d[None, :], b_dc, mask=m_kd)
    else:
        tl.store(col_ptr + o_code, b_col, mask=m_k)


@triton.jit
def soft_assign_bwd_row_kernel(
    # pointers
    z_ptr,
    c_ptr,
    zsq_ptr,
    csq_ptr,
    w_ptr,
    lse_ptr,
    a0_ptr,
    ge_ptr,
    gq_ptr,
    gcol_ptr,
    a_ptr,
    dz_ptr,
    # sizes and scalars
    N,
    K,
    D,
    INV_TAU,
    EPS,
    # meta-parameters
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SIM: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_GCOL: tl.constexpr,
    NEED_DZ: tl.constexpr,
    D_CHUNK: tl.constexpr,
):
    """Rows' gradient (this program's D chunk of it). With column-sum gradients (HAS_GCOL) a
    first pass over the codes adds ``-sum_k w p g_col`` to the row constant; the constant is
    stored (by chunk 0) for the column kernel."""
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_N
    dc0 = tl.program_id(1) * BLOCK_D
    o_n = tl.arange(0, BLOCK_N)
    o_k = tl.arange(0, BLOCK_K)
    o_d = dc0 + tl.arange(0, BLOCK_D)
    o_row = row0 + o_n
    m_n = o_n < N - row0
    m_d = o_d < D
    m_nd = m_n[:, None] & m_d[None, :]
    o_nd = o_row[:, None] * D + o_d[None, :]
    b_z = tl.load(z_ptr + o_nd, mask=m_nd, other=0.0)  # [BN, BD]
    b_zsq = tl.load(zsq_ptr + o_row, mask=m_n, other=0.0)
    b_lse = tl.load(lse_ptr + o_row, mask=m_n, other=0.0)
    b_w = tl.load(w_ptr + o_row, mask=m_n, other=0.0)
    b_a = tl.load(a0_ptr + o_row, mask=m_n, other=0.0)
    if HAS_GCOL:
        for k0 in range(0, K, BLOCK_K):
            m_k = o_k < K - k0
            o_code = (k0 + o_k).to(tl.int64)
            b_csq = tl.load(csq_ptr + o_code, mask=m_k, other=0.0)
            if D_CHUNK > 0:
                b_dot, _ = _dots_over_d(z_ptr, z_ptr, c_ptr, o_row, m_n, o_code, m_k, D,
                                        BLOCK_N, BLOCK_K, D_CHUNK, False, PRECISION)  # fmt: skip
            else:
                b_c = tl.load(c_ptr + o_code[:, None] * D + o_d[None, :],
                              mask=m_k[:, None] & m_d[None, :], other=0.0)  # fmt: skip
                b_dot = tl.dot(b_z, tl.trans(b_c), input_precision=PRECISION)
            _, _, _, b_p = _p_tile(b_dot, b_zsq, b_csq, b_lse, b_w, m_k, INV_TAU, EPS, SIM)
            b_gcol = tl.load(gcol_ptr + o_code, mask=m_k, other=0.0)
            b_a -= tl.sum(b_p * b_gcol[None, :], axis=1)
    if dc0 == 0:
        tl.store(a_ptr + o_row, b_a, mask=m_n)
    if NEED_DZ:
        b_ge = tl.load(ge_ptr + o_row, mask=m_n, other=0.0)
        b_gq = b_z  # a placeholder with the D loop (the dots then read gq_ptr chunk by chunk)
        if D_CHUNK == 0:
            b_gq = tl.load(gq_ptr + o_nd, mask=m_nd, other=0.0)
        b_dz = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            m_k = o_k < K - k0
            o_code = (k0 + o_k).to(tl.int64)
            b_c = tl.load(c_ptr + o_code[:, None] * D + o_d[None, :],
                          mask=m_k[:, None] & m_d[None, :], other=0.0)  # [BK, BD]  # fmt: skip
            b_csq = tl.load(csq_ptr + o_code, mask=m_k, other=0.0)
            b_dot, b_gqc = _dot_and_gq(b_z, b_gq, b_c, z_ptr, gq_ptr, c_ptr, o_row, m_n, o_code,
                                       m_k, D, BLOCK_N, BLOCK_K, D_CHUNK, PRECISION)  # fmt: skip
            b_sim, b_d2, b_x, b_p = _p_tile(b_dot, b_zsq, b_csq, b_lse, b_w, m_k, INV_TAU, EPS,
                                            SIM)  # fmt: skip
            b_in = b_a[:, None] + b_ge[:, None] * (b_x - b_lse[:, None]) + b_gqc
            if HAS_GCOL:
                b_in += tl.load(gcol_ptr + o_code, mask=m_k, other=0.0)[None, :]
            b_h = b_p * b_in * INV_TAU  # dL/ds [BN, BK]
            if SIM == 0:
                b_dz += tl.dot(b_h, b_c, input_precision=PRECISION)
            elif SIM == 1:  # ds/dz = 2 (c - z)
                b_hc = tl.dot(b_h, b_c, input_precision=PRECISION)
                b_dz += 2.0 * (b_hc - b_z * tl.sum(b_h, axis=1)[:, None])
            else:  # ds/dz = (z - c) / s, zero slope under the floor
                b_h = tl.where(b_d2 < EPS * EPS, 0.0, b_h / b_sim)
                b_hc = tl.dot(b_h, b_c, input_precision=PRECISION)
                b_dz += b_z * tl.sum(b_h, axis=1)[:, None] - b_hc
        tl.store(dz_ptr + o_nd, b_dz, mask=m_nd)
