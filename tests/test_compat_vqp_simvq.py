"""fastvq.compat.vqp's ``SimVQ``, ``ResidualSimVQ`` and ``Sequential`` against the installed
vector-quantize-pytorch 1.32.0 ("vqp"), and their argument checks (these run without vqp).

Agreement: both modules are built from the same torch seed (the front end draws its basis and its
default map as vqp does, so the two start equal; the state_dicts are compared key by key), then
several SGD steps on both compare indices (equal), outputs, losses, the input's gradient and the
map's gradients (fp32 rounding: the fused op sums the loss and the codebook gradient in another
order than vqp's ``cdist`` / ``mse_loss``), for both search backends.
"""

import pytest
import torch
from torch import nn

from fastvq.compat import vqp as C

try:
    import vector_quantize_pytorch as V
except ImportError:  # the agreement tests skip; the checks below still run
    V = None

pytestmark = pytest.mark.usefixtures("one_thread")
needs_vqp = [
    pytest.mark.extras,
    pytest.mark.skipif(V is None, reason="needs vector-quantize-pytorch (extra: bench)"),
]
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 rounding of O(1) sums; measured max 8e-7
BACKENDS = ["torch", "triton"]


def _mlp(d):
    return nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))


def _pair(cls, backend, **kw):
    """vqp's module and ours, from the same seed (the transform built inside, as users do)."""
    mods = []
    for lib in (V, C):
        torch.manual_seed(0)
        k = dict(kw)
        if k.get("codebook_transform") == "mlp":
            k["codebook_transform"] = _mlp(kw["dim"])
        if lib is C:
            k["backend"] = backend
        mods.append(getattr(lib, cls)(**k))
    ref, ours = mods
    sa, sb = ref.state_dict(), ours.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        torch.testing.assert_close(sb[key], sa[key], rtol=0, atol=0, msg=key)
    return ref, ours


def _steps(ref, ours, make_x, steps=3, call=lambda m, x: m(x)):
    oa = torch.optim.SGD(ref.parameters(), lr=0.5)
    ob = torch.optim.SGD(ours.parameters(), lr=0.5)
    for step in range(steps):
        torch.manual_seed(100 + step)
        x = make_x()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(7)
        out_a = call(ref, xa)
        torch.manual_seed(7)
        out_b = call(ours, xb)
        assert torch.equal(out_b[1], out_a[1]), f"indices differ at step {step}"
        assert out_b[1].dtype == out_a[1].dtype
        torch.testing.assert_close(out_b[0], out_a[0], **TOL)
        torch.testing.assert_close(out_b[2], out_a[2], **TOL)
        w = torch.randn_like(out_a[0])
        ((out_a[0] * w).sum() + out_a[2].sum()).backward()
        ((out_b[0] * w).sum() + out_b[2].sum()).backward()
        torch.testing.assert_close(xb.grad, xa.grad, **TOL)
        for (name, pa), pb in zip(ref.named_parameters(), ours.parameters(), strict=True):
            torch.testing.assert_close(pb.grad, pa.grad, **TOL, msg=name)
        oa.step()
        ob.step()
        oa.zero_grad()
        ob.zero_grad()


