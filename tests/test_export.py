"""torch.export of an eval VectorQuantizer and of the VQ-VAE's encode -> indices and
decode_indices (docs/export.md): the exported programs equal the eager modules bit for bit at
batch sizes other than the traced one, and hold aten ops only (no fastvq custom op), so they run
where fastvq is not installed and convert to ONNX (tests/test_export_onnx.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from export_helpers import BATCH, DecodeIndices, Encode

import fastvq
from fastvq._search_torch import _scale_of, _scale_of_graph
from fastvq.models.vqvae import VQVAE, VQVAEConfig


def _export(module, example):
    return torch.export.export(module, (example,), dynamic_shapes=({0: BATCH},))


def _assert_aten_only(ep):
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("fastvq" in t for t in targets), sorted(targets)


LAYERS = {
    "default": dict(dim=16, codebook_size=64),
    "heads-channel-first": dict(dim=16, codebook_size=64, heads=2, channel_first=True),
    "cosine-projected": dict(dim=12, codebook_size=40, codebook_dim=6, cosine=True),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_export_vector_quantizer_equals_eager(name):
    torch.manual_seed(0)
    q = fastvq.VectorQuantizer(**LAYERS[name]).eval()
    dim = LAYERS[name]["dim"]
    cf = LAYERS[name].get("channel_first", False)
    shape = (lambda b: (b, dim, 5)) if cf else (lambda b: (b, 5, dim))
    ep = _export(q, torch.randn(shape(3)))
    _assert_aten_only(ep)
    run = ep.module()
    for b in (1, 2, 17):
        x = torch.randn(shape(b))
        want = q(x)
        got = run(x)
        assert got[1].dtype == torch.int64
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)


def test_export_vqvae_encode_and_decode_indices_equal_eager():
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(codebook_size=64)).eval()
    enc = _export(Encode(model).eval(), torch.randn(2, 1, 28, 28))
    dec = _export(DecodeIndices(model).eval(), torch.zeros(2, 7, 7, dtype=torch.int64))
    _assert_aten_only(enc)
    _assert_aten_only(dec)
    for b in (1, 5):
        x = torch.randn(b, 1, 28, 28)
        idx = enc.module()(x)
        assert torch.equal(idx, model.encode(x)[1]) and idx.shape == (b, 7, 7)
        assert torch.equal(dec.module()(idx), model.decode_indices(idx))


def test_saved_program_runs_without_fastvq(tmp_path):
    # torch.export.save / load of the VQ-VAE's encoder in a process where importing fastvq
    # fails: the graph is aten only (docs/export.md)
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(codebook_size=64)).eval()
    torch.export.save(_export(Encode(model).eval(), torch.randn(2, 1, 28, 28)), tmp_path / "e.pt2")
    x = torch.randn(3, 1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys; sys.modules['fastvq'] = None\n"  # any import of fastvq raises
        "import torch\n"
        f"ep = torch.export.load({str(tmp_path / 'e.pt2')!r})\n"
        f"torch.save(ep.module()(torch.load({str(tmp_path / 'x.pt')!r})), "
        f"{str(tmp_path / 'idx.pt')!r})\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "idx.pt"), model.encode(x)[1])


def test_exported_decoder_fails_on_an_index_out_of_range():
    # the eager ValueError is a host-side check; the exported graph's gather raises instead
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(codebook_size=64)).eval()
    dec = _export(DecodeIndices(model).eval(), torch.zeros(2, 7, 7, dtype=torch.int64))
    bad = torch.zeros(1, 7, 7, dtype=torch.int64)
    bad[0, 3, 3] = 64
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 64\)"):
        model.decode_indices(bad)
    with pytest.raises((IndexError, RuntimeError)):
        dec.module()(bad)


def test_export_empty_batch_is_valid():
    torch.manual_seed(0)
    q = fastvq.VectorQuantizer(8, 32).eval()
    ep = torch.export.export(q, (torch.randn(0, 8),))
    got = ep.module()(torch.randn(0, 8))
    assert got[0].shape == (0, 8) and got[1].shape == (0,)


def test_scale_of_graph_equals_frexp_scale():
    # The exported graph's power-of-two scale (log2 and exact corrections, no frexp or bit cast)
    # against the eager one (frexp), on every power of two and its neighbours from the smallest
    # subnormal to the largest fp32, zero, and random magnitudes.
    p = torch.exp2(torch.arange(-149, 128, dtype=torch.float64)).float()
    vals = torch.cat([
        torch.tensor([0.0, torch.finfo(torch.float32).max]), p,
        torch.nextafter(p, torch.tensor(0.0)), torch.nextafter(p, torch.tensor(float("inf"))),
        torch.rand(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        .mul(260).sub(149).exp2().float(),
    ])  # fmt: skip
    vals = vals[torch.isfinite(vals)]
    want = torch.stack([_scale_of(v) for v in vals])
    got = torch.stack([_scale_of_graph(v) for v in vals])
    assert torch.equal(got, want)
