"""fastvq.compat.vqp against the installed vector-quantize-pytorch 1.32.0 ("vqp"), numerically.

Both modules get the same state_dict; every step feeds both the same batch (and the same global
random state, so vqp's k-means seeds, dead-code replacements and quantize-dropout draws are the
same draws), compares indices, outputs, loss (and every ``LossBreakdown`` field), the gradients
of the input and of the codebook and every state_dict entry, then takes one SGD step on both.
Tolerance: fp32 rounding (the sums run in another order; the rotation trick's forward value is
exactly the code here, vqp's the rotated input).

vqp's losses on its distance matrix (the cross-entropy commitment, the diversity loss, the
``indices=`` cross entropy) have wrong gradients in vqp 1.32.0 when its EMA runs: the EMA writes
the new codebook into ``embed`` in place (``.data.copy_``) after ``cdist`` / the einsum saved it
for backward, so vqp's backward uses the updated codes. Their gradients are therefore compared
with vqp's gradient of the same forward with ``ema_update=False`` (a copy of the module run on
the same batch), their values and states with vqp's EMA forward.
"""

import ast
import copy
from pathlib import Path

import pytest
import torch

from fastvq.compat import vqp as C

V = pytest.importorskip("vector_quantize_pytorch")

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 rounding of O(1) values; measured max 6e-6 (docs)
STEPS = 3


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.extras]


def _pair(cls: str, kw: dict):
    torch.manual_seed(0)
    ref = getattr(V, cls)(**kw)
    ours = getattr(C, cls)(**kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _close_states(ref, ours, tol=TOL) -> None:
    sr, so = ref.state_dict(), ours.state_dict()
    assert sr.keys() == so.keys()
    for k in sr:
        torch.testing.assert_close(so[k].float(), sr[k].float(), **tol, msg=k)


def _close_grads(ref, ours, x_ref, x_ours, tol=TOL) -> None:
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **tol)
    for (name, pr), po in zip(ref.named_parameters(), ours.parameters(), strict=True):
        assert (pr.grad is None) == (po.grad is None), name
        if pr.grad is not None:
            torch.testing.assert_close(po.grad, pr.grad, **tol, msg=name)


def _run_both(ref, ours, shape, *, mask_p=None, steps=STEPS, fwd=None, seed=1, tol=TOL,
              grad_ref_without_ema=False):  # fmt: skip
    """Train both for ``steps`` steps on the same batches and compare everything each step.

    ``grad_ref_without_ema``: the reference gradients come from a copy of ``ref`` run with
    ``ema_update=False`` (vqp's in-place EMA corrupts its own distance-based gradients)."""
    fwd = fwd or {}
    params_r, params_o = list(ref.parameters()), list(ours.parameters())
    opt_r = torch.optim.SGD(params_r, lr=0.1) if params_r else None
    opt_o = torch.optim.SGD(params_o, lr=0.1) if params_o else None
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.randn(*shape, generator=gen)
        if mask_p is not None:
            fwd = {**fwd, "mask": torch.rand(shape[0], shape[1], generator=gen) > mask_p}
        w = None
        grad_src = ref
        if grad_ref_without_ema:
            grad_src = copy.deepcopy(ref)
            xg = x.clone().requires_grad_()
            torch.manual_seed(100 + step)
            qg, _, lg = grad_src(xg, **fwd, ema_update=False)[:3]
            w = torch.randn(qg.shape, generator=gen)
            ((qg * w).sum() + lg.sum()).backward()
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(100 + step)
        out_r = ref(xr, **fwd)
        torch.manual_seed(100 + step)
        out_o = ours(xo, **fwd)
        (qr, ir, lr), (qo, io, lo) = out_r[:3], out_o[:3]
        assert torch.equal(ir, io), f"step {step}: indices differ"
        torch.testing.assert_close(qo, qr, **tol)
        torch.testing.assert_close(lo, lr, **tol)
        if fwd.get("return_loss_breakdown"):
            for field, a, b in zip(out_r[3]._fields, out_r[3], out_o[3], strict=True):
                torch.testing.assert_close(b, a, **tol, msg=field)
        if w is None:
            w = torch.randn(qr.shape, generator=gen)
            ((qr * w).sum() + lr.sum()).backward()
            x_ref = xr
        else:
            x_ref = xg
        ((qo * w).sum() + lo.sum()).backward()
        _close_grads(grad_src, ours, x_ref, xo, tol)
        _close_states(ref, ours, tol)
        if opt_r is not None:
            if grad_src is not ref:  # the reference step takes the corrected gradients
                for pr, pg in zip(params_r, grad_src.parameters(), strict=True):
                    pr.grad = pg.grad
            opt_r.step(), opt_o.step(), opt_r.zero_grad(), opt_o.zero_grad()
            _close_states(ref, ours, tol)


