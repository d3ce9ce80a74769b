"""Large-codebook VQ-VAE on Fashion-MNIST: codebook usage and perplexity for several K.

For each K: a ``fastvq.models.VQVAE`` whose ``VectorQuantizer`` uses the techniques that keep
large codebooks alive: k-means init (on the encoder outputs of ``--init-images`` training images),
dead-code restart, a low codebook dimension behind a linear projection, optionally cosine codes.
Recorded, to ``<out>/results.json`` and ``<out>/usage.png``:

- codebook usage over the whole test set (10,000 images x 49 tokens) every ``--eval-every``
  steps: codes used, fraction used, perplexity of the test-set code histogram;
- perplexity and used fraction of each training batch (``vq.last_perplexity``), every step;
- peak memory: CUDA ``max_memory_allocated`` of one steady-state step, or on CPU the growth of
  the RSS high-water mark during one step (after writing 5 to /proc/self/clear_refs) and the
  process's peak RSS.

``--simvq`` replaces that recipe by SimVQ (``VectorQuantizer(simvq=True)``: a frozen random basis
times a learned map, no k-means, no restart), to compare the two at the same K.

Usage:
    python scripts/large_codebook.py --sizes 1024 16384 65536 --steps 1500 --out runs/large_k
    python scripts/large_codebook.py --simvq --sizes 16384 --steps 100 --out runs/simvq_16k
    python scripts/large_codebook.py --combine runs/k1024 runs/k16384 --out runs/all  # merge
    torchrun --nproc_per_node=8 scripts/large_codebook.py --device cuda --sizes 65536 ...

Under torchrun each rank trains on its own batches, the model is wrapped in DDP and the layer
syncs its EMA statistics, k-means init and dead-code restarts across ranks; rank 0 evaluates.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastvq._procmem import proc_status_kib, reset_peak_rss
from fastvq.app.data import load_dataset, to_float
from fastvq.layer import UsageMeter
from fastvq.models.vqvae import VQVAE, VQVAEConfig


@torch.no_grad()
def test_usage(model: VQVAE, images_u8: torch.Tensor, k: int, device, batch: int = 1000) -> dict:
    """Codebook usage and reconstruction error over a whole split (eval mode, no updates)."""
    was = model.training
    model.eval()
    meter = UsageMeter(k)
    se, count = 0.0, 0
    for i in range(0, images_u8.shape[0], batch):
        x = to_float(images_u8[i : i + batch]).to(device)
        q, idx, _ = model.encode(x)
        meter.update(idx)
        se += float(F.mse_loss(model.decode(q), x, reduction="sum"))
        count += x.numel()
    model.train(was)
    used = int((meter.counts > 0).sum())
    return {"used": used, "used_fraction": used / k, "perplexity": meter.perplexity,
            "recon_mse": se / count}  # fmt: skip


def run_one(k: int, args, data, device, rank: int, world: int, save=None) -> dict:
    """Train one VQ-VAE with codebook size ``k``; ``save(partial_result)`` after each eval."""
    torch.manual_seed(args.seed)
    train = data.train.images
    var = float(to_float(train[:10000]).var())
    vq_kwargs = dict(
        ema=not args.no_ema, kmeans_init=True, kmeans_iters=args.kmeans_iters,
        dead_code_steps=args.dead_code_steps, codebook_dim=args.codebook_dim,
        cosine=args.cosine, backend=args.backend, seed=args.seed,
    )  # fmt: skip
    if args.simvq:  # a gradient codebook with its own init: no EMA, k-means or restart
        vq_kwargs = dict(
            simvq=True, codebook_dim=args.codebook_dim, cosine=args.cosine, backend=args.backend,
            seed=args.seed,
        )  # fmt: skip
    vq_kwargs["rotation_trick"] = args.rotation_trick
    cfg = VQVAEConfig(dim=args.dim, codebook_size=k, data_variance=var, vq_kwargs=vq_kwargs)
    model = VQVAE(cfg).to(device)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)

    # k-means init on a larger sample than one batch (K may exceed a batch's 49 * B tokens).
    t0 = time.time()
    init_idx = torch.randint(train.shape[0], (args.init_images,), generator=gen)
    model.train()
    with torch.no_grad():
        model.encode(to_float(train[init_idx]).to(device))
    init_s = time.time() - t0

    history, evals = [], []
    step_peak = None
    t_train = time.time()

    def result() -> dict:
        hwm_kib = proc_status_kib("VmHWM", required=False) or 0
        peak_rss = hwm_kib * 1024 if device.type == "cpu" else None
        return {
            "codebook_size": k, "init_seconds": init_s, "train_seconds": time.time() - t_train,
            "steps_done": step, "history": history, "evals": evals,
            "step_peak_memory": step_peak, "process_peak_rss_bytes": peak_rss,
        }  # fmt: skip

    for step in range(1, args.steps + 1):
        idx = torch.randint(train.shape[0], (args.batch_size,), generator=gen)
        x = to_float(train[idx]).to(device)
        measure = step == min(args.steps, 2)  # CPU: a step reusing freed heap memory hides it
        if measure:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            else:
                rss0, reset = proc_status_kib("VmRSS", required=False), reset_peak_rss()
        x_hat, _, vq_loss = net(x)
        loss = F.mse_loss(x_hat, x) / var + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if measure:
            if device.type == "cuda":
                torch.cuda.synchronize()
                step_peak = {"cuda_max_allocated_bytes": torch.cuda.max_memory_allocated()}
            elif reset and rss0 is not None:
                step_peak = {"rss_hwm_growth_bytes": (proc_status_kib("VmHWM") - rss0) * 1024}
        if step % args.log_every == 0 or step == 1:
            history.append({"step": step, "loss": float(loss.detach()),
                            "batch_perplexity": float(model.vq.last_perplexity),
                            "batch_used_fraction": float(model.vq.last_used_fraction)})  # fmt: skip
        if rank == 0 and (step % args.eval_every == 0 or step == args.steps):
            test = data.test.images[: args.eval_limit]  # default: the whole test set
            ev = {"step": step, **test_usage(model, test, k, device)}
            evals.append(ev)
            print(f"K={k} step {step}: test used {ev['used']}/{k} ({ev['used_fraction']:.3f}), "
                  f"perplexity {ev['perplexity']:.0f}, recon mse {ev['recon_mse']:.4f}, "
                  f"{time.time() - t_train:.0f} s", flush=True)  # fmt: skip
            if save is not None:
                save(result())
    return result()


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        ev = r["evals"]
        a.plot([e["step"] for e in ev], [e["used_fraction"] for e in ev], "o-",
               label=f"K={r['codebook_size']}")  # fmt: skip
        h = r["history"]
        b.plot([e["step"] for e in h], [e["batch_perplexity"] for e in h],
               label=f"K={r['codebook_size']}")  # fmt: skip
    a.set(xlabel="step", ylabel="fraction of codes used (whole test set)", ylim=(0, 1.02))
    b.set(xlabel="step", ylabel="perplexity of the training batch", yscale="log")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 16384, 65536])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dim", type=int, default=16, help="encoder output channels")
    p.add_argument("--codebook-dim", type=int, default=8, help="projected code dimension")
    p.add_argument("--cosine", action="store_true", help="cosine-similarity codes")
    p.add_argument("--no-ema", action="store_true", help="codebook by gradient instead of EMA")
    p.add_argument(
        "--simvq",
        action="store_true",
        help="SimVQ codes (frozen basis x learned map) instead of the EMA + k-means + restart "
        "recipe; --no-ema, --kmeans-iters and --dead-code-steps are then unused",
    )
    p.add_argument(
        "--rotation-trick",
        action="store_true",
        help="the rotation trick instead of straight-through",
    )
    p.add_argument("--kmeans-iters", type=int, default=10)
    p.add_argument("--init-images", type=int, default=2048, help="images for the k-means init")
    p.add_argument("--dead-code-steps", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-limit", type=int, default=None, help="test images (default: all)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/large_codebook")
    p.add_argument(
        "--combine",
        nargs="+",
        metavar="RUN_DIR",
        help="only merge the results.json of these runs into --out (json + plot)",
    )
    args = p.parse_args()
    if args.combine:
        runs = [json.loads((Path(d) / "results.json").read_text()) for d in args.combine]
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        merged = {"runs": [{k: v for k, v in r.items() if k != "results"} for r in runs],
                  "results": [res for r in runs for res in r["results"]]}  # fmt: skip
        (out / "results.json").write_text(json.dumps(merged, indent=1))
        plot(merged["results"], out / "usage.png")
        return

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = 0
    device = torch.device(args.device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank = dist.get_rank()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    data = load_dataset("fashion-mnist", args.data_dir)
    out = Path(args.out)
    results: list[dict] = []

    def save(partial: dict) -> None:
        if rank != 0:
            return
        out.mkdir(parents=True, exist_ok=True)
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        meta = {"args": vars(args), "world_size": world, "torch": torch.__version__,
                "device": str(device), "date": date, "results": [*results, partial]}  # fmt: skip
        (out / "results.json").write_text(json.dumps(meta, indent=1))
        plot(meta["results"], out / "usage.png")

    for k in args.sizes:
        results.append(run_one(k, args, data, device, rank, world, save))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
