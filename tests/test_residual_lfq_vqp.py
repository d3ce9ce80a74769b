"""fastvq.compat.vqp's ResidualLFQ and GroupedResidualLFQ against the installed
vector-quantize-pytorch 1.32 ("vqp"): outputs, indices (values and dtype), the per-depth aux
losses, input and projection gradients over several training steps, ``state_dict`` keys, quantize
dropout from a given seed, decoding; then vqp's own residual LFQ test function, re-written (as
tests/test_vqp_scenarios.py) to run on both.

Upstream file, as stored in the code index: tests/test_readme.py of vector-quantize-pytorch
(``test_rflq``); no upstream code is copied.
"""

import pytest
import torch

import fastvq
import fastvq.compat.vqp as fastvq_vqp

vqp = pytest.importorskip("vector_quantize_pytorch")

IMPLS = {"vqp": vqp, "fastvq": fastvq_vqp}
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.extras]


def _pair(cls="ResidualLFQ", **kwargs):
    ref = getattr(vqp, cls)(**kwargs)
    ours = getattr(fastvq_vqp, cls)(**kwargs)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    return ref, ours


CONFIGS = [
    dict(dim=6, codebook_size=16, num_quantizers=3, commitment_loss_weight=0.25),
    dict(dim=4, codebook_size=16, num_quantizers=2),
    dict(dim=8, codebook_size=32, num_quantizers=3, spherical=True, diversity_gamma=0.5),
    dict(dim=5, codebook_size=8, num_quantizers=4, soft_clamp_input_value=2.0,
         commitment_loss_weight=1.0, entropy_loss_weight=0.3),
]  # fmt: skip


