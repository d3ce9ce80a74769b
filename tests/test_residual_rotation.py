"""ResidualVQ's ``rotation_trick`` and ``quant_grad_frac`` (vector-quantize-pytorch's per-depth
gradients) against a literal fp64 reference in plain autograd.

The reference shares no code with fastvq: per depth the nearest code by ``torch.cdist`` argmin
(or the indices the beam search chose), the rotation trick as the paper's explicit D x D matrix
``sg(lambda R) e`` (``R = I - 2 r r^T + 2 q_hat e_hat^T``; masked rows straight through), each
depth's VQ-VAE loss, the residual ``r - frac_gradient(q, frac)`` and the output the sum of every
depth's (attached) output, as vector-quantize-pytorch's ``ResidualVQ`` computes them.
"""

import pytest
import torch
from test_rotation import literal_rotation  # the paper's explicit matrix, shared oracle

from fastvq.residual import GroupedResidualVQ, ResidualVQ

BETA, W_CB = 0.25, 1.0
PLAIN = dict(ema=False, kmeans_init=False)


def frac_gradient(t: torch.Tensor, frac: float) -> torch.Tensor:
    return t.detach() if frac <= 0 else frac * t + (1.0 - frac) * t.detach()


def reference(x, books, *, rotation, frac, keep=None, indices=None):
    """``(out, indices (N, L), loss)`` of an L-depth stack on rows ``x`` (N, D)."""
    n, d = x.shape
    k = torch.ones(n, dtype=torch.bool) if keep is None else keep
    denom = max(int(k.sum()) * d, 1)
    residual, out, loss, chosen = x, 0.0, 0.0, []
    for depth, book in enumerate(books):
        if indices is None:
            i = torch.cdist(residual.detach(), book.detach()).argmin(1)
        else:
            i = indices[:, depth]
        c = book[i]
        st = residual + (c.detach() - residual).detach()
        q = torch.where(k[:, None], literal_rotation(residual, c), st) if rotation else st
        commit = ((residual - c.detach()) ** 2)[k].sum()
        codebook = ((residual.detach() - c) ** 2)[k].sum()
        loss = loss + (BETA * commit + W_CB * codebook) / denom
        residual = residual - frac_gradient(q, frac)
        out = out + q
        chosen.append(i)
    return out, torch.stack(chosen, 1), loss


def check_against_reference(rvq, x, *, keep=None, num_active=None, beam=False):
    """Run ``rvq`` (fp32) and the fp64 reference on the same codes; compare output, indices,
    loss, and the gradients of ``<out, up> + 0.7 loss`` to x and to every codebook."""
    up = torch.randn(x.shape)
    xr = x.detach().clone().requires_grad_()
    q, idx, loss = rvq(xr, keep, num_active=num_active)
    ((q * up).sum() + 0.7 * loss).backward()

    depths = num_active or rvq.num_quantizers
    layers = [rvq.depth_layer(i) for i in range(depths)]
    distinct = list(dict.fromkeys(layers))
    books64 = {lay: lay.codebook.detach()[0].double().requires_grad_() for lay in distinct}
    x64 = x.detach().double().requires_grad_()
    out, ridx, rloss = reference(
        x64, [books64[lay] for lay in layers], rotation=rvq.rotation_trick,
        frac=rvq.quant_grad_frac, keep=keep, indices=idx[:, :depths] if beam else None,
    )  # fmt: skip
    ((out * up.double()).sum() + 0.7 * rloss).backward()

    assert torch.equal(idx[:, :depths], ridx)
    assert (idx[:, depths:] == -1).all()
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.double(), out, **tol)
    torch.testing.assert_close(loss.double(), rloss, **tol)
    torch.testing.assert_close(xr.grad.double(), x64.grad, **tol)
    for lay in distinct:
        torch.testing.assert_close(lay.codebook.grad[0].double(), books64[lay].grad, **tol)
    return xr.grad


OPTIONS = [
    dict(rotation_trick=True),
    dict(rotation_trick=True, quant_grad_frac=0.3),
    dict(rotation_trick=True, quant_grad_frac=1.0),
    dict(quant_grad_frac=0.5),
]
IDS = ["rot", "rot-frac0.3", "rot-frac1", "ste-frac0.5"]


@pytest.mark.parametrize("opts", OPTIONS, ids=IDS)
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
def test_greedy_matches_literal_reference(backend, opts, masked):
    rvq = ResidualVQ(6, 11, 3, backend=backend, **PLAIN, **opts)
    x = torch.randn(40, 6)
    keep = (torch.rand(40) > 0.3) if masked else None
    check_against_reference(rvq, x, keep=keep)


