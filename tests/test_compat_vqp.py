"""fastvq.compat.vqp against the installed vector-quantize-pytorch 1.32.0 ("vqp"), numerically.

Both modules get the same state_dict; every step feeds both the same batch (and the same global
random state, so vqp's k-means seeds, dead-code replacements and quantize-dropout draws are the
same draws), compares indices, outputs, loss, the gradients of the input and of the codebook and
every state_dict entry, then takes one SGD step on both. Tolerance: fp32 rounding (the sums run
in another order; the rotation trick's forward value is exactly the code here, vqp's the rotated
input).
"""

import subprocess
import sys

import pytest
import torch

from fastvq.compat import vqp as C

V = pytest.importorskip("vector_quantize_pytorch")

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 rounding of O(1) values; measured max 6e-6 (docs)
STEPS = 3


def _pair(cls: str, kw: dict):
    torch.manual_seed(0)
    ref = getattr(V, cls)(**kw)
    ours = getattr(C, cls)(**kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _close_states(ref, ours) -> None:
    sr, so = ref.state_dict(), ours.state_dict()
    assert sr.keys() == so.keys()
    for k in sr:
        torch.testing.assert_close(so[k].float(), sr[k].float(), **TOL, msg=k)


def _run_both(ref, ours, shape, *, mask_p=None, steps=STEPS, fwd=None, seed=1, tol=TOL):
    """Train both for ``steps`` steps on the same batches and compare everything each step."""
    fwd = fwd or {}
    TOL = tol  # noqa: N806
    params_r, params_o = list(ref.parameters()), list(ours.parameters())
    opt_r = torch.optim.SGD(params_r, lr=0.1) if params_r else None
    opt_o = torch.optim.SGD(params_o, lr=0.1) if params_o else None
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.randn(*shape, generator=gen)
        mask = None
        if mask_p is not None:
            mask = torch.rand(shape[0], shape[1], generator=gen) > mask_p
            fwd = {**fwd, "mask": mask}
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(100 + step)
        out_r = ref(xr, **fwd)
        torch.manual_seed(100 + step)
        out_o = ours(xo, **fwd)
        (qr, ir, lr), (qo, io, lo) = out_r[:3], out_o[:3]
        assert torch.equal(ir, io), f"step {step}: indices differ"
        torch.testing.assert_close(qo, qr, **TOL)
        torch.testing.assert_close(lo, lr, **TOL)
        w = torch.randn(qr.shape, generator=gen)
        ((qr * w).sum() + lr.sum()).backward()
        ((qo * w).sum() + lo.sum()).backward()
        torch.testing.assert_close(xo.grad, xr.grad, **TOL)
        for (name, pr), po in zip(ref.named_parameters(), params_o, strict=True):
            assert (pr.grad is None) == (po.grad is None), name
            if pr.grad is not None:
                torch.testing.assert_close(po.grad, pr.grad, **TOL, msg=name)
        _close_states(ref, ours)
        if opt_r is not None:
            opt_r.step(), opt_o.step(), opt_r.zero_grad(), opt_o.zero_grad()
            _close_states(ref, ours)


VQ_CONFIGS = {
    "ema_rotation": dict(),  # vqp's defaults: EMA, decay 0.8, rotation trick
    "ema_straight_through": dict(rotation_trick=False),
    "cosine": dict(use_cosine_sim=True),
    "cosine_straight_through": dict(use_cosine_sim=True, rotation_trick=False),
    "grad_codebook": dict(learnable_codebook=True, ema_update=False),
    "grad_codebook_st": dict(learnable_codebook=True, ema_update=False, rotation_trick=False),
    "heads_shared": dict(heads=2, codebook_dim=4),
    "heads_separate": dict(heads=2, codebook_dim=4, separate_codebook_per_head=True),
    "projection": dict(codebook_dim=4, commitment_weight=0.5),
    "projection_layernorm": dict(codebook_dim=4, layernorm_after_project_in=True),
    "kmeans": dict(kmeans_init=True, kmeans_iters=3),
    "dead_codes": dict(threshold_ema_dead_code=2, codebook_size=64),
    "orthogonal": dict(orthogonal_reg_weight=5.0, orthogonal_reg_max_codes=8),
    "frozen": dict(freeze_codebook=True),
    "manual_ema": dict(manual_ema_update=True),
}
# vqp 1.32.0's masked commitment compares the code with the raw input; equal to ours (codebook
# space) only without cosine normalisation, projections or heads
MASK_OK = {"ema_rotation", "ema_straight_through", "grad_codebook", "grad_codebook_st", "kmeans",
           "dead_codes", "orthogonal", "frozen", "manual_ema"}  # fmt: skip


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("name", sorted(VQ_CONFIGS))
def test_vector_quantize_training_steps_match_vqp(name, masked):
    if masked and name not in MASK_OK:
        pytest.skip("vqp 1.32.0's masked commitment uses the raw input here (documented)")
    kw = dict(dim=8, codebook_size=16) | VQ_CONFIGS[name]
    ref, ours = _pair("VectorQuantize", kw)
    # LayerNorm's backward divides by the rows' std: the inputs' rounding grows (measured 1.2e-5)
    tol = dict(rtol=1e-5, atol=5e-5) if "layernorm" in name else TOL
    _run_both(ref, ours, (2, 12, 8), mask_p=0.3 if masked else None, tol=tol)


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


def test_topk_and_update_indices_match_vqp():
    ref, ours = _pair("VectorQuantize", dict(dim=8, codebook_size=16))
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


RVQ_CONFIGS = {
    "plain": dict(),
    "straight_through": dict(rotation_trick=False),
    "shared": dict(shared_codebook=True),
    "dropout": dict(quantize_dropout=True, quantize_dropout_cutoff_index=1),
    "sizes_projection": dict(codebook_size=(4, 8, 16), codebook_dim=4),
    "grad_frac": dict(quant_grad_frac=0.5),
    "cosine_dead_codes": dict(use_cosine_sim=True, threshold_ema_dead_code=1, codebook_size=32),
    "grad_codebook": dict(learnable_codebook=True, ema_update=False),
}


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("name", sorted(RVQ_CONFIGS))
def test_residual_vq_training_steps_match_vqp(name, masked):
    if masked and "cosine" in name:
        pytest.skip("vqp 1.32.0's masked commitment uses the raw input here (documented)")
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


@pytest.mark.parametrize(
    "cls,kw,name",
    [
        ("VectorQuantize", dict(commitment_use_cross_entropy_loss=True), "commitment_use_cross"),
        ("VectorQuantize", dict(codebook_diversity_loss_weight=0.1), "codebook_diversity"),
        ("VectorQuantize", dict(straight_through=True), "straight_through"),
        ("VectorQuantize", dict(directional_reparam=True), "directional_reparam"),
        ("VectorQuantize", dict(affine_param=True), "affine_param"),
        ("VectorQuantize", dict(vq_bridge=torch.nn.Identity()), "vq_bridge"),
        ("ResidualVQ", dict(num_quantizers=2, implicit_neural_codebook=True), "implicit_neural"),
        ("ResidualVQ", dict(num_quantizers=2, diveq=True), "diveq"),
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
    with pytest.raises(NotImplementedError, match="indices"):
        vq(x, indices=torch.zeros(1, 3, dtype=torch.long))
    rvq = C.ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, beam_size=2, use_cosine_sim=True)
    with pytest.raises(NotImplementedError, match="beam_size with use_cosine_sim"):
        rvq(x)


def test_defaults_are_vqps():
    ours, ref = C.VectorQuantize(dim=8, codebook_size=16), V.VectorQuantize(dim=8, codebook_size=16)
    for attr in ("commitment_weight", "rotation_trick", "channel_last", "heads", "eps"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    for attr in ("decay", "threshold_ema_dead_code", "ema_update", "kmeans_iters"):
        assert getattr(ours._codebook, attr) == getattr(ref._codebook, attr), attr
    assert (
        bool(ours._codebook.initted) and not C.VectorQuantize(dim=1, codebook_size=4).rotation_trick
    )


def test_import_fastvq_does_not_import_vqp():
    code = "import sys, fastvq, fastvq.compat.vqp; print('vector_quantize_pytorch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
