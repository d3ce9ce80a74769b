"""orthogonal_loss, diversity_loss and ce_commitment_loss against literal full-matrix formulas
(fp64) and vqp's own functions and layer: values and gradients, chunks smaller than N and not
dividing it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastvq.codebook_losses import ce_commitment_loss, diversity_loss, orthogonal_loss

try:
    import vector_quantize_pytorch as vqp_pkg
    from vector_quantize_pytorch import vector_quantize_pytorch as vqp
except ImportError:  # vqp is optional: the tests against it skip
    vqp = vqp_pkg = None

needs_vqp = pytest.mark.skipif(vqp is None, reason="vector_quantize_pytorch not installed")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _grads(loss_fn, *tensors):
    """(value, grads) of ``loss_fn(*leaves)`` for fresh leaf copies of ``tensors``."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    value = loss_fn(*leaves)
    return value.detach(), torch.autograd.grad(value, leaves)


def _close(ours, ref, rtol=2e-5, atol=1e-6):
    torch.testing.assert_close(ours.double(), ref.double(), rtol=rtol, atol=atol)


# --- literal references: full N x K (or M x M) matrices, fp64 -----------------------------------


def _ref_orthogonal(c):
    """vqp's orthogonal_loss_fn written out: (H, M, D) codes, the M x M cosine Gram."""
    h, m = c.shape[:2]
    u = c / c.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    cos = u @ u.transpose(-1, -2)
    return cos.square().sum() / (h * m**2) - 1 / m


def _ref_logits(z, codes, cosine=False):
    """vqp's logits over the full matrix: -sqrt(clamp(||z - c||^2, 1e-8)), or z.c."""
    if cosine:
        return z @ codes.t()
    return -(z[:, None, :] - codes[None, :, :]).square().sum(-1).clamp(min=1e-8).sqrt()


def _ref_diversity(z, codes, temperature, cosine=False):
    """z (B, T, D): softmax, mean over B per position, -mean_t entropy (log clamped at 1e-5)."""
    b, t, d = z.shape
    prob = (_ref_logits(z.reshape(-1, d), codes, cosine) * temperature).softmax(-1)
    avg = prob.view(b, t, -1).mean(0)
    return -(-avg * avg.clamp(min=1e-5).log()).sum(-1).mean()


def _ref_ce(z, codes, y, cosine=False):
    return F.cross_entropy(_ref_logits(z, codes, cosine), y, ignore_index=-1)


# --- orthogonal_loss ----------------------------------------------------------------------------


@pytest.mark.extras  # the vqp half runs only with vector_quantize_pytorch
@pytest.mark.parametrize("shape", [(1, 6), (20, 6), (5, 30), (3, 20, 6), (2, 7, 40)])
def test_orthogonal_matches_literal_and_vqp(shape):
    # M > D and M <= D take the two different Gram matrices
    c = torch.randn(shape, generator=_gen(1))
    c3 = c if c.dim() == 3 else c[None]
    val, (g,) = _grads(orthogonal_loss, c)
    ref, (gref,) = _grads(_ref_orthogonal, c3.double())
    assert val.dtype == torch.float32 and val.dim() == 0
    _close(val, ref)
    _close(g, gref.view(shape))
    if vqp is not None:
        theirs, (gt,) = _grads(vqp.orthogonal_loss_fn, c3)
        _close(val, theirs)
        _close(g, gt.view(shape))


def test_orthogonal_orthonormal_and_zero_codes():
    q = torch.linalg.qr(torch.randn(8, 8, generator=_gen(2)))[0]
    assert abs(orthogonal_loss(q[:5] * 3.0).item()) < 1e-6  # orthogonal codes: loss 0
    c = torch.randn(6, 4, generator=_gen(3))
    c[2] = 0.0  # a zero code normalises to zero (vqp's eps), as in the reference
    _close(orthogonal_loss(c), _ref_orthogonal(c[None].double()))