@pytest.mark.parametrize("opts", OPTIONS[:2], ids=IDS[:2])
def test_quantize_dropout_depths_matches_reference(backend, opts):
    rvq = ResidualVQ(6, 11, 3, backend=backend, quantize_dropout=True, **PLAIN, **opts)
    check_against_reference(rvq, torch.randn(30, 6), num_active=2)


@pytest.mark.parametrize("opts", OPTIONS[1:3] + OPTIONS[3:], ids=IDS[1:3] + IDS[3:])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
def test_shared_codebook_matches_reference(backend, opts, masked):
    rvq = ResidualVQ(6, 11, 3, backend=backend, shared_codebook=True, **PLAIN, **opts)
    keep = (torch.rand(30) > 0.3) if masked else None
    check_against_reference(rvq, torch.randn(30, 6), keep=keep)


@pytest.mark.parametrize("opts", OPTIONS[1:3] + OPTIONS[3:], ids=IDS[1:3] + IDS[3:])
def test_beam_search_matches_reference_along_chosen_codes(backend, opts):
    rvq = ResidualVQ(6, 7, 3, backend=backend, beam_size=3, **PLAIN, **opts)
    check_against_reference(rvq, torch.randn(30, 6), beam=True)


def test_rotation_changes_the_gradient_and_grouped_passes_options_through(backend):
    x = torch.randn(20, 8)
    rot = ResidualVQ(8, 11, 2, backend=backend, rotation_trick=True, **PLAIN)
    plain = ResidualVQ(8, 11, 2, backend=backend, **PLAIN)
    plain.load_state_dict(rot.state_dict())  # same codes, same state_dict keys
    g_rot = check_against_reference(rot, x)
    xr = x.clone().requires_grad_()
    plain(xr).quantized.sum().backward()
    assert torch.equal(xr.grad, torch.ones_like(x))  # the default: one straight-through
    assert not torch.allclose(g_rot, torch.ones_like(x))

    grouped = GroupedResidualVQ(
        8, 11, 2, groups=2, backend=backend, rotation_trick=True, quant_grad_frac=0.25, **PLAIN
    )
    for sub in grouped.rvqs:
        assert sub.rotation_trick and sub.quant_grad_frac == 0.25
        assert all(layer.rotation_trick for layer in sub.layers)
    xg = x.clone().requires_grad_()
    q, _, _ = grouped(xg)
    up = torch.randn_like(q)
    (q * up).sum().backward()
    for g, sub in enumerate(grouped.rvqs):
        chunk = x[:, 4 * g : 4 * g + 4].double().requires_grad_()
        books = [lay.codebook.detach()[0].double() for lay in sub.layers]
        out, _, _ = reference(chunk, books, rotation=True, frac=0.25)
        (out * up[:, 4 * g : 4 * g + 4].double()).sum().backward()
        torch.testing.assert_close(
            xg.grad[:, 4 * g : 4 * g + 4].double(), chunk.grad, rtol=1e-5, atol=1e-5
        )


def test_explicit_defaults_are_bit_identical_to_omitted(backend):
    """rotation_trick=False, quant_grad_frac=0.0 take today's path: same bits everywhere."""
    torch.manual_seed(1)
    a = ResidualVQ(6, 11, 3, backend=backend, seed=3)
    b = ResidualVQ(6, 11, 3, backend=backend, seed=3, rotation_trick=False, quant_grad_frac=0.0)
    b.load_state_dict(a.state_dict())
    assert repr(a) == repr(b)
    x = torch.randn(25, 6)
    for _ in range(2):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        oa, ob = a(xa, return_losses=True), b(xb, return_losses=True)
        ((oa.quantized * x).sum() + oa.loss).backward()
        ((ob.quantized * x).sum() + ob.loss).backward()
        for u, v in zip(oa, ob, strict=True):
            assert torch.equal(u, v)
        assert torch.equal(xa.grad, xb.grad)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka


@pytest.mark.parametrize("cls", [ResidualVQ, GroupedResidualVQ])
def test_bad_values_name_the_argument(cls):
    kw = dict(groups=2) if cls is GroupedResidualVQ else {}
    for frac in (-0.1, 1.5):
        with pytest.raises(ValueError, match="quant_grad_frac"):
            cls(4, 8, 2, quant_grad_frac=frac, **kw)
    for frac in ("0.5", None, True, float("nan")):
        with pytest.raises(TypeError, match="quant_grad_frac"):
            cls(4, 8, 2, quant_grad_frac=frac, **kw)
    for rot in (1, "yes", None):
        with pytest.raises(TypeError, match="rotation_trick"):
            cls(4, 8, 2, rotation_trick=rot, **kw)
