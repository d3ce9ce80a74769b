"""LFQ in the demo's VQ-VAE on Fashion-MNIST, step by step: the largest |z| of the encoder's
output, the layer's loss and each step's time, and the first step whose loss is not finite.
The evidence behind docs/quantizers.md's choice of a commitment weight (``--beta``) and of
``frac_per_sample_entropy`` at 2^14 codes.

    python -m benchmarks.lfq_vqvae_probe --beta 0 --steps 120
    python -m benchmarks.lfq_vqvae_probe --beta 0.25 --steps 120
    python -m benchmarks.lfq_vqvae_probe --codebook-size 16384 --frac 1.0 --steps 6
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--codebook-size", type=int, default=1024)
    ap.add_argument("--beta", type=float, default=0.25, help="LFQ's commitment weight")
    ap.add_argument("--frac", type=float, default=1.0, help="frac_per_sample_entropy")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--every", type=int, default=10, help="print every N steps")
    args = ap.parse_args(argv)

    import torch

    from fastvq.app import recipes as R
    from fastvq.app.checkpoint import build
    from fastvq.app.data import load_dataset, to_float
    from fastvq.app.loop import epoch_batches
    from fastvq.app.rng import seed_everything

    torch.set_num_threads(1)
    ds = load_dataset("fashion-mnist")
    lfq = {"frac_per_sample_entropy": args.frac}
    cfg = R.model_config(
        "vqvae", ds, quantizer="lfq", codebook_size=args.codebook_size, beta=args.beta,
        vq_kwargs=lfq,
    )  # fmt: skip
    seed_everything(args.seed)
    model = build("vqvae", cfg)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    stream = epoch_batches(ds.train.images, ds.train.labels, args.batch_size, args.seed)
    print("step  max|z|  layer_loss  mse  seconds")
    for step in range(args.steps):
        x = to_float(next(stream)[0])
        t0 = time.perf_counter()
        loss, logs = model.training_loss(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seconds = time.perf_counter() - t0
        finite = torch.isfinite(loss).item()
        if step % args.every == 0 or not finite or step == args.steps - 1:
            with torch.no_grad():
                zmax = float(model.encoder(x).abs().max())
            print(f"{step} {zmax:.4g} {logs['vq']:.4g} {logs['mse']:.4g} {seconds:.3f}", flush=True)
        if not finite:
            print(f"loss not finite at step {step}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
