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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, {"ema": False}, {"codebook_dim": 4}, {"heads": 2}])
def test_a_converted_layer_trains_in_its_dtype_with_fp32_statistics(dtype, kw):
    """``.half()`` / ``.bfloat16()`` used to crash the first training forward (a bf16
    ``cluster_size`` lerped with fp32 counts). The codes take the dtype; the EMA statistics and
    usage stay fp32, and the codes are their smoothed ratio, rounded once."""
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 16, backend="torch", **kw).to(dtype)
    assert vq.usage_counts.dtype == torch.float32
    for _ in range(3):
        x = torch.randn(4, 10, 8).to(dtype).requires_grad_()
        q, idx, loss = vq(x)
        (q.float().sum() + loss).backward()
        assert q.dtype == dtype and torch.isfinite(x.grad).all()
    assert vq.usage_counts.sum() == 3 * 40 * vq.heads
    if vq.ema:
        assert vq.cluster_size.dtype == vq.embed_avg.dtype == torch.float32
        assert vq.codebook.dtype == dtype
        total = vq.cluster_size.sum(-1, keepdim=True)
        smoothed = (vq.cluster_size + vq.eps) / (total + 16 * vq.eps) * total
        torch.testing.assert_close(vq.codebook, (vq.embed_avg / smoothed[..., None]).to(dtype))
    state = vq.state_dict()
    fresh = VectorQuantizer(8, 16, backend="torch", **kw).to(dtype)
    fresh.load_state_dict(state)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in state.items())