def test_orthogonal_active_shared_mask_matches_vqp_selection():
    # vqp: codebook[:, unique(embed_ind)] for every head, then orthogonal_loss_fn
    c = torch.randn(3, 12, 5, generator=_gen(4))
    ind = torch.tensor([7, 1, 1, 9, 3, 7])
    active = torch.zeros(12, dtype=torch.bool)
    active[ind] = True
    val, (g,) = _grads(lambda x: orthogonal_loss(x, active=active), c)
    sel = torch.unique(ind)
    ref, (gref,) = _grads(lambda x: _ref_orthogonal(x[:, sel]), c.double())
    _close(val, ref)
    _close(g, gref)
    assert (g[:, ~active] == 0).all()


def test_orthogonal_active_per_head_mask():
    c = torch.randn(2, 10, 3, generator=_gen(5))
    active = torch.zeros(2, 10, dtype=torch.bool)
    active[0, [0, 2, 5, 6, 9]] = True
    active[1, [1, 4]] = True
    val, (g,) = _grads(lambda x: orthogonal_loss(x, active=active), c)

    def ref_fn(x):  # each head with its own M, averaged over heads
        return sum(_ref_orthogonal(x[i, active[i]][None]) for i in range(2)) / 2

    ref, (gref,) = _grads(ref_fn, c.double())
    _close(val, ref)
    _close(g, gref)
    # a head without active codes adds 0
    active[1] = False
    _close(orthogonal_loss(c, active=active), _ref_orthogonal(c[0, active[0]][None].double()) / 2)
    assert orthogonal_loss(c, active=torch.zeros(10, dtype=torch.bool)).item() == 0.0


def test_orthogonal_max_codes_is_vqp_randperm():
    c = torch.randn(2, 50, 4, generator=_gen(6))
    val, (g,) = _grads(lambda x: orthogonal_loss(x, max_codes=9, generator=_gen(7)), c)
    ids = torch.randperm(50, generator=_gen(7))[:9]  # vqp: randperm(num_codes)[:max_codes]
    ref, (gref,) = _grads(lambda x: _ref_orthogonal(x[:, ids]), c.double())
    _close(val, ref)
    _close(g, gref)
    assert (g.abs().sum(dim=(0, 2)) > 0).sum() == 9
    # active codes first, then the subset among them; fewer than max_codes: no subset
    active = torch.arange(50) % 3 == 0
    sub = torch.nonzero(active)[:, 0][torch.randperm(17, generator=_gen(8))[:5]]
    got = orthogonal_loss(c, active=active, max_codes=5, generator=_gen(8))
    _close(got, _ref_orthogonal(c[:, sub].double()))
    _close(orthogonal_loss(c, max_codes=50), _ref_orthogonal(c.double()))


