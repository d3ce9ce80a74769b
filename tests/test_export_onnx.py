"""ONNX export (torch.onnx.export, dynamo=True) of an eval VectorQuantizer and of the VQ-VAE's
encode -> indices and decode_indices, run in onnxruntime: indices equal to eager on every row
without a near-tie (docs/export.md: another GEMM library may order a true near-tie either way),
outputs equal to fp32 rounding. Needs the ``export`` extra (onnx, onnxruntime, onnxscript)."""

from __future__ import annotations

import pytest
import torch

import fastvq
from fastvq.models.vqvae import VQVAE, VQVAEConfig

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from export_helpers import BATCH, DecodeIndices, Encode  # noqa: E402

pytestmark = pytest.mark.extras


def _session(module, example, path):
    program = torch.onnx.export(
        module, (example,), dynamic_shapes=({0: BATCH},), dynamo=True, verbose=False
    )
    program.save(str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(session, x):
    (name,) = [i.name for i in session.get_inputs()]
    return [torch.from_numpy(o) for o in session.run(None, {name: x.numpy()})]


def _clear_rows(rows, codes, rel=1e-4):
    """bool (N,): rows whose two nearest codes (fp64 squared distances) differ by more than
    ``rel`` (relative): no GEMM's rounding can swap them."""
    d = (rows.double()[:, None, :] - codes.double()[None]).square().sum(-1)
    two = d.topk(2, dim=1, largest=False).values
    return (two[:, 1] - two[:, 0]) > rel * (1 + two[:, 0])


def test_onnx_vector_quantizer_matches_eager(tmp_path):
    torch.manual_seed(0)
    q = fastvq.VectorQuantizer(16, 64).eval()
    session = _session(q, torch.randn(2, 10, 16), tmp_path / "vq.onnx")
    x = torch.randn(7, 10, 16)  # another batch size than the traced one
    quantized, indices, loss = _run(session, x)
    want = q(x)
    clear = _clear_rows(x.reshape(-1, 16), q.book.codes()[0]).reshape(7, 10)
    assert clear.float().mean() > 0.95
    assert indices.dtype == torch.int64 and indices.shape == (7, 10)
    assert torch.equal(indices[clear], want.indices[clear])
    same = indices == want.indices
    torch.testing.assert_close(quantized[same], want.quantized[same], rtol=0, atol=0)
    torch.testing.assert_close(loss, want.loss, rtol=1e-5, atol=1e-7)


def test_onnx_vqvae_encode_and_decode_indices_match_eager(tmp_path):
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(codebook_size=64)).eval()
    enc = _session(Encode(model).eval(), torch.randn(2, 1, 28, 28), tmp_path / "enc.onnx")
    dec = _session(
        DecodeIndices(model).eval(), torch.zeros(2, 7, 7, dtype=torch.int64), tmp_path / "dec.onnx"
    )
    x = torch.randn(5, 1, 28, 28)
    (indices,) = _run(enc, x)
    want = model.encode(x)[1]
    with torch.no_grad():
        rows = model.encoder(x).permute(0, 2, 3, 1).reshape(-1, model.cfg.dim)
    clear = _clear_rows(rows, model.vq.book.codes()[0]).reshape(5, 7, 7)
    assert clear.float().mean() > 0.95
    assert torch.equal(indices[clear], want[clear])
    (images,) = _run(dec, want)
    with torch.no_grad():
        torch.testing.assert_close(images, model.decode_indices(want), rtol=1e-5, atol=1e-5)
