"""Choose VectorQuantizer's defaults from measurements: a small conv autoencoder on Fashion-MNIST.

Every configuration trains the same model (same seed, same batches, same steps, Adam 1e-3) with a
different quantizer, then reports over the whole test set (10,000 images = 490,000 tokens):
the fraction of codes used, the perplexity of the code histogram and the reconstruction MSE.

    python scripts/defaults_study.py --steps 400 --out docs/defaults_study.json

Results and protocol: docs/layer.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fastvq

DATA = Path("/usr/share/datasets/fashion-mnist")


def load_split(which: str) -> torch.Tensor:
    """uint8 IDX gz -> float (N, 1, 28, 28) in [0, 1]."""
    with gzip.open(DATA / f"{which}-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16)
    return torch.from_numpy(raw.copy()).view(-1, 1, 28, 28).float() / 255.0


class AE(nn.Module):
    """28x28 -> 7x7 x dim latent map -> quantizer (channel-last tokens) -> 28x28."""

    def __init__(self, dim: int, vq: nn.Module, hidden: int = 32):
        super().__init__()
        self.enc = nn.Sequential(
            nn.Conv2d(1, hidden // 2, 4, 2, 1),
            nn.ReLU(),
            nn.Conv2d(hidden // 2, hidden, 4, 2, 1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, dim, 1),
        )
        self.vq = vq
        self.dec = nn.Sequential(
            nn.Conv2d(dim, hidden, 3, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(hidden, hidden // 2, 4, 2, 1),
            nn.ReLU(),
            nn.ConvTranspose2d(hidden // 2, 1, 4, 2, 1),
        )

    def forward(self, x):
        z = self.enc(x)  # (B, D, 7, 7)
        b, d, h, w = z.shape
        tokens = z.permute(0, 2, 3, 1).reshape(b, h * w, d)  # (B, 49, D)
        q, idx, loss = self.vq(tokens)
        q = q.reshape(b, h, w, d).permute(0, 3, 1, 2)
        return torch.sigmoid(self.dec(q)), idx, loss.sum()


def make_vq(kind: str, dim: int, k: int, kw: dict) -> nn.Module:
    if kind == "vqp":
        from vector_quantize_pytorch import VectorQuantize

        return VectorQuantize(dim=dim, codebook_size=k, **kw)
    return fastvq.VectorQuantizer(dim, k, backend="torch", **kw)


CONFIGS = [
    # (name, kind, dim, K, kwargs)
    ("vqp defaults", "vqp", 16, 256, {}),
    ("fastvq defaults", "fastvq", 16, 256, {}),
    ("fastvq ema, no init/restart", "fastvq", 16, 256, dict(kmeans_init=False, dead_code_steps=0)),
    ("fastvq ema + kmeans", "fastvq", 16, 256, dict(dead_code_steps=0)),
    ("fastvq ema + restart", "fastvq", 16, 256, dict(kmeans_init=False)),
    ("fastvq ema + kmeans + restart 5", "fastvq", 16, 256, dict(dead_code_steps=5)),
    ("fastvq ema + kmeans + restart 100", "fastvq", 16, 256, dict(dead_code_steps=100)),
    ("fastvq grad codebook", "fastvq", 16, 256, dict(ema=False)),
    ("fastvq defaults + rotation trick", "fastvq", 16, 256, dict(rotation_trick=True)),
    (
        "fastvq grad codebook + rotation trick",
        "fastvq",
        16,
        256,
        dict(ema=False, rotation_trick=True),
    ),
    ("vqp defaults, straight-through", "vqp", 16, 256, dict(rotation_trick=False)),
    ("vqp defaults", "vqp", 32, 1024, {}),
    ("fastvq defaults", "fastvq", 32, 1024, {}),
    ("fastvq ema, no init/restart", "fastvq", 32, 1024, dict(kmeans_init=False, dead_code_steps=0)),
    ("fastvq defaults + codebook_dim 8", "fastvq", 32, 1024, dict(codebook_dim=8)),
    ("fastvq defaults + rotation trick", "fastvq", 32, 1024, dict(rotation_trick=True)),
]


@torch.no_grad()
def evaluate(model: AE, test: torch.Tensor, k: int) -> dict:
    model.eval()
    meter = fastvq.UsageMeter(k)
    se, n = 0.0, 0
    for i in range(0, len(test), 1000):
        x = test[i : i + 1000]
        x_hat, idx, _ = model(x)
        meter.update(idx)
        se += float((x_hat - x).square().sum())
        n += x.numel()
    model.train()
    return {
        "test_used_fraction": meter.used_fraction,
        "test_perplexity": meter.perplexity,
        "test_mse": se / n,
    }


def run(cfg, train, test, steps: int, batch: int, seed: int) -> dict:
    name, kind, dim, k, kw = cfg
    torch.manual_seed(seed)
    model = AE(dim, make_vq(kind, dim, k, kw))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        x = train[torch.randint(len(train), (batch,), generator=g)]
        x_hat, _, vq_loss = model(x)
        loss = F.mse_loss(x_hat, x) + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    secs = time.perf_counter() - t0
    res = {"name": name, "library": kind, "dim": dim, "K": k, "kwargs": kw, "train_s": secs}
    res.update(evaluate(model, test, k))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", type=str, default=None, help="'|'-separated config names to run")
    ap.add_argument("--K", type=int, default=None, help="run only this codebook size")
    ap.add_argument("--out", type=str, default="docs/defaults_study.json")
    args = ap.parse_args()
    # One thread: on a shared 2-core machine two OpenMP threads were 10-50x slower (spinning).
    torch.set_num_threads(args.threads)
    train, test = load_split("train"), load_split("t10k")
    results = []
    for cfg in CONFIGS:
        if args.only and cfg[0] not in args.only.split("|"):
            continue
        if args.K and cfg[3] != args.K:
            continue
        r = run(cfg, train, test, args.steps, args.batch, args.seed)
        results.append(r)
        print(
            f"K={r['K']:5d} D={r['dim']:3d} {r['name']:36s} used {r['test_used_fraction']:6.1%} "
            f"ppl {r['test_perplexity']:7.1f} mse {r['test_mse']:.5f} ({r['train_s']:.0f} s)",
            flush=True,
        )
    meta = {
        "steps": args.steps,
        "batch": args.batch,
        "seed": args.seed,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} "
        f"{torch.get_num_threads()} threads".strip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