CE = dict(commitment_use_cross_entropy_loss=True)
DIV = dict(codebook_diversity_loss_weight=0.5)
GRAD_CB = dict(learnable_codebook=True, ema_update=False)
COS = dict(use_cosine_sim=True)
ST = dict(rotation_trick=False)
HEADS = dict(heads=2, codebook_dim=4)
SEPARATE = HEADS | dict(separate_codebook_per_head=True)
VQ_CONFIGS = {
    "ema_rotation": dict(),  # vqp's defaults: EMA, decay 0.8, rotation trick
    "ema_straight_through": ST,
    "cosine": COS,
    "cosine_heads_shared_st": COS | HEADS | ST,
    "grad_codebook": GRAD_CB,
    "grad_codebook_st": GRAD_CB | ST,
    "heads_separate": SEPARATE,
    # LayerNorm's backward divides by the rows' std: the inputs' rounding grows (measured 1.2e-5)
    "projection_layernorm": dict(codebook_dim=4, commitment_weight=0.5)
    | dict(layernorm_after_project_in=True),
    "kmeans": dict(kmeans_init=True, kmeans_iters=3),
    "dead_codes": dict(threshold_ema_dead_code=2, codebook_size=64),
    "orthogonal": dict(orthogonal_reg_weight=5.0, orthogonal_reg_max_codes=8),
    "frozen": dict(freeze_codebook=True),
    "manual_ema": dict(manual_ema_update=True),
    # stochastic sampling at a temperature where the logits dominate the Gumbel noise: the
    # sampled path (fastvq.sampling.sample_codes) picks vqp's codes whatever the noise draws
    "stochastic_cold": dict(stochastic_sample_codes=True, sample_codebook_temp=1e-4),
    "ce": CE,
    # with a mask vqp sets the masked indices to -1 in place, so the active codes include -1
    "ce_grad_codebook_active_orthogonal": CE
    | GRAD_CB
    | dict(orthogonal_reg_weight=2.0, orthogonal_reg_active_codes_only=True),
    "ce_cosine_heads_separate": CE | COS | SEPARATE,
    "diversity": DIV,
    "diversity_grad_codebook": DIV | GRAD_CB | dict(codebook_diversity_temperature=3.0),
    "diversity_cosine_heads_shared": DIV | COS | HEADS,
}
# vqp 1.32.0's masked MSE commitment compares the code with the raw input; equal to ours
# (codebook space) only without cosine normalisation, projections or heads. The masked runs
# cover every distinct use of the mask: commitment (rotation, straight-through), codebook
# gradient, EMA, k-means, dead codes, the cross-entropy (-1 targets, heads) and the diversity
# loss (vqp's ignores the mask).
MASKED = [
    "ema_rotation", "grad_codebook_st", "kmeans", "dead_codes", "ce",
    "ce_grad_codebook_active_orthogonal", "ce_cosine_heads_separate", "diversity",
]  # fmt: skip
VQ_CASES = [(n, False) for n in VQ_CONFIGS] + [(n, True) for n in MASKED]


@pytest.mark.parametrize(
    "name,masked", VQ_CASES, ids=[f"{n}-{'mask' if m else 'nomask'}" for n, m in VQ_CASES]
)
def test_vector_quantize_training_steps_match_vqp(name, masked):
    kw = dict(dim=8, codebook_size=16) | VQ_CONFIGS[name]
    ref, ours = _pair("VectorQuantize", kw)
    tol = dict(rtol=1e-5, atol=5e-5) if "layernorm" in name else TOL
    # the distance-based losses' gradients, with vqp's EMA on: see the module docstring
    no_ema_ref = ("ce" in name or "diversity" in name) and ours.ema_update
    _run_both(
        ref, ours, (2, 12, 8), mask_p=0.3 if masked else None, tol=tol,
        fwd=dict(return_loss_breakdown=True), grad_ref_without_ema=no_ema_ref,
    )  # fmt: skip


