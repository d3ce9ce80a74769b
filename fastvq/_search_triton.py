"""Launcher of the fused Triton search (``kernels/vq_search.py``): tiles, scaling, post-processing.

The twin of ``fastvq/_search_torch.py``, with the same contract. It imports Triton, so
``fastvq.ops`` imports it only on first use of the Triton backend.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton

from fastvq._interpret import interpreting
from fastvq._search_torch import code_norms, magnitude_scale
from fastvq.kernels.vq_search import vq_search_fwd_kernel

# Tests set this to fill outputs with NaN / -1 before launch, so a row the kernel forgets to write
# fails loudly instead of passing with whatever memory held.
POISON_OUTPUTS = False

FP32_PRECISIONS = ("ieee", "tf32x3", "tf32", "tf32_rescore")
# How many rows "tf32_rescore" searched again (read by tests and the GPU exactness report).
RESCORE_STATS = {"rows": 0}
# The fp32 precision used when none is asked for: tf32x3, chosen by the H200 measurements in
# docs/benchmarks.md (exact in every row checked; tf32_rescore was slower).
DEFAULT_FP32_PRECISION = "tf32x3"


class SearchConfig(NamedTuple):
    block_n: int
    block_k: int
    block_d: int
    num_warps: int
    num_stages: int


# Autotune candidates (``FASTVQ_AUTOTUNE=1``); every one is compiled and gated statically by
# benchmarks/gpu_static.py for sm_80 and sm_90 (all dot dims >= 16).
AUTOTUNE_CONFIGS = [
    SearchConfig(128, 128, 64, 8, 3), SearchConfig(128, 64, 64, 4, 3),
    SearchConfig(128, 64, 64, 8, 4), SearchConfig(64, 128, 64, 4, 3),
    SearchConfig(256, 64, 64, 8, 3), SearchConfig(128, 128, 32, 8, 4),
    SearchConfig(64, 64, 64, 4, 4), SearchConfig(128, 64, 32, 8, 3),
    # D = 256 with the row tile held across the code loop, and 256-row blocks (less L2 traffic)
    SearchConfig(128, 64, 256, 8, 2), SearchConfig(128, 128, 256, 8, 2),
    SearchConfig(256, 128, 64, 8, 3),
]  # fmt: skip


# Keyed on K, D and (implicitly) the tensor dtypes, never on N: a new batch size reuses the tune.
vq_search_fwd_autotuned = triton.autotune(
    configs=[
        triton.Config(
            {"BLOCK_N": c.block_n, "BLOCK_K": c.block_k, "BLOCK_D": c.block_d},
            num_warps=c.num_warps,
            num_stages=c.num_stages,
        )
        for c in AUTOTUNE_CONFIGS
    ],
    key=["K", "D"],
)(triton.heuristics({"ONE_D": lambda a: a["D"] <= a["BLOCK_D"]})(vq_search_fwd_kernel))


def gpu_arch(device: torch.device) -> int | None:
    """``10 * major + minor`` of a CUDA device (90 for H100), None elsewhere."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def pick_config(
    n: int,
    k: int,
    d: int,
    dtype: torch.dtype,
    *,
    arch: int | None = None,
    precision: str = "tf32x3",
) -> SearchConfig:
    """Tile sizes and launch parameters for one problem.

    Args:
        n, k, d: rows, codes, dimension.
        dtype: the search dtype (the promotion of both inputs' dtypes).
        arch: the GPU it is for (80: A100, 90: H100/H200). None: interpreter tiles when
            ``TRITON_INTERPRET`` is set, else the sm_90 choice. Passing an arch returns the GPU
            choice whatever the interpreter says, so the static gate sees what a GPU launches.
        precision: the fp32 ``tl.dot`` input precision (ignored for 16-bit searches).

    Every tl.dot dimension is >= 16 (the GPU's rule). The GPU tiles are spill-free ones that
    benchmarks/gpu_static.py found for each (arch, dtype, precision, D alignment); on sm_90 the
    fastest of them on an H200 (benchmarks/results/gpu-h200-2026-11-26/), on sm_80 unmeasured.
    The gate in tests/test_gpu_static.py keeps them spill-free.
    """
    p2 = triton.next_power_of_2
    if arch is None and interpreting():
        # fewer, bigger numpy steps; BLOCK_D covers D up to 256 so ONE_D is exercised too
        return SearchConfig(
            max(16, min(64, p2(n))), max(16, min(128, p2(k))), max(16, min(p2(d), 256)), 4, 1
        )
    arch = 90 if arch is None else arch
    # Unaligned D (not a multiple of 16 elements): the loads cannot be vectorised and their
    # addresses take many more registers, so the D block shrinks to stay spill-free.
    aligned = d % 16 == 0
    bd_full = max(16, p2(d))
    small = n <= 4096  # few row blocks: 64-row blocks (and split-K, see plan_search)
    block_n = 64 if small else 128
    block_k, stages = 64, 3
    if dtype == torch.float32:
        if precision == "ieee" and not aligned and d > 16:
            # CUDA-core FMAs hold the whole BN x BK accumulator per thread and the unaligned loads
            # are scalar: BK 32 is the one shape found spill-free on both archs (the exception
            # to BN, BK >= 64; ieee is the exact fallback, not a speed path).
            return SearchConfig(64, max(16, min(32, p2(k))), 32, 4, 3)
        if not aligned and d > 16:
            # BN 128 x BD 32 spills on sm_80 (and sm_90 ieee); BN 64 x BD 16 lands on ptxas'
            # 128-register choice and spills a little: these two are clear of both.
            block_d = 16 if block_n == 128 else 32
        elif arch >= 90 and precision != "ieee" and d <= 64:
            block_d = bd_full  # row tile loaded once (ONE_D)
            if not small:
                # Measured on an H200 (N=65536, K=16384, D=64; docs/benchmarks.md): 256-row
                # blocks for tf32x3 (2.07 ms vs 2.34 for 128 x 64), 128 x 128 for tf32
                # (0.88 ms vs 1.02); both spill-free.
                block_n, block_k = (256, 64) if precision == "tf32x3" else (128, 128)
        elif precision != "ieee" and d > 64 and (arch >= 90 or precision != "tf32x3"):
            # H200, D=256: 128 x 128 x 32 in 4 stages, 8.82 ms vs 11.14 (tf32x3), 3.27 vs 3.33
            # (tf32), 8.56 vs 11.63 (autocast's mix); spills on sm_80 for tf32x3 only.
            block_d, block_k, stages = 32, 128, 4
        else:
            block_d = min(32, bd_full)
    elif not aligned and d > 32:
        block_d = 32  # BD 64 spills 27-34 registers' worth on both archs at D=100
    elif d <= 64:
        block_d, block_k = bd_full, 128
    elif d <= 256:
        # Row tile held across the code loop (ONE_D, BLOCK_D = D): measured on an H200 at
        # N=65536, D=256: 1.65 ms vs 2.12 (K=16384), 6.31 vs 8.44 (K=65536) for 128 x 64 x 64.
        block_d, block_k, stages = bd_full, 128, 2
    else:
        block_d = 64
    block_k = max(16, min(block_k, p2(k)))
    return SearchConfig(block_n, block_k, block_d, 8, stages)  # 8 warps: two warpgroups


