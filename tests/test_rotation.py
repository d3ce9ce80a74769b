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
    """fp64 literal formula: rotated output (masked rows: straight-through), codebook +
    commitment loss over kept rows."""
    z64, c64 = z.double(), codebook.double()
    idx = torch.cdist(z64, c64).argmin(1)
    zq = c64[idx]
    k = torch.ones(z.shape[0], dtype=torch.bool) if keep is None else keep
    st = z64 + (zq - z64).detach()
    out = torch.where(k[:, None], literal_rotation(z64, zq.detach()), st)
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


@pytest.mark.extras
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


def _ref_layer(ref, x64, valid):
    """fp64 literal forward of a ``VectorQuantizer`` copy with the rotation trick: the layer's
    pipeline (projection, heads, cosine, mask) written out with the paper's explicit rotation."""
    n = x64.shape[0]
    h, cd = ref.heads, ref.codebook_dim
    z = ref.project_in(x64).reshape(n, h, cd)
    codes = torch.nn.functional.normalize(ref.codebook, dim=-1) if ref.cosine else ref.codebook
    if ref.ema:
        codes = codes.detach()
    w_cb = 0.0 if ref.ema else ref.codebook_loss_weight
    if ref.num_codebooks == 1:
        keep = None if valid is None else valid.repeat_interleave(h)
        groups = [(z.reshape(-1, cd), keep)]
    else:
        groups = [(z[:, g], valid) for g in range(h)]
    outs, idxs, losses = [], [], []
    for g, (zg, keep) in enumerate(groups):
        if ref.cosine:
            zg = torch.nn.functional.normalize(zg, dim=-1)
        idx = torch.cdist(zg.detach(), codes[g].detach()).argmin(1)
        zq = codes[g][idx]
        k = torch.ones(zg.shape[0], dtype=torch.bool) if keep is None else keep
        denom = max(int(k.sum()) * cd, 1)
        cb = ((zg.detach() - zq) ** 2)[k].sum() / denom
        commit = ((zg - zq.detach()) ** 2)[k].sum() / denom
        losses.append(w_cb * cb + ref.beta * commit)
        st = zg + (zq - zg).detach()
        outs.append(torch.where(k[:, None], literal_rotation(zg, zq.detach()), st))
        idxs.append(idx)
    if len(outs) == 1:
        q, idx = outs[0].reshape(n, h * cd), idxs[0].reshape(n, h)
    else:
        q, idx = torch.stack(outs, 1).reshape(n, h * cd), torch.stack(idxs, 1)
    return ref.project_out(q), idx, torch.stack(losses).mean()


LAYER_CASES = {
    "ema": {},
    "grad": {"ema": False},
    "heads": {"heads": 2},
    "heads_shared": {"heads": 2, "shared_codebook": True, "ema": False},
    "cosine": {"cosine": True, "ema": False},
    "cosine_ema": {"cosine": True},
    "proj": {"codebook_dim": 5, "ema": False},
}


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
@pytest.mark.parametrize("masked", [False, True])
def test_layer_rotation_matches_literal_fp64(backend, case, masked):
    import copy

    layer = fastvq.VectorQuantizer(
        8, 12, kmeans_init=False, dead_code_steps=0, backend=backend, rotation_trick=True,
        **LAYER_CASES[case],
    )  # fmt: skip
    ref = copy.deepcopy(layer).double()
    x = torch.randn(30, 8, requires_grad=True)
    mask = (torch.rand(30) > 0.3) if masked else None
    up = torch.randn(30, 8)
    q, idx, loss = layer(x, mask=mask)
    ((q * up).sum() + 0.5 * loss).backward()

    x64 = x.detach().double().requires_grad_()
    rq, ridx, rloss = _ref_layer(ref, x64, mask)
    ((rq * up.double()).sum() + 0.5 * rloss).backward()

    assert torch.equal(idx.reshape(30, -1), ridx)
    torch.testing.assert_close(q.double(), rq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), rloss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    ref_params = dict(ref.named_parameters())
    for name, p in layer.named_parameters():
        assert (p.grad is None) == (ref_params[name].grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(
                p.grad.double(), ref_params[name].grad, rtol=1e-4, atol=1e-5, msg=name
            )


def test_layer_rotation_trick_type_checked():
    with pytest.raises(TypeError, match="rotation_trick"):
        fastvq.VectorQuantizer(8, 4, rotation_trick=1)


@pytest.mark.parametrize("ema", [False, True])
def test_sharded_layer_rotation_is_the_layer_rotation(ema):
    """One process: the sharded layer's rotation-trick gradients equal the plain layer's."""
    from fastvq.sharded import ShardedVectorQuantizer

    cb = torch.randn(37, 8)
    sharded = ShardedVectorQuantizer(
        8, 37, ema=ema, codebook=cb, backend="torch", rotation_trick=True
    )
    plain = fastvq.VectorQuantizer(
        8, 37, ema=ema, kmeans_init=False, dead_code_steps=0, backend="torch",
        rotation_trick=True,
    )  # fmt: skip
    plain.load_codebook(cb)
    grads = []
    for layer in (sharded, plain):
        x = torch.randn(40, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        q, idx, loss = layer(x)
        ((q * torch.linspace(-1, 1, 8)).sum() + loss).backward()
        grads.append((idx, x.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-6, atol=1e-7)


def test_rotation_masked_zero_padding_passes_straight_through(backend):
    """Zero padding under a mask: straight-through, not ``||q|| / 1e-6`` times the gradient."""
    z = torch.randn(6, 4)
    z[4:] = 0.0
    z.requires_grad_()
    keep = torch.tensor([True, True, True, True, False, False])
    q, _, loss, _ = quantize_rows(
        z, torch.randn(5, 4), beta=0.25, backend=backend, keep=keep, rotation_trick=True
    )
    up = torch.randn(6, 4)
    (q * up).sum().backward()
    assert torch.equal(z.grad[4:], up[4:])
