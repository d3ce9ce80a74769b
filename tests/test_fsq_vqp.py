"""fastvq.compat.vqp's FSQ, ResidualFSQ and GroupedResidualFSQ against the installed
vector-quantize-pytorch 1.32 ("vqp"): outputs, indices (values and dtype), input gradients,
``state_dict`` keys, bf16 inputs, residual forms over several training steps; then vqp's own FSQ
test functions, re-written (as tests/test_vqp_scenarios.py) to run on both.

Upstream file, as stored in the code index: tests/test_readme.py at
dde8ed293321806fc0af94775c0d380d9c109183 (``test_fsq``, ``test_fsq_without_indices``,
``test_rfsq``); no upstream code is copied.
"""

import pytest
import torch

import fastvq.compat.vqp as fastvq_vqp

vqp = pytest.importorskip("vector_quantize_pytorch")

IMPLS = {"vqp": vqp, "fastvq": fastvq_vqp}
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.extras]


def _pair(cls: str, **kwargs):
    ref = getattr(vqp, cls)(**kwargs)
    ours = getattr(fastvq_vqp, cls)(**kwargs)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _grads(x, outs, g):
    return [torch.autograd.grad((o * g.to(o.dtype)).float().sum(), x)[0] for o in outs]


@pytest.mark.parametrize("bound_hard_clamp", [False, True])
@pytest.mark.parametrize("preserve_symmetry", [False, True])
@pytest.mark.parametrize(
    "levels, dim, num_codebooks",
    [([8, 5, 5, 5], None, 1), ([7, 6, 3], None, 2), ([8, 8, 8, 5, 5, 5], 16, 1), ([5, 4], 9, 3)],
)
def test_fsq_agrees(levels, dim, num_codebooks, preserve_symmetry, bound_hard_clamp):
    torch.manual_seed(0)
    ref, ours = _pair(
        "FSQ", levels=levels, dim=dim, num_codebooks=num_codebooks,
        preserve_symmetry=preserve_symmetry, bound_hard_clamp=bound_hard_clamp,
    )  # fmt: skip
    d = ref.dim
    x = (torch.randn(2, 41, d) * 1.5).requires_grad_()
    (qr, ir), (qo, io) = ref(x), ours(x)
    assert io.dtype == ir.dtype == torch.int32 and io.shape == ir.shape
    assert torch.equal(qo, qr) and torch.equal(io, ir)
    gr, go = _grads(x, (qr, qo), torch.randn_like(qr))
    assert torch.equal(go, gr)
    assert torch.equal(ours.indices_to_codes(io), ref.indices_to_codes(ir))
    assert ours.codebook_size == ref.codebook_size


