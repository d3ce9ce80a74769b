"""Residual VQ, FSQ, residual FSQ and LFQ on one batch: shapes, losses, exact decoding.

python examples/residual_fsq_lfq.py
"""

import torch

import fastvq

torch.manual_seed(0)
x = torch.randn(8, 256, 64)  # (batch, tokens, dim): 2048 rows

# ResidualVQ: each depth quantizes what the previous ones left; indices gain a last dim.
rvq = fastvq.ResidualVQ(64, 64, num_quantizers=4)
for _ in range(3):
    quantized, indices, loss = rvq(x)
rvq.eval()
quantized, indices, _ = rvq(x)
coarse = indices.clone()
coarse[..., 1:] = -1  # -1 = no code: decode the first depth only
first = rvq.codes_from_indices(coarse)
print(
    f"ResidualVQ: indices {tuple(indices.shape)}, error after 1 depth "
    f"{(x - first).pow(2).mean():.3f}, after 4 {(x - quantized).pow(2).mean():.3f}"
)
assert torch.equal(rvq.codes_from_indices(indices), quantized)

# FSQ: an implicit grid of 8*5*5*5 = 1000 codes, nothing learned but the projections.
fsq = fastvq.FSQ([8, 5, 5, 5], dim=64).eval()
quantized, indices, loss = fsq(x)
print(f"FSQ: {fsq.codebook_size} codes, indices in [{indices.min()}, {indices.max()}], loss {loss}")
assert torch.equal(fsq.codes_from_indices(indices), quantized)

# ResidualFSQ: FSQ stages on the residual.
rfsq = fastvq.ResidualFSQ([8, 5, 5, 5], num_quantizers=3, dim=64).eval()
quantized, indices, loss = rfsq(x)
print(f"ResidualFSQ: indices {tuple(indices.shape)}")
assert torch.equal(rfsq.codes_from_indices(indices), quantized)

# LFQ: lookup-free quantization, 2^10 implicit codes (one bit per channel), entropy loss.
lfq = fastvq.LFQ(codebook_size=2**10, dim=64, entropy_loss_weight=0.1)
quantized, indices, loss = lfq(x)
print(f"LFQ: indices {tuple(indices.shape)}, training loss {loss:.4f}")
