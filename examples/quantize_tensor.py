"""Quantize a tensor: the fused op, the layer, and search without autograd.

    python examples/quantize_tensor.py

Runs on CPU (the torch backend) or on a CUDA GPU (the Triton kernel) in a few seconds.
"""

import torch

import fastvq

torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"

# The op: rows (..., D) and a codebook (K, D); no N x K distance matrix is built.
z = torch.randn(8, 256, 64, device=device, requires_grad=True)
codebook = torch.randn(1024, 64, device=device, requires_grad=True)
quantized, indices, loss = fastvq.vector_quantize(z, codebook, beta=0.25)
(quantized.square().mean() + loss).backward()  # straight-through to z; codebook term to codes
print(f"op: quantized {tuple(quantized.shape)}, indices {tuple(indices.shape)}, loss {loss:.4f}")
assert torch.equal(quantized.detach(), codebook.detach()[indices])
assert z.grad is not None and codebook.grad is not None

# The layer on an encoder's feature map (B, D, H, W): EMA codebook, k-means init on the first
# training batch, dead-code restart.
vq = fastvq.VectorQuantizer(64, 512, channel_first=True).to(device)
fmap = torch.randn(16, 64, 8, 8, device=device)
for _ in range(5):  # training forwards update the EMA codebook
    quantized, indices, loss = vq(fmap)
vq.eval()
quantized, indices, loss, stats = vq(fmap, return_stats=True)
print(
    f"layer: indices {tuple(indices.shape)}, {stats.used_fraction:.0%} of codes used, "
    f"perplexity {stats.perplexity:.1f}"
)
assert torch.equal(vq.codes_from_indices(indices), quantized)  # decoding is exact in eval

# Without autograd: nearest codes, gathered rows and squared errors.
idx, z_q, err = fastvq.search(z.detach().reshape(-1, 64), codebook.detach())
print(f"search: {len(idx)} rows, mean squared error {err.mean():.3f}")
