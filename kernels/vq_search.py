"""Fused nearest-code search: distance + running argmin + gather + squared error, one pass.

For ``z`` (N, D) and a codebook ``C`` (K, D), each program owns ``BLOCK_N`` rows and streams the
codebook in ``BLOCK_K`` tiles:

    dist[n, k] = ||C_k||^2 - 2 <z_n, C_k>          (fp32 accumulation; ||z_n||^2 is row-constant)
    idx[n]     = argmin_k dist[n, k]                (ties -> lowest k; NaN never wins)
    z_q[n]     = C[idx[n]]                          (cast to z's dtype)
    err[n]     = sum_d (z[n, d] - C[idx[n], d])^2   (fp32, from the gathered row, not from dist)

No N x K tensor exists anywhere: a tile of distances lives in registers only.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastvq._search_torch import code_norms
from fastvq.ops import interpreting

# Tests set this to fill outputs with NaN / -1 before launch, so a row the kernel forgets to write
# fails loudly instead of passing with whatever memory held.
POISON_OUTPUTS = False

FP32_PRECISIONS = ("ieee", "tf32x3", "tf32", "tf32_rescore")
# How many rows "tf32_rescore" searched again (read by tests and the GPU exactness report).
RESCORE_STATS = {"rows": 0}


@triton.jit
def vq_search_fwd_kernel(
    # pointers
    z_ptr,
    c_ptr,
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
    stride_qn,
    stride_qd,
    # meta-parameters
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAST_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    STORE_ZQ: tl.constexpr,
    SPLIT_K: tl.constexpr,
    TRACK_SECOND: tl.constexpr,
):
    """One program: BLOCK_N rows x the codes [split * K_PER_SPLIT, (split + 1) * K_PER_SPLIT).

    SPLIT_K=False: the program sees every code, then gathers z_q and the squared error.
    SPLIT_K=True (small N, large K: too few row blocks to fill the GPU): it writes its partial
    (min distance, index) pair to ``part_ptr``/``idx_ptr`` [splits, N]; the launcher merges.
    TRACK_SECOND=True also keeps each row's second-best distance (``second_ptr``, [splits, N]):
    the launcher re-scores rows whose top-2 gap is within the fast mode's rounding bound.
    """
    pid = tl.program_id(0).to(tl.int64)  # int64 before any stride product: N*D may exceed 2^31
    pid_s = tl.program_id(1).to(tl.int64)
    o_n = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # [BN]
    m_n = o_n < N
    o_d = tl.arange(0, BLOCK_D)
    k_lo = pid_s * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)

    b_best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    b_idx = tl.zeros([BLOCK_N], dtype=tl.int64) + k_lo
    b_second = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    # Every program walks the codebook in the same order, so programs resident at the same time
    # read the same code tiles and share them through L2.
    for k0 in range(k_lo, k_hi, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)  # [BK]
        m_k = o_k < k_hi
        b_acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            m_d = (d0 + o_d) < D
            p_z = z_ptr + o_n[:, None] * stride_zn + (d0 + o_d)[None, :] * stride_zd
            b_z = tl.load(p_z, mask=m_n[:, None] & m_d[None, :], other=0.0)  # [BN, BD]
            p_c = c_ptr + o_k[None, :] * stride_ck + (d0 + o_d)[:, None] * stride_cd
            b_c = tl.load(p_c, mask=m_k[None, :] & m_d[:, None], other=0.0)  # [BD, BK]
            if CAST_FP32:
                # The interpreter mishandles bf16 dot; mixed input dtypes also meet here in fp32.
                b_z = b_z.to(tl.float32)
                b_c = b_c.to(tl.float32)
            b_acc = tl.dot(b_z, b_c, b_acc, input_precision=INPUT_PRECISION)
        b_cn = tl.load(cnorm_ptr + o_k, mask=m_k, other=float("inf"))  # [BK]
        b_dist = b_cn[None, :] - 2.0 * b_acc  # [BN, BK]
        # NaN and -inf only come from a non-finite row or code: they never win (NaN > x is
        # false), so such a row falls back to index 0, the torch backend's policy.
        b_dist = tl.where(b_dist > float("-inf"), b_dist, float("inf"))
        b_tmin = tl.min(b_dist, axis=1)  # [BN]
        # lowest index among the tile's minima: tie-breaking independent of tl.argmin's choice
        b_cand = tl.where(b_dist == b_tmin[:, None], o_k[None, :], K)
        b_targ = tl.min(b_cand, axis=1)
        # strict < keeps the earlier tile on exact ties across tiles
        b_better = b_tmin < b_best
        if TRACK_SECOND:
            # tile runner-up: the smallest distance at any other index than the tile's argmin
            b_t2 = tl.min(tl.where(o_k[None, :] == b_targ[:, None], float("inf"), b_dist), axis=1)
            b_second = tl.where(b_better, tl.minimum(b_best, b_t2), tl.minimum(b_second, b_tmin))
        b_best = tl.where(b_better, b_tmin, b_best)
        b_idx = tl.where(b_better, b_targ, b_idx)

    if TRACK_SECOND:
        tl.store(second_ptr + pid_s * N + o_n, b_second, mask=m_n)
        tl.store(part_ptr + pid_s * N + o_n, b_best, mask=m_n)
    if SPLIT_K:
        tl.store(part_ptr + pid_s * N + o_n, b_best, mask=m_n)
        tl.store(idx_ptr + pid_s * N + o_n, b_idx, mask=m_n)
    else:
        # A row with no finite distance keeps index 0 (its k_lo): the documented NaN policy.
        tl.store(idx_ptr + o_n, b_idx, mask=m_n)
        # gather z_q = C[idx] and the per-row squared error from the gathered row
        b_err = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            m_d = (d0 + o_d) < D
            m_nd = m_n[:, None] & m_d[None, :]
            p_z = z_ptr + o_n[:, None] * stride_zn + (d0 + o_d)[None, :] * stride_zd
            b_z = tl.load(p_z, mask=m_nd, other=0.0).to(tl.float32)
            p_c = c_ptr + b_idx[:, None] * stride_ck + (d0 + o_d)[None, :] * stride_cd
            b_q = tl.load(p_c, mask=m_nd, other=0.0).to(tl.float32)
            b_diff = b_z - b_q
            b_err += tl.sum(b_diff * b_diff, axis=1)
            if STORE_ZQ:
                p_q = zq_ptr + o_n[:, None] * stride_qn + (d0 + o_d)[None, :] * stride_qd
                tl.store(p_q, b_q.to(zq_ptr.dtype.element_ty), mask=m_nd)
        tl.store(err_ptr + o_n, b_err, mask=m_n)


def _autotune_configs() -> list:
    """Candidate GPU tiles for ``FASTVQ_AUTOTUNE=1`` (all dot dims >= 16)."""
    out = []
    for bn, bk, bd, w, st in [
        (128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (128, 64, 64, 8, 4), (64, 128, 64, 4, 3),
        (256, 64, 64, 8, 3), (128, 128, 32, 8, 4), (64, 64, 64, 4, 4), (128, 256, 32, 8, 3),
    ]:  # fmt: skip
        out.append(
            triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w, num_stages=st)
        )
    return out


# Keyed on K, D and (implicitly) the tensor dtypes, never on N: a new batch size reuses the tune.
vq_search_fwd_autotuned = triton.autotune(configs=_autotune_configs(), key=["K", "D"])(
    vq_search_fwd_kernel
)


class SearchConfig(NamedTuple):
    block_n: int
    block_k: int
    block_d: int
    num_warps: int
    num_stages: int


def pick_config(n: int, k: int, d: int, dtype: torch.dtype) -> SearchConfig:
    """Tile sizes and launch parameters for one problem.

    Every tl.dot dimension is >= 16 (the GPU's rule; the interpreter would accept less). The GPU
    choices start from flash-kmeans' H100 tiles (BLOCK_N 128, BLOCK_K 64-128, 128x64 for D >= 256)
    and are keyed on D and dtype, not on N beyond "small N"; they are not yet measured on a GPU
    here (see benchmarks/gpu_check.sh). Under the interpreter bigger tiles mean fewer numpy steps.
    """
    p2 = triton.next_power_of_2
    if interpreting():
        return SearchConfig(
            max(16, min(64, p2(n))), max(16, min(128, p2(k))), max(16, min(p2(d), 256)), 4, 1
        )
    wide = dtype == torch.float32  # fp32 tiles take twice the registers / shared memory
    block_d = max(16, min(p2(d), 32 if wide else 64))
    block_n = 64 if n <= 4096 else 128
    block_k = 64 if (d >= 256 or wide) else 128
    block_k = max(16, min(block_k, p2(k)))
    warps = 8 if block_n * block_k >= 128 * 128 else 4
    return SearchConfig(block_n, block_k, block_d, warps, 3)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def vq_search_triton(
    z2d: torch.Tensor,
    codebook: torch.Tensor,
    *,
    fp32_precision: str | None = None,
    config: SearchConfig | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the fused search. Same contract as ``fastvq._search_torch.search_torch``.

    Args:
        z2d: (N, D) float32/float16/bfloat16, any strides.
        codebook: (K, D) float32/float16/bfloat16, K >= 1, same device.
        fp32_precision: ``tl.dot`` input precision when the search dtype is fp32 on a GPU:
            "ieee" (exact fp32, no tensor cores), "tf32x3" (near-fp32 on tensor cores, default;
            env ``FASTVQ_FP32_PRECISION`` overrides), "tf32" (fastest, may misrank near-ties),
            "tf32_rescore" (tf32 pass that also tracks each row's runner-up; rows whose top-2
            gap is within tf32's rounding bound are searched again in ieee fp32, so the result
            is exact; costs one host sync). bf16/fp16 searches always use native MMAs with fp32
            accumulation; the interpreter's dot is exact fp32 whatever is asked.
        config: tile sizes; default from :func:`pick_config`.
        splits: number of K splits (1 = none). Default: split K when the row blocks alone
            would leave most SMs idle (small N) and K is large.

    Returns:
        (indices int64 (N,), z_q (N, D) in z2d.dtype, err fp32 (N,)).
    """
    n, d = z2d.shape
    k = codebook.shape[0]
    dev = z2d.device
    indices = torch.empty(n, dtype=torch.int64, device=dev)
    z_q = torch.empty((n, d), dtype=z2d.dtype, device=dev)
    err = torch.empty(n, dtype=torch.float32, device=dev)
    if POISON_OUTPUTS:
        indices.fill_(-1), z_q.fill_(float("nan")), err.fill_(float("nan"))
    if n == 0:
        return indices, z_q, err

    # Search dtype: the promotion of both inputs (bf16 z + fp32 codebook searches in fp32).
    search_dtype = torch.promote_types(z2d.dtype, codebook.dtype)
    cnorm = code_norms(codebook)
    finite = torch.isfinite(cnorm)

    interp = interpreting()
    same_dtype = z2d.dtype == codebook.dtype
    cast_fp32 = interp or search_dtype == torch.float32 or not same_dtype
    if fp32_precision is None:
        fp32_precision = os.environ.get("FASTVQ_FP32_PRECISION", "tf32x3")
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS}, got {fp32_precision!r}")
    track = fp32_precision == "tf32_rescore" and search_dtype == torch.float32
    if interp or search_dtype != torch.float32:
        precision = "ieee" if interp else "tf32"  # "tf32" is ignored for bf16/fp16 operands
    else:
        precision = "tf32" if track else fp32_precision
    cfg = config or pick_config(n, k, d, search_dtype)
    row_blocks = triton.cdiv(n, cfg.block_n)
    if splits is None:
        splits = 1
        if row_blocks < _num_sms(dev) and k >= 32 * cfg.block_k:
            splits = min(triton.cdiv(2 * _num_sms(dev), row_blocks), k // (16 * cfg.block_k))
    splits = max(1, min(splits, triton.cdiv(k, cfg.block_k)))
    # each split covers whole BLOCK_K tiles
    k_per_split = triton.cdiv(triton.cdiv(k, splits), cfg.block_k) * cfg.block_k
    splits = triton.cdiv(k, k_per_split)
    split = splits > 1
    part_d = part_i = second = err  # placeholders: unused pointers
    if split or track:
        part_d = torch.empty((splits, n), dtype=torch.float32, device=dev)
    part_i = torch.empty((splits, n), dtype=torch.int64, device=dev) if split else indices
    if track:
        second = torch.empty((splits, n), dtype=torch.float32, device=dev)
    args = (
        z2d, codebook, cnorm, part_i, z_q, err, part_d, second,
        n, k, d, k_per_split,
        z2d.stride(0), z2d.stride(1), codebook.stride(0), codebook.stride(1),
        z_q.stride(0), z_q.stride(1),
    )  # fmt: skip
    flags = dict(
        CAST_FP32=cast_fp32, INPUT_PRECISION=precision, STORE_ZQ=same_dtype, SPLIT_K=split,
        TRACK_SECOND=track,
    )  # fmt: skip
    use_autotune = (
        config is None and not interp and not split and os.environ.get("FASTVQ_AUTOTUNE") == "1"
    )
    if use_autotune:
        # The kernel only writes its outputs, so the autotuner's repeated launches are harmless.
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), 1)
        vq_search_fwd_autotuned[grid](*args, **flags)
    else:
        vq_search_fwd_kernel[(row_blocks, splits)](
            *args, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
        )  # fmt: skip
    if split or track:
        # Splits are ordered by k, and argmin returns the first occurrence: ties -> lowest index.
        # A row with no finite distance anywhere keeps split 0's index 0.
        which = part_d.argmin(dim=0, keepdim=True)
    if split:
        indices.copy_(part_i.gather(0, which).squeeze(0))
    redo = None
    if track:
        best = part_d.gather(0, which).squeeze(0)
        # runner-up: the chosen split's own second best, or another split's best
        sec = second.gather(0, which).squeeze(0)
        sec = torch.minimum(sec, part_d.scatter(0, which, float("inf")).min(dim=0).values)
        redo = _rows_to_rescore(z2d, cnorm, finite, best, sec)
        if redo.numel():
            sub_idx, _, _ = vq_search_triton(z2d[redo], codebook, fp32_precision="ieee", splits=1)
            indices[redo] = sub_idx
    if split:
        _regather(z2d, codebook, indices, None, z_q, err)  # the split kernel gathers nothing
    else:
        if redo is not None and redo.numel():
            _regather(z2d, codebook, indices, redo, z_q, err)  # rescored rows changed code
        if not same_dtype:
            # Mixed dtypes: z_q must equal torch's cast (round-to-nearest-even) bit for bit; a
            # gather of N x D is small next to the search, and the interpreter rounds otherwise.
            z_q.copy_(codebook.index_select(0, indices))
    return indices, z_q, err