@pytest.mark.parametrize("layout", ["channel_first", "image", "one_token"])
def test_vector_quantize_layouts_match_vqp(layout):
    kw = dict(dim=4, codebook_size=16)
    shape = {"channel_first": (2, 4, 6), "image": (2, 4, 3, 3), "one_token": (5, 4)}[layout]
    kw |= {"channel_first": dict(channel_last=False), "image": dict(accept_image_fmap=True)}.get(
        layout, {}
    )
    ref, ours = _pair("VectorQuantize", kw)
    _run_both(ref, ours, shape)


@pytest.mark.parametrize("learnable", [False, True])
def test_vector_quantize_eval_matches_vqp(learnable):
    kw = dict(dim=8, codebook_size=16, codebook_dim=4)
    if learnable:
        kw |= dict(learnable_codebook=True, ema_update=False)
    ref, ours = _pair("VectorQuantize", kw)
    ref.eval(), ours.eval()
    x = torch.randn(2, 12, 8, requires_grad=True)
    mask = torch.rand(2, 12) > 0.3
    (qr, ir, lr), (qo, io, lo) = ref(x, mask=mask), ours(x, mask=mask)
    assert torch.equal(ir, io) and (io[~mask] == -1).all()
    torch.testing.assert_close(qo, qr, **TOL)
    assert lo.item() == lr.item() == 0.0
    w = torch.randn_like(qr)
    gr = torch.autograd.grad((qr * w).sum(), [x, *ref.parameters()], allow_unused=True)
    go = torch.autograd.grad((qo * w).sum(), [x, *ours.parameters()], allow_unused=True)
    assert gr[0] is None and go[0] is None  # eval: no gradient to the input through the output
    for a, b in zip(gr[1:], go[1:], strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, **TOL)
    _close_states(ref, ours)


@pytest.mark.parametrize("cosine", [False, True])
def test_topk_and_update_indices_match_vqp(cosine):
    """``topk`` through fastvq.sampling.topk_codes (for cosine: the dot product, ranked by an
    extra coordinate that makes every code's norm equal), then vqp's manual EMA step."""
    ref, ours = _pair("VectorQuantize", dict(dim=8, codebook_size=16, use_cosine_sim=cosine))
    x = torch.randn(2, 10, 8)
    mask = torch.rand(2, 10) > 0.3
    for m in (ref, ours):
        m.eval()
    (qr, ir, lr), (qo, io, lo) = ref(x, mask=mask, topk=3), ours(x, mask=mask, topk=3)
    assert torch.equal(ir, io)
    torch.testing.assert_close(qo, qr, **TOL)
    torch.testing.assert_close(lo, lr, **TOL)
    for m in (ref, ours):
        m.train()
        m.update_indices(x, ir[..., 0], mask=mask)
    _close_states(ref, ours)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("layout", ["tokens", "image_fmap"])
def test_topk_loss_breakdown_matches_vqp(layout, training):
    """With ``topk``, the breakdown's commitment is vqp's per-candidate ``(B, N, k)`` (N the
    tokens, ``H * W`` for a feature map), not the flat ``(1, B * N, k)`` it was."""
    kw = dict(accept_image_fmap=True) if layout == "image_fmap" else {}
    ref, ours = _pair("VectorQuantize", dict(dim=8, codebook_size=16, **kw))
    x = torch.randn(2, 8, 3, 4) if kw else torch.randn(2, 5, 8)
    for m in (ref, ours):
        m.train(training)
    (_, ir, lr, br), (_, io, lo, bo) = (m(x, topk=3, return_loss_breakdown=True)
                                        for m in (ref, ours))  # fmt: skip
    assert torch.equal(ir, io)
    torch.testing.assert_close(lo, lr, **TOL)
    assert bo.commitment.shape == br.commitment.shape == (2, 12 if kw else 5, 3)
    torch.testing.assert_close(bo.commitment, br.commitment, **TOL)


