"""What the two vqp example scripts share: Fashion-MNIST from its IDX files, vqp's training loop
(AdamW, ``rec_loss + alpha * commit_loss`` with the output clamped to [-1, 1]), the test metrics
and the JSON report. It imports neither vqp nor fastvq: each script's one import line picks the
library."""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import struct
import sys
import time
from pathlib import Path

import torch

DATA_DIR = "/usr/share/datasets/fashion-mnist"


def parse_args(doc: str, steps: int) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--impl", choices=("vqp", "fastvq"), default="fastvq",
                   help="which library the one import line takes")  # fmt: skip
    p.add_argument("--steps", type=int, default=steps, help="training steps")
    p.add_argument("--seed", type=int, default=1234, help="torch seed (model and batches)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--alpha", type=float, default=10.0, help="commitment loss weight")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--test-images", type=int, default=10000, help="test images to evaluate")
    p.add_argument("--data-dir", default=DATA_DIR)
    args = p.parse_args()
    if args.steps < 1 or args.batch_size < 1 or args.threads < 1 or args.test_images < 1:
        p.error("--steps, --batch-size, --threads and --test-images must be >= 1")
    return args


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file of unsigned bytes (gzip) as a uint8 tensor of its shape."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8).reshape(dims)


def load_images(data_dir: str, split: str) -> torch.Tensor:
    """Fashion-MNIST ``split`` ("train" or "t10k") as fp32 (N, 1, 28, 28) in [-1, 1] (vqp's
    ``ToTensor`` then ``Normalize((0.5,), (0.5,))``)."""
    path = Path(data_dir) / f"{split}-images-idx3-ubyte.gz"
    if not path.exists():
        sys.exit(f"error: {path} not found (Debian: apt-get install dataset-fashion-mnist)")
    x = read_idx(path).float().div_(255.0)
    return ((x - 0.5) / 0.5)[:, None]


def batches(images: torch.Tensor, batch_size: int, seed: int):
    """Shuffled batches forever, from their own generator: the model's random draws (sampling,
    k-means) cannot change the data order, so both libraries see the same batches."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        for idx in torch.randperm(images.shape[0], generator=gen).split(batch_size):
            if idx.numel() == batch_size:
                yield images[idx]


def train_and_report(model: torch.nn.Module, args, impl_name: str, num_codes: int) -> dict:
    """vqp's example loop for ``args.steps`` steps, then the test metrics; prints the JSON."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    train = load_images(args.data_dir, "train")
    test = load_images(args.data_dir, "t10k")[: args.test_images]
    data = batches(train, args.batch_size, args.seed)
    step_s, rec_curve, cmt_curve = [], [], []
    model.train()
    for _ in range(args.steps):
        x = next(data)
        t0 = time.perf_counter()
        opt.zero_grad()
        out, indices, cmt_loss = model(x)
        out = out.clamp(-1.0, 1.0)
        rec_loss = (out - x).abs().mean()
        (rec_loss + args.alpha * cmt_loss).backward()
        opt.step()
        step_s.append(time.perf_counter() - t0)
        rec_curve.append(rec_loss.item())
        cmt_curve.append(cmt_loss.item())
    model.eval()
    l1 = mse = 0.0
    counts = torch.zeros(num_codes, dtype=torch.int64)
    with torch.no_grad():
        for x in test.split(1000):
            out, indices, _ = model(x)
            out = out.clamp(-1.0, 1.0)
            l1 += (out - x).abs().sum().item()
            mse += (out - x).square().sum().item()
            counts += torch.bincount(indices.flatten(), minlength=num_codes)
    p = counts.double() / counts.sum()
    perplexity = torch.exp(-(p[p > 0] * p[p > 0].log()).sum()).item()
    warm = sorted(step_s[min(5, len(step_s) - 1) :])  # the first steps include warm-up
    report = {
        "impl": impl_name, "steps": args.steps, "seed": args.seed, "threads": args.threads,
        "batch_size": args.batch_size, "test_images": int(test.shape[0]),
        "test_l1": l1 / test.numel(), "test_mse": mse / test.numel(),
        "codebook_usage": int((counts > 0).sum()) / num_codes, "test_perplexity": perplexity,
        "step_ms_median": 1000 * warm[len(warm) // 2], "train_s": sum(step_s),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "train_rec_l1": rec_curve, "train_commit": cmt_curve,
    }  # fmt: skip
    print(json.dumps(report))
    return report
