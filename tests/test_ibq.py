"""``fastvq.IBQ`` against a literal N x K implementation of SEED-Voken's IBQ in fp64 (one-hot,
softmax, ``(onehot - sg(p) + p) @ C``, its four loss terms): values, indices, gradients to the
rows and to every code, masks, layout, eval, bad options."""

from __future__ import annotations

import pytest
import torch

import fastvq
from fastvq.ibq import IBQ, IBQConfig, ibq_loss, ibq_quantize_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def _literal(z, c, cfg: IBQConfig, keep=None):
    """SEED-Voken's IndexPropagationQuantize + compute_entropy_loss, literally (N x K)."""
    logits = z @ c.T
    soft = (logits / cfg.temperature).softmax(1)
    ind = soft.argmax(1)
    hard = torch.zeros_like(logits).scatter_(1, ind[:, None], 1.0)
    one_hot = hard - soft.detach() + soft
    zq, zq2 = one_hot @ c, hard @ c
    if keep is not None:
        zq = torch.where(keep[:, None], zq, zq2.detach())
        z, zq, zq2, logits = z[keep], zq[keep], zq2[keep], logits[keep]
    loss = (cfg.double_quant_weight * (zq - z).square().mean()
            + cfg.commitment_weight * (zq2.detach() - z).square().mean()
            + cfg.codebook_weight * (zq2 - z.detach()).square().mean())  # fmt: skip
    probs = (logits / cfg.entropy_temperature).softmax(1)
    log_probs = (logits / cfg.entropy_temperature + cfg.entropy_eps).log_softmax(1)
    avg = probs.mean(0)
    avg_entropy = -(avg * torch.log(avg + cfg.entropy_eps)).sum()
    sample_entropy = (-(probs * log_probs).sum(1)).mean()
    ent = cfg.sample_entropy_weight * sample_entropy - cfg.codebook_entropy_weight * avg_entropy
    return zq, ind, loss + cfg.entropy_loss_weight * ent