def _regather(z2d, codebook, indices, rows, z_q, err) -> None:
    """Write ``z_q`` and ``err`` of ``rows`` (None: all rows) from the final ``indices``."""
    z = z2d if rows is None else z2d[rows]
    gathered = codebook.index_select(0, indices if rows is None else indices[rows])
    row_err = (z.to(torch.float32) - gathered.to(torch.float32)).square().sum(dim=1)
    if rows is None:
        err.copy_(row_err)
        z_q.copy_(gathered)
    else:
        err[rows] = row_err
        z_q[rows] = gathered.to(z_q.dtype)


def _rows_to_rescore(z2d, cnorm, finite, best, second) -> torch.Tensor:
    """Rows whose tf32 top-2 gap is within tf32's rounding bound: the order may be wrong.

    tf32 keeps 10 mantissa bits (unit roundoff 2^-11), so each product z_d c_d is off by at most
    2 * 2^-11 |z_d c_d|, plus fp32 accumulation (D * 2^-24). One distance ||c||^2 - 2 z.c is off
    by at most 2 (2^-10 + D 2^-24) ||z|| ||c||, a difference of two by twice that.
    """
    d = z2d.shape[1]
    cmax = torch.where(finite, cnorm, torch.zeros((), device=cnorm.device)).max().sqrt()
    znorm = torch.linalg.vector_norm(z2d.to(torch.float32), dim=1)
    tau = 4.0 * (2.0**-10 + d * 2.0**-24) * znorm * cmax
    redo = ((second - best) <= tau).nonzero().squeeze(1)  # NaN gaps (non-finite rows) stay out
    RESCORE_STATS["rows"] += redo.numel()
    return redo
