"""vqp's Gumbel ``straight_through`` in fastvq.compat.vqp's ``VectorQuantize``.

vqp 1.32 (``gumbel_sample(..., straight_through=True)``) outputs ``(one_hot + pi - sg(pi)) @ C``
with ``pi = softmax(logits / temperature)``; then, when the layer's input requires grad and
``route_gradients_to_input``, its layer replaces that by the plain straight-through ``x + sg(q -
x)``, so the soft path only reaches parameters upstream of an input that does not require grad
(``project_in``) or the input with ``route_gradients_to_input=False``. The front end does the
same with :func:`fastvq.sampling.gumbel_soft_codes` (no N x K tensor).

The op is checked against the literal dense formula in fp64 (no vqp needed); the layer against
the installed vqp: indices, outputs, losses and the gradients of the input, ``project_in`` and
``project_out`` over several training steps. With ``stochastic_sample_codes`` the draws are
fastvq's, not vqp's, but the soft path's gradient does not depend on the chosen code: with a loss
linear in the output and no commitment term, the gradients still agree.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from fastvq.compat import vqp as C
from fastvq.sampling import gumbel_soft_codes

try:
    import vector_quantize_pytorch as V
except ImportError:  # the agreement tests skip; the op's tests still run
    V = None

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 rounding of O(1) sums (vqp sums over K, ours in tiles)
BACKENDS = ["torch", "triton"]


def _dense(z, codes, idx, t, cosine):
    """The literal formula, fp64: vqp's ``one_hot + pi - pi.detach()`` times the codes."""
    if cosine:
        logits = z @ codes.T
    else:
        d2 = z.square().sum(1, keepdim=True) + codes.square().sum(1) - 2 * z @ codes.T
        logits = -d2.clamp(min=1e-8).sqrt()
    pi = (logits / t).softmax(-1)
    one_hot = F.one_hot(idx, codes.shape[0]).to(z.dtype)
    return (one_hot + pi - pi.detach()) @ codes


