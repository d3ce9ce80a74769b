"""vqp's DiVeQ (``VectorQuantize(directional_reparam=True)``, ``ResidualVQ(diveq=True)``) in
fastvq.compat.vqp, against the installed vqp 1.32.

DiVeQ's output is ``z + sg(u) |q - z|`` with ``u`` the noised unit error direction; the noise is
torch's global generator, drawn after the codebook step as vqp draws it, so from the same seed
the two libraries draw the same noise (and the same dead-code replacements): indices, outputs,
losses and the gradients of the input and of the (learned) codes agree over several SGD steps
(measured: bit for bit; compared with fp32 rounding tolerance).
"""

import pytest
import torch

from fastvq.compat import vqp as C

try:
    import vector_quantize_pytorch as V
except ImportError:  # the agreement tests skip; the argument checks still run
    V = None

pytestmark = pytest.mark.usefixtures("one_thread")
needs_vqp = pytest.mark.skipif(V is None, reason="needs vector-quantize-pytorch (extra: bench)")
TOL = dict(rtol=1e-5, atol=1e-6)


def _steps(cls, kw, steps=4):
    torch.manual_seed(0)
    ref = getattr(V, cls)(**kw)
    ours = getattr(C, cls)(**kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, ours)]
    for step in range(steps):
        torch.manual_seed(50 + step)
        x, w = torch.randn(3, 10, kw["dim"]), torch.randn(3, 10, kw["dim"])
        outs = []
        for m in (ref, ours):
            xm = x.clone().requires_grad_()
            torch.manual_seed(5)  # the same global stream: noise and replacements
            q, idx, loss = m(xm)
            ((q * w).sum() + loss.sum()).backward()
            outs.append((q, idx, loss, xm.grad))
        (qa, ia, la, ga), (qb, ib, lb, gb) = outs
        assert torch.equal(ib, ia), f"step {step}"
        for a, b in ((qa, qb), (la, lb), (ga, gb)):
            torch.testing.assert_close(b, a, **TOL)
        for (name, pa), pb in zip(ref.named_parameters(), ours.parameters(), strict=True):
            assert (pa.grad is None) == (pb.grad is None), name
            if pa.grad is not None:
                torch.testing.assert_close(pb.grad, pa.grad, **TOL, msg=name)
        for opt in opts:
            opt.step()
            opt.zero_grad()
    return ref, ours


@pytest.mark.extras
@needs_vqp
@pytest.mark.parametrize(
    "kw",
    [
        dict(threshold_ema_dead_code=2),  # codes expire: replacements drawn before the noise
        dict(codebook_dim=4, directional_reparam_variance=0.1, threshold_ema_dead_code=1e-3),
        dict(heads=2, codebook_dim=3, threshold_ema_dead_code=0.5),
    ],
    ids=["expiring", "projected", "heads"],
)
def test_vector_quantize_diveq_matches_vqp(kw):
    ref, ours = _steps("VectorQuantize", dict(dim=8, codebook_size=16, directional_reparam=True,
                                              **kw))  # fmt: skip
    assert ours.ema_update is False and ours.learnable_codebook and not ours.rotation_trick


@pytest.mark.extras
@needs_vqp
@pytest.mark.parametrize("kw", [dict(), dict(codebook_dim=4, quantize_dropout=True)])
def test_residual_vq_diveq_matches_vqp(kw):
    ref, ours = _steps("ResidualVQ", dict(dim=8, codebook_size=16, num_quantizers=3, diveq=True,
                                          **kw))  # fmt: skip
    ref.eval(), ours.eval()
    x = torch.randn(2, 5, 8)
    torch.manual_seed(1)  # vqp adds DiVeQ's noise in eval too
    qa = ref(x)[0]
    torch.manual_seed(1)
    torch.testing.assert_close(ours(x)[0], qa, **TOL)


def test_diveq_arguments_as_vqp():
    with pytest.raises(ValueError, match="threshold_ema_dead_code"):
        C.VectorQuantize(dim=4, codebook_size=8, directional_reparam=True)
    with pytest.raises(ValueError, match="at most one"):
        C.VectorQuantize(dim=4, codebook_size=8, directional_reparam=True, rotation_trick=True,
                         threshold_ema_dead_code=1)  # fmt: skip
    vq = C.VectorQuantize(dim=4, codebook_size=8, directional_reparam=True,
                          threshold_ema_dead_code=1)  # fmt: skip
    x = torch.randn(0, 3, 4, requires_grad=True)  # an empty batch is valid
    q, idx, loss = vq(x)
    (q.sum() + loss).backward()
    assert q.shape == x.shape and idx.shape == (0, 3)
