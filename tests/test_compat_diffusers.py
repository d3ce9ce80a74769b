"""fastvq.compat.diffusers against diffusers' own ``VQModel`` and ``VectorQuantizer``.

Tiny models built from a config with random weights (nothing is downloaded). The original and a
deep copy whose quantizer is swapped for fastvq's must agree to fp32 rounding: indices
identical, model outputs, ``commit_loss`` and every parameter's gradient within
``torch.testing.assert_close``'s fp32 tolerance (rtol 1.3e-6, atol 1e-5), over two SGD steps.

Near-ties: diffusers picks codes by ``argmin(torch.cdist(...))``, whose matmul form rounds
distances differently from fastvq's fp32 search, so a row whose two nearest codes are within
that rounding could get different indices, fastvq's being the exact one. ``check_no_near_tie``
asserts that every compared row's two nearest codes are apart by more than that rounding (in
fp64), so index equality is the right expectation and no test passes or fails by luck.
"""

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytestmark = pytest.mark.extras  # `pip install -e ".[compat]"`
from diffusers import VQModel  # noqa: E402
from diffusers.models.autoencoders.vae import VectorQuantizer as DiffusersVQ  # noqa: E402
from test_compat_taming import check_no_near_tie  # noqa: E402

from fastvq.compat.diffusers import VectorQuantizer, swap_quantizer  # noqa: E402

CONFIG = dict(
    in_channels=3, out_channels=3, block_out_channels=(32,), layers_per_block=1,
    latent_channels=4, num_vq_embeddings=64, norm_num_groups=8, sample_size=16,
)  # fmt: skip


def _model(legacy: bool) -> VQModel:
    """A tiny VQModel whose codebook spreads over its latents, as a trained codebook does (the
    default uniform(-1/K, 1/K) init puts all 64 codes within 0.02 of 0, where the nearest code
    of an O(1) latent is decided by differences near fp32 rounding)."""
    torch.manual_seed(0)
    model = VQModel(**CONFIG)
    model.quantize.legacy = legacy  # VQModel always builds legacy=True; theirs reads it per call
    with torch.no_grad():
        h = model.encode(torch.randn(4, 3, 16, 16)).latents
        model.quantize.embedding.weight.normal_().mul_(h.std())
    return model


def _assert_grads_equal(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    named = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None and named[name].grad is not None, name
        torch.testing.assert_close(p.grad, named[name].grad, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "nonlegacy"])
def test_swapped_vqmodel_matches_diffusers(legacy, train):
    theirs = _model(legacy).train(train)
    ours = swap_quantizer(copy.deepcopy(theirs))
    assert isinstance(ours.quantize, VectorQuantizer) and isinstance(theirs.quantize, DiffusersVQ)
    assert ours.quantize.legacy is legacy and ours.quantize.training is train
    opt_t = torch.optim.SGD(theirs.parameters(), lr=0.05)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.05)
    torch.manual_seed(1)
    for _ in range(2):
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            h = theirs.encode(x).latents
            rows = h.permute(0, 2, 3, 1).reshape(-1, 4)
            check_no_near_tie(rows, theirs.quantize.embedding.weight)
            q_t, loss_t, (ppl_t, enc_t, idx_t) = theirs.quantize(h)
            q_o, loss_o, (ppl_o, enc_o, idx_o) = ours.quantize(h)
        assert ppl_t is ppl_o is None and enc_t is enc_o is None
        assert torch.equal(idx_o, idx_t) and idx_o.shape == (2 * 16 * 16,)
        torch.testing.assert_close(q_o, q_t)
        torch.testing.assert_close(loss_o, loss_t)

        out_t, out_o = theirs(x), ours(x)
        torch.testing.assert_close(out_o.sample, out_t.sample)
        torch.testing.assert_close(out_o.commit_loss, out_t.commit_loss)
        for out, opt in ((out_t, opt_t), (out_o, opt_o)):
            opt.zero_grad()
            (out.sample.square().mean() + out.commit_loss).backward()
        _assert_grads_equal(ours, theirs)
        opt_t.step()
        opt_o.step()
    # the codebook was trained by both (legacy decides the codebook term's weight)
    torch.testing.assert_close(ours.quantize.embedding.weight, theirs.quantize.embedding.weight)


