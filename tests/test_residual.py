"""ResidualVQ: shapes, decoding, loss, error falling with depth, gradients, both backends."""

import pytest
import torch

import fastvq
from fastvq.residual import ResidualVQ


@pytest.mark.parametrize("ema", [True, False], ids=["ema", "grad"])
def test_shapes_loss_and_decode(backend, ema):
    rvq = ResidualVQ(8, 16, 3, ema=ema, channel_first=True, backend=backend)
    x = torch.randn(2, 8, 4, 5, requires_grad=True)
    q, idx, loss, stats = rvq(x, return_stats=True)
    assert q.shape == x.shape and idx.shape == (2, 4, 5, 3) and len(stats) == 3
    layer_losses = []
    rvq.eval()
    q2, idx2, loss2 = rvq(x)
    torch.testing.assert_close(rvq.codes_from_indices(idx2), q2, rtol=0, atol=0)
    # the loss is the sum of the layers' losses on their residuals
    r = x.detach().movedim(1, -1)
    for i, layer in enumerate(rvq.layers):
        out = layer(r)
        assert torch.equal(out.indices, idx2[..., i])
        layer_losses.append(out.loss)
        r = r - out.quantized
    torch.testing.assert_close(loss2, torch.stack(layer_losses).sum())
    rvq.train()
    (q.square().mean() + loss).backward()
    assert torch.isfinite(x.grad).all()


def test_error_falls_with_more_quantizers():
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    errs = []
    for nq in (1, 2, 4):
        rvq = ResidualVQ(8, 32, nq, kmeans_init=True, backend="torch")
        rvq(x)  # k-means init of each layer on its residual
        rvq.eval()
        errs.append(float((rvq(x).quantized - x).square().mean()))
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.6 * errs[0], errs


def test_straight_through_gradient_and_projection():
    rvq = ResidualVQ(8, 16, 2, codebook_dim=4, ema=False, kmeans_init=False, backend="torch")
    x = torch.randn(10, 8, requires_grad=True)
    q, idx, loss = rvq(x)
    q.sum().backward(retain_graph=True)
    # d quantized / d x = W_out @ W_in (the straight-through path through both projections)
    w = rvq.project_out.weight @ rvq.project_in.weight  # (8, 8)
    torch.testing.assert_close(x.grad, w.sum(0).expand(10, 8), rtol=1e-5, atol=1e-5)
    assert rvq.layers[0].codebook.grad is None  # no loss backward yet
    loss.backward()
    assert rvq.layers[1].codebook.grad.abs().sum() > 0


def test_bad_input():
    rvq = ResidualVQ(8, 16, 2, backend="torch")
    with pytest.raises(ValueError, match="x has 7 channels"):
        rvq(torch.randn(3, 7))
    with pytest.raises(ValueError, match="num_quantizers=2"):
        rvq.codes_from_indices(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="indices must lie"):
        rvq.codes_from_indices(torch.full((3, 2), 16))
    with pytest.raises(ValueError, match="num_quantizers"):
        ResidualVQ(8, 16, 0)


def test_exported():
    assert fastvq.ResidualVQ is ResidualVQ