class SearchPlan(NamedTuple):
    """Everything a launch decides besides the tensors: one plan, one binary."""

    config: SearchConfig
    splits: int
    k_per_split: int
    one_d: bool
    cast_fp32: bool
    input_precision: str
    store_zq: bool
    track_second: bool
    gluon: bool = False  # the sm_90 Gluon kernel (kernels/vq_search_sm90.py) instead

    def constexprs(self) -> dict:
        return dict(
            BLOCK_N=self.config.block_n, BLOCK_K=self.config.block_k,
            BLOCK_D=self.config.block_d, ONE_D=self.one_d, CAST_FP32=self.cast_fp32,
            INPUT_PRECISION=self.input_precision, STORE_ZQ=self.store_zq,
            SPLIT_K=self.splits > 1, TRACK_SECOND=self.track_second,
        )  # fmt: skip


# Which search kernel a CUDA launch uses: "auto" (the default: the Gluon kernel where it applies
# and has passed its first-use check on this device, else Triton), "triton" (kernels/vq_search.py,
# everywhere) or "gluon" (kernels/vq_search_sm90.py where it applies, unchecked; under the
# interpreter, its Triton twin kernels/vq_search_sm90_twin.py). The Gluon kernel's MMA for the next
# code tile overlaps this tile's epilogue; it has been compiled and read (the static gate) and its
# algorithm tested through the twin, but not yet timed on a GPU: see docs/benchmarks.md.
SEARCH_KERNELS = ("auto", "triton", "gluon")