RVQ_CONFIGS = {
    "plain": dict(),
    "shared": dict(shared_codebook=True),
    "dropout": dict(quantize_dropout=True, quantize_dropout_cutoff_index=1),
    "sizes_projection": dict(codebook_size=(4, 8, 16), codebook_dim=4),
    "grad_frac_straight_through": dict(quant_grad_frac=0.5, rotation_trick=False),
    "cosine_dead_codes": dict(use_cosine_sim=True, threshold_ema_dead_code=1, codebook_size=32),
    "grad_codebook": dict(learnable_codebook=True, ema_update=False),
}
# masks: per-depth masked commitment and EMA, the shared codebook's end step, projections, the
# codebook gradient (cosine: vqp 1.32.0's masked commitment uses the raw input, documented)
RVQ_CASES = [(n, False) for n in RVQ_CONFIGS] + [
    (n, True) for n in ("plain", "shared", "sizes_projection", "grad_codebook")
]


@pytest.mark.parametrize(
    "name,masked", RVQ_CASES, ids=[f"{n}-{'mask' if m else 'nomask'}" for n, m in RVQ_CASES]
)
def test_residual_vq_training_steps_match_vqp(name, masked):
    kw = dict(dim=8, num_quantizers=3, codebook_size=16) | RVQ_CONFIGS[name]
    ref, ours = _pair("ResidualVQ", kw)
    _run_both(ref, ours, (2, 12, 8), mask_p=0.3 if masked else None)


def test_grouped_residual_vq_training_steps_match_vqp():
    kw = dict(dim=8, groups=2, num_quantizers=2, codebook_size=16, quantize_dropout=True)
    ref, ours = _pair("GroupedResidualVQ", kw)
    _run_both(ref, ours, (2, 12, 8))


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("rotation", [False, True])
def test_beam_search_step_matches_vqp(rotation, masked):
    """Indices, outputs, losses and input gradients of a beam-search training step equal vqp's.
    The EMA step after it does not: vqp 1.32.0 updates only depth 0 (it indexes the saved
    residuals' depth axis with ``[..., 0, :]``); this front end updates every depth from its
    chosen residuals, as upstream's later test_residual_beam_ema requires."""
    kw = dict(dim=4, num_quantizers=3, codebook_size=8, beam_size=2, rotation_trick=rotation)
    ref, ours = _pair("ResidualVQ", kw)
    x = torch.randn(2, 9, 4)
    mask = torch.rand(2, 9) > 0.3 if masked else None
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    (qr, ir, lr), (qo, io, lo) = ref(xr, mask=mask), ours(xo, mask=mask)
    assert torch.equal(ir, io)
    torch.testing.assert_close(qo, qr, **TOL)
    torch.testing.assert_close(lo, lr, **TOL)
    w = torch.randn_like(qr)
    ((qr * w).sum() + lr.sum()).backward()
    ((qo * w).sum() + lo.sum()).backward()
    torch.testing.assert_close(xo.grad, xr.grad, **TOL)
    for key in ("cluster_size", "embed_avg", "embed"):  # depth 0: both update it alike
        k = f"layers.0._codebook.{key}"
        torch.testing.assert_close(ours.state_dict()[k], ref.state_dict()[k], **TOL)


LAYERNORM = dict(layernorm_after_project_in=True)
CHECKPOINTS = [
    ("VectorQuantize", dict(dim=8, codebook_size=16)),
    ("VectorQuantize", dict(dim=8, codebook_size=16, kmeans_init=True)),
    ("VectorQuantize", dict(dim=8, codebook_size=16, learnable_codebook=True, ema_update=False)),
    ("VectorQuantize", dict(dim=8, codebook_size=16, orthogonal_reg_weight=1.0)),
    ("VectorQuantize", dict(dim=8, codebook_size=16, heads=4, separate_codebook_per_head=True)),
    ("VectorQuantize", dict(dim=8, codebook_size=8, codebook_dim=4) | LAYERNORM),
    ("ResidualVQ", dict(dim=8, num_quantizers=3, codebook_size=16, shared_codebook=True)),
    ("ResidualVQ", dict(dim=8, codebook_size=(4, 8), codebook_dim=4)),
    ("GroupedResidualVQ", dict(dim=8, groups=2, num_quantizers=2, codebook_size=16)),
]  # fmt: skip


