"""Issue 11, items 3 and 8: NaN/Inf rows and masks in the layers; torch.compile gaps.

NaN policy under test: a masked row counts in no loss whatever it holds; an unmasked row holding
NaN/Inf makes the loss NaN/Inf (it surfaces) but is left out of EMA statistics, k-means init,
dead-code restart candidates and usage counts, so one bad batch cannot poison a code for good.
"""

import pytest
import torch

import fastvq
from fastvq import VectorQuantizer
from fastvq.kmeans import kmeans
from fastvq.sharded import ShardedVectorQuantizer

NONFINITE = [float("nan"), float("inf"), float("-inf")]


def _pair(**kw):
    """Two layers with the same state: one fed the bad rows, one the clean subset."""
    kw = dict(dict(kmeans_init=False, dead_code_steps=0, backend="torch"), **kw)
    a, b = VectorQuantizer(4, 8, **kw), VectorQuantizer(4, 8, **kw)
    b.load_state_dict(a.state_dict())
    return a, b


# --- item 3: masks ---------------------------------------------------------------------------


@pytest.mark.parametrize("ema", [True, False], ids=["ema", "grad"])
@pytest.mark.parametrize("bad", NONFINITE, ids=["nan", "inf", "-inf"])
def test_masked_nonfinite_rows_count_in_no_loss(backend, ema, bad):
    a, b = _pair(ema=ema, backend=backend)
    x = torch.randn(2, 6, 4)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 1] = mask[1, 4] = mask[1, 5] = False
    x[~mask] = bad  # a padding sentinel in every masked row
    xa = x.clone().requires_grad_(True)
    xb = x[mask].clone().requires_grad_(True)
    qa, ia, la = a(xa, mask=mask)
    qb, ib, lb = b(xb)
    assert torch.isfinite(la), la
    torch.testing.assert_close(la, lb)
    assert torch.equal(ia[mask], ib)
    # the output of a masked row is its code, not NaN that the next layer would spread
    assert torch.isfinite(qa).all()
    (qa.sum() + la).backward()
    (qb.sum() + lb).backward()
    assert torch.isfinite(xa.grad).all()
    torch.testing.assert_close(xa.grad[mask], xb.grad)
    if not ema:
        torch.testing.assert_close(a.codebook.grad, b.codebook.grad)
    else:
        torch.testing.assert_close(a.codebook, b.codebook)
        torch.testing.assert_close(a.cluster_size, b.cluster_size)
    assert torch.equal(a.usage_counts, b.usage_counts)


# --- item 3: unmasked non-finite rows --------------------------------------------------------


def test_unmasked_nan_row_surfaces_in_loss_but_not_in_ema(backend):
    """One NaN row and one Inf row in one batch: the loss says so, the EMA state is that of the
    batch without those rows, and 50 clean steps later every code is still finite."""
    a, b = _pair(ema=True, backend=backend)
    x = torch.randn(16, 4)
    bad = x.clone()
    bad[3, 0] = float("nan")
    bad[9, 2] = float("inf")
    _, _, loss = a(bad)
    assert not torch.isfinite(loss)
    b(x[torch.isfinite(bad).all(-1)])
    torch.testing.assert_close(a.codebook, b.codebook)
    torch.testing.assert_close(a.embed_avg, b.embed_avg)
    torch.testing.assert_close(a.cluster_size, b.cluster_size)
    assert torch.equal(a.usage_counts, b.usage_counts)
    for _ in range(50 if backend == "torch" else 5):
        a(torch.randn(16, 4))
    assert torch.isfinite(a.codebook).all()


def test_nonfinite_head_is_left_out_alone():
    """heads=2 with a codebook per head: only the sub-row holding the NaN is left out."""
    vq = VectorQuantizer(4, 8, heads=2, kmeans_init=False, dead_code_steps=0, backend="torch")
    x = torch.randn(16, 4)
    x[3, 0] = float("nan")  # head 0 of row 3
    vq(x)
    assert vq.usage_counts[0].sum() == 15 and vq.usage_counts[1].sum() == 16
    assert torch.isfinite(vq.codebook).all()


def test_nonfinite_rows_never_become_restart_candidates():
    """Half the rows NaN and a restart every step: re-seeded codes come from finite rows."""
    vq = VectorQuantizer(4, 32, kmeans_init=False, dead_code_steps=1, backend="torch")
    for _ in range(5):
        x = torch.randn(8, 4)
        x[::2] = float("nan")
        vq(x)
        assert torch.isfinite(vq.codebook).all()
        assert torch.isfinite(vq.embed_avg).all()
    assert vq.usage_counts.sum() == 5 * 4


def test_grad_codebook_usage_skips_nonfinite_rows():
    vq = VectorQuantizer(4, 8, ema=False, kmeans_init=False, dead_code_steps=0, backend="torch")
    x = torch.randn(10, 4)
    x[2] = float("nan")
    _, _, loss = vq(x, return_stats=False)
    assert torch.isnan(loss)
    assert vq.usage_counts.sum() == 9


# --- item 3: k-means init --------------------------------------------------------------------