SIMVQ_CASES = {
    "default": dict(dim=8, codebook_size=37),
    "mlp-channel-first": dict(
        dim=8, codebook_size=37, codebook_transform="mlp", channel_first=True
    ),
    "frozen-dim-st": dict(dim=8, codebook_size=37, frozen_codebook_dim=5, rotation_trick=False),
    "weights-init-fn": dict(
        dim=6, codebook_size=20, init_fn=torch.nn.init.orthogonal_, commitment_weight=0.5,
        input_to_quantize_commit_loss_weight=1.0,
    ),
}  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SIMVQ_CASES)
@pytest.mark.extras
@pytest.mark.skipif(V is None, reason="needs vector-quantize-pytorch (extra: bench)")
def test_simvq_matches_vqp(case, backend):
    kw = SIMVQ_CASES[case]
    ref, ours = _pair("SimVQ", backend, **kw)
    d = kw["dim"]
    if kw.get("channel_first"):
        _steps(ref, ours, lambda: torch.randn(3, d, 5, 4))
    else:
        _steps(ref, ours, lambda: torch.randn(3, 11, d))
    # eval, decoding and the codebook
    ref.eval(), ours.eval()
    x = torch.randn(2, 9, d) if not kw.get("channel_first") else torch.randn(2, d, 3, 3)
    (_, ia, _), (_, ib, _) = ref(x), ours(x)
    assert torch.equal(ib, ia)
    torch.testing.assert_close(ours.indices_to_codes(ib), ref.indices_to_codes(ia), **TOL)
    torch.testing.assert_close(ours.codebook, ref.codebook, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channel_first", [False, True])
@pytest.mark.extras
@pytest.mark.skipif(V is None, reason="needs vector-quantize-pytorch (extra: bench)")
def test_residual_simvq_matches_vqp(channel_first, backend):
    kw = dict(dim=6, num_quantizers=3, codebook_size=16, channel_first=channel_first,
              quantize_dropout=True, codebook_transform=None)  # fmt: skip
    ref, ours = _pair("ResidualSimVQ", backend, **kw)
    shape = (2, 6, 4, 3) if channel_first else (2, 9, 6)
    _steps(ref, ours, lambda: torch.randn(shape), steps=4)
    for seed in range(4):  # the dropout draw from a given seed: vqp's depths
        out_a = ref(torch.randn(shape), rand_quantize_dropout_fixed_seed=seed)
        out_b = ours(torch.randn(shape), rand_quantize_dropout_fixed_seed=seed)
        assert torch.equal(out_a[1] == -1, out_b[1] == -1)
    ref.eval(), ours.eval()
    x = torch.randn(shape)
    qa, ia, la, ca = ref(x, return_all_codes=True)
    qb, ib, lb, cb = ours(x, return_all_codes=True)
    assert torch.equal(ib, ia)
    torch.testing.assert_close(cb, ca, **TOL)
    torch.testing.assert_close(lb, la, **TOL)
    torch.testing.assert_close(ours.get_output_from_indices(ib[..., :2]),
                               ref.get_output_from_indices(ia[..., :2]), **TOL)  # fmt: skip


@pytest.mark.extras
@pytest.mark.skipif(V is None, reason="needs vector-quantize-pytorch (extra: bench)")
@pytest.mark.parametrize("which", ["vq", "simvq"])
def test_sequential_matches_vqp(which):
    def build(lib):
        torch.manual_seed(0)
        q = (
            lib.VectorQuantize(dim=4, codebook_size=16, accept_image_fmap=True)
            if which == "vq"
            else lib.SimVQ(dim=4, codebook_size=16, channel_first=True)
        )
        return lib.Sequential(nn.Conv2d(1, 4, 3, padding=1), q, nn.Conv2d(4, 1, 3, padding=1))

    ref, ours = build(V), build(C)
    ours.load_state_dict(ref.state_dict(), strict=True)
    _steps(ref, ours, lambda: torch.randn(2, 1, 6, 5), steps=2)
    # vqp's Sequential takes ours too (vqp's contract), and ours takes vqp's quantizers
    torch.manual_seed(0)
    mixed = C.Sequential(nn.Identity(), V.VectorQuantize(dim=4, codebook_size=8))
    assert len(mixed(torch.randn(2, 3, 4))) == 3


# --- checks (no vqp needed) -------------------------------------------------------------------


def test_simvq_bad_arguments_name_them():
    with pytest.raises(TypeError, match="dim"):
        C.SimVQ(dim=2.5, codebook_size=4)
    with pytest.raises(ValueError, match="codebook_size"):
        C.SimVQ(dim=2, codebook_size=0)
    with pytest.raises(ValueError, match="frozen_codebook_dim"):
        C.SimVQ(dim=2, codebook_size=4, frozen_codebook_dim=0)
    with pytest.raises(TypeError, match="codebook_transform"):
        C.SimVQ(dim=2, codebook_size=4, codebook_transform=lambda t: t)
    with pytest.raises(ValueError, match="commitment_weight"):
        C.SimVQ(dim=2, codebook_size=4, commitment_weight=-1.0)
    with pytest.raises(ValueError, match="init_fn"):
        C.SimVQ(dim=2, codebook_size=4, init_fn=lambda t: t[:2])
    q = C.SimVQ(dim=3, codebook_size=4)
    with pytest.raises(ValueError, match="dim"):
        q(torch.randn(2, 5, 4))
    with pytest.raises(TypeError, match="x"):
        q([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="heads"):
        C.ResidualSimVQ(dim=3, num_quantizers=2, codebook_size=4, heads=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_simvq_empty_batch(backend):
    q = C.SimVQ(dim=3, codebook_size=4, channel_first=True, backend=backend)
    x = torch.randn(0, 3, 2, 2, requires_grad=True)
    out, idx, loss = q(x)
    assert out.shape == x.shape and idx.shape == (0, 2, 2) and idx.dtype == torch.int64
    assert loss.item() == 0.0
    (out.sum() + loss).backward()
    assert x.grad.shape == x.shape


def test_sequential_needs_exactly_one_quantizer():
    with pytest.raises(ValueError, match="exactly one quantizer"):
        C.Sequential(nn.Identity(), nn.ReLU())
    two = [C.SimVQ(dim=2, codebook_size=4), C.SimVQ(dim=2, codebook_size=4)]
    with pytest.raises(ValueError, match="exactly one quantizer"):
        C.Sequential(*two)
    with pytest.raises(TypeError, match="fns"):
        C.Sequential(C.SimVQ(dim=2, codebook_size=4), lambda t: t)
    seq = C.Sequential(nn.Linear(3, 2), C.LFQ(dim=2, codebook_size=4), nn.Linear(2, 3))
    out = seq(torch.randn(2, 5, 3))
    assert out[0].shape == (2, 5, 3) and len(out) == 3


def test_codebook_takes_a_given_simvq_basis():
    from fastvq.codebook import Codebook

    basis = torch.randn(5, 3)
    book = Codebook(1, 5, 3, learning="simvq", init=basis, grouped=False, counters=False)
    assert torch.equal(book.simvq_basis, basis)
    torch.testing.assert_close(book.codes()[0], basis @ book.simvq_map.T)
    with pytest.raises(ValueError, match="init"):
        Codebook(1, 4, 3, learning="simvq", init=torch.randn(5, 3), grouped=False)
