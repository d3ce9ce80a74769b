"""Dtypes a user mixes: an input in another float dtype than the layer's weights, and a layer
converted with ``.half()`` / ``.bfloat16()``."""

import pytest
import torch

from fastvq import VectorQuantizer


@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("codebook_dim", [None, 4])
def test_input_dtype_differs_from_the_layers(in_dtype, codebook_dim):
    """Outside autocast, the projection runs in its weights' dtype (as autocast casts inputs);
    quantized comes back in x's dtype, like the op's output, and equals the fp32 input's result
    cast (no projection: the op searches in the promotion of both dtypes)."""
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 16, codebook_dim=codebook_dim, backend="torch").eval()
    x = torch.randn(4, 10, 8).to(in_dtype)
    xr = x.detach().clone().requires_grad_()
    q, idx, loss = vq(xr)
    assert q.dtype == in_dtype and loss.dtype == torch.float32
    q32, idx32, _ = vq(x.float())
    assert torch.equal(idx, idx32)
    assert torch.equal(q, q32.to(in_dtype))
    vq.train()
    q, idx, loss = vq(xr)
    (q.float().sum() + loss).backward()
    assert xr.grad.dtype == in_dtype and torch.isfinite(xr.grad).all()
