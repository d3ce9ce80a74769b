"""Compile every Triton binary fastvq can launch, for sm_80 and sm_90, without a GPU, and read it.

    python -m benchmarks.gpu_static                       # report: JSON + markdown under results/
    python -m benchmarks.gpu_static --gate                # CI gate: default binaries only
    python -m benchmarks.gpu_static --gate --arch 90 --only "fp32 tf32x3 D64"

Each binary is compiled the way the runtime specialises a launch (Triton's own binder on meta
tensors: 16-byte-aligned pointers, ints divisible by 16 marked, unit strides as constants), from
the same :func:`fastvq._search_triton.plan_search` the launcher calls, with ``arch`` set so the
GPU choice is returned even where ``TRITON_INTERPRET`` is set. The cubin is read with the
``cuobjdump``/``nvdisasm`` shipped in the triton wheel: registers, stack, shared memory, spill
instructions, the MMA instruction, resident warps per SM and the SASS mix of the code-tile loop.
:mod:`benchmarks.gpu_model` turns those counts into predicted times (docs/benchmarks.md).

``main`` removes ``TRITON_INTERPRET`` from the environment before Triton is imported (Triton is
imported lazily here): under the interpreter ``triton.compile`` does not produce a cubin.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# Hardware facts used by the gate and the model (per SM). Sources: NVIDIA's A100/H100 whitepapers
# (dense tensor-core rates, 64 K registers, 64 resident warps, 32 resident blocks, shared memory
# per SM and per block).
ARCHS = {
    90: dict(name="sm_90 (H100 SXM)", sms=132, smem_sm=228 * 1024, smem_block=227 * 1024),
    80: dict(name="sm_80 (A100 SXM)", sms=108, smem_sm=164 * 1024, smem_block=163 * 1024),
}
REGS_PER_SM = 65536
MAX_WARPS_SM = 64
MAX_BLOCKS_SM = 32
MIN_RESIDENT_WARPS = 8  # the gate's occupancy floor (two warpgroups: enough to hide one MMA)

# Problem the defaults are chosen for (the launcher's config depends on N only through "small N").
N_BIG, K_BIG = 65536, 16384
N_SMALL, K_SMALL = 1024, 65536  # small N, large K: the split-K binaries

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Binary:
    """One distinct compiled kernel: what it is for, and how to rebuild it."""

    name: str  # human-readable, unique per arch
    kernel: str  # "search" | "scatter_atomic" | "scatter_segment" | one of SOFT_KERNELS
    arch: int
    default: bool  # launched by default (gated) rather than an autotune/precision alternative
    z_dtype: str = "bfloat16"
    c_dtype: str = "bfloat16"
    d: int = 64
    n: int = N_BIG
    k: int = K_BIG
    fp32_precision: str | None = None
    config: tuple | None = None  # SearchConfig fields, None: the launcher's choice
    sim: str = "dot"  # the soft-assignment kernels' similarity
    meta: dict = field(default_factory=dict)  # filled after compiling (plan, constexprs)


def _dt(name: str) -> torch.dtype:
    return getattr(torch, name)


def search_binaries(arch: int, scope: str) -> list[Binary]:
    """The search binaries: every dtype pair x precision x alignment x default/autotune config."""
    from fastvq._search_triton import AUTOTUNE_CONFIGS, FP32_PRECISIONS

    pairs = [("bf16", "bfloat16", "bfloat16"), ("fp16", "float16", "float16"),
             ("fp32", "float32", "float32"), ("mix", "bfloat16", "float32")]  # fmt: skip
    out = []
    for tag, zt, ct in pairs:
        fp32 = ct == "float32"
        precisions = FP32_PRECISIONS if fp32 else (None,)
        for prec in precisions:
            ptag = f" {prec}" if prec else ""
            for d in (64, 256, 100, 8):
                base = dict(arch=arch, z_dtype=zt, c_dtype=ct, d=d, fp32_precision=prec)
                out.append(Binary(f"{tag}{ptag} D{d}", "search", default=True, **base))
                out.append(
                    Binary(f"{tag}{ptag} D{d} splitK", "search", default=True, n=N_SMALL,
                           k=K_SMALL, **base)
                )  # fmt: skip
                if arch == 90 and not fp32 and zt == ct and d in (64, 256):
                    # the sm_90 default for 16-bit operands (kernels/vq_search_sm90.py); the
                    # Triton binaries above stay the default where its first-use check fails
                    for tail, nk in (("", {}), (" splitK", dict(n=N_SMALL, k=K_SMALL))):
                        out.append(Binary(f"gluon {tag} D{d}{tail}", "search_gluon",
                                          default=True, **base, **nk))  # fmt: skip
                if scope == "all" and d in (64, 256) and prec in (None, "tf32x3", "tf32"):
                    for c in AUTOTUNE_CONFIGS:
                        out.append(
                            Binary(f"{tag}{ptag} D{d} autotune {tuple(c)}", "search",
                                   default=False, config=tuple(c), **base)
                        )  # fmt: skip
    return out


def scatter_binaries(arch: int) -> list[Binary]:
    out = []
    for dt in ("bfloat16", "float16", "float32"):
        for d in (64, 100):
            for kern in ("scatter_atomic", "scatter_segment"):
                out.append(Binary(f"{kern} {dt} D{d}", kern, arch, True, z_dtype=dt, d=d))
    return out


# The soft-assignment kernels (kernels/soft_assign.py) as the launcher runs them: the forward,
# the column sums, and the backward's row and column kernels.
SOFT_KERNELS = ("soft_fwd", "soft_col", "soft_row_bwd", "soft_col_bwd")  # "soft_" + launcher's


# Every D class of the launcher (kernels/soft_assign.py): held in one tile (32, 64), the D loop
# unaligned (33, 100: one binary for every D % 16 != 0) and aligned (256).
SOFT_DS = (32, 33, 64, 100, 256)


def soft_binaries(arch: int) -> list[Binary]:
    """Every soft-assignment kernel for each similarity (fp32 operands) at each of
    :data:`SOFT_DS`, all gated."""
    out = []
    for kern in SOFT_KERNELS:
        for sim in ("dot", "neg_l2", "neg_dist"):
            for d in SOFT_DS:
                out.append(Binary(f"{kern} {sim} D{d}", kern, arch, True, z_dtype="float32",
                                  c_dtype="float32", d=d, sim=sim))  # fmt: skip
    return out


def _specialise(fn, target, args, kwargs):
    """signature, constexprs, attrs, options exactly as ``JITFunction.run`` derives them."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    return fn._pack_args(backend, kwargs, bound, spec, opts)


