"""The training step on a GPU: fastvq's EMA layer against vector-quantize-pytorch and the textbook.

    OUT=/dir python -m benchmarks.train_step_gpu              # run by benchmarks/gpu_check.sh
    OUT=/dir python -m benchmarks.train_step_gpu --dry-run    # CPU: Triton interpreted, tiny

Cases, in this order (N = 65536, D = 256 on a GPU):

1. ``ema-step`` (K = 16384): one training step of an EMA codebook layer, forward (search, EMA
   update) and backward of the quantized output (fixed random upstream gradient) and the loss to
   the input. Parameters fp32, the step under ``torch.autocast(dtype=torch.bfloat16)``, the
   input bf16 (what an encoder under autocast emits). Three layers with vector-quantize-pytorch's
   defaults (decay 0.8, commitment weight 1, no k-means init, no dead-code restarts):
   ``fastvq.VectorQuantizer`` (Triton backend), ``vector_quantize_pytorch.VectorQuantize(dim,
   codebook_size)`` in train mode, and the textbook cdist + one-hot EMA
   (``benchmarks._providers.NaiveEMA``). Issue 28's target: fastvq >= 20x faster and >= 20x less
   peak memory than vector-quantize-pytorch.
2. ``scatter`` (K = 16384): the backward's code sums alone, ``fastvq.scatter_rows`` of bf16 rows
   (atomics, and the deterministic sorted-segment kernel).
3. ``forward`` at K = 2^18 and 2^20, bf16: ``fastvq.vector_quantize`` in training mode (autograd
   on), where one N x K bf16 matrix would take 32 and 128 GiB.

Each: median of ``--reps`` calls after a warm-up call, and the ``max_memory_allocated`` growth
over one call with the inputs and layer state allocated before it (``benchmarks/_cuda_timing.py``).
Results go to ``$OUT/train_step_gpu.json`` after every case; a layer that fails (out of memory,
missing peer) is recorded with its reason.
"""

from __future__ import annotations

import sys

import torch

from ._cuda_timing import StageResults, measure, mib, stage_cli
from ._providers import NaiveEMA, _train_step

# vector-quantize-pytorch's VectorQuantize defaults, given to every layer of the step
VQP_DECAY, VQP_COMMITMENT = 0.8, 1.0
TARGET_SPEEDUP = TARGET_MEMORY = 20.0
FULL = dict(n=65536, d=256, k=16384, big_ks=(1 << 18, 1 << 20))
DRY = dict(n=64, d=16, k=48, big_ks=(128, 256))


def _inputs(n, d, dev, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g).to(dev, torch.bfloat16).requires_grad_()
    up = torch.randn(n, d, generator=g).to(dev, torch.bfloat16)
    return z, up


def _layer_step(name, n, d, k, dev, backend):
    """The zero-argument training step of one layer, its inputs and state already allocated."""
    z, up = _inputs(n, d, dev, seed=k)
    if name == "fastvq":
        import fastvq

        layer = fastvq.VectorQuantizer(
            d, k, ema=True, decay=VQP_DECAY, beta=VQP_COMMITMENT, kmeans_init=False,
            dead_code_steps=0, backend=backend,
        ).to(dev).train()  # fmt: skip
        fwd = lambda: tuple(layer(z[None]))[:3]  # noqa: E731
        step = _train_step(fwd, up[None], [z])
    elif name == "vector-quantize-pytorch":
        import vector_quantize_pytorch as vqp

        layer = vqp.VectorQuantize(dim=d, codebook_size=k).to(dev).train()
        fwd = lambda: tuple(layer(z[None]))[:3]  # noqa: E731
        step = _train_step(fwd, up[None], [z])
    else:
        g = torch.Generator().manual_seed(k + 1)
        ema = NaiveEMA(torch.randn(k, d, generator=g).to(dev), decay=VQP_DECAY, beta=VQP_COMMITMENT)
        step = _train_step(lambda: ema(z), up, [z])

    def autocast_step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            step()

    return autocast_step