def search_kernel() -> str:
    """``FASTVQ_SEARCH_KERNEL`` if set, else "auto"."""
    name = os.environ.get("FASTVQ_SEARCH_KERNEL", "auto")
    if name not in SEARCH_KERNELS:
        raise ValueError(f"FASTVQ_SEARCH_KERNEL must be one of {SEARCH_KERNELS}, got {name!r}")
    return name


def finish_or_raise(device: torch.device, seconds: float = 60.0) -> None:
    """Wait for the work queued on ``device``'s current stream, or raise after ``seconds``.

    The first-use check's guard against a kernel that never finishes: a plain sync would hang
    the process without a word. The GPU stays busy either way; the error says what to do.
    """
    import time

    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    start = time.monotonic()
    while not event.query():
        if time.monotonic() - start > seconds:
            raise RuntimeError(
                f"fastvq: the sm_90 Gluon search did not finish its first-use check within "
                f"{seconds:g} s (a small search that takes milliseconds): the GPU is likely "
                f"stuck in it. Restart with FASTVQ_SEARCH_KERNEL=triton, and please report this."
            )
        time.sleep(0.001)


# (device index, dtype, D) -> whether the Gluon kernel passed its first-use check there
_GLUON_CHECKED: dict[tuple, bool] = {}


def gluon_checked(device: torch.device, dtype: torch.dtype, d: int) -> bool:
    """Whether the Gluon kernel gives exact results on this device for (dtype, D); checked once.

    The check searches small-integer rows and codes (every score exact in fp32, many exact ties):
    300 rows (three row blocks, the last partial) against 1000 codes (8 tiles, the last partial),
    whole and in three K splits (3, 3 and 2 tiles), and against 856 codes (7 tiles: a round of
    stages, then a pair and an odd tile at the next barrier phase), and compares indices and z_q
    with an fp64 oracle, ties to the lowest index. A wrong result, or a kernel that does not
    build with this Triton, warns once and leaves the search to the Triton kernel; a kernel that
    does not finish within a minute raises (:func:`finish_or_raise`). Running out of memory
    during the check fails only this call (it is checked again next time).
    """
    key = (device.index, dtype, d)
    if key not in _GLUON_CHECKED:
        # the caller may be under autocast or autograd; the probe wants neither
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            ok = _gluon_probe(device, dtype, d)
        if ok is None:
            return False
        _GLUON_CHECKED[key] = ok
    return _GLUON_CHECKED[key]


