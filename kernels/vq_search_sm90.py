"""The fused search for Hopper (sm_90) in Gluon: the next MMA runs during this tile's epilogue.

Same contract as ``vq_search_fwd_kernel`` (kernels/vq_search.py, the portable Triton kernel and this
one's interpretable twin) for 16-bit operands of one dtype and D <= 256:

    score[n, k] = 2 <z_n, C_k> - ||C_k||^2 = -dist[n, k]   (fp32; exactly -fl(||C_k||^2 - 2 acc))
    idx[n]      = argmax_k score[n, k]                    (ties -> lowest k; NaN never wins)

Why Gluon: Triton's wgmma pipeliner keeps a dot asynchronous only when its result feeds another
dot, so a per-tile epilogue always waits for its own tile (``warp_group_dot_wait {pendings = 0}``).
Here code tiles go in pairs (a, b):

    issue MMA(a), MMA(b) (async)  ->  wait until 1 is in flight  ->  epilogue of a (MMA(b) runs)
                                  ->  wait for MMA(b)            ->  epilogue of b

so the tensor cores work on tile b while the CUDA cores run tile a's epilogue (half the epilogues
overlap an MMA). No MMA stays in flight across the loop's back edge: there, a loop-carried copy of
an in-flight accumulator makes ptxas serialise every wgmma of the kernel (its advisory C7514), which
a first version with one MMA always in flight hit. The epilogue keeps a running (score, tile) pair
per accumulator element: per element and tile one fma, one compare and two selects, with no
cross-lane reduction until after the loop. The next pair's code tiles are copied by ``cp.async``
into the other two of four shared-memory stages during this pair's work; every program walks the
codebook in the same order, so resident programs share code tiles through L2. The launcher pads the
norms with +inf past the last pair, so the hot loop has no bounds select.

This file imports nothing from ``fastvq``; the launcher is ``fastvq/_search_triton.py``. Gluon does
not run under ``TRITON_INTERPRET``: the Triton kernel is the CPU-tested twin, and the CUDA tests
compare the two.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_wait,
)


@gluon.jit
def _load_codes(
    stage, cs_ptr, tile, k_lo, k_hi, D, stride_sk, stride_sd, o_kl, o_dl, BLOCK_K: gl.constexpr
):
    """Start copying code tile ``tile`` (rows k_lo + tile * BLOCK_K...) into ``stage``; rows past
    ``k_hi`` and columns past ``D`` are filled with zeros (their norms are +inf)."""
    k0 = k_lo + tile * BLOCK_K
    rows = k0 + o_kl  # [BK] int32
    ptr = cs_ptr + rows.to(gl.int64)[:, None] * stride_sk + o_dl[None, :] * stride_sd
    cp.async_load(stage, ptr, mask=(rows < k_hi)[:, None] & (o_dl < D)[None, :])


@gluon.jit
def _keep_best(b_acc, b_top, b_tile, cnorm_ptr, k0, o_kc):
    """Fold one tile's scores into the running per-element (best score, its tile's first code)."""
    b_cn = gl.load(cnorm_ptr + k0 + o_kc)  # padded to whole tiles: no mask
    b_score = 2.0 * b_acc - b_cn[None, :]
    # strict >: the earlier tile keeps an exact tie; NaN never wins
    b_up = b_score > b_top
    return gl.where(b_up, b_score, b_top), gl.where(b_up, k0, b_tile)


@gluon.jit
def vq_search_fwd_sm90_kernel(
    z_ptr,
    c_ptr,
    zs_ptr,
    cs_ptr,
    cnorm_ptr,
    idx_ptr,
    zq_ptr,
    err_ptr,
    part_ptr,
    N,
    K,
    D,
    K_PER_SPLIT,
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
    BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr,
    BLOCK_D: gl.constexpr,
    STORE_ZQ: gl.constexpr,
    SPLIT_K: gl.constexpr,
):
    """One program: BLOCK_N rows x codes [split * K_PER_SPLIT, ...). Arguments as the Triton
    kernel's (``zs``/``cs``: the scaled copies searched; ``z``/``c``: gathered from), less the
    fp32-only ones. Needs D <= BLOCK_D, BLOCK_N = 16 * num_warps and K_PER_SPLIT a multiple of
    2 * BLOCK_K."""
    NUM_WARPS: gl.constexpr = gl.num_warps()
    dtype: gl.constexpr = cs_ptr.dtype.element_ty
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, BLOCK_K, 16]
    )
    row_l: gl.constexpr = gl.SliceLayout(1, acc_l)
    col_l: gl.constexpr = gl.SliceLayout(0, acc_l)
    # 16-byte vectors along D for the copies and the gather
    TPW_D: gl.constexpr = min(32, BLOCK_D // 8)
    ld_l: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_D, TPW_D], [NUM_WARPS, 1], [1, 0])
    z_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_D], dtype)
    c_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_K, BLOCK_D], dtype)
    z_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_D], z_sl)
    c_smem = gl.allocate_shared_memory(dtype, [4, BLOCK_K, BLOCK_D], c_sl)

    pid = gl.program_id(0)
    pid_s = gl.program_id(1)
    row0 = pid.to(gl.int64) * BLOCK_N
    k_lo = pid_s * K_PER_SPLIT
    k_hi = gl.minimum(k_lo + K_PER_SPLIT, K)
    n_tiles = gl.cdiv(k_hi - k_lo, BLOCK_K)
    o_nl = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ld_l))
    o_kl = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, ld_l))
    o_dl = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, ld_l))
    o_kc = gl.arange(0, BLOCK_K, layout=col_l)
    m_nl = o_nl < N - row0
    m_dl = o_dl < D

    # Prologue: the row tile and the first pair of code tiles, one copy group.
    p_z = zs_ptr + (row0 + o_nl)[:, None] * stride_zsn + o_dl[None, :] * stride_zsd
    cp.async_load(z_smem, p_z, mask=m_nl[:, None] & m_dl[None, :])
    _load_codes(
        c_smem.index(0), cs_ptr, 0, k_lo, k_hi, D, stride_sk, stride_sd, o_kl, o_dl, BLOCK_K
    )
    _load_codes(
        c_smem.index(1), cs_ptr, 1, k_lo, k_hi, D, stride_sk, stride_sd, o_kl, o_dl, BLOCK_K
    )
    cp.commit_group()
    b_acc_a = gl.zeros([BLOCK_N, BLOCK_K], gl.float32, acc_l)
    b_acc_b = gl.zeros([BLOCK_N, BLOCK_K], gl.float32, acc_l)
    b_top = gl.full([BLOCK_N, BLOCK_K], float("-inf"), gl.float32, acc_l)
    b_tile = gl.zeros([BLOCK_N, BLOCK_K], gl.int32, acc_l) + k_lo
    # Code tiles go in pairs (stages 0-1, then 2-3, in turn): MMA(b) runs during a's epilogue.
    # No MMA is in flight across the loop's back edge: ptxas serialises every wgmma of a kernel
    # where a loop-carried move reads an in-flight accumulator. Split ranges hold whole pairs
    # and the norms are padded past them with +inf, so a pair's second tile may lie past k_hi.
    for pair in range(0, gl.cdiv(n_tiles, 2)):
        st = (pair % 2) * 2
        # Pair `pair` has landed; after the barrier every warpgroup has retired the previous
        # pair's MMAs, so its stages take the next pair.
        cp.wait_group(0)
        fence_async_shared()
        gl.barrier()
        nst = 2 - st
        _load_codes(
            c_smem.index(nst),
            cs_ptr,
            2 * pair + 2,
            k_lo,
            k_hi,
            D,
            stride_sk,
            stride_sd,
            o_kl,
            o_dl,
            BLOCK_K,
        )
        _load_codes(
            c_smem.index(nst + 1),
            cs_ptr,
            2 * pair + 3,
            k_lo,
            k_hi,
            D,
            stride_sk,
            stride_sd,
            o_kl,
            o_dl,
            BLOCK_K,
        )
        cp.commit_group()
        tok_a = warpgroup_mma(
            z_smem, c_smem.index(st).permute((1, 0)), b_acc_a, use_acc=False, is_async=True
        )
        tok_b = warpgroup_mma(
            z_smem, c_smem.index(st + 1).permute((1, 0)), b_acc_b, use_acc=False, is_async=True
        )
        k0 = k_lo + 2 * pair * BLOCK_K
        b_acc_a = warpgroup_mma_wait(num_outstanding=1, deps=[tok_a])
        b_top, b_tile = _keep_best(b_acc_a, b_top, b_tile, cnorm_ptr, k0, o_kc)
        b_acc_b = warpgroup_mma_wait(num_outstanding=0, deps=[tok_b])
        b_top, b_tile = _keep_best(b_acc_b, b_top, b_tile, cnorm_ptr, k0 + BLOCK_K, o_kc)
    cp.wait_group(0)

    # One row reduction: the largest score, ties -> the lowest code. A row whose scores are all
    # -inf or NaN (a NaN row) keeps k_lo: every element ties at -inf with tile k_lo.
    b_max = gl.max(b_top, axis=1)  # [BN]
    b_code = gl.where(b_top == b_max[:, None], b_tile + o_kc[None, :], k_hi)
    b_idx = gl.min(b_code, axis=1)
    # +inf only comes from a row holding Inf: like a NaN row it gets k_lo (the torch backend's
    # policy), and its partial distance is +inf so the split merge stays comparable.
    b_idx = gl.where(b_max < float("inf"), b_idx, k_lo)
    b_best = gl.where((b_max > float("-inf")) & (b_max < float("inf")), -b_max, float("inf"))

    o_nr = gl.arange(0, BLOCK_N, layout=row_l)
    m_nr = o_nr < N - row0
    if SPLIT_K:
        o_part = pid_s.to(gl.int64) * N + row0 + o_nr
        gl.store(part_ptr + o_part, b_best, mask=m_nr)
        gl.store(idx_ptr + o_part, b_idx.to(gl.int64), mask=m_nr)
    else:
        gl.store(idx_ptr + row0 + o_nr, b_idx.to(gl.int64), mask=m_nr)
        # gather z_q = C[idx] and the per-row squared error from the gathered row
        b_gi = gl.convert_layout(b_idx, gl.SliceLayout(1, ld_l)).to(gl.int64)
        m_nd = m_nl[:, None] & m_dl[None, :]
        p_zr = z_ptr + (row0 + o_nl)[:, None] * stride_zn + o_dl[None, :] * stride_zd
        b_z = gl.load(p_zr, mask=m_nd, other=0.0).to(gl.float32)
        p_c = c_ptr + b_gi[:, None] * stride_ck + o_dl[None, :] * stride_cd
        b_q = gl.load(p_c, mask=m_nd, other=0.0)
        b_diff = b_z - b_q.to(gl.float32)
        gl.store(err_ptr + row0 + o_nl, gl.sum(b_diff * b_diff, axis=1), mask=m_nl)
        if STORE_ZQ:
            p_q = zq_ptr + (row0 + o_nl)[:, None] * stride_qn + o_dl[None, :] * stride_qd
            gl.store(p_q, b_q.to(zq_ptr.dtype.element_ty), mask=m_nd)