@pytest.mark.parametrize(
    "cls,kw", CHECKPOINTS, ids=[f"{c}-{i}" for i, (c, _) in enumerate(CHECKPOINTS)]
)
def test_vqp_checkpoint_loads_strict_and_decodes_alike(cls, kw):
    """A trained vqp module's state_dict loads with strict=True (same keys, shapes) and the
    front end then quantizes like it in eval mode."""
    torch.manual_seed(0)
    ref = getattr(V, cls)(**kw)
    shape = (2, 12, 8)
    ref(torch.randn(*shape))  # one training step: k-means, EMA
    ours = getattr(C, cls)(**kw)
    missing = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    ref.eval(), ours.eval()
    x = torch.randn(*shape)
    (qr, ir, _), (qo, io, _) = ref(x)[:3], ours(x)[:3]
    assert torch.equal(ir, io)
    torch.testing.assert_close(qo, qr, **TOL)
    torch.testing.assert_close(ours.get_output_from_indices(io), ref.get_output_from_indices(ir))


INDICES_CONFIGS = {
    "ema_rotation": dict(),
    "grad_codebook_st": GRAD_CB | ST,
    "cosine_heads_shared": COS | HEADS,
    "heads_separate_projection": dict(heads=2, codebook_dim=3, separate_codebook_per_head=True),
    "image": dict(accept_image_fmap=True),
}


@pytest.mark.parametrize("name", sorted(INDICES_CONFIGS))
def test_forward_with_indices_matches_vqp(name):
    """``vq(x, indices=...)`` returns vqp's ``(quantize, ce_loss)``: the codes in codebook space
    in vqp's layout (``(B, N, d)``; heads: ``(1, B h, N, d)`` shared, ``(h, B, N, d)``
    separate), the cross entropy of vqp's logits to the given indices (-1 ignored), its
    gradients, and the training step's EMA; then the same in eval mode."""
    kw = dict(dim=6, codebook_size=16) | INDICES_CONFIGS[name]
    ref, ours = _pair("VectorQuantize", kw)
    heads = kw.get("heads", 1)
    gen = torch.Generator().manual_seed(3)
    shape = (2, 6, 3, 3) if name == "image" else (2, 9, 6)
    for train in (True, False):
        ref.train(train), ours.train(train)
        ref.zero_grad(), ours.zero_grad()
        x = torch.randn(*shape, generator=gen)
        lead = (2, 3, 3) if name == "image" else (2, 9)
        indices = torch.randint(0, 16, (*lead, heads) if heads > 1 else lead, generator=gen)
        indices[0, :2] = -1
        if name == "image":
            indices = indices.flatten(1)  # vqp takes (B, H W) here
        # vqp's EMA overwrites the codes its cdist saved for backward: its gradient of the same
        # forward without the EMA step is the reference (see the module docstring)
        grad_src = copy.deepcopy(ref) if train and ref.ema_update else None
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        (qr, lr), (qo, lo) = ref(xr, indices=indices), ours(xo, indices=indices)
        assert qo.shape == qr.shape
        torch.testing.assert_close(qo, qr, **TOL)
        torch.testing.assert_close(lo, lr, **TOL)
        _close_states(ref, ours)
        if grad_src is not None:
            xr = x.clone().requires_grad_()
            qr, lr = grad_src(xr, indices=indices, ema_update=False)
        w = torch.randn(qr.shape, generator=gen)
        ((qr * w).sum() + lr).backward()
        ((qo * w).sum() + lo).backward()
        _close_grads(ref if grad_src is None else grad_src, ours, xr, xo)