def _gluon_probe(device: torch.device, dtype: torch.dtype, d: int) -> bool | None:
    import warnings

    gen = torch.Generator().manual_seed(0)
    z = torch.randint(-3, 4, (300, d), generator=gen).to(device=device, dtype=dtype)
    codes = torch.randint(-3, 4, (1000, d), generator=gen).to(device=device, dtype=dtype)
    why = None
    for k, splits in ((1000, 1), (1000, 3), (856, 1)):
        c = codes[:k]
        # argmin returns the first of equal minima: ties go to the lowest index
        oracle = torch.cdist(z.double(), c.double()).square().argmin(dim=1)
        try:
            idx, z_q, _ = vq_search_triton(z, c, splits=splits, kernel="gluon")
        except torch.cuda.OutOfMemoryError:
            return None  # not the kernel's fault: no verdict
        except Exception as exc:  # a build or launch failure is a failed check, not a crash
            why = f"{type(exc).__name__}: {exc}"
            break
        if device.type == "cuda":
            finish_or_raise(device)
        if not torch.equal(idx, oracle) or not torch.equal(z_q, c[idx]):
            wrong = int((idx != oracle).sum())
            why = f"{wrong} of 300 indices differ from the fp64 oracle (K={k}, splits={splits})"
            break
    if why is None:
        return True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    warnings.warn(
        f"fastvq: the sm_90 Gluon search failed its first-use check on {name} "
        f"({dtype}, D={d}, Triton {triton.__version__}): "
        f"{why}. The Triton kernel runs instead; FASTVQ_SEARCH_KERNEL=triton skips the check. "
        f"Please report this.",
        RuntimeWarning,
        stacklevel=3,
    )
    return False


def gluon_applies(arch: int | None, z_dtype: torch.dtype, c_dtype: torch.dtype, d: int) -> bool:
    """Whether the sm_90 Gluon kernel can run this search (whatever is asked for): 16-bit
    operands of one dtype, and rows TMA can copy (D <= 256, 16-byte aligned: D % 8 == 0)."""
    return (
        arch == 90 and z_dtype == c_dtype and z_dtype in (torch.bfloat16, torch.float16)
        and d <= 256 and d % 8 == 0
    )  # fmt: skip


def gluon_config_ok(cfg: SearchConfig, d: int) -> bool:
    """Whether the Gluon kernel can run ``cfg``: the row tile covers D in one TMA box (a power of
    two up to 256), one warp per 16 rows in whole warpgroups, a code tile of at most 128 (two
    tiles' accumulators and the best tile's copy take 3 * BLOCK_K / 2 registers per thread), and
    the row tile and the stages fit Hopper's 227 KiB of shared memory per block."""
    from fastvq.kernels.vq_search_sm90 import stages_for

    bd = cfg.block_d
    smem = 2 * cfg.block_n * bd + stages_for(bd) * 2 * cfg.block_k * (bd + 16) + 1024
    return (
        d <= bd <= 256 and bd & (bd - 1) == 0 and cfg.block_n == 16 * cfg.num_warps
        and cfg.num_warps % 4 == 0 and cfg.block_k in (16, 32, 64, 128) and smem <= 227 * 1024
    )  # fmt: skip