def _search_launch(b: Binary):
    """(kernel, args, kwargs, plan) of the launcher for this binary, on meta tensors."""
    from fastvq import _search_triton as vs

    zt, ct = _dt(b.z_dtype), _dt(b.c_dtype)
    cfg = vs.SearchConfig(*b.config) if b.config else None
    gluon = b.kernel == "search_gluon"
    plan = vs.plan_search(
        b.n, b.k, b.d, zt, ct, arch=b.arch, num_sms=ARCHS[b.arch]["sms"],
        fp32_precision=b.fp32_precision, config=cfg, kernel="gluon" if gluon else "triton",
    )  # fmt: skip
    if gluon and not plan.gluon:
        raise ValueError(f"{b.name}: the Gluon kernel does not apply to this case")
    meta = torch.device("meta")
    z = torch.empty(b.n, b.d, dtype=zt, device=meta)
    c = torch.empty(b.k, b.d, dtype=ct, device=meta)
    search_t = torch.promote_types(zt, ct)
    # the launcher's scaled copies (contiguous), or the inputs themselves for fp16
    zs = z if search_t == torch.float16 else torch.empty(b.n, b.d, dtype=zt, device=meta)
    cs = c if search_t == torch.float16 else torch.empty(b.k, b.d, dtype=ct, device=meta)
    f32 = torch.empty(b.k, dtype=torch.float32, device=meta)
    i64 = torch.empty(b.n, dtype=torch.int64, device=meta)
    args = (
        z, c, zs, cs, f32, i64, z, f32, f32, f32,
        b.n, b.k, b.d, plan.k_per_split,
        z.stride(0), z.stride(1), c.stride(0), c.stride(1), zs.stride(0), zs.stride(1),
        cs.stride(0), cs.stride(1), z.stride(0), z.stride(1),
    )  # fmt: skip
    kwargs = dict(plan.constexprs(), num_warps=plan.config.num_warps,
                  num_stages=plan.config.num_stages)  # fmt: skip
    if gluon:
        from fastvq.kernels.vq_search_sm90 import vq_search_fwd_sm90_kernel

        gargs, flags = vs.gluon_launch(plan, z, c, zs, cs, f32, i64, z, f32, f32)
        kwargs = dict(flags, num_warps=plan.config.num_warps, num_stages=plan.config.num_stages)
        return vq_search_fwd_sm90_kernel, gargs, kwargs, plan
    return vs.vq_search_fwd_kernel, args, kwargs, plan