def test_orthogonal_half_and_errors():
    c = torch.randn(9, 4, generator=_gen(9)).to(torch.bfloat16)
    val, (g,) = _grads(orthogonal_loss, c)
    assert val.dtype == torch.float32 and g.dtype == torch.bfloat16
    _close(val, _ref_orthogonal(c[None].double()))
    with pytest.raises(TypeError, match="codes must be float32"):
        orthogonal_loss(c.double())
    with pytest.raises(ValueError, match="codes must have shape"):
        orthogonal_loss(torch.randn(3))
    with pytest.raises(ValueError, match="K >= 1"):
        orthogonal_loss(torch.randn(0, 4))
    with pytest.raises(TypeError, match="active must be a bool"):
        orthogonal_loss(c, active=torch.ones(9))
    with pytest.raises(ValueError, match="active must have shape"):
        orthogonal_loss(c, active=torch.ones(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="active must have shape"):
        orthogonal_loss(c, active=torch.ones(1, 9, dtype=torch.bool))  # (H, K) needs 3-D codes
    with pytest.raises(ValueError, match="max_codes must be"):
        orthogonal_loss(c, max_codes=0)
    with pytest.raises(TypeError, match="generator"):
        orthogonal_loss(c, max_codes=2, generator=3)


# --- diversity_loss -----------------------------------------------------------------------------


@pytest.mark.parametrize("zshape", [(63, 5), (1, 5), (6, 7, 5)])
@pytest.mark.parametrize("chunk", [1, 10, 4096])
@pytest.mark.parametrize("cosine", [False, True])
def test_diversity_matches_literal(zshape, chunk, cosine):
    g = _gen(sum(zshape) + chunk)
    z = torch.randn(zshape, generator=g)
    codes = torch.randn(23, 5, generator=g)
    if cosine:
        z, codes = F.normalize(z, dim=-1), F.normalize(codes, dim=-1)
    temp = 2.5
    val, (gz, gc) = _grads(
        lambda a, b: diversity_loss(a, b, temperature=temp, chunk=chunk, cosine=cosine), z, codes
    )
    z3 = z if z.dim() == 3 else z[:, None]  # (N, D) is one position: vqp's (N, 1, D)
    ref, (rz, rc) = _grads(
        lambda a, b: _ref_diversity(a, b, temp, cosine), z3.double(), codes.double()
    )
    assert val.dtype == torch.float32 and val.dim() == 0
    _close(val, ref)
    _close(gz, rz.view(zshape), atol=1e-6)
    _close(gc, rc, atol=1e-6)


def test_diversity_default_temperature_and_clamped_probabilities():
    # temperature 100 (vqp's default) makes most probabilities fall under entropy's 1e-5 clamp:
    # the clamp's zero gradient must match too
    g = _gen(11)
    z = torch.randn(40, 3, generator=g)
    codes = torch.randn(30, 3, generator=g)
    val, (gz, gc) = _grads(lambda a, b: diversity_loss(a, b, chunk=7), z, codes)
    ref, (rz, rc) = _grads(
        lambda a, b: _ref_diversity(a[:, None], b, 100.0), z.double(), codes.double()
    )
    _close(val, ref)
    _close(gz, rz, atol=1e-5)
    _close(gc, rc, atol=1e-5)


@pytest.mark.extras
@needs_vqp
def test_diversity_and_ce_match_vqp_layer():
    # vqp's VectorQuantize in training: its loss breakdown's diversity and cross-entropy
    # commitment terms, and their gradients wrt the input, from the codebook it searched with.
    # ema_update=False: with it, vqp's EMA step writes the codebook's .data in place after the
    # distances saved it for backward, so vqp's input gradient mixes the pre- and post-update
    # codebooks (a vqp bug; its forward values match either way).
    torch.manual_seed(0)
    vq = vqp_pkg.VectorQuantize(
        dim=6,
        codebook_size=50,
        codebook_diversity_loss_weight=1.0,
        codebook_diversity_temperature=3.0,
        commitment_use_cross_entropy_loss=True,
        commitment_weight=1.0,
        ema_update=False,
    ).train()
    codes = vq._codebook.embed.detach().clone()[0]
    x = torch.randn(4, 9, 6, generator=_gen(12), requires_grad=True)
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[1, 5:] = False
    _, ind, _, parts = vq(x, mask=mask, return_loss_breakdown=True)
    (gx_div,) = torch.autograd.grad(parts.codebook_diversity, x, retain_graph=True)
    (gx_ce,) = torch.autograd.grad(parts.commitment, x)

    val, (gz,) = _grads(lambda a: diversity_loss(a, codes, temperature=3.0, chunk=5), x)
    _close(val, parts.codebook_diversity)
    _close(gz, gx_div, atol=1e-6)
    y = ind.masked_fill(~mask, -1).reshape(-1)  # vqp sets masked rows to -1
    assert (y == -1).sum() == 4
    val, (gz,) = _grads(lambda a: ce_commitment_loss(a.reshape(-1, 6), codes, y, chunk=7), x)
    _close(val, parts.commitment)
    _close(gz, gx_ce, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_diversity_and_ce_half_inputs(dtype):
    g = _gen(13)
    z = torch.randn(30, 8, generator=g).to(dtype)
    codes = torch.randn(12, 8, generator=g).to(dtype)
    y = torch.randint(0, 12, (30,), generator=g)
    val, (gz, gc) = _grads(lambda a, b: diversity_loss(a, b, temperature=1.0, chunk=7), z, codes)
    assert val.dtype == torch.float32 and gz.dtype == gc.dtype == dtype
    ref, (rz, rc) = _grads(
        lambda a, b: _ref_diversity(a[:, None], b, 1.0), z.double(), codes.double()
    )
    _close(val, ref)
    _close(gz, rz, rtol=1e-2, atol=1e-4)  # the gradients are rounded to the input dtype
    val, (gz, gc) = _grads(lambda a, b: ce_commitment_loss(a, b, y, chunk=7), z, codes)
    assert val.dtype == torch.float32 and gz.dtype == gc.dtype == dtype
    ref, (rz, rc) = _grads(lambda a, b: _ref_ce(a, b, y), z.double(), codes.double())
    _close(val, ref)
    _close(gc, rc, rtol=1e-2, atol=1e-4)


def test_diversity_empty_and_errors():
    codes = torch.randn(4, 3, requires_grad=True)
    z = torch.empty(0, 3, requires_grad=True)
    loss = diversity_loss(z, codes)
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    loss.backward()
    assert (codes.grad == 0).all() and z.grad.shape == (0, 3)
    assert diversity_loss(torch.empty(2, 0, 3), codes).item() == 0.0
    z = torch.randn(2, 3)
    with pytest.raises(ValueError, match="temperature must be"):
        diversity_loss(z, codes, temperature=-1.0)
    with pytest.raises(ValueError, match="chunk must be"):
        diversity_loss(z, codes, chunk=0)
    with pytest.raises(ValueError, match="z must have shape"):
        diversity_loss(torch.randn(1, 2, 2, 3), codes)
    with pytest.raises(ValueError, match="codes' D"):
        diversity_loss(torch.randn(2, 4), codes)
    with pytest.raises(TypeError, match="codes must be float32"):
        diversity_loss(z, codes.double())


# --- ce_commitment_loss -------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 63])
@pytest.mark.parametrize("chunk", [1, 10, 4096])
@pytest.mark.parametrize("cosine", [False, True])
def test_ce_matches_literal(n, chunk, cosine):
    g = _gen(n + chunk)
    z = torch.randn(n, 5, generator=g)
    codes = torch.randn(17, 5, generator=g)
    if cosine:
        z, codes = F.normalize(z, dim=-1), F.normalize(codes, dim=-1)
    y = torch.randint(0, 17, (n,), generator=g)
    y[::4] = -1 if n > 1 else y[::4]  # ignored rows
    val, (gz, gc) = _grads(
        lambda a, b: ce_commitment_loss(a, b, y, chunk=chunk, cosine=cosine), z, codes
    )
    ref, (rz, rc) = _grads(lambda a, b: _ref_ce(a, b, y, cosine), z.double(), codes.double())
    assert val.dtype == torch.float32 and val.dim() == 0
    _close(val, ref)
    _close(gz, rz)
    _close(gc, rc)
    if n > 1:
        assert (gz[::4] == 0).all()


def test_ce_zero_distance_clamp_and_nan_in_ignored_row():
    # a row sitting on a code hits vqp's sqrt clamp (distance 1e-4, zero gradient there); a NaN in
    # an ignored row reaches neither the loss nor any gradient
    g = _gen(14)
    codes = torch.randn(9, 4, generator=g)
    z = torch.randn(12, 4, generator=g)
    z[3] = codes[5]
    y = torch.randint(0, 9, (12,), generator=g)
    y[7] = -1
    val, (gz, gc) = _grads(lambda a, b: ce_commitment_loss(a, b, y, chunk=5), z, codes)
    ref, (rz, rc) = _grads(lambda a, b: _ref_ce(a, b, y), z.double(), codes.double())
    _close(val, ref)
    _close(gz, rz, atol=1e-5)
    _close(gc, rc, atol=1e-5)
    z[7] = float("nan")
    val2, (gz2, gc2) = _grads(lambda a, b: ce_commitment_loss(a, b, y, chunk=5), z, codes)
    assert torch.isfinite(val2) and torch.isfinite(gz2).all() and torch.isfinite(gc2).all()
    _close(val2, val)


def test_ce_empty_all_ignored_and_errors():
    codes = torch.randn(4, 3, requires_grad=True)
    z = torch.randn(5, 3, requires_grad=True)
    loss = ce_commitment_loss(z, codes, torch.full((5,), -1))
    assert loss.item() == 0.0  # vqp (torch's cross_entropy) gives NaN here
    loss.backward()
    assert (z.grad == 0).all() and (codes.grad == 0).all()
    empty = ce_commitment_loss(torch.empty(0, 3), codes, torch.empty(0, dtype=torch.int64))
    assert empty.item() == 0.0 and empty.dtype == torch.float32
    with pytest.raises(ValueError, match=r"indices must lie in \[0, K\)"):
        ce_commitment_loss(z, codes, torch.tensor([0, 1, 4, 0, 0]))
    with pytest.raises(ValueError, match=r"indices\[1\] = -2"):
        ce_commitment_loss(z, codes, torch.tensor([0, -2, 1, 0, 0]))
    with pytest.raises(TypeError, match="indices must be int64"):
        ce_commitment_loss(z, codes, torch.zeros(5, dtype=torch.int32))
    with pytest.raises(ValueError, match="indices must have shape"):
        ce_commitment_loss(z, codes, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="chunk must be"):
        ce_commitment_loss(z, codes, torch.zeros(5, dtype=torch.int64), chunk=0)
    with pytest.raises(ValueError, match="z must have shape"):
        ce_commitment_loss(z[None], codes, torch.zeros(5, dtype=torch.int64))
    with pytest.raises(TypeError, match="indices must be a torch.Tensor"):
        ce_commitment_loss(z, codes, [0, 0, 0, 0, 0])


# --- memory and devices -------------------------------------------------------------------------


def test_chunked_losses_save_no_n_by_k_tensor():
    # Every tensor autograd saves for the backward stays far below N x K: the chunked Functions
    # keep only the inputs (and the T x K means), not a chunk's logits.
    n, k, chunk = 600, 200, 50
    g = _gen(15)
    z = torch.randn(n, 8, generator=g, requires_grad=True)
    codes = torch.randn(k, 8, generator=g, requires_grad=True)
    y = torch.randint(0, k, (n,), generator=g)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = diversity_loss(z, codes, temperature=1.0, chunk=chunk)
        loss = loss + ce_commitment_loss(z, codes, y, chunk=chunk)
    loss.backward()
    assert sizes and max(sizes) <= n * 8  # the inputs themselves, nothing N x K
    assert z.grad.shape == z.shape and torch.isfinite(codes.grad).all()


def test_losses_on_device(device):
    # The same values on the test device (CUDA where there is one) as the fp64 references on CPU,
    # including the accelerator's sync-free handling of a bad index (NaN instead of a raise).
    g = _gen(16)
    z = torch.randn(50, 6, generator=g)
    codes = torch.randn(20, 6, generator=g)
    y = torch.randint(0, 20, (50,), generator=g)
    zd, cd, yd = z.to(device), codes.to(device), y.to(device)
    _close(
        diversity_loss(zd, cd, temperature=2.0, chunk=7).cpu(),
        _ref_diversity(z[:, None].double(), codes.double(), 2.0),
    )
    _close(ce_commitment_loss(zd, cd, yd, chunk=7).cpu(), _ref_ce(z.double(), codes.double(), y))
    _close(
        orthogonal_loss(cd, max_codes=5, generator=torch.Generator(device).manual_seed(1)).cpu(),
        _ref_orthogonal(
            codes[
                torch.randperm(20, generator=torch.Generator(device).manual_seed(1), device=device)[
                    :5
                ].cpu()
            ][None].double()
        ),
    )
    if torch.device(device).type != "cpu":
        bad = yd.clone()
        bad[3] = 20
        assert ce_commitment_loss(zd, cd, bad).isnan()