def norm_pieces(cnorm: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows, 16) bf16: -cnorm / 2 as three bf16 pieces in columns 0-2 whose fp32 sum is exact.

    Each piece takes the next 8 significant bits of the fp32 value (the remainders are exact fp32
    differences), so the pieces sum to -cnorm / 2 exactly while the last stays a normal bf16
    (norms above about 2^-100; the launcher's power-of-two scaling keeps them there), and
    <(1, 1, 1), pieces> accumulated in fp32 is -cnorm / 2 up to the summation's own rounding.
    Rows past ``cnorm``'s length get -inf: those codes never win.
    """
    k = cnorm.shape[0]
    out = torch.zeros(rows, 16, dtype=torch.bfloat16, device=cnorm.device)
    rest = cnorm * -0.5
    for j in range(3):
        out[:k, j] = rest.bfloat16()
        rest = rest - out[:k, j].float()
    out[k:, 0] = float("-inf")
    return out


def gluon_launch(plan, z2d, codebook, rows_s, codes_s, cnorm, part_i, z_q, err, part_d):
    """(args, constexprs) of kernels/vq_search_sm90.py: TMA descriptors of the searched rows and
    codes, and of their norms as bf16 pieces padded with -inf to whole code tiles."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from fastvq.kernels.vq_search_sm90 import stages_for

    cfg = plan.config
    n, d = rows_s.shape
    k = codes_s.shape[0]

    def desc(t, block, dt):
        # TMA: aligned, unit stride, 16-byte row pitch, rows that do not overlap (expand())
        if (
            t.stride(-1) != 1
            or t.data_ptr() % 16
            or (t.stride(0) * t.element_size()) % 16
            or t.stride(0) < t.shape[1]
        ):
            t = t.clone(memory_format=torch.contiguous_format)  # fmt: skip
        return TensorDescriptor.from_tensor(
            t, block, gl.NVMMASharedLayout.get_default_for(block, dt)
        )

    gdt = gl.bfloat16 if codes_s.dtype == torch.bfloat16 else gl.float16
    # the norm step is a bf16 MMA for fp16 searches too: bf16 has fp32's range
    pieces = norm_pieces(cnorm[:k], triton.cdiv(k, cfg.block_k) * cfg.block_k)
    args = (
        desc(rows_s, [cfg.block_n, cfg.block_d], gdt),
        desc(codes_s, [cfg.block_k, cfg.block_d], gdt),
        desc(pieces, [cfg.block_k, 16], gl.bfloat16), z2d, codebook, part_i, z_q, err, part_d,
        n, k, d, plan.k_per_split,
        z2d.stride(0), z2d.stride(1), codebook.stride(0), codebook.stride(1),
        z_q.stride(0), z_q.stride(1),
    )  # fmt: skip
    flags = dict(STORE_ZQ=plan.store_zq, SPLIT_K=plan.splits > 1, STAGES=stages_for(cfg.block_d))
    return args, flags


def default_fp32_precision() -> str:
    """``FASTVQ_FP32_PRECISION`` if set, else the default chosen in docs/benchmarks.md."""
    return os.environ.get("FASTVQ_FP32_PRECISION", DEFAULT_FP32_PRECISION)


def plan_search(
    n: int,
    k: int,
    d: int,
    z_dtype: torch.dtype,
    c_dtype: torch.dtype,
    *,
    arch: int | None,
    num_sms: int,
    fp32_precision: str | None = None,
    config: SearchConfig | None = None,
    splits: int | None = None,
    kernel: str | None = None,
) -> SearchPlan:
    """Decide the launch of one search: config, K splits and the kernel's constexpr flags.

    ``arch`` None means "whatever runs here" (the interpreter under ``TRITON_INTERPRET``);
    the static gate passes 80 or 90 to get exactly what the launcher would run on that GPU.
    ``kernel``: "auto", "triton" or "gluon" (default :func:`search_kernel`); "auto" and "gluon"
    fall back to the Triton kernel where the Gluon one does not apply (see :func:`gluon_applies`);
    under the interpreter only "gluon" takes it (its Triton twin).
    """
    interp = arch is None and interpreting()
    search_dtype = torch.promote_types(z_dtype, c_dtype)
    same_dtype = z_dtype == c_dtype
    if fp32_precision is None:
        fp32_precision = default_fp32_precision()
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS}, got {fp32_precision!r}")
    track = fp32_precision == "tf32_rescore" and search_dtype == torch.float32
    if interp or search_dtype != torch.float32:
        precision = "ieee" if interp else "tf32"  # "tf32" is ignored for bf16/fp16 operands
    else:
        precision = "tf32" if track else fp32_precision
    choice = kernel or search_kernel()
    if interp:
        # only when asked for: the Gluon kernel's Triton twin, with the plan sm_90 would run
        gluon = choice == "gluon" and gluon_applies(90, z_dtype, c_dtype, d)
    else:
        gluon = choice in ("auto", "gluon") and gluon_applies(arch, z_dtype, c_dtype, d)
    if gluon and config is not None and (choice == "auto" or not gluon_config_ok(config, d)):
        # a tile config was asked for: under "auto" (the first-use check covers the default
        # config only) and where the Gluon kernel cannot run it, the Triton kernel runs it
        gluon = False
    if gluon:
        # one warp per 16 rows (wgmma m64 per warpgroup), 128-code tiles (m64n128: half the
        # MMA instructions, and their descriptor moves, per score of 64-code tiles); always two
        # warpgroups: at D = 256 one block fills the shared memory, and one warpgroup alone would
        # leave 4 warps on the SM (split-K gives small batches their parallelism)
        cfg = config or SearchConfig(128, 128, max(16, triton.next_power_of_2(d)), 8, 1)
    else:
        cfg = config or pick_config(n, k, d, search_dtype, arch=arch, precision=precision)
    # each split covers whole BLOCK_K tiles
    tile_k = cfg.block_k
    row_blocks = triton.cdiv(n, cfg.block_n)
    if splits is None:
        splits = 1
        if row_blocks < num_sms and k >= 32 * cfg.block_k:
            splits = min(triton.cdiv(2 * num_sms, row_blocks), k // (16 * cfg.block_k))
    splits = max(1, min(splits, triton.cdiv(k, tile_k)))
    k_per_split = triton.cdiv(triton.cdiv(k, splits), tile_k) * tile_k
    splits = triton.cdiv(k, k_per_split)
    return SearchPlan(
        config=cfg, splits=splits, k_per_split=k_per_split, one_d=d <= cfg.block_d,
        cast_fp32=interp or search_dtype == torch.float32 or not same_dtype,
        input_precision=precision, store_zq=same_dtype, track_second=track, gluon=gluon,
    )  # fmt: skip


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
    kernel: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the fused search. Same contract as ``fastvq._search_torch.search_torch``.

    Args:
        z2d: (N, D) float32/float16/bfloat16, any strides.
        codebook: (K, D) float32/float16/bfloat16, K >= 1, same device.
        fp32_precision: ``tl.dot`` input precision when the search dtype is fp32 on a GPU:
            "ieee" (exact fp32, no tensor cores), "tf32x3" (near-fp32 on tensor cores, three
            MMAs per product), "tf32" (fastest, may misrank near-ties), "tf32_rescore" (tf32
            pass that also tracks each row's runner-up; rows whose top-2 gap is within tf32's
            rounding bound are searched again in ieee fp32, so the result is exact; costs one
            host sync). Default: :data:`DEFAULT_FP32_PRECISION`; env ``FASTVQ_FP32_PRECISION``
            overrides. bf16/fp16 searches always use native MMAs with fp32 accumulation; the
            interpreter's dot is exact fp32 whatever is asked.
        config: tile sizes; default from :func:`pick_config`.
        splits: number of K splits (1 = none). Default: split K when the row blocks alone
            would leave most SMs idle (small N) and K is large.
        kernel: "auto", "triton" or "gluon" (see :data:`SEARCH_KERNELS`); default
            :func:`search_kernel` (env ``FASTVQ_SEARCH_KERNEL``, else "auto").

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
    arch = gpu_arch(dev)
    choice = kernel or search_kernel()
    plan = plan_search(
        n, k, d, z2d.dtype, codebook.dtype, arch=arch, num_sms=_num_sms(dev),
        fp32_precision=fp32_precision, config=config, splits=splits, kernel=choice,
    )  # fmt: skip
    if plan.gluon and arch is not None and choice == "auto":
        # no check inside a CUDA graph capture (it syncs): there the Gluon kernel runs only if
        # it passed before, else the Triton kernel
        capturing = dev.type == "cuda" and torch.cuda.is_current_stream_capturing()
        key = (dev.index, z2d.dtype, d)
        ok = _GLUON_CHECKED.get(key, False) if capturing else gluon_checked(dev, z2d.dtype, d)
    else:
        ok = True
    if not ok:
        plan = plan_search(
            n, k, d, z2d.dtype, codebook.dtype, arch=arch, num_sms=_num_sms(dev),
            fp32_precision=fp32_precision, config=config, splits=splits, kernel="triton",
        )  # fmt: skip
    if plan.config.block_n * max(abs(z2d.stride(0)), abs(z2d.stride(1))) >= 2**31 - 1:
        z2d = z2d.contiguous()  # in-tile offsets are int32 (see the kernel)

    # One power-of-two scale s for both operands (a device scalar: no host sync). The kernel
    # searches ||s c||^2 - 2 (s z).(s c) = s^2 dist: exact rescaling, same order, and neither the
    # dot nor the norms overflow or underflow for any finite input.
    if torch.promote_types(z2d.dtype, codebook.dtype) == torch.float16:
        # fp16's range cannot overflow fp32 sums, and scaling would flush fp16 values to zero
        scale = torch.ones((), dtype=torch.float32, device=dev)
        rows_s, codes_s = z2d, codebook
    else:
        scale = magnitude_scale(z2d, codebook)
        # Both operands scaled (copies: N x D and K x D, small next to the search): tensor cores
        # flush fp32 subnormals, so tiny rows must be scaled up too, not only the codes.
        rows_s = (z2d * scale).contiguous()
        codes_s = (codebook * scale).contiguous()
    cnorm = code_norms(codebook, scale=scale)
    finite = torch.isfinite(cnorm)

    split = plan.splits > 1
    part_d = part_i = second = err  # placeholders: unused pointers
    if split or plan.track_second:
        part_d = torch.empty((plan.splits, n), dtype=torch.float32, device=dev)
    part_i = torch.empty((plan.splits, n), dtype=torch.int64, device=dev) if split else indices
    if plan.track_second:
        second = torch.empty((plan.splits, n), dtype=torch.float32, device=dev)
    args = (
        z2d, codebook, rows_s, codes_s, cnorm, part_i, z_q, err, part_d, second,
        n, k, d, plan.k_per_split,
        z2d.stride(0), z2d.stride(1), codebook.stride(0), codebook.stride(1),
        rows_s.stride(0), rows_s.stride(1), codes_s.stride(0), codes_s.stride(1),
        z_q.stride(0), z_q.stride(1),
    )  # fmt: skip
    flags = plan.constexprs()
    use_autotune = (
        config is None and arch is not None and not split and not plan.gluon
        and os.environ.get("FASTVQ_AUTOTUNE") == "1"
    )  # fmt: skip
    if plan.gluon and arch is None:  # the interpreter: the Gluon kernel's Triton twin
        from fastvq.kernels.vq_search_sm90_twin import vq_search_fwd_sm90_twin_kernel

        cfg = plan.config
        pieces = norm_pieces(cnorm[:k], triton.cdiv(k, cfg.block_k) * cfg.block_k)
        vq_search_fwd_sm90_twin_kernel[(triton.cdiv(n, cfg.block_n), plan.splits)](
            rows_s, codes_s, pieces, z2d, codebook, part_i, z_q, err, part_d,
            n, k, d, plan.k_per_split,
            rows_s.stride(0), rows_s.stride(1), codes_s.stride(0), codes_s.stride(1),
            z2d.stride(0), z2d.stride(1), codebook.stride(0), codebook.stride(1),
            z_q.stride(0), z_q.stride(1),
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d,
            STORE_ZQ=plan.store_zq, SPLIT_K=split,
        )  # fmt: skip
    elif plan.gluon:
        try:
            from fastvq.kernels.vq_search_sm90 import vq_search_fwd_sm90_kernel
        except ImportError as exc:
            raise RuntimeError(
                f"FASTVQ_SEARCH_KERNEL=gluon needs Triton's Gluon (triton.experimental.gluon, "
                f"Triton 3.9 is tested); this Triton is {triton.__version__}: {exc}"
            ) from exc

        args, flags = gluon_launch(plan, z2d, codebook, rows_s, codes_s, cnorm, part_i, z_q, err,
                                   part_d)  # fmt: skip
        cfg = plan.config
        vq_search_fwd_sm90_kernel[(triton.cdiv(n, cfg.block_n), plan.splits)](
            *args, **flags, num_warps=cfg.num_warps, num_stages=cfg.num_stages
        )
    elif use_autotune:
        # The kernel only writes its outputs, so the autotuner's repeated launches are harmless.
        for name in ("BLOCK_N", "BLOCK_K", "BLOCK_D", "ONE_D"):
            flags.pop(name)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), 1)
        vq_search_fwd_autotuned[grid](*args, **flags)
    else:
        cfg = plan.config
        vq_search_fwd_kernel[(triton.cdiv(n, cfg.block_n), plan.splits)](
            *args, **flags, num_warps=cfg.num_warps, num_stages=cfg.num_stages
        )
    if split or plan.track_second:
        # Splits are ordered by k, and argmin returns the first occurrence: ties -> lowest index.
        # A row with no finite distance anywhere keeps split 0's index 0 (the kernel stores
        # +inf, never NaN or -inf, as such a row's partial minimum).
        which = part_d.argmin(dim=0, keepdim=True)
    if split:
        indices.copy_(part_i.gather(0, which).squeeze(0))
    redo = None
    if plan.track_second:
        best = part_d.gather(0, which).squeeze(0)
        # runner-up: the chosen split's own second best, or another split's best
        sec = second.gather(0, which).squeeze(0)
        sec = torch.minimum(sec, part_d.scatter(0, which, float("inf")).min(dim=0).values)
        redo = _rows_to_rescore(z2d, cnorm, finite, best, sec, scale)
        if redo.numel():
            sub_idx, _, _ = vq_search_triton(z2d[redo], codebook, fp32_precision="ieee", splits=1)
            indices[redo] = sub_idx
    if split:
        _regather(z2d, codebook, indices, None, z_q, err)  # the split kernel gathers nothing
    else:
        if redo is not None and redo.numel():
            _regather(z2d, codebook, indices, redo, z_q, err)  # rescored rows changed code
        if not plan.store_zq:
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