def test_stochastic_sampling_follows_vqps_distribution():
    """Stochastic sampling draws fastvq.sampling's noise, not vqp's: the samples differ, the
    distribution is the same, ``softmax(logits / temperature)`` with vqp's logits (``-|z - c|``;
    ``z.c`` for cosine). One row repeated 4000 times (independent noise per position): both
    libraries' code frequencies lie within 5 standard errors of it."""
    n = 4000
    for cosine in (False, True):
        kw = dict(dim=2, codebook_size=4, stochastic_sample_codes=True, sample_codebook_temp=0.5,
                  ema_update=False, use_cosine_sim=cosine, rotation_trick=False)  # fmt: skip
        ref, ours = _pair("VectorQuantize", kw)
        codes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.2], [0.6, 0.8]])
        for m in (ref, ours):
            m.codebook = codes
        z = torch.tensor([0.7, 0.4])
        zc = torch.nn.functional.normalize(z, dim=0) if cosine else z
        logits = codes @ zc if cosine else -(codes - zc).norm(dim=-1)
        p = (logits / 0.5).softmax(-1)
        x = z.expand(1, n, 2)
        for m in (ref, ours):
            torch.manual_seed(9)
            idx = m(x)[1]
            freq = torch.bincount(idx.flatten(), minlength=4).float() / n
            assert (freq - p).abs().max() < 5 * (p * (1 - p) / n).sqrt().max(), (cosine, freq, p)
        torch.manual_seed(9)
        assert not torch.equal(ours(x)[1], ref(x)[1])  # other draws


@pytest.mark.parametrize(
    "cls,kw,name",
    [
        ("VectorQuantize", dict(affine_param=True), "affine_param"),
        ("VectorQuantize", dict(vq_bridge=torch.nn.Identity()), "vq_bridge"),
        (
            "VectorQuantize",
            dict(codebook_diversity_loss_weight=0.1, heads=2, separate_codebook_per_head=True),
            "codebook_diversity_loss_weight with separate_codebook_per_head",
        ),
        ("ResidualVQ", dict(num_quantizers=2, implicit_neural_codebook=True), "implicit_neural"),
    ],
)
def test_unsupported_arguments_raise_naming_them(cls, kw, name):
    with pytest.raises(NotImplementedError, match=name):
        getattr(C, cls)(dim=8, codebook_size=16, **kw)


def test_unsupported_forward_arguments_raise_naming_them():
    vq = C.VectorQuantize(dim=4, codebook_size=8)
    x = torch.randn(1, 3, 4)
    with pytest.raises(NotImplementedError, match="codebook_transform_fn"):
        vq(x, codebook_transform_fn=lambda e: e)
    sampling = C.VectorQuantize(dim=4, codebook_size=8, stochastic_sample_codes=True)
    with pytest.raises(NotImplementedError, match="topk with stochastic_sample_codes"):
        sampling(x, topk=2)  # vqp: Gumbel top-k, k samples without replacement
    rvq = C.ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, beam_size=2, use_cosine_sim=True)
    with pytest.raises(NotImplementedError, match="beam_size with use_cosine_sim"):
        rvq(x)
    rvq = C.ResidualVQ(dim=4, num_quantizers=2, codebook_size=8)
    with pytest.raises(NotImplementedError, match="indices"):  # vqp 1.32.0 fails here too
        rvq(x, indices=torch.zeros(1, 3, 2, dtype=torch.long))
    grvq = C.GroupedResidualVQ(dim=4, groups=2, num_quantizers=2, codebook_size=8)
    with pytest.raises(NotImplementedError, match="indices"):
        grvq(x, indices=torch.zeros(2, 1, 3, 2, dtype=torch.long))
    ce = C.VectorQuantize(dim=4, codebook_size=8, commitment_use_cross_entropy_loss=True)
    with pytest.raises(ValueError, match="commitment_use_cross_entropy_loss"):  # as vqp asserts
        ce(x, topk=2)