def _scatter_launch(b: Binary):
    """(kernel, args, kwargs, None) for a scatter kernel, arguments bound by parameter name."""
    import triton

    from fastvq.kernels import vq_scatter as sc

    meta = torch.device("meta")
    rows = torch.empty(b.n, b.d, dtype=_dt(b.z_dtype), device=meta)
    idx = torch.empty(b.n, dtype=torch.int64, device=meta)
    values = {
        "idx_ptr": idx, "perm_ptr": idx, "rows_ptr": rows,
        "out_ptr": torch.empty(b.k, b.d, dtype=torch.float32, device=meta),
        "offsets_ptr": torch.empty(b.k + 1, dtype=torch.int64, device=meta),
        "N": b.n, "K": b.k, "D": b.d, "stride_rn": rows.stride(0), "stride_rd": rows.stride(1),
        # the launcher's choices (fastvq/_scatter_triton.py)
        "BLOCK_N": 32, "BLOCK_R": 16, "BLOCK_D": max(16, min(128, triton.next_power_of_2(b.d))),
    }  # fmt: skip
    fn = sc.scatter_rows_atomic_kernel if b.kernel == "scatter_atomic" else (
        sc.scatter_rows_segment_kernel)  # fmt: skip
    args = tuple(values[n] for n in fn.arg_names if not n.startswith("BLOCK_"))
    kwargs = {n: values[n] for n in fn.arg_names if n.startswith("BLOCK_")}
    return fn, args, dict(kwargs, num_warps=4, num_stages=1), None


def _soft_launch(b: Binary):
    """(kernel, args, kwargs, None) of one soft-assignment kernel, as its launcher binds it."""
    from fastvq import _soft_assign_triton as sa
    from fastvq.kernels import soft_assign as ks

    kernel = b.kernel.removeprefix("soft_")
    cfg = (sa.SoftAssignConfig(*b.config) if b.config
           else sa.pick_config(kernel, b.n, b.k, b.d, arch=b.arch))  # fmt: skip
    b.meta["config"] = tuple(cfg)
    _, flags = sa.launch_meta(kernel, b.n, b.k, b.d, b.sim, arch=b.arch, config=cfg)
    meta = torch.device("meta")
    f32 = dict(dtype=torch.float32, device=meta)
    rows, codes = torch.empty(b.n, b.d, **f32), torch.empty(b.k, b.d, **f32)
    row_vec, code_vec = torch.empty(b.n, **f32), torch.empty(b.k, **f32)
    values = {
        "z_ptr": rows, "c_ptr": codes, "zsq_ptr": row_vec, "csq_ptr": code_vec,
        "w_ptr": row_vec, "lse_ptr": row_vec, "lo_ptr": row_vec,
        "idx_ptr": torch.empty(b.n, dtype=torch.int64, device=meta), "e_ptr": row_vec,
        "q_ptr": rows, "col_ptr": code_vec, "a_ptr": row_vec, "a0_ptr": row_vec,
        "ge_ptr": row_vec, "gq_ptr": rows, "gcol_ptr": code_vec, "dc_ptr": codes, "dz_ptr": rows,
        "N": b.n, "K": b.k, "D": b.d, "INV_TAU": 1.0, "EPS": 1e-4,
    }  # fmt: skip
    fn = {"soft_fwd": ks.soft_assign_fwd_kernel, "soft_row_bwd": ks.soft_assign_bwd_row_kernel}.get(
        b.kernel, ks.soft_assign_col_kernel
    )
    if b.kernel in ("soft_col", "soft_col_bwd"):
        bwd = b.kernel == "soft_col_bwd"
        flags.update(BWD=bwd, HAS_GCOL=bwd, VALUE_GRAD=bwd)
    elif b.kernel == "soft_row_bwd":
        flags.update(HAS_GCOL=True, NEED_DZ=True)
    args = tuple(values[n] for n in fn.arg_names if n not in flags)
    return fn, args, flags, None


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _specialised(b: Binary):
    """(kernel, target, plan, kwargs, (options, signature, constexprs, attrs)) of one binary."""
    from triton.backends.compiler import GPUTarget

    launch = (_search_launch if b.kernel in ("search", "search_gluon")
              else _soft_launch if b.kernel in SOFT_KERNELS else _scatter_launch)  # fmt: skip
    fn, args, kwargs, plan = launch(b)
    target = GPUTarget("cuda", b.arch, 64 if b.arch >= 90 else 32)
    return fn, target, plan, kwargs, _specialise(fn, target, args, kwargs)