def _data(n, d, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(k, d, generator=g) * 0.3


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("temps", [(1.0, 0.01), (0.5, 0.2)])
def test_rows_and_loss_match_literal(backend, masked, temps):
    """The functional core in fp64 (torch) / fp32 (Triton): q, indices, loss and the gradients
    to z and to every code, against autograd through the literal N x K formula in fp64."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    cfg = IBQConfig(6, 50, temperature=temps[0], entropy_temperature=temps[1], backend=backend,
                    codebook_weight=0.3, entropy_loss_weight=0.07)  # fmt: skip
    z, c = _data(40, 6, 50, seed=int(masked))
    keep = (torch.arange(40) % 4 != 1) if masked else None
    g = torch.randn(40, 6, generator=torch.Generator().manual_seed(2))
    z1, c1 = z.to(dtype).clone().requires_grad_(), c.to(dtype).clone().requires_grad_()
    q, idx, hard = ibq_quantize_rows(z1, c1, cfg.temperature, backend)
    if keep is not None:
        q = torch.where(keep[:, None], q, hard.detach())
    loss, _ = ibq_loss(z1, c1, keep, q, hard, cfg)
    (loss + (q * g.to(dtype)).sum()).backward()
    z2, c2 = z.double().requires_grad_(), c.double().requires_grad_()
    zq, ind, ref = _literal(z2, c2, cfg, keep)
    full_q = zq if keep is None else torch.zeros(40, 6, dtype=torch.float64).masked_scatter(
        keep[:, None].expand(-1, 6), zq)  # fmt: skip
    (ref + (full_q * g.double()).sum()).backward()
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    assert torch.equal(idx, ind)
    torch.testing.assert_close(loss.double(), ref, **tol)
    torch.testing.assert_close((q if keep is None else q[keep]).double(), zq, **tol)
    torch.testing.assert_close(z1.grad.double(), z2.grad, **tol)
    torch.testing.assert_close(c1.grad.double(), c2.grad, **tol)


TERMS = {  # each loss term alone: every other weight 0
    "double_quant": dict(commitment_weight=0.0, codebook_weight=0.0, entropy_loss_weight=0.0),
    "commitment": dict(double_quant_weight=0.0, codebook_weight=0.0, entropy_loss_weight=0.0),
    "codebook": dict(double_quant_weight=0.0, commitment_weight=0.0, entropy_loss_weight=0.0),
    "sample_entropy": dict(double_quant_weight=0.0, commitment_weight=0.0, codebook_weight=0.0,
                           entropy_loss_weight=1.0, codebook_entropy_weight=0.0),
    "codebook_entropy": dict(double_quant_weight=0.0, commitment_weight=0.0,
                             codebook_weight=0.0, entropy_loss_weight=1.0,
                             sample_entropy_weight=0.0),
}  # fmt: skip


@pytest.mark.parametrize("term", list(TERMS))
@pytest.mark.parametrize("code_scale", [1.0, 0.1])
def test_each_term_gradient_matches_literal(backend, term, code_scale):
    """Each term on its own (a sign or a lost path of one term cannot hide behind the others),
    in the demo VQ-VAE's regime: D = 16, |z| ~ 3 rows sharing a direction, codes N(0, s^2); at
    s = 1 the entropy softmax at 0.01 is one-hot to fp32 (docs/ibq.md), at s = 0.1 it is not."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    g = torch.Generator().manual_seed(5)
    z = torch.randn(48, 16, generator=g) * 0.5 + torch.randn(16, generator=g) * 0.7
    c = torch.randn(64, 16, generator=g) * code_scale
    cfg = IBQConfig(16, 64, backend=backend, **TERMS[term])
    z1, c1 = z.to(dtype).clone().requires_grad_(), c.to(dtype).clone().requires_grad_()
    q, _, hard = ibq_quantize_rows(z1, c1, cfg.temperature, backend)
    loss, _ = ibq_loss(z1, c1, None, q, hard, cfg)
    loss.backward()
    z2, c2 = z.double().requires_grad_(), c.double().requires_grad_()
    _, _, ref = _literal(z2, c2, cfg)
    ref.backward()
    assert c2.grad.abs().max() + z2.grad.abs().max() > 0  # the term is not trivially zero
    # fp32: a logit |z.c| ~ 10 rounds by ~1e-6, ~1e-4 after / 0.01, which moves p and the
    # gradients by ~1e-4 relative. With rows one-hot to fp32 (code_scale 1) the entropies once lost
    # more: the sample entropy as lse - E_p[x] (two ~1e3 logits) was 1.2e-2 / 1.3e-2 off (torch /
    # Triton), the codebook entropy's gradient on Triton 1.3e-3, where the literal formula in fp32
    # is 1.2e-4 / 3.7e-5 off. soft_assign's entropy output and lse's rounding error on both
    # backends bring them to 6.5e-5 and 2.0e-5 (docs/ibq.md): the common tolerance holds.
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    loose = tol
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
    for got, want in ((z1.grad, z2.grad), (c1.grad, c2.grad)):
        atol = loose * float(want.abs().max())
        torch.testing.assert_close(got.double(), want, rtol=loose, atol=atol)


def test_entropy_gradient_reaches_every_code_only_unsaturated():
    """Why IBQ collapsed in the demo's VQ-VAE: with N(0, 1) codes in D = 16 and |z| ~ 3 the
    logits / 0.01 are ~1e3 apart, the entropy softmax is one-hot in fp32 and the codebook
    entropy's gradient reaches fewer codes than the argmax uses (52 and 185 of 512 here: a row
    one-hot to fp32 passes nothing above fp32's underflow, where soft_assign's torch twin floors
    exp at the smallest normal); at init_scale 0.1 it reaches all 512."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 16, generator=g) * 0.75  # |z| ~ 3, as after a few demo steps
    reached, chosen = {}, {}
    for scale in (1.0, 0.1):
        torch.manual_seed(0)
        q = IBQ(16, 512, init_scale=scale, double_quant_weight=0.0, commitment_weight=0.0,
                codebook_weight=0.0, sample_entropy_weight=0.0)  # fmt: skip
        out = q(z)
        out.loss.backward()
        # the exp floor leaves at most ~1e-33 on codes a one-hot row does not reach
        reached[scale] = int((q.book.codebook.grad.abs().sum(1) > 1e-30).sum())
        chosen[scale] = int(out.indices.unique().numel())
        assert float(q.codes().detach().std()) == pytest.approx(scale, rel=0.05)
    assert chosen[1.0] == chosen[0.1]  # the argmax does not depend on the codes' scale
    assert reached[1.0] < chosen[1.0] and reached[0.1] == 512


def test_layer_matches_literal_and_reaches_every_code(backend):
    torch.manual_seed(0)
    q = IBQ(8, 300, backend=backend)
    x = torch.randn(2, 5, 8, requires_grad=True)
    out = q(x)
    out.loss.backward()
    c = q.codes().detach().double().requires_grad_()
    xr = x.detach().double().reshape(10, 8).requires_grad_()
    zq, ind, ref = _literal(xr, c, q.config)
    ref.backward()
    assert out.indices.shape == (2, 5) and out.indices.dtype == torch.int64
    assert torch.equal(out.indices.reshape(-1), ind)
    torch.testing.assert_close(out.quantized.double().reshape(10, 8), zq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-5)
    grad = q.book.codebook.grad
    # entropy logits at temperature 0.01 are ~100x the raw ones (here up to ~1e3): fp32 rounding
    # of a logit (~1e-4 there) moves p, and the gradient, by ~1e-4 relative
    atol = 1e-3 * float(c.grad.abs().max())
    torch.testing.assert_close(grad.double(), c.grad, rtol=1e-4, atol=atol)
    assert (grad.abs().sum(1) > 0).all(), "every code gets a gradient through the softmax"
    atol = 1e-3 * float(xr.grad.abs().max())
    torch.testing.assert_close(x.grad.double().reshape(10, 8), xr.grad, rtol=1e-4, atol=atol)


def test_breakdown_eval_channel_first_and_dtype():
    torch.manual_seed(0)
    q = IBQ(4, 32, channel_first=True)
    x = torch.randn(2, 4, 3, 3)
    out = q(x, return_loss_breakdown=True)
    bd = out.breakdown
    cfg = q.config
    total = (cfg.double_quant_weight * bd.double_quant + cfg.commitment_weight * bd.commitment
             + cfg.codebook_weight * bd.codebook + cfg.entropy_loss_weight
             * (bd.sample_entropy - bd.codebook_entropy))  # fmt: skip
    torch.testing.assert_close(out.loss, total)
    assert out.quantized.shape == x.shape and out.indices.shape == (2, 3, 3)
    torch.testing.assert_close(out.quantized, q.codes_from_indices(out.indices))  # channel-first
    with pytest.raises(ValueError, match="indices"):
        q.codes_from_indices(torch.tensor([32]))
    q.eval()
    ev = q(x.bfloat16())
    assert ev.loss.item() == 0 and ev.quantized.dtype == torch.bfloat16
    assert fastvq.IBQ is IBQ


def test_mask_rows_pass_nothing():
    torch.manual_seed(0)
    q = IBQ(4, 16)
    x = torch.randn(12, 4, requires_grad=True)
    mask = torch.arange(12) < 8
    with torch.no_grad():
        x[10] = float("nan")
    out = q(x, mask)
    out.loss.backward()
    assert out.loss.isfinite() and (x.grad[~mask] == 0).all()
    ref = IBQ(4, 16)
    ref.load_state_dict(q.state_dict())
    torch.testing.assert_close(out.loss, ref(x.detach()[:8]).loss)


def test_empty_batch():
    q = IBQ(4, 16)
    out = q(torch.zeros(0, 4, requires_grad=True))
    assert out.quantized.shape == (0, 4) and out.loss.item() == 0
    out.loss.backward()


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(codebook_weight=float("nan")), ValueError, "codebook_weight"),
        (dict(entropy_temperature=0.0), ValueError, "entropy_temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(init_scale=0.0), ValueError, "init_scale"),
        (dict(channel_first=1), TypeError, "channel_first"),
        (dict(backend="gpu"), ValueError, "backend"),
        (dict(beta=0.25), TypeError, "beta"),
    ],
)
def test_bad_options_name_the_argument(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        IBQ(4, 16, **kwargs)


def test_bad_input_names_x():
    with pytest.raises(ValueError, match="x has 3 channels"):
        IBQ(4, 16)(torch.zeros(2, 3))