def _rows_to_rescore(z2d, cnorm, finite, best, second, scale) -> torch.Tensor:
    """Rows whose tf32 top-2 gap is within tf32's rounding bound: the order may be wrong.

    tf32 keeps 10 mantissa bits. A plain ``tl.dot`` on fp32 hands the tensor cores raw fp32 (no
    ``cvt`` in the PTX), which may truncate: an input is off by up to 2^-10 relative, not the
    2^-11 of rounding to nearest (tests/test_fp32_bounds.py shows truncated inputs past the
    round-to-nearest bound). So each product z_d c_d is off by at most 2 * 2^-10 |z_d c_d|, plus
    fp32 accumulation (D * 2^-24). One distance ||c||^2 - 2 z.c is off by at most
    2 (2^-9 + D 2^-24) ||z|| ||c||, a difference of two by twice that. Everything is in the
    kernel's scaled units (``cnorm`` is ``||s c||^2``, distances are ``s^2 dist``).
    """
    d = z2d.shape[1]
    cmax = torch.where(finite, cnorm, torch.zeros((), device=cnorm.device)).max().sqrt()
    znorm = torch.linalg.vector_norm(z2d.to(torch.float32) * scale, dim=1)
    tau = 4.0 * (2.0**-9 + d * 2.0**-24) * znorm * cmax
    redo = ((second - best) <= tau).nonzero().squeeze(1)  # NaN gaps (non-finite rows) stay out
    RESCORE_STATS["rows"] += redo.numel()
    return redo
