"""The fused search for Hopper (sm_90) in Gluon: an MMA runs during each tile pair's first epilogue.

Same contract as ``vq_search_fwd_kernel`` (kernels/vq_search.py, the portable Triton kernel) for
16-bit operands of one dtype, D <= 256, D a multiple of 8; its interpretable twin, step for step,
is kernels/vq_search_sm90_twin.py:

    score[n, k] = <z_n, C_k> - ||C_k||^2 / 2 = (||z_n||^2 - dist[n, k]) / 2   (fp32 accumulation)
    idx[n]      = argmax_k score[n, k]                    (ties -> lowest k; NaN never wins)

Why Gluon: Triton's wgmma pipeliner keeps a dot asynchronous only when its result feeds another
dot, so a per-tile epilogue always waits for its own tile (``warp_group_dot_wait {pendings = 0}``).
Here code tiles of 128 go in pairs (a, b):

    issue MMA(a), MMA(b) (async)  ->  wait until b's are the only ones in flight
                                  ->  epilogue of a (MMA(b) runs)  ->  wait  ->  epilogue of b

so the tensor cores work on tile b while the CUDA cores run tile a's epilogue. No MMA stays in
flight across the loop's back edge: there, a loop-carried copy of an in-flight accumulator makes
ptxas serialise every wgmma of the kernel (its advisory C7514), which a first version with one MMA
always in flight hit.

The norm term rides in the MMA: the launcher writes -||C_k||^2 / 2 as three bf16 pieces whose fp32
sum is exact (``norm_pieces`` in the launcher), and a 16-wide extra K step multiplies them by ones
held in registers, so the accumulator is the score. The epilogue keeps, per row, the best score,
its tile and a copy of that tile's scores: a max and a select per element and tile; the column
is found once, after the loop. Code tiles arrive by TMA, one box and one mbarrier per stage, in a
ring of STAGES stages (tile t in stage t % STAGES, refilled with tile t + STAGES after tile t's
epilogue); rows past K come back as zeros and their norm pieces are padded with -inf, so no
select guards bounds in the loop. Every program walks the codebook in the same order, so
resident programs share code tiles through L2.

This file imports nothing from ``fastvq``; the launcher is ``fastvq/_search_triton.py``. Gluon does
not run under ``TRITON_INTERPRET``: the twin is what the CPU tests run, and the CUDA tests compare
this kernel with the Triton kernel and an fp64 oracle.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

# Triton 3.6 and 3.9 name three of Gluon's builtins differently (the one lent GPU so far had 3.6,
# CI has 3.9): the TMA load, the CTA barrier, and whether inline PTX with a scalar result exists.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
_HAS_INLINE_ASM = hasattr(gl, "inline_asm")

# Width of the extra K step that carries the norm pieces (the 16-bit MMA's K granularity).
NORM_K = gl.constexpr(16)


def stages_for(block_d: int) -> int:
    """Shared-memory stages of code tiles (the main loop's trip covers one tile per stage, which
    the static report divides its instruction count by): 4 where they fit, so a tile's TMA is
    issued three tiles ahead of its MMAs; 2 at D > 128, where a stage is 68 KiB and two fill the
    shared memory beside the 64 KiB row tile."""
    return 4 if block_d <= 128 else 2


if _HAS_INLINE_ASM:

    @gluon.jit
    def _first_row(BLOCK_N: gl.constexpr):
        """The row tile's first row, read again after the loop: a row0 kept across the loop went
        to the stack at D = 256 (the loop holds 255 registers), and an impure read is not merged
        with the first. (%ctaid.x is program_id(0) for a launch without clusters.)"""
        return gl.inline_asm("mov.u32 $0, %ctaid.x;", "=r", [], gl.int32) * BLOCK_N

else:

    @gluon.jit
    def _first_row(BLOCK_N: gl.constexpr):
        """Triton 3.6: no scalar inline PTX; program_id (kept across the loop)."""
        return gl.program_id(0) * BLOCK_N


@gluon.jit
def _load_tile(c_desc, n_desc, c_smem, n_smem, bar, slot, k0, pred, EXTRA: gl.constexpr = 0):
    """TMA the code tile at k0 and its norm pieces into stage ``slot``.

    The one expect-tx of the barrier's phase (an arrive: a second would complete the phase
    early) counts these bytes and EXTRA more, loaded by the caller on the same barrier.
    """
    NBYTES: gl.constexpr = c_desc.block_type.nbytes + n_desc.block_type.nbytes + EXTRA
    mbarrier.expect(bar.index(slot), NBYTES, pred=pred)
    _tma_load(c_desc, [k0, 0], bar.index(slot), c_smem.index(slot), pred=pred)
    _tma_load(n_desc, [k0, 0], bar.index(slot), n_smem.index(slot), pred=pred)


@gluon.jit
def _issue(z_smem, c_smem, b_one, n_smem, slot, b_free):
    """Start the MMAs of the tile in stage ``slot``: the codes, then the norm step, into the
    registers of ``b_free`` (use_acc=False ignores their values)."""
    tok = warpgroup_mma(z_smem, c_smem.index(slot).permute((1, 0)), b_free, use_acc=False,
                        is_async=True)  # fmt: skip
    # an async MMA may take another's pending result as its accumulator, with no wait
    return warpgroup_mma(b_one, n_smem.index(slot).permute((1, 0)), tok, is_async=True)


@gluon.jit
def _keep_best(b_score, b_top, b_tile, b_best, tile):
    """Fold tile number ``tile``'s scores into the running state of each row: its best score
    (``b_top``), the tile that holds it (``b_tile``), and that tile's scores (``b_best``).

    Per element this is one max (the row's maximum over the tile, within the thread before the
    lanes of a row combine) and one select (the copy, under the row's predicate); the column is
    found once, after the loop, in the copy. The copy holds the MMA's own values, so the final
    comparison with ``b_top`` finds the maximum exactly.
    """
    b_max = gl.max(b_score, axis=1)  # NaN never wins: max ignores NaN operands
    # strict >: the earlier tile keeps an exact tie
    b_up = b_max > b_top
    b_best = gl.where(b_up[:, None], b_score, b_best)
    return gl.where(b_up, b_max, b_top), gl.where(b_up, tile, b_tile), b_best


@gluon.jit
def _pair_step(
    z_smem,
    c_smem,
    n_smem,
    c_desc,
    n_desc,
    bar,
    b_one,
    b_acc_a,
    b_acc_b,
    b_top,
    b_tile,
    b_best,
    tile0,
    t,
    n_tiles,
    SA: gl.constexpr,
    STAGES: gl.constexpr,
    BLOCK_K: gl.constexpr,
    RUNTIME_STAGE: gl.constexpr,
):
    """Tiles t (stage SA) and t + 1 (stage SA + 1): both tiles' MMAs, tile t's epilogue while
    tile t + 1's MMAs run, and each stage refilled with the tile STAGES on once every warpgroup
    is done reading it."""
    phase = (t // STAGES) & 1
    stage = SA
    if RUNTIME_STAGE:
        # SA, but not to the compiler (the grid is 2-D): the code tiles' MMA descriptors are
        # then built each trip instead of held, 32 of them, in registers the loop lacks at D = 256
        stage = SA + t * gl.program_id(2)
    mbarrier.wait(bar.index(SA), phase)
    tok_a = _issue(z_smem, c_smem, b_one, n_smem, stage, b_acc_a)
    mbarrier.wait(bar.index(SA + 1), phase)
    tok_b = _issue(z_smem, c_smem, b_one, n_smem, stage + 1, b_acc_b)
    # tile t + 1's two commit groups (codes, norm step) stay in flight
    b_acc_a = warpgroup_mma_wait(num_outstanding=2, deps=[tok_a])
    b_top, b_tile, b_best = _keep_best(b_acc_a, b_top, b_tile, b_best, tile0 + t)
    # Every warpgroup has retired its MMAs on stage SA: it takes tile t + STAGES. The barrier and
    # the TMA issue come after tile t's epilogue on purpose: ptxas does not move the next wait
    # above them, while it did move that wait above an epilogue placed after them (and then no
    # epilogue instruction ran under the MMAs of tile t + 1).
    _cta_barrier()
    k0 = (tile0 + t + STAGES) * BLOCK_K
    _load_tile(c_desc, n_desc, c_smem, n_smem, bar, SA, k0, t + STAGES < n_tiles)
    # the running state rides along so that tile t's epilogue stays before this wait (else LLVM
    # sinks it past, and the MMAs of tile t + 1 no longer overlap anything)
    b_acc_b, b_top, b_tile, b_best = warpgroup_mma_wait(
        num_outstanding=0, deps=[tok_b, b_top, b_tile, b_best]
    )
    _cta_barrier()
    _load_tile(c_desc, n_desc, c_smem, n_smem, bar, SA + 1, k0 + BLOCK_K, t + 1 + STAGES < n_tiles)
    b_top, b_tile, b_best = _keep_best(b_acc_b, b_top, b_tile, b_best, tile0 + t + 1)
    return b_acc_a, b_acc_b, b_top, b_tile, b_best


@gluon.jit
def _single_step(z_smem, c_smem, n_smem, bar, b_one, b_acc, b_top, b_tile, b_best, tile0, t,
                 SA: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """The last tile of an odd count, alone in stage SA (its MMAs overlap nothing)."""
    mbarrier.wait(bar.index(SA), (t // STAGES) & 1)
    tok = _issue(z_smem, c_smem, b_one, n_smem, SA, b_acc)
    b_acc = warpgroup_mma_wait(num_outstanding=0, deps=[tok])
    b_top, b_tile, b_best = _keep_best(b_acc, b_top, b_tile, b_best, tile0 + t)
    return b_acc, b_top, b_tile, b_best


@gluon.jit
def vq_search_fwd_sm90_kernel(
    z_desc,
    c_desc,
    n_desc,
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
    stride_zn,
    stride_zd,
    stride_ck,
    stride_cd,
    stride_qn,
    stride_qd,
    STORE_ZQ: gl.constexpr,
    SPLIT_K: gl.constexpr,
    STAGES: gl.constexpr,
):
    """One program: BLOCK_N rows x codes [split * K_PER_SPLIT, ...).

    ``z_desc`` / ``c_desc``: TMA descriptors of the searched (scaled) rows (N, D) and codes
    (K, D), blocks (BLOCK_N, BLOCK_D) and (BLOCK_K, BLOCK_D); ``n_desc``: the bf16 norm pieces
    (K padded to whole tiles, 16), block (BLOCK_K, 16). ``z_ptr`` / ``c_ptr``: the unscaled
    inputs the gather reads. Outputs as the Triton kernel's (the partial distances of a split
    are ``-2 * score``). Needs BLOCK_N = 16 * num_warps, K_PER_SPLIT a multiple of BLOCK_K, a
    non-empty split, and a 2-D grid (``program_id(2)`` is the opaque zero of RUNTIME_STAGE).
    """
    BLOCK_N: gl.constexpr = z_desc.block_type.shape[0]
    BLOCK_D: gl.constexpr = z_desc.block_type.shape[1]
    BLOCK_K: gl.constexpr = c_desc.block_type.shape[0]
    NUM_WARPS: gl.constexpr = gl.num_warps()
    gl.static_assert(BLOCK_N == 16 * NUM_WARPS, "one warp per 16 rows (wgmma m64 per warpgroup)")
    dtype: gl.constexpr = c_desc.dtype
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, BLOCK_K, 16]
    )
    row_l: gl.constexpr = gl.SliceLayout(1, acc_l)
    col_l: gl.constexpr = gl.SliceLayout(0, acc_l)
    # the gather walks D in chunks of 64 (a whole row at once spilled after the loop at D = 200),
    # 16-byte vectors along D
    GATHER_D: gl.constexpr = min(BLOCK_D, 64)
    TPW_D: gl.constexpr = GATHER_D // 8
    ld_l: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_D, TPW_D], [NUM_WARPS, 1], [1, 0])

    z_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_D], z_desc.layout)
    gl.static_assert(STAGES % 2 == 0, "tiles go in pairs of stages")
    c_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_K, BLOCK_D], c_desc.layout)
    n_smem = gl.allocate_shared_memory(n_desc.dtype, [STAGES, BLOCK_K, NORM_K], n_desc.layout)
    bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(bar.index(s), count=1)
    fence_async_shared()

    pid = gl.program_id(0)
    pid_s = gl.program_id(1)
    row0 = pid * BLOCK_N
    k_lo = pid_s * K_PER_SPLIT
    k_hi = gl.minimum(k_lo + K_PER_SPLIT, K)
    n_tiles = gl.cdiv(k_hi - k_lo, BLOCK_K)
    tile0 = k_lo // BLOCK_K
    o_kc = gl.arange(0, BLOCK_K, layout=col_l)

    # Prologue: the row tile and the first tile on barrier 0, tile s on barrier s.
    _load_tile(c_desc, n_desc, c_smem, n_smem, bar, 0, k_lo, True, z_desc.block_type.nbytes)
    _tma_load(z_desc, [row0, 0], bar.index(0), z_smem)
    for s in gl.static_range(1, STAGES):
        _load_tile(c_desc, n_desc, c_smem, n_smem, bar, s, k_lo + s * BLOCK_K, n_tiles > s)
    # ones where the pieces sit, <1, pieces> = -||C_k||^2 / 2: the A operand of the norm step,
    # from registers (a shared-memory copy written here made every trip take one more barrier)
    one_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    o_j = gl.arange(0, NORM_K, layout=gl.SliceLayout(0, one_l))
    b_one = gl.zeros([BLOCK_N, NORM_K], n_desc.dtype, one_l) + (o_j < 3).to(n_desc.dtype)[None, :]
    b_acc_a = gl.zeros([BLOCK_N, BLOCK_K], gl.float32, acc_l)
    b_acc_b = gl.zeros([BLOCK_N, BLOCK_K], gl.float32, acc_l)
    # A row with no score above -inf (all NaN, or -inf) keeps tile0's column 0, that is k_lo:
    # its copy is all -inf and ties with b_top there.
    b_best = gl.full([BLOCK_N, BLOCK_K], float("-inf"), gl.float32, acc_l)
    b_top = gl.full([BLOCK_N], float("-inf"), gl.float32, row_l)
    b_tile = gl.zeros([BLOCK_N], gl.int32, row_l) + tile0
    smem = (z_smem, c_smem, n_smem, c_desc, n_desc, bar)
    # Tile t sits in stage t % STAGES. The loop is unrolled over the stages: with the stage a
    # constant, the MMA descriptors are fixed offsets (a run-time stage made ptxas rebuild them
    # each trip; at D = 256 they overflowed the uniform registers).
    RT: gl.constexpr = BLOCK_D > 128
    n_rounds = n_tiles // STAGES
    for r in range(0, n_rounds):
        for p in gl.static_range(STAGES // 2):
            b_acc_a, b_acc_b, b_top, b_tile, b_best = _pair_step(*smem, b_one, b_acc_a, b_acc_b,
                b_top, b_tile, b_best, tile0, r * STAGES + 2 * p, n_tiles, 2 * p, STAGES,
                BLOCK_K, RT)  # fmt: skip
    # The last round's fewer than STAGES tiles: pairs (at most STAGES // 2 - 1 of them), then an
    # odd one alone. No refills are left.
    base = n_rounds * STAGES
    for p in gl.static_range(STAGES // 2 - 1):
        if base + 2 * p + 1 < n_tiles:
            b_acc_a, b_acc_b, b_top, b_tile, b_best = _pair_step(*smem, b_one, b_acc_a, b_acc_b,
                b_top, b_tile, b_best, tile0, base + 2 * p, n_tiles, 2 * p, STAGES, BLOCK_K,
                RT)  # fmt: skip
    for p in gl.static_range(STAGES // 2):
        if n_tiles - base == 2 * p + 1:
            b_acc_a, b_top, b_tile, b_best = _single_step(z_smem, c_smem, n_smem, bar, b_one,
                b_acc_a, b_top, b_tile, b_best, tile0, base + 2 * p, 2 * p, STAGES)  # fmt: skip
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(bar.index(s))

    # The column: the lowest one of the best tile's copy that holds the row's best score.
    b_col = gl.min(gl.where(b_best == b_top[:, None], o_kc[None, :], BLOCK_K), axis=1)
    # (the copy always holds b_top; the clamp only keeps a broken invariant from reading past C)
    b_idx = gl.minimum(b_tile * BLOCK_K + b_col, K - 1)
    b_max = b_top
    # +inf only comes from a row holding Inf: like a NaN row it gets k_lo (the torch backend's
    # policy), and its partial distance is +inf so the split merge stays comparable. (k_lo from
    # tile0, which the loop keeps anyway: a k_lo kept across the loop went to the stack.)
    b_idx = gl.where(b_max < float("inf"), b_idx, gl.program_id(1) * K_PER_SPLIT)
    b_best_d = gl.where((b_max > float("-inf")) & (b_max < float("inf")), -2.0 * b_max,
                        float("inf"))  # fmt: skip

    row0 = _first_row(BLOCK_N)
    o_nr = gl.arange(0, BLOCK_N, layout=row_l)
    m_nr = o_nr < N - row0
    if SPLIT_K:
        o_part = pid_s.to(gl.int64) * N + row0 + o_nr
        gl.store(part_ptr + o_part, b_best_d, mask=m_nr)
        gl.store(idx_ptr + o_part, b_idx.to(gl.int64), mask=m_nr)
    else:
        gl.store(idx_ptr + row0 + o_nr, b_idx.to(gl.int64), mask=m_nr)
        # gather z_q = C[idx] and the per-row squared error from the gathered row
        o_nl = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ld_l))
        m_n = o_nl < N - row0
        b_gi = gl.convert_layout(b_idx, gl.SliceLayout(1, ld_l)).to(gl.int64)
        p_z = z_ptr + (row0 + o_nl).to(gl.int64)[:, None] * stride_zn
        p_c = c_ptr + b_gi[:, None] * stride_ck
        p_q = zq_ptr + (row0 + o_nl).to(gl.int64)[:, None] * stride_qn
        b_err = gl.zeros([BLOCK_N], gl.float32, gl.SliceLayout(1, ld_l))
        for d0 in gl.static_range(0, BLOCK_D, GATHER_D):
            o_dl = d0 + gl.arange(0, GATHER_D, layout=gl.SliceLayout(0, ld_l))
            m_nd = m_n[:, None] & (o_dl < D)[None, :]
            b_z = gl.load(p_z + o_dl[None, :] * stride_zd, mask=m_nd, other=0.0).to(gl.float32)
            b_q = gl.load(p_c + o_dl[None, :] * stride_cd, mask=m_nd, other=0.0)
            b_diff = b_z - b_q.to(gl.float32)
            b_err += gl.sum(b_diff * b_diff, axis=1)
            if STORE_ZQ:
                gl.store(p_q + o_dl[None, :] * stride_qd, b_q.to(zq_ptr.dtype.element_ty),
                         mask=m_nd)  # fmt: skip
        gl.store(err_ptr + row0 + o_nl, b_err, mask=m_n)