@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cosine"])
def test_kmeans_ignores_nonfinite_rows(cosine):
    x = torch.randn(100, 4)
    bad = torch.cat([x[:40], torch.full((1, 4), float("nan")), x[40:]])
    bad[70, 1] = float("inf")
    clean = torch.cat([x[:40], x[40:69], x[70:]])
    c_bad, n_bad = kmeans(
        bad, 8, iters=3, cosine=cosine, generator=torch.Generator().manual_seed(1)
    )
    c_ref, n_ref = kmeans(
        clean, 8, iters=3, cosine=cosine, generator=torch.Generator().manual_seed(1)
    )
    assert torch.isfinite(c_bad).all()
    torch.testing.assert_close(c_bad, c_ref)
    torch.testing.assert_close(n_bad, n_ref)
    with pytest.raises(ValueError, match="no finite row"):
        kmeans(torch.full((3, 4), float("nan")), 2)


@pytest.mark.parametrize("kw", [dict(), dict(heads=2, codebook_dim=2)], ids=["heads1", "heads2"])
def test_layer_kmeans_init_skips_nan_rows(kw):
    vq = VectorQuantizer(4, 8, kmeans_iters=3, dead_code_steps=0, backend="torch", **kw)
    x = torch.randn(64, 4)
    x[5] = float("nan")
    mask = torch.ones(64, dtype=torch.bool)
    mask[7] = False
    x[7] = float("inf")  # masked and non-finite
    vq(x, mask=mask)
    assert bool(vq.initted)
    assert torch.isfinite(vq.codebook).all()


def test_all_rows_nonfinite_postpones_kmeans_init():
    vq = VectorQuantizer(4, 8, kmeans_iters=2, dead_code_steps=0, backend="torch")
    vq(torch.full((6, 4), float("nan")))
    assert not bool(vq.initted) and torch.isfinite(vq.codebook).all()
    vq(torch.randn(20, 4))
    assert bool(vq.initted) and torch.isfinite(vq.codebook).all()


# --- item 3: the sharded layer (one process: the shard is the whole codebook) ---------------


def test_sharded_ema_leaves_out_nonfinite_rows():
    cb = torch.randn(8, 4)
    a = ShardedVectorQuantizer(4, 8, ema=True, codebook=cb, backend="torch")
    b = ShardedVectorQuantizer(4, 8, ema=True, codebook=cb, backend="torch")
    x = torch.randn(12, 4)
    bad = x.clone()
    bad[0, 0] = float("nan")
    bad[5, 3] = float("-inf")
    keep = torch.isfinite(bad).all(-1)
    out = a(bad)
    b(x[keep])
    assert not torch.isfinite(out.loss)
    assert torch.isfinite(a.codebook).all()
    torch.testing.assert_close(a.codebook, b.codebook)
    torch.testing.assert_close(a.cluster_size, b.cluster_size)


# --- item 8: torch.compile -------------------------------------------------------------------


def test_compile_dynamic_fullgraph_with_float_beta():
    """A Python float beta (argument or layer attribute) becomes a SymFloat under
    dynamic=True: the beta check must trace (it used math.isfinite)."""
    torch._dynamo.reset()
    cb = torch.randn(8, 4, requires_grad=True)

    def f(x, beta):
        return fastvq.vector_quantize(x, cb, beta=beta, backend="torch")

    compiled = torch.compile(f, dynamic=True, fullgraph=True, backend="eager")
    for n, beta in ((16, 0.25), (9, 0.5)):
        x = torch.randn(n, 4)
        got, ref = compiled(x, beta), f(x, beta)
        assert torch.equal(got.indices, ref.indices)
        torch.testing.assert_close(got.loss, ref.loss)

    torch._dynamo.reset()
    vq = VectorQuantizer(4, 8, ema=False, kmeans_init=False, dead_code_steps=0, backend="torch")
    step = torch.compile(vq, dynamic=True, fullgraph=True, backend="eager")
    for n in (16, 9):
        q, _, loss = step(torch.randn(n, 4))
        (q.sum() + loss).backward()
    assert vq.usage_counts.sum() == 25


def test_beta_check_still_rejects_bad_values():
    for beta in (float("nan"), float("inf"), "0.1", True):
        with pytest.raises(TypeError, match="beta"):
            fastvq.vector_quantize(torch.zeros(2, 3), torch.zeros(4, 3), beta=beta)
        with pytest.raises(TypeError, match="beta"):
            VectorQuantizer(3, 4, beta=beta)
    with pytest.raises(ValueError, match="beta"):
        VectorQuantizer(3, 4, beta=-1.0)


def test_kmeans_init_is_one_graph_break_on_the_first_call_only():
    """k-means init cannot trace (host syncs, data-dependent shapes): it runs eagerly as exactly
    one graph break on the first training forward; afterwards the training forward compiles
    whole (with dead_code_steps=0), dynamic shapes included."""
    torch._dynamo.reset()
    vq = VectorQuantizer(4, 8, ema=False, kmeans_iters=2, dead_code_steps=0, backend="torch")
    explained = torch._dynamo.explain(vq)(torch.randn(32, 4))
    assert bool(vq.initted)
    assert explained.graph_break_count == 1, [b.reason for b in explained.break_reasons]
    torch._dynamo.reset()
    step = torch.compile(vq, dynamic=True, fullgraph=True, backend="eager")
    for n in (32, 17):
        q, _, loss = step(torch.randn(n, 4))
        (q.sum() + loss).backward()