@pytest.mark.parametrize("kwargs", CONFIGS, ids=["projected", "plain", "spherical", "clamped"])
def test_residual_lfq_agrees_over_training_steps(kwargs):
    torch.manual_seed(0)
    ref, ours = _pair(**kwargs)
    x0 = torch.randn(2, 23, kwargs["dim"]) * 0.8
    params = {}
    for name, m in (("vqp", ref), ("fastvq", ours)):
        x = x0.clone().requires_grad_()
        params[name] = (x, torch.optim.SGD([x, *m.parameters()], lr=0.1))
    for step in range(3):
        outs = {}
        for name, m in (("vqp", ref), ("fastvq", ours)):
            x, opt = params[name]
            opt.zero_grad()
            q, idx, losses = m(x)
            (q.square().mean() + losses.sum()).backward()
            outs[name] = (q.detach(), idx, losses.detach(), x.grad.clone())
            opt.step()
        (qr, ir, lr, gr), (qo, io, lo, go) = outs["vqp"], outs["fastvq"]
        assert io.dtype == ir.dtype == torch.int64 and torch.equal(io, ir)
        assert lo.shape == lr.shape == (kwargs["num_quantizers"],)
        torch.testing.assert_close(qo, qr, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lo, lr, rtol=1e-4, atol=1e-5)
        # the chunked clamped entropy rounds apart from vqp's N x 2^d one at step 0 (input
        # gradients off an fp64 run of vqp by 1.6e-6 for vqp, 2.5e-6 for the front end, "clamped"
        # case); vqp's stack fixes inv_temperature at 100, so the steps amplify it (~10x a step)
        torch.testing.assert_close(go, gr, rtol=1e-3, atol=5e-6 * 10**step)
    for (n, pr), po in zip(ref.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(po, pr, rtol=1e-3, atol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    ref.eval(), ours.eval()
    (qr, ir, lr, cr), (qo, io, lo, co) = (
        ref(x0, return_all_codes=True),
        ours(x0, return_all_codes=True),
    )
    assert torch.equal(qo, qr) and torch.equal(io, ir) and torch.equal(lo, lr)
    assert torch.equal(ours.codebooks, ref.codebooks)
    if not kwargs.get("spherical"):  # vqp decodes codes off the sphere (docs/lfq.md)
        assert torch.equal(co, cr)
        assert torch.equal(ours.get_output_from_indices(io), ref.get_output_from_indices(ir))
        assert torch.equal(ours.get_output_from_indices(io), qo)
    else:
        assert torch.equal(ours.get_output_from_indices(io), qo)


def test_residual_lfq_dropout_from_a_seed_and_coarse_indices():
    torch.manual_seed(1)
    kw = dict(dim=6, codebook_size=16, num_quantizers=5, quantize_dropout=True,
              quantize_dropout_cutoff_index=1, quantize_dropout_multiple_of=2)  # fmt: skip
    ref, ours = _pair(**kw)
    x = torch.randn(2, 7, 6)
    seen = set()
    for seed in range(8):
        (qr, ir, lr), (qo, io, lo) = (
            m(x, rand_quantize_dropout_fixed_seed=seed) for m in (ref, ours)
        )  # fmt: skip
        torch.testing.assert_close(qo, qr, rtol=1e-6, atol=1e-6)
        assert torch.equal(io, ir)
        torch.testing.assert_close(lo, lr, rtol=1e-4, atol=1e-6)
        n = int((io[0, 0] >= 0).sum())
        seen.add(n)
        assert (io[..., n:] == -1).all() and (lo[n:] == 0).all()
    assert len(seen) > 1
    ours.train()
    _, idx, _ = ours(x)  # no seed: the stack's own replayable draw
    assert ours.last_num_active is not None and (idx[..., ours.last_num_active :] == -1).all()
    ref.eval(), ours.eval()
    coarse = ours(x)[1][..., :2]  # fewer indices than depths: padded with -1, as vqp
    assert torch.equal(ours.get_output_from_indices(coarse), ref.get_output_from_indices(coarse))


def test_residual_lfq_mask_and_bf16():
    """A (b, n) mask: the same outputs and indices (vqp's batch entropy is then per row,
    docs/lfq.md). bf16: vqp keeps the residual in bf16 between depths, fastvq in fp32, so depth
    0 agrees and the stack equals fastvq's on the fp32 input."""
    torch.manual_seed(2)
    ref, ours = _pair(dim=6, codebook_size=16, num_quantizers=3)
    x = torch.randn(2, 9, 6)
    mask = torch.rand(2, 9) > 0.3
    (qr, ir, _), (qo, io, _) = ref(x, mask=mask), ours(x, mask=mask)
    assert torch.equal(io, ir)
    torch.testing.assert_close(qo, qr, rtol=1e-6, atol=1e-6)
    ref, ours = _pair(dim=5, codebook_size=32, num_quantizers=4)
    ref.eval(), ours.eval()
    lo = (torch.randn(4, 50, 5) * 2).bfloat16()
    (qr, ir, _), (qo, io, _) = ref(lo), ours(lo)
    assert qo.dtype == qr.dtype == torch.bfloat16 and torch.equal(io[..., 0], ir[..., 0])
    q32, i32, _ = ours(lo.float())
    assert torch.equal(io, i32) and torch.equal(qo, q32.bfloat16())


def test_grouped_residual_lfq_agrees():
    torch.manual_seed(3)
    kw = dict(dim=12, groups=2, codebook_size=16, num_quantizers=3, commitment_loss_weight=0.5)
    ref, ours = _pair("GroupedResidualLFQ", **kw)
    x0 = torch.randn(2, 11, 12)
    outs = []
    for m in (ref, ours):
        x = x0.clone().requires_grad_()
        q, idx, losses = m(x)
        (q.square().mean() + losses.sum()).backward()
        outs.append((q.detach(), idx, losses.detach(), x.grad))
    (qr, ir, lr, gr), (qo, io, lo, go) = outs
    assert io.shape == ir.shape == (2, 2, 11, 3) and torch.equal(io, ir)
    assert lo.shape == lr.shape == (2, 3)
    torch.testing.assert_close(qo, qr, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lo, lr, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(go, gr, rtol=1e-3, atol=1e-6)
    ref.eval(), ours.eval()
    (qr, ir, _, cr), (qo, io, _, co) = (
        ref(x0, return_all_codes=True),
        ours(x0, return_all_codes=True),
    )
    assert torch.equal(qo, qr) and torch.equal(io, ir)
    assert all(torch.equal(a, b) for a, b in zip(co, cr, strict=True))
    assert torch.equal(ours.get_output_from_indices(io), ref.get_output_from_indices(ir))
    assert torch.equal(ours.codebooks, ref.codebooks)


def test_native_and_front_end_share_the_stack():
    """The front end is the native ResidualLFQ with vqp's options: the same module arithmetic."""
    torch.manual_seed(4)
    ours = fastvq_vqp.ResidualLFQ(dim=6, codebook_size=16, num_quantizers=3)
    native = fastvq.ResidualLFQ(16, 3, dim=6, inv_temperature=100.0, prob_floor=1e-5)
    native.load_state_dict(ours.state_dict(), strict=False)
    x = torch.randn(3, 5, 6)
    (qo, io, lo), out = ours(x), native(x, return_losses=True)
    assert torch.equal(qo, out.quantized) and torch.equal(io, out.indices)
    assert torch.equal(lo, out.losses)


@pytest.mark.parametrize(
    "cls, kwargs, name",
    [
        ("ResidualLFQ", dict(orthogonal_rotation=True), "orthogonal_rotation"),
        ("ResidualLFQ", dict(cosine_sim_project_in=True), "cosine_sim_project_in"),
        ("ResidualLFQ", dict(experimental_softplus_entropy_loss=True),
         "experimental_softplus_entropy_loss"),
        ("ResidualLFQ", dict(straight_through_activation=torch.nn.Tanh()),
         "straight_through_activation"),
        ("ResidualLFQ", dict(num_codebooks=2), "num_codebooks"),
        ("ResidualLFQ", dict(has_projections=True), "has_projections"),
        ("ResidualLFQ", dict(force_quantization_f32=False), "force_quantization_f32"),
        ("GroupedResidualLFQ", dict(accept_image_fmap=True), "accept_image_fmap"),
    ],
)  # fmt: skip
def test_unsupported_arguments_raise_naming_them(cls, kwargs, name):
    with pytest.raises(NotImplementedError, match=name):
        getattr(fastvq_vqp, cls)(dim=8, codebook_size=16, num_quantizers=2, **kwargs)


def test_bad_arguments_raise_as_vqp():
    with pytest.raises(TypeError, match="codebook_scale"):
        fastvq_vqp.ResidualLFQ(dim=8, codebook_size=16, num_quantizers=2, codebook_scale=2.0)
    with pytest.raises(ValueError, match="power of 2"):
        fastvq_vqp.ResidualLFQ(dim=8, codebook_size=12, num_quantizers=2)
    with pytest.raises(ValueError, match="divisible"):
        fastvq_vqp.GroupedResidualLFQ(dim=9, groups=2, codebook_size=16, num_quantizers=2)


# --- vqp's own residual LFQ test, re-written to run on both (smaller: 1 x 64 x 32) -------------


@pytest.fixture(params=sorted(IMPLS))
def impl(request):
    return IMPLS[request.param]


def test_rflq(impl):
    torch.manual_seed(0)
    residual_lfq = impl.ResidualLFQ(dim=32, codebook_size=256, num_quantizers=4)
    x = torch.randn(1, 64, 32)
    residual_lfq.eval()
    quantized, indices, commit_loss = residual_lfq(x)
    assert quantized.shape == x.shape and indices.shape == (1, 64, 4)
    assert commit_loss.shape == (4,)
    quantized_out = residual_lfq.get_output_from_indices(indices)
    assert torch.all(quantized == quantized_out)


def test_grouped_rflq_readme(impl):
    torch.manual_seed(0)
    model = impl.GroupedResidualLFQ(dim=32, groups=4, codebook_size=256, num_quantizers=2)
    model.eval()
    x = torch.randn(2, 20, 32)
    quantized, indices, losses = model(x)
    assert quantized.shape == x.shape and indices.shape == (4, 2, 20, 2)
    assert losses.shape == (4, 2)
    assert torch.all(quantized == model.get_output_from_indices(indices))