def test_defaults_are_vqps():
    ours, ref = C.VectorQuantize(dim=8, codebook_size=16), V.VectorQuantize(dim=8, codebook_size=16)
    for attr in ("commitment_weight", "rotation_trick", "channel_last", "heads", "eps"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    for attr in ("decay", "threshold_ema_dead_code", "ema_update", "kmeans_iters"):
        assert getattr(ours._codebook, attr) == getattr(ref._codebook, attr), attr
    assert (
        bool(ours._codebook.initted) and not C.VectorQuantize(dim=1, codebook_size=4).rotation_trick
    )


def test_fastvq_never_imports_vqp():
    """No module of the package imports vector_quantize_pytorch, at import time or lazily (an
    import statement or ``importlib.import_module`` / ``__import__`` of it anywhere), so
    ``import fastvq.compat.vqp`` works without vqp installed."""
    root = Path(C.__file__).resolve().parents[1]
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            elif isinstance(node, ast.Call) and node.args:
                func = node.func
                fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                arg = node.args[0]
                dynamic = fname in ("import_module", "__import__") and isinstance(arg, ast.Constant)
                names = [str(arg.value)] if dynamic else []
            else:
                continue
            assert not any(n.split(".")[0] == "vector_quantize_pytorch" for n in names), path


def test_sync_update_v_with_topk_matches_vqp():
    """vqp applies sync_update_v to the top-k output too (the front end skipped it there)."""
    torch.manual_seed(0)
    kw = dict(dim=8, codebook_size=16, learnable_codebook=True, ema_update=False,
              sync_update_v=0.5)  # fmt: skip
    ref, ours = V.VectorQuantize(**kw), C.VectorQuantize(**kw)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 8)
    grads = []
    for m in (ref, ours):
        xx = x.clone().requires_grad_()
        q, idx, loss = m(xx, topk=3)
        (q.square().sum() + loss.sum()).backward()
        grads.append((q.detach(), idx, xx.grad, m._codebook.embed.grad))
    (q_r, i_r, gx_r, gc_r), (q_o, i_o, gx_o, gc_o) = grads
    assert torch.equal(i_r, i_o)
    for a, b in ((q_r, q_o), (gx_r, gx_o), (gc_r, gc_o)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(kmeans_init=True), "kmeans_init"),
        (dict(orthogonal_reg_weight=1.0), "orthogonal_reg_weight"),
        (dict(learnable_codebook=True, ema_update=False, sync_update_v=0.5), "sync_update_v"),
    ],
)
def test_beam_training_rejects_what_the_beam_route_does_not_apply(kw, name):
    rvq = C.ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, beam_size=2, **kw)
    with pytest.raises(NotImplementedError, match=f"beam_size with {name}"):
        rvq(torch.randn(2, 6, 8))


def test_update_indices_refuses_a_mask_where_forward_does():
    """One rule for both entry points: a mask with one-token ``(B, dim)`` input or a feature map
    is a ValueError in ``update_indices`` as in ``forward`` (it only checked feature maps)."""
    one = C.VectorQuantize(dim=8, codebook_size=16).train()
    fmap = C.VectorQuantize(dim=8, codebook_size=16, accept_image_fmap=True).train()
    for m, x, idx, mask in (
        (one, torch.randn(4, 8), torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.bool)),
        (fmap, torch.randn(2, 8, 3, 3), torch.zeros(2, 3, 3, dtype=torch.long),
         torch.ones(2, 9, dtype=torch.bool)),
    ):  # fmt: skip
        with pytest.raises(ValueError, match="mask is not supported"):
            m(x, mask=mask)
        with pytest.raises(ValueError, match="mask is not supported"):
            m.update_indices(x, idx, mask=mask)


def test_manual_ema_update_by_vqps_name():
    """``manual_ema_update=True``: vqp users call ``vq._codebook.update_ema()``; it gives the same
    codes as vqp's after the same steps."""
    ref, ours = _pair("VectorQuantize", dict(dim=8, codebook_size=16, manual_ema_update=True))
    x = torch.randn(2, 10, 8)
    for m in (ref, ours):
        m.train()
        m(x)
        before = m._codebook.embed.clone()
        m._codebook.update_ema()
        assert not torch.equal(m._codebook.embed, before)
    _close_states(ref, ours)


def test_dropout_cutoff_at_or_above_q_is_a_named_error():
    """A cutoff of Q or more builds (as vqp's layers do), and the first quantize-dropout draw is a
    ValueError naming the argument instead of ``randrange``'s "empty range" (vqp's failure)."""
    rvq = C.ResidualVQ(dim=8, codebook_size=16, num_quantizers=3, quantize_dropout=True,
                       quantize_dropout_cutoff_index=3).train()  # fmt: skip
    sim = C.ResidualSimVQ(dim=8, codebook_size=16, num_quantizers=3, quantize_dropout=True,
                          quantize_dropout_cutoff_index=5).train()  # fmt: skip
    x = torch.randn(2, 5, 8)
    for m in (rvq, sim):
        with pytest.raises(ValueError, match="quantize_dropout_cutoff_index must be below"):
            m(x)
        m.eval()
        m(x)  # no draw in eval: it runs
