"""Train a small VQ-VAE for a few steps on Fashion-MNIST, in a plain PyTorch loop.

    python examples/train_vqvae.py [--steps 60] [--data-dir DIR]

The data: the Debian package dataset-fashion-mnist (IDX files in
/usr/share/datasets/fashion-mnist/), or --data-dir with the same files; nothing is downloaded.
A few dozen steps take well under a minute on one CPU thread; `fastvq train vqvae` and
`fastvq demo` are the full runs (docs/models.md).
"""

import argparse

import torch
import torch.nn.functional as F

import fastvq
from fastvq.data import load_dataset, to_float
from fastvq.models import VQVAE, VQVAEConfig

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--steps", type=int, default=60)
ap.add_argument("--data-dir", default=None)
args = ap.parse_args()

torch.manual_seed(0)
ds = load_dataset("fashion-mnist", args.data_dir)  # uint8 (60000, 28, 28) and (10000, 28, 28)
train = ds.train.images[:8192]

# A small model: the layer's defaults (EMA codebook, k-means init, dead-code restart), K = 128.
model = VQVAE(VQVAEConfig(hidden=32, res_hidden=16, n_res=1, dim=16, codebook_size=128))
opt = torch.optim.Adam(model.parameters(), lr=2e-3)
for step in range(1, args.steps + 1):
    x = to_float(train[torch.randint(len(train), (64,))])  # (64, 1, 28, 28) in [0, 1]
    x_hat, indices, vq_loss = model(x)  # indices: a 7x7 code map per image
    loss = F.mse_loss(x_hat, x) + vq_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if step % 20 == 0 or step == 1:
        print(
            f"step {step:4d}  loss {loss.item():.4f}  codes used {model.vq.last_used_fraction:.0%}"
        )

# Evaluation: reconstruction error and codebook usage over 1000 test images.
model.eval()
meter = fastvq.UsageMeter(128)
with torch.no_grad():
    x = to_float(ds.test.images[:1000])
    x_hat, indices, _ = model(x)
    meter.update(indices)
    # A prior would sample code maps; decoding them is exact: the same images come back.
    assert torch.equal(model.decode_indices(indices), x_hat)
print(
    f"test: MSE {F.mse_loss(x_hat, x).item():.4f}, {meter.used_fraction:.0%} of 128 codes "
    f"used, perplexity {meter.perplexity:.1f}"
)
