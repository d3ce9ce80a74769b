"""The CE-commitment and diversity losses on both backends of ``fastvq.soft_assign`` (Triton
interpreted on CPU), against the literal fp64 N x K formulas: on CUDA the losses take the
kernels (``backend="auto"``), on CPU the torch twin, and both must give the literal value and
gradient."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from test_codebook_losses import _close, _gen, _grads, _ref_ce, _ref_diversity

from fastvq import codebook_losses as cl
from fastvq.soft_assignment import soft_assign


@pytest.fixture
def on_backend(monkeypatch, backend):
    """The losses' op calls pinned to ``backend``."""
    monkeypatch.setattr(cl, "soft_assign", functools.partial(soft_assign, backend=backend))
    return backend


@pytest.mark.parametrize("cosine", [False, True])
def test_ce_on_both_backends(on_backend, cosine, one_thread):
    g = _gen(31)
    z = torch.randn(45, 6, generator=g)
    codes = torch.randn(70, 6, generator=g)
    if cosine:
        z, codes = F.normalize(z, dim=1), F.normalize(codes, dim=1)
    y = torch.randint(-1, 70, (45,), generator=g)  # -1: ignored rows
    val, (gz, gc) = _grads(lambda a, b: cl.ce_commitment_loss(a, b, y, cosine=cosine), z, codes)
    ref, (rz, rc) = _grads(lambda a, b: _ref_ce(a, b, y, cosine=cosine), z.double(), codes.double())
    _close(val, ref)
    _close(gz, rz, atol=1e-6)
    _close(gc, rc, atol=1e-6)


@pytest.mark.parametrize("zshape", [(45, 6), (9, 5, 6)])
def test_diversity_on_both_backends(on_backend, zshape, one_thread):
    g = _gen(32)
    z = torch.randn(*zshape, generator=g)
    codes = torch.randn(70, 6, generator=g)
    val, (gz, gc) = _grads(lambda a, b: cl.diversity_loss(a, b, temperature=4.0), z, codes)
    z3 = z if z.dim() == 3 else z[:, None]
    ref, (rz, rc) = _grads(lambda a, b: _ref_diversity(a, b, 4.0), z3.double(), codes.double())
    _close(val, ref)
    _close(gz, rz.reshape(gz.shape), atol=1e-6)
    _close(gc, rc, atol=1e-6)