def test_state_dict_keys_and_strict_loading(tmp_path):
    theirs = _model(legacy=True)
    ours = swap_quantizer(copy.deepcopy(theirs))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert "quantize.embedding.weight" in ours.state_dict()
    fresh = swap_quantizer(VQModel(**CONFIG))  # other random weights
    fresh.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(fresh.state_dict(), strict=True)
    # a checkpoint written by diffusers, loaded by diffusers, then swapped: same outputs
    theirs.save_pretrained(tmp_path)
    loaded = swap_quantizer(VQModel.from_pretrained(tmp_path))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).sample, theirs(x).sample)
    # and a swapped model's save_pretrained is a diffusers checkpoint
    ours.save_pretrained(tmp_path / "ours")
    back = VQModel.from_pretrained(tmp_path / "ours")
    assert isinstance(back.quantize, DiffusersVQ)
    for k, v in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@pytest.mark.parametrize("sane", [False, True], ids=["flat", "sane"])
@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "nonlegacy"])
def test_quantizer_module_matches_diffusers(legacy, sane):
    torch.manual_seed(2)
    theirs = DiffusersVQ(32, 5, beta=0.3, sane_index_shape=sane, legacy=legacy)
    theirs.embedding.weight.data.normal_()
    ours = VectorQuantizer.from_quantizer(theirs)
    z = torch.randn(3, 5, 4, 6)
    check_no_near_tie(z.permute(0, 2, 3, 1).reshape(-1, 5), theirs.embedding.weight)
    zt, zo = z.clone().requires_grad_(), z.clone().requires_grad_()
    q_t, loss_t, (_, _, idx_t) = theirs(zt)
    q_o, loss_o, (_, _, idx_o) = ours(zo)
    assert torch.equal(idx_o, idx_t)
    assert idx_o.shape == ((3, 4, 6) if sane else (3 * 4 * 6,))
    torch.testing.assert_close(q_o, q_t)
    torch.testing.assert_close(loss_o, loss_t)
    w = torch.randn_like(q_t)  # an upstream gradient that is not all ones
    ((q_t * w).sum() + loss_t).backward()
    ((q_o * w).sum() + loss_o).backward()
    torch.testing.assert_close(zo.grad, zt.grad)
    torch.testing.assert_close(ours.embedding.weight.grad, theirs.embedding.weight.grad)
    for shape in ((3, 4, 6, 5), None):
        flat = idx_t.reshape(-1)
        torch.testing.assert_close(
            ours.get_codebook_entry(flat, shape), theirs.get_codebook_entry(flat, shape)
        )


def test_vqmodel_decode_lookup_from_codebook():
    torch.manual_seed(3)
    theirs = VQModel(**CONFIG, lookup_from_codebook=True).eval()
    ours = swap_quantizer(copy.deepcopy(theirs))
    idx = torch.randint(0, 64, (2 * 16 * 16,))
    with torch.no_grad():
        dec_t = theirs.decode(idx, force_not_quantize=True, shape=(2, 16, 16, 4)).sample
        dec_o = ours.decode(idx, force_not_quantize=True, shape=(2, 16, 16, 4)).sample
    assert torch.equal(dec_o, dec_t)  # a plain lookup: bit-identical


def test_swap_keeps_mode_dtype_trainability_and_is_idempotent():
    model = VQModel(**CONFIG).eval().to(torch.bfloat16)
    model.quantize.embedding.weight.requires_grad_(False)
    swap_quantizer(model)
    q = model.quantize
    assert isinstance(q, VectorQuantizer) and not q.training
    assert q.embedding.weight.dtype == torch.bfloat16 and not q.embedding.weight.requires_grad
    assert swap_quantizer(model).quantize is q


def test_remap_raises_not_implemented(tmp_path):
    used = tmp_path / "used.npy"
    np.save(used, np.arange(0, 64, 2))
    theirs = DiffusersVQ(64, 4, beta=0.25, remap=str(used))
    with pytest.raises(NotImplementedError, match="remap"):
        VectorQuantizer.from_quantizer(theirs)
    with pytest.raises(NotImplementedError, match="remap"):
        VectorQuantizer(64, 4, 0.25, remap=str(used))
