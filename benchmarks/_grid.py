"""The benchmark grid: which (op, provider, N, K, D, dtype, device) cells exist in each mode.

Shared by the pytest side (parametrization) and the worker process (cell construction).

Modes (``FASTVQ_BENCH_GRID``, default: ``smoke`` under ``--benchmark-disable`` or
``FASTVQ_BENCH_SMOKE=1``, else ``gpu`` when CUDA is available, else ``cpu``):

- ``cpu``: N=16384, D=64, K in 1024/8192/65536, fp32.
- ``gpu``: N=65536, D in 64/256, K in 1024..262144 (x4 steps), fp32 and bf16.
- ``gpu-check``: the pruned H100 grid run by ``gpu_check.sh`` (D=256, K in 16384/65536/262144).
- ``smoke``: every op and provider once at tiny sizes (CI).
- ``gpu-check-dry``: the ``gpu-check`` cell list at tiny sizes on CPU (``gpu_check.sh --dry-run``).

Filters (comma-separated, applied to every mode): ``FASTVQ_BENCH_OPS``, ``FASTVQ_BENCH_PROVIDERS``,
``FASTVQ_BENCH_DTYPES``, ``FASTVQ_BENCH_K``, ``FASTVQ_BENCH_D``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

OPS = ("search", "fwd", "fwdbwd", "ema")  # the op grid; "model" (VQ-VAE step) has its own

# A VQ-VAE on 28x28 images quantizes a 7x7 latent map: for op "model", N is the batch size in
# images and the quantizer sees N * 49 vectors.
MODEL_LATENTS_PER_IMAGE = 49

# Group prefix per op: every provider of one problem lands in one pytest-benchmark group.
GROUP_PREFIX = {
    "search": "vq-search",
    "fwd": "vq-fwd",
    "fwdbwd": "vq-fwdbwd",
    "ema": "vq-ema",
    "model": "vqvae-train",
}

# Which providers have a meaning for which op. Combinations not listed are not generated
# (e.g. faiss has no gradient, vqp has no search-only entry point); see docs/benchmarks.md.
PROVIDERS = {
    "search": ["fastvq-triton", "fastvq-torch", "naive", "naive-compile", "faiss", "matmul"],
    "fwd": [
        "fastvq-triton",
        "fastvq-torch",
        "naive",
        "naive-compile",
        "vqp-train",
        "vqp-eval",
        "matmul",
    ],
    "fwdbwd": ["fastvq-triton", "fastvq-torch", "naive", "naive-compile", "vqp-train"],
    "ema": ["fastvq-triton", "fastvq-torch", "naive", "vqp-train"],
    "model": ["fastvq-triton", "fastvq-torch", "vqp-train"],
}

# Providers whose failure is a bug in fastvq (the test fails) rather than a peer result (recorded).
OWN_PROVIDERS = ("fastvq-triton", "fastvq-torch")

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class Cell:
    """One measurement: an op run by one provider on one problem size."""

    op: str
    provider: str
    N: int
    K: int
    D: int
    dtype: str  # "fp32" | "bf16" | "fp16"
    device: str  # "cpu" | "cuda"

    @property
    def group(self) -> str:
        n = f"B={self.N}" if self.op == "model" else f"N={self.N}"
        return f"{GROUP_PREFIX[self.op]} {n} K={self.K} D={self.D} {self.dtype}"

    @property
    def id(self) -> str:
        return f"{self.op}-{self.provider}-N{self.N}-K{self.K}-D{self.D}-{self.dtype}"

    @property
    def search_flops(self) -> int:
        """FLOPs of the distance matmul alone (2*N*K*D): the yardstick for every op."""
        n = self.N * (MODEL_LATENTS_PER_IMAGE if self.op == "model" else 1)
        return 2 * n * self.K * self.D

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Settings:
    """How long to measure: per-cell time budget and round limits."""

    budget_s: float  # target total timed seconds per cell (rounds = budget / one call)
    min_rounds: int
    max_rounds: int
    warmup: int  # untimed calls before the memory measurement (compilation, autotuning)


def _problems(device, N, Ds, Ks, dtypes):
    return [(device, N, K, D, dt) for dt in dtypes for D in Ds for K in Ks]


def _product(problems, ops=OPS, providers=None):
    cells = []
    for device, N, K, D, dt in problems:
        for op in ops:
            for p in PROVIDERS[op]:
                if providers is None or p in providers:
                    cells.append(Cell(op, p, N, K, D, dt, device))
    return cells


def _gpu_check_cells(device, N, D, Ks, dtypes) -> list[Cell]:
    """Pruned H100 grid: fastvq fwd/fwd+bwd at every K, peers at the smallest K only."""
    cells = []
    k0 = Ks[0]
    for dt in dtypes:
        for K in Ks:
            for op in ("fwd", "fwdbwd"):
                cells.append(Cell(op, "fastvq-triton", N, K, D, dt, device))
            cells.append(Cell("fwd", "matmul", N, K, D, dt, device))
        for op in ("fwd", "fwdbwd"):
            cells.append(Cell(op, "fastvq-torch", N, Ks[1], D, dt, device))
            cells.append(Cell(op, "naive", N, k0, D, dt, device))
            cells.append(Cell(op, "vqp-train", N, k0, D, dt, device))
    return cells


def mode_from_env(benchmark_disabled: bool, cuda: bool) -> str:
    mode = os.environ.get("FASTVQ_BENCH_GRID")
    if mode:
        return mode
    if os.environ.get("FASTVQ_BENCH_SMOKE") == "1" or benchmark_disabled:
        return "smoke"
    return "gpu" if cuda else "cpu"


def cells_for(mode: str, cuda: bool) -> list[Cell]:
    dev = "cuda" if cuda else "cpu"
    if mode == "cpu":
        cells = _product(_problems("cpu", 16384, [64], [1024, 8192, 65536], ["fp32"]))
        cells += _product(_problems("cpu", 256, [64], [1024, 8192], ["fp32"]), ops=["model"])
    elif mode == "gpu":
        ks = [1024, 4096, 16384, 65536, 262144]
        cells = _product(_problems("cuda", 65536, [64, 256], ks, ["fp32", "bf16"]))
        cells += _product(_problems("cuda", 1024, [64], [1024, 16384], ["fp32"]), ops=["model"])
    elif mode == "gpu-check":
        cells = _gpu_check_cells("cuda", 65536, 256, [16384, 65536, 262144], ["bf16", "fp32"])
    elif mode == "gpu-check-dry":
        cells = _gpu_check_cells("cpu", 1024, 32, [64, 256, 1024], ["bf16", "fp32"])
    elif mode == "smoke":
        cells = _product(_problems(dev, 1024, [32], [64, 512], ["fp32"]))
        cells += _product(_problems(dev, 4, [16], [64], ["fp32"]), ops=["model"])
    else:
        raise ValueError(f"unknown FASTVQ_BENCH_GRID={mode!r}")
    return [c for c in cells if _selected(c)]


def _env_list(name: str) -> list[str] | None:
    v = os.environ.get(name, "").strip()
    return [s.strip() for s in v.split(",") if s.strip()] or None


def _selected(c: Cell) -> bool:
    for env, value in (
        ("FASTVQ_BENCH_OPS", c.op),
        ("FASTVQ_BENCH_PROVIDERS", c.provider),
        ("FASTVQ_BENCH_DTYPES", c.dtype),
        ("FASTVQ_BENCH_K", str(c.K)),
        ("FASTVQ_BENCH_D", str(c.D)),
    ):
        allowed = _env_list(env)
        if allowed is not None and value not in allowed:
            return False
    return True


def settings_for(mode: str, cell: Cell) -> Settings:
    device = cell.device
    if mode in ("smoke", "gpu-check-dry"):
        return Settings(budget_s=0.0, min_rounds=1, max_rounds=1, warmup=1)
    if mode == "gpu-check":
        return Settings(budget_s=0.3, min_rounds=3, max_rounds=20, warmup=2)
    if device == "cuda":
        return Settings(budget_s=1.0, min_rounds=5, max_rounds=50, warmup=2)
    # CPU: eager ops need no warmup (the measured-memory call is the first); compile does.
    budget = float(os.environ.get("FASTVQ_BENCH_BUDGET_S", 4.0))
    warmup = 1 if cell.provider == "naive-compile" or cell.op == "model" else 0
    return Settings(budget_s=budget, min_rounds=3, max_rounds=20, warmup=warmup)
