"""Launcher of the fused soft assignment (``kernels/soft_assign.py``): tiles, buffers, launches.

The twin of ``fastvq/_soft_assign_torch.py``, with the same contract. It imports Triton, so
``fastvq.soft_assign`` imports it only on first use of the Triton backend.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from fastvq._interpret import interpreting
from fastvq.kernels.soft_assign import (
    soft_assign_bwd_row_kernel,
    soft_assign_col_kernel,
    soft_assign_fwd_kernel,
)

SIM_IDS = {"dot": 0, "neg_l2": 1, "neg_dist": 2}
# "auto" takes the torch backend above this D (the kernels' D loop has no limit of its own;
# fastvq/soft_assignment.py mirrors the number without importing Triton).
MAX_D = 512
# Tests set this to fill outputs with NaN / -1 before launch, so a row the kernels forget to
# write fails loudly.
POISON_OUTPUTS = False


class SoftAssignConfig(NamedTuple):
    block_n: int
    block_k: int
    block_d: int
    num_warps: int
    num_stages: int
    d_chunk: int = 0  # > 0: the D loop, dots summed d_chunk columns at a time (kernels' D_CHUNK)


KERNELS = ("fwd", "col", "row_bwd", "col_bwd")
# Tiles found spill-free with tensor-core MMAs by benchmarks/gpu_static.py (fp32 operands,
# tf32x3 dots, every similarity; 4 warps: 8 warps or larger tiles spilled, the tf32x3 split
# triples the operand registers); unmeasured for speed on a GPU.
# HELD_TILES (BLOCK_N, BLOCK_K): D a multiple of 16 up to 64, the row (or code) tile held whole.
HELD_TILES = {
    90: dict(fwd=(64, 32), col=(64, 32), row_bwd=(64, 16), col_bwd=(32, 32)),
    80: dict(fwd=(32, 32), col=(64, 32), row_bwd=(32, 16), col_bwd=(32, 32)),
}
# DLOOP_TILES (BLOCK_N, BLOCK_K, BLOCK_D, D_CHUNK, stages): every other D, through the D loop.
# A D-loop binary is the same for every D of one alignment class (D % 16 == 0 or not: Triton's
# divisibility mark), so the gate's D = 33, 100 and 256 cover them all. Picked from a sweep at
# D = 100, neg_dist (the most registers): the largest tiles under about 200 registers, for a
# margin over the other similarities and D % 16 == 0; BLOCK_D 64 keeps the logits' recompute at
# cdiv(D, 64) passes (4 at D = 256).
DLOOP_TILES = {
    90: dict(fwd=(64, 16, 64, 32, 2), col=(64, 16, 32, 32, 2), row_bwd=(16, 32, 64, 16, 1),
             col_bwd=(16, 32, 64, 16, 1)),
    80: dict(fwd=(32, 16, 64, 32, 1), col=(64, 16, 32, 32, 2), row_bwd=(16, 32, 64, 16, 1),
             col_bwd=(16, 32, 64, 16, 1)),
}  # fmt: skip


def pick_config(kernel: str, n: int, k: int, d: int, *, arch: int | None = None
                ) -> SoftAssignConfig:  # fmt: skip
    """Tiles of one kernel (one of :data:`KERNELS`). ``arch`` None: interpreter tiles under
    ``TRITON_INTERPRET`` (the whole D in one tile), else the sm_90 choice. On a GPU, D a
    multiple of 16 up to 64 is held in one tile (:data:`HELD_TILES`); any other D runs the D loop
    (:data:`DLOOP_TILES`). Every dot dim >= 16 (the GPU's rule)."""
    p2 = triton.next_power_of_2
    if arch is None and interpreting():
        bd = max(16, p2(d))
        return SoftAssignConfig(max(16, min(64, p2(n))), max(16, min(64, p2(k))), bd, 4, 1)
    arch = 80 if arch is not None and arch < 90 else 90
    if d % 16 == 0 and d <= 64:
        bn, bk = HELD_TILES[arch][kernel]
        if kernel == "col_bwd" and d <= 32:
            # 32 x 32 spilled at D = 32 (not at D = 64) on both archs; 16 x 32 does not on
            # sm_90, 16 x 16 on sm_80 (16 x 32 spilled there for neg_dist)
            bn, bk = 16, (32 if arch >= 90 else 16)
        return SoftAssignConfig(bn, max(16, min(bk, p2(k))), max(16, p2(d)), 4, 2)
    bn, bk, bd, chunk, stages = DLOOP_TILES[arch][kernel]
    return SoftAssignConfig(bn, max(16, min(bk, p2(k))), bd, 4, stages, chunk)


def launch_meta(kernel: str, n: int, k: int, d: int, sim: str, *, arch: int | None,
                config: SoftAssignConfig | None = None) -> tuple[tuple, dict]:  # fmt: skip
    """Grid and keyword arguments (tiles, similarity, precision, warps, stages) of one launch
    of ``kernel`` for z (n, d) and codes (k, d); the gate (benchmarks/gpu_static.py) compiles
    from the same. The call's own flags (BWD, HAS_GCOL, ...) come on top."""
    cfg = config or pick_config(kernel, n, k, d, arch=arch)
    if not cfg.d_chunk and cfg.block_d < d:
        raise ValueError(f"config: block_d {cfg.block_d} < D = {d} needs the D loop (d_chunk)")
    rows = kernel in ("fwd", "row_bwd")
    blocks = triton.cdiv(n, cfg.block_n) if rows else triton.cdiv(k, cfg.block_k)
    chunks = 1 if kernel == "col" else triton.cdiv(d, cfg.block_d)
    meta = dict(
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d, SIM=SIM_IDS[sim],
        PRECISION=fp32_precision(arch), D_CHUNK=cfg.d_chunk, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    return (blocks, chunks), meta


def fp32_precision(arch: int | None = None) -> str:
    """``tl.dot``'s input precision: ``tf32x3`` (near-fp32 on tensor cores) on a GPU, the
    interpreter's exact fp32 there (it ignores the setting)."""
    return "ieee" if arch is None and interpreting() else "tf32x3"


def _arch(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _common(z, codes, inv_tau, sim, eps):
    n, d = z.shape
    k = codes.shape[0]
    if d > MAX_D:
        raise ValueError(f"the Triton soft assignment takes D <= {MAX_D}, got D = {d}")
    arch = _arch(z.device)
    csq = codes.square().sum(1)
    zsq = z.square().sum(1)
    scalars = (n, k, d, float(inv_tau), float(eps))

    def launch(kernel, fn, *args, **flags):
        grid, meta = launch_meta(kernel, n, k, d, sim, arch=arch)
        fn[grid](*args, *scalars, **meta, **flags)

    return zsq, csq, launch


def lo_weights(w: torch.Tensor, lse_lo: torch.Tensor | None) -> torch.Tensor:
    """Row weights times ``exp(-lse_lo)``: the kernels' ``exp(x - lse)`` then rounds as with the
    max and the log-sum kept apart (at a low temperature ``|lse|`` is ~1e3, and one ulp of it a
    relative error of ~1e-4 in every ``p``)."""
    return w if lse_lo is None else (w * torch.exp(-lse_lo)).contiguous()


def soft_assign_fwd_triton(z, codes, w, inv_tau: float, sim: str, eps: float, want_col: bool):
    """Same contract as :func:`fastvq._soft_assign_torch.soft_assign_fwd_torch` (fp32 only)."""
    n, d = z.shape
    k = codes.shape[0]
    lse = torch.empty(n, dtype=torch.float32, device=z.device)
    idx = torch.empty(n, dtype=torch.int64, device=z.device)
    q = torch.empty((n, d), dtype=torch.float32, device=z.device)
    col = torch.zeros(k, dtype=torch.float32, device=z.device) if want_col else None
    ent, lse_lo = torch.empty_like(lse), torch.empty_like(lse)
    if POISON_OUTPUTS:
        lse.fill_(float("nan")), idx.fill_(-1), q.fill_(float("nan"))
        ent.fill_(float("nan")), lse_lo.fill_(float("nan"))
        if col is not None:
            col.fill_(float("nan"))
    if n == 0:
        return lse, idx, lse.clone(), ent, q, col, lse_lo
    zsq, csq, launch = _common(z, codes, inv_tau, sim, eps)
    # the kernel writes the row entropy lse - E_p[x] (accumulated relative to the row max)
    launch("fwd", soft_assign_fwd_kernel, z, codes, zsq, csq, lse, lse_lo, idx, ent, q)
    e = lse - ent
    if want_col:
        # unused gradient pointers: any fp32 tensor (BWD=False never reads them)
        launch("col", soft_assign_col_kernel, z, codes, zsq, csq, lo_weights(w, lse_lo), lse, col,
               lse, lse, q, lse, q, BWD=False, HAS_GCOL=False, VALUE_GRAD=False)  # fmt: skip
    return lse, idx, e, ent, q, col, lse_lo


def soft_assign_bwd_triton(z, codes, w, lse, a0, g_e, g_q, g_col, inv_tau: float, sim: str,
                           eps: float, *, need_z: bool, need_c: bool, value_grad: bool = True,
                           lse_lo: torch.Tensor | None = None):  # fmt: skip
    """Same contract as :func:`fastvq._soft_assign_torch.soft_assign_bwd_torch`."""
    n = z.shape[0]
    w = lo_weights(w, lse_lo)
    dz, dc = torch.zeros_like(z), torch.zeros_like(codes)
    if not (need_z or need_c) or n == 0:
        return dz, dc
    zsq, csq, launch = _common(z, codes, inv_tau, sim, eps)
    has_gcol = g_col is not None
    gcol = g_col.contiguous() if has_gcol else lse  # placeholder pointer when absent
    a = torch.empty_like(a0)
    g_e, g_q, a0 = g_e.contiguous(), g_q.contiguous(), a0.contiguous()
    launch("row_bwd", soft_assign_bwd_row_kernel, z, codes, zsq, csq, w, lse, a0, g_e, g_q, gcol,
           a, dz, HAS_GCOL=has_gcol, NEED_DZ=need_z)  # fmt: skip
    if need_c:
        launch("col_bwd", soft_assign_col_kernel, z, codes, zsq, csq, w, lse, lse, a, g_e, g_q,
               gcol, dc, BWD=True, HAS_GCOL=has_gcol, VALUE_GRAD=value_grad)  # fmt: skip
    return dz, dc