def compile_one(b: Binary) -> dict:
    """Compile one binary and return its record (resource usage, SASS analysis)."""
    import triton
    from triton.compiler import ASTSource

    fn, target, plan, kwargs, (options, signature, constexprs, attrs) = _specialised(b)
    source = ASTSource
    if getattr(fn, "is_gluon", lambda: False)():
        from triton.experimental.gluon._runtime import GluonASTSource as source
    src = source(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=target, options=options.__dict__)
    rec = asdict(b)
    if plan is None and b.kernel in SOFT_KERNELS:
        rec["meta"] = dict(rec["meta"], input_precision=kwargs["PRECISION"])
    if plan is not None:
        rec["meta"] = dict(
            plan._asdict(), config=tuple(plan.config), aliases=b.meta.get("aliases", [])
        )
    rec["meta"]["divisible_by_16"] = sorted(
        fn.arg_names[k[0]] for k, v in attrs.items() if ["tt.divisibility", 16] in v
    )
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
        sass = subprocess.run([_tool("nvdisasm"), str(cubin)], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    regs, stack, shared_static, local = (int(x) for x in m.groups())
    rec.update(
        regs=regs, stack=stack, local=local,
        shared=int(kernel.metadata.shared) + shared_static,
        num_warps=kwargs["num_warps"], num_stages=kwargs["num_stages"],
    )  # fmt: skip
    rec.update(analyse_sass(sass))
    rec.update(occupancy(b.arch, regs, rec["shared"], kwargs["num_warps"]))
    rec["overlap"] = analyse_ttgir(kernel.asm["ttgir"])
    rec["overlap"]["ptxas_serialised"] = wgmma_serialised(sass)
    under = epilogue_under_mma(sass)
    rec["overlap"]["sass_epilogue_under_mma"] = under
    # the SASS must keep some epilogue under the MMAs, not only the TTGIR allow it
    rec["overlap"]["overlap"] &= not rec["overlap"]["ptxas_serialised"] and any(under)
    rec["loop_per_element"] = None
    if plan is not None:
        tiles = 1
        if plan.gluon:
            from fastvq.kernels.vq_search_sm90 import stages_for

            tiles = stages_for(plan.config.block_d)  # one tile per stage per trip
        rec["tiles_per_trip"] = tiles
        rec["loop_per_element"] = loop_per_element(rec.get("loop"), plan.config, tiles)
    return rec


def _wgmma_events(sass: str):
    """(op, depbar) per HGMMA and per wgmma wait, in program order, read with ``_LINE`` (the
    parser analyse_sass uses): op is "HGMMA" (depbar: whether it closes a group, ``gsb0``) or
    "WAIT" (depbar: the N of ``WARPGROUP.DEPBAR.LE gsb0, N``, the groups left in flight); any
    other instruction comes as (its opcode, None)."""
    for line in sass.splitlines():
        m = _LINE.search(line)
        if not m:
            continue
        op, suffix, operands = m.group(3), m.group(4), m.group(5)
        if op == "HGMMA":
            yield "HGMMA", "gsb0" in operands
        elif op == "WARPGROUP" and suffix == ".DEPBAR.LE":
            yield "WAIT", int(operands.split(",")[-1], 16)
        else:
            yield op, None


def wgmma_serialised(sass: str) -> bool:
    """Whether ptxas serialised the wgmma chains (its advisory C7514): then every HGMMA closes its
    own group (``gsb0``) and is waited for (``WARPGROUP.DEPBAR.LE gsb0, 0x0``) before the next
    HGMMA issues, so no dot overlaps anything. (A chain of one HGMMA per group, as at D <= 16,
    also closes every group; it is serialised only if each is waited for at once.)"""
    ev = [(op, x) for op, x in _wgmma_events(sass) if op == "HGMMA" or (op == "WAIT" and x == 0)]
    mma = [i for i, (op, _) in enumerate(ev) if op == "HGMMA"]
    if len(mma) < 2 or not all(ev[i][1] for i in mma):
        return False
    return all(i + 1 < len(ev) and ev[i + 1][0] == "WAIT" for i in mma)


# what a search epilogue is made of (not loop control: integer compares and selects are not)
EPILOGUE_OPS = {"FMNMX", "FSEL", "FSETP", "SHFL"}


def epilogue_under_mma(sass: str) -> list[int]:
    """For each wait that leaves MMAs in flight (``WARPGROUP.DEPBAR.LE gsb0, N`` with N > 0): the
    float max/compare/select and shuffle instructions ptxas scheduled before the next full wait
    (N = 0), i.e. the epilogue work that runs while those MMAs do. The TTGIR's pendings say the
    program allows it; this says how much of it ptxas kept there."""
    out, inside = [], None
    for op, x in _wgmma_events(sass):
        if op == "WAIT":
            if x > 0:
                inside = 0
            elif inside is not None:
                out.append(inside)
                inside = None
        elif inside is not None:
            inside += op in EPILOGUE_OPS
    return out


def loop_per_element(loop: dict | None, cfg, tiles_per_trip: int = 1) -> float | None:
    """Non-MMA SASS instructions of the code-tile loop per accumulator element per thread.

    Static: every instruction of the loop (and of a D loop nested in it) counted once, whatever
    the branches do, divided by the accumulator elements a thread holds per code tile,
    ``BLOCK_N * BLOCK_K / (32 * num_warps)``. The epilogue's floor is about 3-4 (norm add, min,
    compare, index select); the tile loads and the D loop's address arithmetic come on top.
    """
    if not loop or not loop.get("outer"):
        return None
    parts = [loop["outer"]] + ([loop["inner"]] if loop.get("inner") else [])
    non_mma = sum(v for part in parts for c, v in part.items() if c != "tensor")
    per_thread = tiles_per_trip * cfg.block_n * cfg.block_k / (32 * cfg.num_warps)
    return round(non_mma / per_thread, 2)


_PENDINGS = re.compile(r"warp_group_dot_wait\b.*?pendings\s*=\s*(\d+)")


def analyse_ttgir(ttgir: str) -> dict:
    """Whether the next tile's MMA can be in flight while this tile's epilogue runs.

    sm_90 (wgmma): every ``warp_group_dot_wait`` and its ``pendings`` (0: the warps wait for the
    dot they just issued before the epilogue; >= 1: a later dot may still run). Any target:
    ``ttg.warp_specialize`` (producer / consumer warps). sm_80's ``mma.sync`` is synchronous:
    no overlap beyond instruction-level parallelism, so it reports none.
    """
    pendings = [int(p) for p in _PENDINGS.findall(ttgir)]
    ws = "ttg.warp_specialize" in ttgir
    return {
        "async_dots": ttgir.count("isAsync = true"),
        "dot_wait_pendings": pendings,
        "warp_specialized": ws,
        "overlap": ws or any(p >= 1 for p in pendings),
    }


# The targets for the sm_90 bf16 defaults (reported, not gated): epilogue instructions
# per accumulator element and the next tile's MMA in flight during the epilogue.
TARGET_PER_ELEMENT = 5.0
# the sm_90 defaults (the Gluon kernel) and the Triton kernel behind them at the same shapes
TARGET_BINARIES = ("bf16 D64", "bf16 D256", "gluon bf16 D64", "gluon bf16 D256")


def target_status(rec: dict) -> dict | None:
    """For the sm_90 bf16 D = 64 / 256 searches: are the lean-epilogue and overlap targets met?"""
    if rec["arch"] != 90 or rec["name"] not in TARGET_BINARIES:
        return None
    per = rec.get("loop_per_element")
    return {
        "per_element": per is not None and per <= TARGET_PER_ELEMENT,
        "overlap": rec["overlap"]["overlap"],
    }


# --- SASS ---------------------------------------------------------------------------------------

# Instruction classes by SASS mnemonic (the part before the first '.').
TENSOR = {"HGMMA", "HMMA", "IMMA", "WGMMA"}
FMA_PIPE = {"FFMA", "FADD", "FMUL", "FFMA32I", "FADD32I", "FMUL32I", "IMAD", "IMAD32I", "HFMA2",
            "HADD2", "HMUL2"}  # fmt: skip
CMP_SEL = {"FSETP", "ISETP", "FSEL", "SEL", "FMNMX", "IMNMX", "VIMNMX", "PLOP3", "FSET", "ISET"}
INT_ALU = {"IADD3", "LOP3", "SHF", "LEA", "IABS", "PRMT", "SGXT", "BMSK", "IADD", "VIADD", "POPC",
           "FLO", "BREV", "LOP", "SHL", "SHR", "IADD32I", "LOP32I"}  # fmt: skip
CVT = {"F2F", "F2FP", "I2F", "F2I", "FRND", "I2FP", "F2IP"}
MEM = {"LDG", "STG", "LDS", "STS", "LDSM", "LDGSTS", "LDGDEPBAR", "DEPBAR", "UTMALDG", "UBLKCP",
       "LD", "ST", "ATOM", "ATOMG", "RED", "REDG", "LDL", "STL", "SYNCS", "STSM"}  # fmt: skip
MOVE = {"MOV", "SHFL", "S2R", "CS2R", "R2UR", "S2UR", "P2R", "R2P", "MOV32I"}

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([.\w]*)\s*([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")


def analyse_sass(sass: str) -> dict:
    """Spills, the MMA instruction and the instruction mix of the code-tile loop.

    The code-tile loop is the longest span closed by a backward branch, holding no EXIT, that holds
    a tensor-core instruction (or the longest loop when there is none: ieee fp32, scatter
    kernels); a loop nested in it (the D blocks when D > BLOCK_D) is counted separately, once
    per iteration.
    """
    instrs, labels = [], {}
    pending = []
    for line in sass.splitlines():
        lab = _LABEL.match(line)
        if lab:
            pending.append(lab.group(1))
            continue
        m = _LINE.search(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        for name in pending:
            labels[name] = addr
        pending = []
        instrs.append((addr, m.group(3), m.group(3) + m.group(4), m.group(5)))
    loops = []
    exits = [addr for addr, op, _, _ in instrs if op == "EXIT"]
    for addr, op, _full, operands in instrs:
        if op == "BRA":
            t = re.search(r"(\.L_x_\d+)", operands)
            # An EXIT inside the span: a jump back from out-of-line code (an mbarrier wait's
            # retry path placed after the kernel's end), not a loop.
            if (
                t
                and t.group(1) in labels
                and labels[t.group(1)] < addr
                and not any(labels[t.group(1)] <= e <= addr for e in exits)
            ):
                loops.append((labels[t.group(1)], addr))  # fmt: skip
    rec = {
        "spill_stores": sum(op == "STL" for _, op, _, _ in instrs),
        "spill_loads": sum(op == "LDL" for _, op, _, _ in instrs),
        "instructions": len(instrs),
    }
    mmas = sorted({full for _, op, full, _ in instrs if op in TENSOR})
    rec["mma"] = mmas[0] if len(mmas) == 1 else (", ".join(mmas) if mmas else None)

    def mix(lo, hi, skip=None):
        c = dict(tensor=0, fma=0, cmp_sel=0, int_alu=0, cvt=0, mem=0, move=0, uniform=0, other=0)
        for addr, op, _full, _ in instrs:
            if not (lo <= addr <= hi) or (skip and skip[0] <= addr <= skip[1]):
                continue
            cls = ("tensor" if op in TENSOR else "fma" if op in FMA_PIPE
                   else "cmp_sel" if op in CMP_SEL else "int_alu" if op in INT_ALU
                   else "cvt" if op in CVT else "mem" if op in MEM else "move" if op in MOVE
                   else "uniform" if op.startswith("U") else "other")  # fmt: skip
            c[cls] += 1
        return c

    def has_mma(lo, hi):
        return any(lo <= a <= hi and op in TENSOR for a, op, _, _ in instrs)

    cands = [lp for lp in loops if has_mma(*lp)] or loops
    if not cands:
        rec["loop"] = None
        return rec
    outer = max(cands, key=lambda lp: lp[1] - lp[0])
    inner = [lp for lp in loops if outer[0] < lp[0] and lp[1] < outer[1]]
    inner = max(inner, key=lambda lp: lp[1] - lp[0]) if inner else None
    rec["loop"] = {"outer": mix(*outer, skip=inner), "inner": mix(*inner) if inner else None}
    return rec


def occupancy(arch: int, regs: int, shared: int, warps: int) -> dict:
    """Resident blocks and warps per SM from registers, shared memory and the hardware caps."""
    hw = ARCHS[arch]
    regs_alloc = -(-max(regs, 1) // 8) * 8  # allocated per thread in units of 8
    per_warp = -(-(regs_alloc * 32) // 256) * 256  # and per warp in units of 256
    by_regs = REGS_PER_SM // (per_warp * warps)
    by_smem = hw["smem_sm"] // (shared + 1024) if shared else MAX_BLOCKS_SM  # 1 KB reserved
    by_warps = MAX_WARPS_SM // warps
    blocks = min(by_regs, by_smem, by_warps, MAX_BLOCKS_SM)
    return {
        "blocks_per_sm": blocks,
        "warps_per_sm": blocks * warps,
        "limited_by": min(
            ("registers", by_regs), ("shared", by_smem), ("warps", by_warps), key=lambda t: t[1]
        )[0],  # fmt: skip
        "smem_ok": shared <= hw["smem_block"],
    }


# --- gate ---------------------------------------------------------------------------------------


def gate_failures(rec: dict) -> list[str]:
    """Why this binary fails the gate (empty: it passes)."""
    why = []
    if rec["spill_stores"] or rec["spill_loads"] or rec["stack"]:
        why.append(f"spills: {rec['spill_stores']} STL, {rec['spill_loads']} LDL, "
                   f"stack {rec['stack']} B")  # fmt: skip
    ieee = rec["kernel"] == "search" and rec["meta"].get("input_precision") == "ieee"
    if rec["kernel"] in ("search", "search_gluon", *SOFT_KERNELS) and not ieee and not rec["mma"]:
        why.append(f"no tensor-core MMA in a {rec['kernel']} binary")
    if not rec["smem_ok"]:
        why.append(f"shared memory {rec['shared']} B above the per-block limit")
    if rec["warps_per_sm"] < MIN_RESIDENT_WARPS:
        why.append(f"{rec['warps_per_sm']} resident warps/SM < {MIN_RESIDENT_WARPS}")
    return why


def run(binaries: list[Binary], workers: int) -> list[dict]:
    from tqdm import tqdm  # a dependency of fastvq

    out = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        it = pool.map(compile_one, binaries)
        for rec in tqdm(it, total=len(binaries), desc="compile", file=sys.stderr, mininterval=5):
            rec["gate"] = gate_failures(rec)
            rec["targets"] = target_status(rec)
            out.append(rec)
    return out


def dedupe(binaries: list[Binary]) -> list[Binary]:
    """Drop binaries whose launch would compile to the same kernel as an earlier one."""
    seen, out = {}, []
    for b in binaries:
        fn, _, _, _, (options, signature, constexprs, attrs) = _specialised(b)
        key = (fn.__name__, b.arch, str(signature), str(constexprs), str(attrs), str(options))
        if key not in seen:
            seen[key] = b
            b.meta["aliases"] = []
            out.append(b)
        else:  # remember the name, so the model finds e.g. "fp32 tf32 D256" under "... D64"
            seen[key].meta["aliases"].append(b.name)
    return out


def gated(default: bool, kernel: str) -> bool:
    """The gate holds the default binaries (the sm_90 Gluon search among them)."""
    return default


def select(arch_list, scope: str, only: str | None) -> list[Binary]:
    bins = []
    for arch in arch_list:
        bins += search_binaries(arch, scope) + scatter_binaries(arch) + soft_binaries(arch)
    if scope == "defaults":
        bins = [b for b in bins if gated(b.default, b.kernel)]
    if only:
        bins = [b for b in bins if only in b.name]
    # defaults first: a default that compiles like an autotune candidate keeps its own record
    return dedupe(sorted(bins, key=lambda b: not b.default))


# --- report -------------------------------------------------------------------------------------


def markdown(records: list[dict], header: str) -> str:
    lines = [header, ""]
    for arch in sorted({r["arch"] for r in records}, reverse=True):
        lines += [f"## {ARCHS[arch]['name']}", "",
                  "| binary | config (BN,BK,BD,warps,stages) | regs | stack | spills (st/ld) "
                  "| smem KB | warps/SM | MMA | loop: tensor / fma / cmp+sel / int / cvt / mem "
                  "| non-MMA / acc. element | overlap (pendings) | gate |",
                  "|" + "---|" * 12]  # fmt: skip
        for r in sorted((r for r in records if r["arch"] == arch),
                        key=lambda r: (not r["default"], r["kernel"], r["name"])):  # fmt: skip
            cfg = r["meta"].get("config")  # (BN, BK, BD, warps, stages); none for the scatters
            cfg = ",".join(map(str, cfg)) if cfg else "-"
            lp = r.get("loop") or {}
            o = lp.get("outer")
            mixs = "-"
            if o:
                inner = lp.get("inner")
                mixs = " / ".join(str(o[c] + (inner[c] if inner else 0))
                                  for c in ("tensor", "fma", "cmp_sel", "int_alu", "cvt",
                                            "mem"))  # fmt: skip
                if inner:
                    mixs += " (D loop incl.)"
            mma = (r["mma"] or "none").replace(", ", "<br>")
            per = r.get("loop_per_element")
            per = "-" if per is None else f"{per:.2f}"
            ov = r.get("overlap") or {}
            pend = ",".join(map(str, sorted(set(ov.get("dot_wait_pendings", []))))) or "-"
            ovs = ("yes" if ov.get("overlap") else "no") + f" ({pend})"
            if ov.get("warp_specialized"):
                ovs += " ws"
            if ov.get("sass_epilogue_under_mma"):
                ovs += " SASS " + "/".join(map(str, ov["sass_epilogue_under_mma"]))
            if r.get("targets"):
                t = r["targets"]
                per += " (target " + ("met" if t["per_element"] else "missed") + ")"
                ovs += " (target " + ("met" if t["overlap"] else "missed") + ")"
            gate = "ok" if not r["gate"] else "FAIL: " + "; ".join(r["gate"])
            if not gated(r["default"], r["kernel"]):
                gate = "(alt) " + gate
            lines.append(
                f"| {r['name']} | {cfg} | {r['regs']} | {r['stack']} | "
                f"{r['spill_stores']}/{r['spill_loads']} | {r['shared'] / 1024:.0f} | "
                f"{r['warps_per_sm']} | {mma} | {mixs} | {per} | {ovs} | {gate} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    os.environ.pop("TRITON_INTERPRET", None)  # before the first triton import
    import triton

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gate", action="store_true", help="default binaries only; exit 1 on failure")
    ap.add_argument("--arch", type=int, action="append", choices=sorted(ARCHS))
    ap.add_argument("--only", help="substring of the binary names to keep")
    ap.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--out", type=Path, help="JSON path (default: results/gpu-static-DATE.json)")
    a = ap.parse_args(argv)
    archs = a.arch or [90, 80]
    scope = "defaults" if a.gate else "all"
    bins = select(archs, scope, a.only)
    print(f"compiling {len(bins)} binaries for sm_{'/sm_'.join(map(str, archs))} "
          f"(triton {triton.__version__}, {a.workers} workers)", file=sys.stderr)  # fmt: skip
    records = run(bins, a.workers)
    bad = [r for r in records if gated(r["default"], r["kernel"]) and r["gate"]]
    for r in bad:
        print(f"GATE FAIL sm_{r['arch']} {r['name']}: {'; '.join(r['gate'])} "
              f"(regs {r['regs']}, config {r['meta'].get('config')})", file=sys.stderr)  # fmt: skip
    for r in records:
        if r.get("targets"):
            ov = r["overlap"]
            print(
                f"target sm_{r['arch']} {r['name']}: {r['loop_per_element']} non-MMA per "
                f"accumulator element (<= {TARGET_PER_ELEMENT:g}: "
                f"{'met' if r['targets']['per_element'] else 'missed'}); overlap "
                f"{'met' if ov['overlap'] else 'missed'} (pendings "
                f"{ov['dot_wait_pendings']}, warp specialised {ov['warp_specialized']}, "
                f"SASS epilogue instructions under the MMAs per wait "
                f"{ov.get('sass_epilogue_under_mma')})"
            )
    if a.gate and not a.out:
        print(f"{len(records) - len(bad)}/{len(records)} default binaries pass the gate "
              "(the sm_90 Gluon search's included)")  # fmt: skip
        return 1 if bad else 0
    date = datetime.date.today().isoformat()
    out = a.out or RESULTS / f"gpu-static-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "produced_by": "python -m benchmarks.gpu_static " + " ".join(argv or sys.argv[1:]),
        "date": date, "triton": triton.__version__, "torch": torch.__version__,
        "machine": "CPU only: ahead-of-time compiles, no GPU", "binaries": records,
    }  # fmt: skip
    out.write_text(json.dumps(doc, indent=1))
    header = (f"# Static report: every fastvq Triton binary for sm_90 and sm_80\n\n"
              f"Produced by `{doc['produced_by'].strip()}` on {date} (Triton {triton.__version__}, "
              f"torch {torch.__version__}), compiled ahead of time on a CPU-only machine. "
              "'(alt)' rows are autotune candidates or non-default precisions: reported, not "
              "gated ('gluon' rows: the sm_90 default for 16-bit operands). Loop mix: SASS "
              "instructions per warp in the code-tile loop. Non-MMA / acc. element: the loop's "
              "non-MMA instructions (each once) per accumulator element per thread, "
              "BLOCK_N*BLOCK_K/(32*warps) per code tile the loop covers (one per stage for "
              "the Gluon search). Overlap: a TTGIR warp_group_dot_wait with pendings >= 1 or warp "
              "specialisation (an MMA in flight during an epilogue), unless ptxas serialised "
              "the wgmma chains or kept no epilogue instruction between a partial and the next "
              "full wgmma wait ('SASS a/b/...': float max/compare/select and shuffle "
              "instructions there, "
              f"per partial wait); targets (sm_90 bf16 D64/D256): <= {TARGET_PER_ELEMENT:g} per "
              "element and overlap.")  # fmt: skip
    out.with_suffix(".md").write_text(markdown(records, header))
    print(f"wrote {out} and {out.with_suffix('.md')}; {len(bad)} default binaries fail the gate")
    return 1 if (a.gate and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