@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
@pytest.mark.parametrize("n,k,d,chunk", [(37, 23, 7, 5), (64, 300, 3, 4096), (5, 1, 9, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gumbel_soft_codes_matches_dense_formula(n, k, d, chunk, cosine, dtype):
    gen = torch.Generator().manual_seed(n * 1000 + k)
    z = torch.randn(n, d, generator=gen)
    codes = torch.randn(k, d, generator=gen)
    if cosine:
        z, codes = F.normalize(z, dim=-1), F.normalize(codes, dim=-1)
    z, codes = z.to(dtype), codes.to(dtype)
    idx = torch.randint(0, k, (n,), generator=gen)
    g = torch.randn(n, d, generator=gen)
    zq = z.clone().requires_grad_()
    out = gumbel_soft_codes(zq, codes, idx, temperature=0.6, cosine=cosine, chunk=chunk)
    assert out.dtype == dtype and torch.equal(out, codes[idx])
    (out.float() * g).sum().backward()
    z64 = z.double().requires_grad_()
    (_dense(z64, codes.double(), idx, 0.6, cosine) * g.double()).sum().backward()
    tol = TOL if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)  # bf16 output rounding
    torch.testing.assert_close(zq.grad.double(), z64.grad, **tol)


def test_gumbel_soft_codes_empty_batch_and_bad_input():
    codes = torch.randn(4, 3)
    z = torch.randn(0, 3, requires_grad=True)
    out = gumbel_soft_codes(z, codes, torch.zeros(0, dtype=torch.int64))
    out.sum().backward()
    assert out.shape == (0, 3) and z.grad.shape == (0, 3)
    with pytest.raises(ValueError, match="temperature"):
        gumbel_soft_codes(torch.randn(2, 3), codes, torch.zeros(2, dtype=torch.int64),
                          temperature=0.0)  # fmt: skip
    with pytest.raises(TypeError, match="indices"):
        gumbel_soft_codes(torch.randn(2, 3), codes, torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="indices"):
        gumbel_soft_codes(torch.randn(2, 3), codes, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="chunk"):
        gumbel_soft_codes(torch.randn(2, 3), codes, torch.zeros(2, dtype=torch.int64), chunk=0)


def test_straight_through_arguments_as_vqp():
    with pytest.raises(ValueError, match="rotation_trick"):
        C.VectorQuantize(dim=4, codebook_size=8, straight_through=True)  # rotation on by default
    with pytest.raises(ValueError, match="learnable_codebook"):
        C.VectorQuantize(dim=4, codebook_size=8, straight_through=True, rotation_trick=False,
                         learnable_codebook=True, ema_update=False)  # fmt: skip
    vq = C.VectorQuantize(dim=4, codebook_size=8, straight_through=True, rotation_trick=False)
    with pytest.raises(NotImplementedError, match="topk with straight_through"):
        vq(torch.randn(2, 3, 4), topk=2)


CASES = {
    # input without grad: the soft path reaches project_in
    "proj-no-input-grad": (dict(dim=6, codebook_dim=4, sample_codebook_temp=0.5), False),
    # input with grad, but no route to it: the soft path reaches the input
    "no-route-cosine": (dict(dim=4, use_cosine_sim=True, route_gradients_to_input=False), True),
    # input with grad and routed: vqp's plain straight-through wins
    "routed-heads": (dict(dim=8, heads=2, codebook_dim=3, sample_codebook_temp=2.0), True),
}


def _pair(kw, backend):
    torch.manual_seed(0)
    ref = V.VectorQuantize(codebook_size=16, straight_through=True, rotation_trick=False, **kw)
    ours = C.VectorQuantize(
        codebook_size=16, straight_through=True, rotation_trick=False, backend=backend, **kw
    )
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _run(mod, x, w, **fwd):
    q, idx, loss = mod(x, **fwd)
    ((q * w).sum() + loss).backward()
    return q, idx, loss


def _grads(ref, x, w):
    """vqp's gradients of the forward, from a copy run with ``ema_update=False``: vqp's EMA
    writes the new codes into ``embed`` in place after its ``cdist`` and soft-path einsum saved
    it, so its own backward reads the updated codes (see tests/test_compat_vqp.py)."""
    src = copy.deepcopy(ref)
    xs = x.detach().clone().requires_grad_(x.requires_grad)
    _run(src, xs, w, ema_update=False)
    return xs.grad, {n: p.grad for n, p in src.named_parameters() if p.grad is not None}


@pytest.mark.extras
@pytest.mark.skipif(V is None, reason="needs vector-quantize-pytorch (extra: bench)")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_straight_through_matches_vqp(case, backend):
    kw, input_grad = CASES[case]
    ref, ours = _pair(kw, backend)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (ref, ours) if list(m.parameters())]
    for step in range(3):
        torch.manual_seed(10 + step)
        x, w = torch.randn(3, 7, kw["dim"]), torch.randn(3, 7, kw["dim"])
        xa, xb = x.clone().requires_grad_(input_grad), x.clone().requires_grad_(input_grad)
        x_grad, grads = _grads(ref, xa, w)
        qa, ia, la = _run(ref, xa, w)
        qb, ib, lb = _run(ours, xb, w)
        assert torch.equal(ib, ia), f"step {step}"
        torch.testing.assert_close(qb, qa, **TOL)
        torch.testing.assert_close(lb, la, **TOL)
        if input_grad:
            torch.testing.assert_close(xb.grad, x_grad, **TOL)
        assert grads or case == "no-route-cosine"
        ours_grads = dict(ours.named_parameters())
        for name, ga in grads.items():
            torch.testing.assert_close(ours_grads[name].grad, ga, **TOL, msg=name)
        torch.testing.assert_close(ours.codebook, ref.codebook, **TOL)
        for name, p in ref.named_parameters():  # both step with the forward's own gradient
            p.grad = grads.get(name)
        for opt in opts:
            opt.step()
            opt.zero_grad()


@pytest.mark.extras
@pytest.mark.skipif(V is None, reason="needs vector-quantize-pytorch (extra: bench)")
def test_straight_through_stochastic_gradient_matches_vqp():
    kw = dict(dim=6, codebook_dim=4, commitment_weight=0.0, stochastic_sample_codes=True,
              sample_codebook_temp=0.7)  # fmt: skip
    ref, ours = _pair(kw, "torch")
    torch.manual_seed(3)
    x, w = torch.randn(4, 9, 6), torch.randn(4, 9, 6)
    _, grads = _grads(ref, x, w)
    _, idx, _ = _run(ours, x, w)
    assert idx.shape == (4, 9) and idx.dtype == torch.int64
    # project_in is upstream of the soft path only (project_out's gradient sees the codes drawn)
    ours_params = dict(ours.named_parameters())
    for name in ("project_in.weight", "project_in.bias"):
        ga = grads[name]
        assert ga is not None and ga.abs().sum() > 0
        torch.testing.assert_close(ours_params[name].grad, ga, **TOL, msg=name)