@pytest.mark.parametrize("preserve_symmetry", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fsq_agrees_low_precision(dtype, preserve_symmetry):
    """vqp rounds in fp32 (``force_quantization_f32``) and returns x's dtype: as fastvq."""
    torch.manual_seed(1)
    ref, ours = _pair("FSQ", levels=[8, 8, 8, 5, 5, 5], preserve_symmetry=preserve_symmetry)
    x = (torch.randn(3, 50, 6) * 2).to(dtype).requires_grad_()
    (qr, ir), (qo, io) = ref(x), ours(x)
    assert qo.dtype == qr.dtype == dtype
    assert torch.equal(qo, qr) and torch.equal(io, ir) and int(io.max()) > 2048
    g = torch.randn(qr.shape).to(dtype)
    gr, go = _grads(x, (qr, qo), g)
    assert torch.equal(go, gr)


@pytest.mark.parametrize("channel_first", [False, True])
def test_fsq_agrees_on_image_layouts(channel_first):
    torch.manual_seed(2)
    ref, ours = _pair("FSQ", levels=[8, 5, 5], dim=12, num_codebooks=2, channel_first=channel_first)
    x = torch.randn(2, 12, 5, 3)
    (qr, ir), (qo, io) = ref(x), ours(x)
    assert qo.shape == qr.shape == x.shape and io.shape == ir.shape == (2, 5, 3, 2)
    assert torch.equal(qo, qr) and torch.equal(io, ir)
    assert torch.equal(ours.indices_to_codes(io), ref.indices_to_codes(ir))
    if channel_first:
        x3 = torch.randn(2, 12, 7)
        assert torch.equal(ours(x3)[0], ref(x3)[0]) and torch.equal(ours(x3)[1], ref(x3)[1])
    assert torch.equal(ours.implicit_codebook, ref.implicit_codebook)


@pytest.mark.parametrize("dim, dropout", [(None, False), (16, False), (16, True)])
def test_residual_fsq_agrees_over_steps(dim, dropout):
    """Four SGD steps of an encoder into the stack, each implementation from the same start:
    outputs, indices, gradients and the updated weights agree at every step (dropout draws
    from the same ``rand_quantize_dropout_fixed_seed``)."""
    torch.manual_seed(3)
    kw = dict(levels=[8, 5, 5, 3], num_quantizers=4, dim=dim, quantize_dropout=dropout)
    ref, ours = _pair("ResidualFSQ", **kw)
    d = dim or 4
    enc_r = torch.nn.Linear(6, d)
    enc_o = torch.nn.Linear(6, d)
    enc_o.load_state_dict(enc_r.state_dict())
    params_r = list(enc_r.parameters()) + list(ref.parameters())
    params_o = list(enc_o.parameters()) + list(ours.parameters())
    opt_r, opt_o = torch.optim.SGD(params_r, lr=0.1), torch.optim.SGD(params_o, lr=0.1)
    for step in range(4):
        x = torch.randn(2, 30, 6)
        seed = 1000 + step
        qr, ir = ref(enc_r(x), rand_quantize_dropout_fixed_seed=seed)
        qo, io = ours(enc_o(x), rand_quantize_dropout_fixed_seed=seed)
        assert io.dtype == ir.dtype and torch.equal(io, ir) and torch.equal(qo, qr)
        for opt, q in ((opt_r, qr), (opt_o, qo)):
            opt.zero_grad()
            (q - x[..., :1]).square().mean().backward()
            opt.step()
        for a, b in zip(params_r, params_o, strict=True):
            assert torch.equal(a, b), step
    ref.eval(), ours.eval()
    x = torch.randn(2, 30, d)
    (qr, ir), (qo, io) = ref(x), ours(x)
    assert torch.equal(qo, qr) and torch.equal(io, ir) and ir.dtype == torch.int32
    assert torch.equal(ours.get_output_from_indices(io), ref.get_output_from_indices(ir))
    assert torch.equal(ours.get_codes_from_indices(io), ref.get_codes_from_indices(ir))
    assert torch.equal(ours.codebooks, ref.codebooks)


def test_residual_fsq_dropout_indices_and_bf16():
    torch.manual_seed(4)
    ref, ours = _pair(
        "ResidualFSQ", levels=[5, 5, 5], num_quantizers=6, quantize_dropout=True,
        quantize_dropout_multiple_of=2,
    )  # fmt: skip
    x = torch.randn(2, 20, 3).to(torch.bfloat16).requires_grad_()
    for seed in range(5):
        (qr, ir), (qo, io) = (
            m(x, rand_quantize_dropout_fixed_seed=seed) for m in (ref, ours)
        )  # fmt: skip
        assert ir.dtype == io.dtype and torch.equal(io, ir) and torch.equal(qo, qr)
        gr, go = _grads(x, (qr, qo), torch.randn(qr.shape))
        assert torch.equal(go, gr)


def test_residual_fsq_channel_first_and_soft_clamp():
    torch.manual_seed(5)
    ref, ours = _pair(
        "ResidualFSQ", levels=[7, 5], num_quantizers=3, dim=8, is_channel_first=True,
        bound_hard_clamp=False, soft_clamp_input_value=1.5,
    )  # fmt: skip
    x = torch.randn(2, 8, 11)
    (qr, ir), (qo, io) = ref(x), ours(x)
    assert io.shape == ir.shape == (2, 3, 11) and torch.equal(io, ir) and torch.equal(qo, qr)


def test_grouped_residual_fsq_agrees():
    torch.manual_seed(6)
    ref, ours = _pair("GroupedResidualFSQ", dim=12, groups=2, levels=[8, 5, 5], num_quantizers=3)
    x = torch.randn(2, 17, 12).requires_grad_()
    (qr, ir), (qo, io) = ref(x), ours(x)
    assert io.shape == ir.shape == (2, 2, 17, 3) and torch.equal(io, ir) and torch.equal(qo, qr)
    gr, go = _grads(x, (qr, qo), torch.randn_like(qr))
    assert torch.equal(go, gr)
    ref.eval(), ours.eval()
    (qr, ir), (qo, io) = ref(x), ours(x)
    assert torch.equal(ours.get_output_from_indices(io), ref.get_output_from_indices(ir))
    assert torch.equal(ours.codebooks, ref.codebooks)


@pytest.mark.parametrize(
    "cls, kwargs, name",
    [
        ("FSQ", dict(levels=[5, 5], orthogonal_rotation=True), "orthogonal_rotation"),
        ("FSQ", dict(levels=[5, 5], force_quantization_f32=False), "force_quantization_f32"),
        ("FSQ", dict(levels=[5, 5], allowed_dtypes=(torch.bfloat16,)), "allowed_dtypes"),
        ("ResidualFSQ", dict(levels=[5], num_quantizers=2, num_codebooks=2), "num_codebooks"),
        ("ResidualFSQ", dict(levels=[5], num_quantizers=2, orthogonal_rotation=True),
         "orthogonal_rotation"),
    ],
)  # fmt: skip
def test_unsupported_arguments_raise_naming_them(cls, kwargs, name):
    with pytest.raises(NotImplementedError, match=name):
        getattr(fastvq_vqp, cls)(**kwargs)


# --- vqp's own tests (tests/test_readme.py), on both ---------------------------------------------


@pytest.fixture(params=sorted(IMPLS))
def lib(request):
    return IMPLS[request.param]


@pytest.mark.parametrize("preserve_symmetry", [True, False])
@pytest.mark.parametrize("bound_hard_clamp", [True, False])
def test_vqp_readme_fsq(lib, preserve_symmetry, bound_hard_clamp):
    quantizer = lib.FSQ(
        [8, 5, 5, 5], preserve_symmetry=preserve_symmetry, bound_hard_clamp=bound_hard_clamp
    )
    x = torch.randn(1, 256, 4)
    xhat, indices = quantizer(x)
    assert torch.all(xhat == quantizer.indices_to_codes(indices))


def test_vqp_readme_fsq_without_indices(lib):
    quantizer = lib.FSQ([8, 5, 5, 5], return_indices=False)
    xhat, indices = quantizer(torch.randn(1, 256, 4))
    assert indices is None and xhat.shape == (1, 256, 4)


def test_vqp_readme_rfsq(lib):
    residual_fsq = lib.ResidualFSQ(dim=64, levels=[8, 5, 5, 3], num_quantizers=8)
    x = torch.randn(1, 256, 64)
    residual_fsq.eval()
    quantized, indices = residual_fsq(x)
    assert torch.all(quantized == residual_fsq.get_output_from_indices(indices))