def _timed(make, dev, reps) -> dict:
    """Build and time one step; a failure (OOM, missing peer) is a result with its reason."""
    try:
        t, times, growth, _ = measure(make(), dev, reps)
        return {"median_s": t, "times_s": times, "peak_growth_mib": mib(growth)}
    except Exception as exc:  # noqa: BLE001 - recorded, the other layers still run
        return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"}
    finally:
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def ema_step_case(s, dev, reps, backend) -> dict:
    n, d, k = s["n"], s["d"], s["k"]
    rec = {"case": "ema-step", "N": n, "D": d, "K": k, "params": "fp32",
           "autocast": "bfloat16", "input": "bfloat16",
           "layer_options": f"decay={VQP_DECAY}, commitment={VQP_COMMITMENT}, no k-means init, "
                            "no dead-code restarts (vector-quantize-pytorch's defaults)",
           "layers": {}}  # fmt: skip
    for name in ("fastvq", "vector-quantize-pytorch", "cdist + one-hot"):
        rec["layers"][name] = _timed(lambda name=name: _layer_step(name, n, d, k, dev, backend),
                                     dev, reps)  # fmt: skip
    ours, peer = rec["layers"]["fastvq"], rec["layers"]["vector-quantize-pytorch"]
    if "median_s" in ours and "median_s" in peer:
        rec["speedup_vs_vqp"] = peer["median_s"] / ours["median_s"]
        if ours["peak_growth_mib"] and peer["peak_growth_mib"]:
            rec["memory_ratio_vs_vqp"] = peer["peak_growth_mib"] / ours["peak_growth_mib"]
        if dev.type == "cuda":
            rec["target"] = {
                "speedup >= 20": rec["speedup_vs_vqp"] >= TARGET_SPEEDUP,
                "memory >= 20x less": rec.get("memory_ratio_vs_vqp", 0) >= TARGET_MEMORY,
            }
    return rec


def scatter_case(s, dev, reps, backend) -> dict:
    import fastvq

    n, d, k = s["n"], s["d"], s["k"]
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, k, (n,), generator=g).to(dev)
    rows = torch.randn(n, d, generator=g).to(dev, torch.bfloat16)
    rec = {"case": "scatter", "N": n, "D": d, "K": k, "rows": "bfloat16", "variants": {}}
    for det in (False, True):
        rec["variants"]["deterministic" if det else "atomic"] = _timed(
            lambda det=det: lambda: fastvq.scatter_rows(idx, rows, k, backend=backend,
                                                        deterministic=det),
            dev, reps,
        )  # fmt: skip
    return rec


def forward_case(s, k, dev, reps, backend) -> dict:
    import fastvq

    n, d = s["n"], s["d"]
    g = torch.Generator().manual_seed(k)
    z = torch.randn(n, d, generator=g).to(dev, torch.bfloat16).requires_grad_()
    c = torch.randn(k, d, generator=g).to(dev, torch.bfloat16).requires_grad_()
    rec = {"case": "forward", "N": n, "D": d, "K": k, "dtype": "bfloat16",
           "codebook_mib": mib(c.numel() * c.element_size()),
           "one_nxk_bf16_mib": mib(n * k * 2)}  # fmt: skip
    rec.update(_timed(lambda: lambda: fastvq.vector_quantize(z, c, backend=backend), dev, reps))
    return rec


def main(argv=None) -> int:
    parsed = stage_cli(__doc__.split("\n")[0], "layer", argv)
    if parsed is None:
        return 3
    a, dev = parsed
    s = DRY if a.dry_run else FULL
    backend = "triton"
    res = StageResults(
        "train_step_gpu", argv, a, dev,
        memory="torch.cuda.max_memory_allocated growth over one call, inputs and state "
        "allocated before it",
    )  # fmt: skip
    plan = [lambda: ema_step_case(s, dev, a.reps, backend),
            lambda: scatter_case(s, dev, a.reps, backend)]  # fmt: skip
    plan += [lambda k=k: forward_case(s, k, dev, a.reps, backend) for k in s["big_ks"]]
    for run in plan:
        rec = run()
        res.add(rec, summary(rec))
    print(f"wrote {res.path}")
    return 0


def _cell(r: dict) -> str:
    if "error" in r:
        return r["error"]
    return f"{r['median_s'] * 1e3:.2f} ms, {r['peak_growth_mib']} MiB"


def summary(rec: dict) -> str:
    """One line per case for the log."""
    head = f"{rec['case']} N={rec['N']} D={rec['D']} K={rec['K']}: "
    if rec["case"] == "ema-step":
        line = head + "; ".join(f"{k} {_cell(v)}" for k, v in rec["layers"].items())
        if "speedup_vs_vqp" in rec:
            line += f"; vs vqp {rec['speedup_vs_vqp']:.1f}x faster"
            if "memory_ratio_vs_vqp" in rec:
                line += f", {rec['memory_ratio_vs_vqp']:.1f}x less memory"
        return line
    if rec["case"] == "scatter":
        return head + "; ".join(f"{k} {_cell(v)}" for k, v in rec["variants"].items())
    return head + _cell(rec)


if __name__ == "__main__":
    sys.exit(main())
