"""The rotation trick (Fifty et al. 2024) in the fused op, against a literal fp64 reference.

The reference builds the paper's D x D matrix per row, ``R = I - 2 r r^T + 2 q_hat e_hat^T`` with
``r = (e_hat + q_hat) / ||e_hat + q_hat||``, and lets plain autograd differentiate
``sg(||q|| / ||e|| * R) e`` (plus the VQ-VAE loss), so it shares no code with the backward.
"""

import pytest
import torch

import fastvq
from fastvq.functional import quantize_rows, rotate_grad

EPS = 1e-6


def literal_rotation(e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """fp64 (N, D): ``sg(lambda R) e``, R as the explicit matrix of the paper's section 4.2."""
    e_hat = e.detach() / e.detach().norm(dim=1, keepdim=True).clamp_min(EPS)
    q_hat = q.detach() / q.detach().norm(dim=1, keepdim=True).clamp_min(EPS)
    r = e_hat + q_hat
    r = r / r.norm(dim=1, keepdim=True).clamp_min(EPS)
    eye = torch.eye(e.shape[1], dtype=e.dtype)
    rot = eye - 2 * r[:, :, None] * r[:, None, :] + 2 * q_hat[:, :, None] * e_hat[:, None, :]
    lam = q.detach().norm(dim=1) / e.detach().norm(dim=1).clamp_min(EPS)
    return lam[:, None] * torch.einsum("nij,nj->ni", rot, e)


def reference(z, codebook, beta, keep=None):
    """fp64 literal formula: rotated output, codebook + commitment loss over kept rows."""
    z64, c64 = z.double(), codebook.double()
    idx = torch.cdist(z64, c64).argmin(1)
    zq = c64[idx]
    out = literal_rotation(z64, zq.detach())
    k = torch.ones(z.shape[0], dtype=torch.bool) if keep is None else keep
    d = z.shape[1]
    denom = max(int(k.sum()) * d, 1)
    cb = ((z64.detach() - zq) ** 2)[k].sum() / denom
    commit = ((z64 - zq.detach()) ** 2)[k].sum() / denom
    return out, idx, cb + beta * commit


@pytest.mark.parametrize("n,k,d", [(1, 1, 3), (63, 17, 3), (40, 1000, 8), (9, 5, 257)])
@pytest.mark.parametrize("masked", [False, True])
def test_rotation_matches_literal_fp64(backend, n, k, d, masked):
    z = torch.randn(n, d, requires_grad=True)
    codebook = torch.randn(k, d, requires_grad=True)
    keep = (torch.rand(n) > 0.3) if masked else None
    up = torch.randn(n, d)
    q, idx, loss, _ = quantize_rows(
        z, codebook, beta=0.25, backend=backend, keep=keep, rotation_trick=True
    )
    ((q * up).sum() + 0.7 * loss).backward()

    z64 = z.detach().double().requires_grad_()
    c64 = codebook.detach().double().requires_grad_()
    out, ridx, rloss = reference(z64, c64, 0.25, keep)
    ((out * up.double()).sum() + 0.7 * rloss).backward()

    assert torch.equal(idx, ridx)
    assert torch.equal(q, codebook.detach()[idx])  # forward value exactly the code
    torch.testing.assert_close(loss.double(), rloss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(codebook.grad.double(), c64.grad, rtol=1e-4, atol=1e-6)


def test_rotation_differs_from_straight_through_and_keeps_codebook_grad(backend):
    z = torch.randn(64, 16, requires_grad=True)
    codebook = torch.randn(32, 16, requires_grad=True)
    up = torch.randn(64, 16)
    grads = {}
    for rot in (False, True):
        z.grad = codebook.grad = None
        q, _, loss = fastvq.vector_quantize(z, codebook, backend=backend, rotation_trick=rot)
        ((q * up).sum() + loss).backward()
        grads[rot] = (z.grad.clone(), codebook.grad.clone())
    assert not torch.allclose(grads[True][0], grads[False][0])
    torch.testing.assert_close(grads[True][1], grads[False][1], rtol=0, atol=0)


def test_rotation_matches_vector_quantize_pytorch():
    vqp = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch")
    e = torch.randn(50, 12, dtype=torch.float64, requires_grad=True)
    q = torch.randn(50, 12, dtype=torch.float64)
    g = torch.randn(50, 12, dtype=torch.float64)
    (vqp.rotate_to(e, q) * g).sum().backward()
    torch.testing.assert_close(rotate_grad(g, e.detach(), q), e.grad, rtol=1e-12, atol=1e-12)


def test_rotation_nan_row_passes_straight_through(backend):
    z = torch.randn(6, 4)
    z[2, 1] = float("nan")
    z.requires_grad_()
    codebook = torch.randn(5, 4)
    keep = torch.tensor([True, True, False, True, True, True])
    q, _, loss, _ = quantize_rows(
        z, codebook, beta=0.25, backend=backend, keep=keep, rotation_trick=True
    )
    up = torch.randn(6, 4)
    ((q * up).sum() + loss).backward()
    assert torch.isfinite(loss)
    assert torch.equal(z.grad[2], up[2])  # masked NaN row: straight-through, no NaN
    assert torch.isfinite(z.grad).all()


def test_rotation_trick_type_checked():
    with pytest.raises(TypeError, match="rotation_trick"):
        fastvq.vector_quantize(torch.randn(2, 3), torch.randn(4, 3), rotation_trick="yes")


def test_rotation_dtypes(backend):
    for dtype in (torch.float16, torch.bfloat16):
        z = torch.randn(33, 8).to(dtype).requires_grad_()
        codebook = torch.randn(20, 8).to(dtype)
        q, idx, loss = fastvq.vector_quantize(z, codebook, backend=backend, rotation_trick=True)
        up = torch.randn(33, 8)
        (q.float() * up).sum().backward()
        assert z.grad.dtype == dtype
        ref = rotate_grad(up.to(dtype), z.detach().float(), codebook.float()[idx])
        torch.testing.assert_close(z.grad.float(), ref.to(dtype).float(), rtol=0, atol=0)
