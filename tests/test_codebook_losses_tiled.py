"""The auxiliary losses tiled over rows AND codes: literal values and gradients with many code
tiles, bounded memory at a shape where one N x K fp32 matrix is 4 GiB, and the layer's options
under ``torch.compile(fullgraph=True)``."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

# the literal fp64 references and the comparison helpers of the untiled tests
from test_codebook_losses import _close, _gen, _grads, _ref_diversity, _ref_logits

from fastvq import VectorQuantizer
from fastvq import codebook_losses as cl
from fastvq.codebook_losses import ce_commitment_loss, diversity_loss, orthogonal_loss

# --- many code tiles ----------------------------------------------------------------------------


@pytest.mark.parametrize("tile", [1, 24, 100])
@pytest.mark.parametrize("zshape", [(63, 5), (6, 7, 5)])
@pytest.mark.parametrize("cosine", [False, True])
def test_diversity_many_code_tiles_matches_literal(monkeypatch, tile, zshape, cosine):
    # TILE_ELEMS this small splits K = 23 codes into several tiles (and rows into tiles of 16):
    # the streamed logsumexp and the two-pass backward, not the one-tile path.
    monkeypatch.setattr(cl, "TILE_ELEMS", tile)
    g = _gen(tile + len(zshape))
    z = torch.randn(zshape, generator=g)
    codes = torch.randn(23, 5, generator=g)
    if cosine:
        z, codes = F.normalize(z, dim=-1), F.normalize(codes, dim=-1)
    for temp in (2.5, 100.0):
        val, (gz, gc) = _grads(
            lambda a, b, t=temp: diversity_loss(a, b, temperature=t, chunk=10, cosine=cosine),
            z,
            codes,
        )
        z3 = z if z.dim() == 3 else z[:, None]
        ref, (rz, rc) = _grads(
            lambda a, b, t=temp: _ref_diversity(a, b, t, cosine), z3.double(), codes.double()
        )
        # at temperature 100 fp32 rounding alone is ~1.6e-5 (the untiled implementation too)
        atol = 1e-5 if temp < 10 else 5e-5
        _close(val, ref)
        _close(gz, rz.view(zshape), atol=atol)
        _close(gc, rc, atol=atol)


@pytest.mark.parametrize("tile", [1, 24, 100])
@pytest.mark.parametrize("cosine", [False, True])
def test_ce_many_code_tiles_matches_literal(monkeypatch, tile, cosine):
    monkeypatch.setattr(cl, "TILE_ELEMS", tile)
    g = _gen(tile)
    z = torch.randn(40, 5, generator=g)
    codes = torch.randn(17, 5, generator=g)
    if cosine:
        z, codes = F.normalize(z, dim=-1), F.normalize(codes, dim=-1)
    z[3] = codes[5]  # the distance clamp's zero gradient
    y = torch.randint(0, 17, (40,), generator=g)
    y[::4] = -1
    val, (gz, gc) = _grads(
        lambda a, b: ce_commitment_loss(a, b, y, chunk=7, cosine=cosine), z, codes
    )
    ref, (rz, rc) = _grads(
        lambda a, b: F.cross_entropy(_ref_logits(a, b, cosine), y, ignore_index=-1),
        z.double(),
        codes.double(),
    )
    _close(val, ref)
    _close(gz, rz, atol=1e-5)
    _close(gc, rc, atol=1e-5)


def test_tiles_stay_within_the_tile_budget():
    for chunk, k in ((4096, 65536), (4096, 8192), (1, 10), (4096, 1 << 22), (7, 3)):
        rows, codes = cl._tiles(chunk, k)
        assert 1 <= rows <= chunk and 1 <= codes <= k
        assert rows * codes <= max(cl.TILE_ELEMS, rows)


def test_orthogonal_active_mask_matches_selection():
    # the masked (sync-free) active-codes path equals the literal loss on the selected codes
    g = _gen(3)
    codes = torch.randn(2, 30, 6, generator=g)
    codes[0, 4] = float("nan")  # an inactive code reaches nothing
    active = torch.rand(2, 30, generator=g) > 0.5
    active[:, 4] = False
    for mask in (active[1], active):
        val, (gc,) = _grads(lambda c, m=mask: orthogonal_loss(c, active=m), codes)
        assert torch.isfinite(gc).all() and (gc[0, 4] == 0).all()
        terms = []
        for h in range(2):
            sel = codes[h, mask if mask.dim() == 1 else mask[h]].double()
            u = sel / sel.norm(dim=-1, keepdim=True).clamp(min=1e-6)
            m = sel.shape[0]
            terms.append((u @ u.t()).square().sum() / m**2 - 1 / m)
        _close(val, sum(terms) / 2)
    assert orthogonal_loss(codes, active=torch.zeros(30, dtype=torch.bool)).item() == 0.0


# --- torch.compile(fullgraph=True) --------------------------------------------------------------

OPTIONS = {
    "ce": dict(commitment_use_cross_entropy_loss=True),
    "diversity": dict(codebook_diversity_loss_weight=0.1, codebook_diversity_temperature=3.0),
    "orthogonal": dict(orthogonal_reg_weight=0.1),
    "orthogonal-active": dict(orthogonal_reg_weight=0.1, orthogonal_reg_active_codes_only=True),
    "all": dict(
        commitment_use_cross_entropy_loss=True,
        codebook_diversity_loss_weight=0.1,
        orthogonal_reg_weight=0.1,
        orthogonal_reg_active_codes_only=True,
        cosine=True,
        heads=2,
    ),
}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("training", [False, True])
def test_options_compile_fullgraph_and_match_eager(option, training):
    """The loss options trace whole (no graph break: fullgraph=True) in eval and in training
    with dead_code_steps=0, with a mask, and give eager's outputs and gradients."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    kw = dict(ema=False, kmeans_init=False, dead_code_steps=0, backend="torch")
    vq = VectorQuantizer(8, 16, **kw, **OPTIONS[option]).train(training)
    ref = VectorQuantizer(8, 16, **kw, **OPTIONS[option]).train(training)
    ref.load_state_dict(vq.state_dict())
    x = torch.randn(4, 9, 8, generator=_gen(5))
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[1, 5:] = False
    x[1, 6] = float("nan")  # masked padding reaches no loss
    step = torch.compile(vq, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        xc, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        q, idx, loss = step(xc, mask=mask)
        q_ref, idx_ref, loss_ref = ref(xe, mask=mask)
        assert torch.equal(idx, idx_ref)
        torch.testing.assert_close(loss, loss_ref)
        torch.testing.assert_close(q[mask], q_ref[mask])
        if training:
            (q[mask].sum() + loss).backward()
            (q_ref[mask].sum() + loss_ref).backward()
            torch.testing.assert_close(xc.grad, xe.grad, equal_nan=True)
            for p, p_ref in zip(vq.parameters(), ref.parameters(), strict=True):
                torch.testing.assert_close(p.grad, p_ref.grad)


# --- memory -------------------------------------------------------------------------------------

_MEMORY_CHILD = textwrap.dedent(
    """
    import json, sys, time, torch
    from fastvq import VectorQuantizer
    from fastvq._procmem import proc_status_kib, reset_peak_rss

    n, k, d = 8192, 65536, 8  # the N x K bound does not depend on D; a small D runs faster
    kw = dict(ema=False, kmeans_init=False, dead_code_steps=0, backend="torch")
    cases = {
        "plain": {},
        "diversity": dict(codebook_diversity_loss_weight=0.1),
        "ce": dict(commitment_use_cross_entropy_loss=True),
        "orthogonal": dict(orthogonal_reg_weight=0.1, orthogonal_reg_active_codes_only=True,
                           orthogonal_reg_max_codes=4096),
    }
    out = {}
    for name in sys.argv[1:]:
        torch.manual_seed(0)
        vq = VectorQuantizer(d, k, **kw, **cases[name])
        z = torch.randn(n, d, requires_grad=True)
        q, _, loss = vq(z[:8])  # warm up
        (q.sum() + loss).backward()
        vq.zero_grad(set_to_none=False)
        z.grad = torch.zeros_like(z)
        reset_peak_rss(required=True)
        base = proc_status_kib("VmHWM")
        t = time.perf_counter()
        q, _, loss = vq(z)
        (q.sum() + loss).backward()
        out[name] = [(proc_status_kib("VmHWM") - base) / 1024, time.perf_counter() - t]
        del q, loss
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_aux_losses_memory_stays_far_below_nxk():
    """N = 8192, K = 65536 (D = 8): one N x K fp32 matrix is 2 GiB. A training forward+backward
    with each auxiliary loss raises peak RSS by under 128 MiB, 1/16 of that matrix (at N = 16384
    the diversity loss raised it by 6227 MiB with 4096-row chunks over all K codes)."""
    import json

    cases = ["plain", "orthogonal", "ce", "diversity"]
    res = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, *cases], capture_output=True, text=True, timeout=1500
    )
    assert res.returncode == 0, res.stderr[-3000:]
    peaks = json.loads(res.stdout.strip().splitlines()[-1])
    # Tiles of a few MiB, their exponentials and gradients: a constant far below one N x K
    # matrix (2048 MiB), whatever N and K (the plain layer's rows and codes are under 16 MiB here).
    for name in cases:
        assert peaks[name][0] < 128, f"{name}: peak RSS rose by {peaks[name]} MiB ({peaks})"
