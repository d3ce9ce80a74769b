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
# D is held in one register tile per row block (the expected code's accumulator): above this
# the Triton backend is refused and "auto" takes the torch one.
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


KERNELS = ("fwd", "col", "row_bwd", "col_bwd")
# Spill-free tiles found by benchmarks/gpu_static.py for D <= 64 (fp32 operands, tf32x3 dots;
# every similarity), (BLOCK_N, BLOCK_K) per kernel and arch; unmeasured for speed on a GPU.
# 8 warps or larger tiles spilled (the tf32x3 split triples the operand registers).
GPU_TILES = {
    90: dict(fwd=(64, 32), col=(64, 32), row_bwd=(64, 16), col_bwd=(32, 32)),
    80: dict(fwd=(32, 32), col=(64, 32), row_bwd=(32, 16), col_bwd=(32, 32)),
}


def pick_config(kernel: str, n: int, k: int, d: int, *, arch: int | None = None
                ) -> SoftAssignConfig:  # fmt: skip
    """Tiles of one kernel (one of :data:`KERNELS`). ``arch`` None: interpreter tiles under
    ``TRITON_INTERPRET``, else the sm_90 choice. The whole D is one tile (BLOCK_D >= D); every
    dot dim >= 16 (the GPU's rule). Above D = 64 the GPU tiles shrink and still spill (the
    static report lists them; the gate covers D <= 64)."""
    p2 = triton.next_power_of_2
    bd = max(16, p2(d))
    if arch is None and interpreting():
        return SoftAssignConfig(max(16, min(64, p2(n))), max(16, min(64, p2(k))), bd, 4, 1)
    bn, bk = GPU_TILES[80 if arch is not None and arch < 90 else 90][kernel]
    if d > 64:
        bn, bk = max(16, bn // 2), 16
    elif kernel == "col_bwd" and d <= 32:
        bn = 16  # 32 x 32 spilled at D = 32 (not at D = 64) on both archs; 16 x 32 does not
    return SoftAssignConfig(bn, max(16, min(bk, p2(k))), bd, 4, 2)


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
    scalars = (n, k, d, float(inv_tau), float(eps))

    def launch(kernel, grid_dim, fn, *args, **flags):
        cfg = pick_config(kernel, n, k, d, arch=arch)
        size = cfg.block_n if kernel in ("fwd", "row_bwd") else cfg.block_k
        fn[(triton.cdiv(grid_dim, size),)](
            *args, *scalars, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d,
            SIM=SIM_IDS[sim], PRECISION=fp32_precision(arch), num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, **flags,
        )  # fmt: skip

    return csq, launch


def soft_assign_fwd_triton(z, codes, w, inv_tau: float, sim: str, eps: float, want_col: bool):
    """Same contract as :func:`fastvq._soft_assign_torch.soft_assign_fwd_torch` (fp32 only)."""
    n, d = z.shape
    k = codes.shape[0]
    lse = torch.empty(n, dtype=torch.float32, device=z.device)
    idx = torch.empty(n, dtype=torch.int64, device=z.device)
    e = torch.empty_like(lse)
    q = torch.empty((n, d), dtype=torch.float32, device=z.device)
    col = torch.zeros(k, dtype=torch.float32, device=z.device) if want_col else None
    if POISON_OUTPUTS:
        lse.fill_(float("nan")), idx.fill_(-1), e.fill_(float("nan")), q.fill_(float("nan"))
        if col is not None:
            col.fill_(float("nan"))
    if n == 0:
        return lse, idx, e, q, col
    csq, launch = _common(z, codes, inv_tau, sim, eps)
    launch("fwd", n, soft_assign_fwd_kernel, z, codes, csq, lse, idx, e, q)
    if want_col:
        # unused gradient pointers: any fp32 tensor (BWD=False never reads them)
        launch("col", k, soft_assign_col_kernel, z, codes, csq, w, lse, col, lse, lse, q, lse, q,
               BWD=False, HAS_GCOL=False, VALUE_GRAD=False)  # fmt: skip
    return lse, idx, e, q, col


def soft_assign_bwd_triton(z, codes, w, lse, a0, g_e, g_q, g_col, inv_tau: float, sim: str,
                           eps: float, *, need_z: bool, need_c: bool,
                           value_grad: bool = True):  # fmt: skip
    """Same contract as :func:`fastvq._soft_assign_torch.soft_assign_bwd_torch`."""
    n = z.shape[0]
    k = codes.shape[0]
    dz, dc = torch.zeros_like(z), torch.zeros_like(codes)
    if not (need_z or need_c) or n == 0:
        return dz, dc
    csq, launch = _common(z, codes, inv_tau, sim, eps)
    has_gcol = g_col is not None
    gcol = g_col.contiguous() if has_gcol else lse  # placeholder pointer when absent
    a = torch.empty_like(a0)
    g_e, g_q, a0 = g_e.contiguous(), g_q.contiguous(), a0.contiguous()
    launch("row_bwd", n, soft_assign_bwd_row_kernel, z, codes, csq, w, lse, a0, g_e, g_q, gcol,
           a, dz, HAS_GCOL=has_gcol, NEED_DZ=need_z)  # fmt: skip
    if need_c:
        launch("col_bwd", k, soft_assign_col_kernel, z, codes, csq, w, lse, lse, a, g_e, g_q,
               gcol, dc, BWD=True, HAS_GCOL=has_gcol, VALUE_GRAD=value_grad)  # fmt: skip
    return dz, dc
