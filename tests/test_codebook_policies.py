"""Codebook's constructor-chosen policies: fastvq's rules (the default) and vqp's
(fastvq.codebook.vqp_rules), each one implementation, used by fastvq.compat.vqp."""

import pytest
import torch

from fastvq.codebook import Codebook, rules, vqp_rules
from fastvq.kmeans import kmeans


def _vqp(**kw):
    base = dict(decay=0.8, counters=False, ema_rule="vqp", restart_rule="vqp", kmeans_rule="vqp")
    return Codebook(1, 8, 4, **{**base, **kw})


def test_default_policies_and_state_names_are_fastvqs():
    cb = Codebook(2, 8, 4, kmeans_init=True, dead_code_steps=3)
    assert (cb.ema_rule, cb.restart_rule, cb.kmeans_rule) == ("fastvq", "steps", "fastvq")
    assert set(cb.state_dict()) == {
        "codebook", "cluster_size", "embed_avg", "steps_unused", "usage_counts", "initted"
    }  # fmt: skip


@pytest.mark.parametrize(
    "kw", [dict(ema_rule="x"), dict(restart_rule="x"), dict(kmeans_rule="x"),
           dict(ema_rule="vqp", dead_code_steps=2), dict(ema_rule="vqp", learning="grad")],
)  # fmt: skip
def test_bad_policies_raise(kw):
    with pytest.raises(ValueError):
        Codebook(1, 8, 4, **kw)


def test_vqp_ema_is_a_weighted_lerp_then_the_shared_laplace_smoothing():
    torch.manual_seed(0)
    cb = _vqp()
    n0, m0 = cb.cluster_size.clone(), cb.embed_avg.clone()
    counts, sums = torch.rand(1, 8) * 4, torch.randn(1, 8, 4)
    w = torch.rand(8)
    cb.step_(counts, sums, [torch.randn(5, 4)], [None], ema_weight=w)
    n = n0.lerp(counts, 0.2 * w[None])
    m = m0.lerp(sums, 0.2 * w[None, :, None])
    torch.testing.assert_close(cb.cluster_size, n)
    torch.testing.assert_close(cb.embed_avg, m)
    want = rules.smoothed_codes(n, m, n.sum(-1, keepdim=True), cb.eps, 8)
    torch.testing.assert_close(cb.codebook, want)


def test_vqp_ema_accumulates_then_applies_and_manual_smoothing_waits():
    torch.manual_seed(0)
    cb = _vqp(smooth_each_step=False)
    codes = cb.codebook.clone()
    c1, s1, c2, s2 = torch.rand(1, 8), torch.randn(1, 8, 4), torch.rand(1, 8), torch.randn(1, 8, 4)
    n0 = cb.cluster_size.clone()
    cb.step_(c1, s1, [torch.randn(3, 4)], [None], accumulate=True)
    torch.testing.assert_close(cb.cluster_size, n0)  # only accumulated
    cb.step_(c2, s2, [torch.randn(3, 4)], [None])
    torch.testing.assert_close(cb.cluster_size, n0.lerp(c1 + c2, 0.2))
    assert torch.equal(cb.codebook, codes)  # manual smoothing: codes wait for smooth_()
    cb.smooth_()
    assert not torch.equal(cb.codebook, codes)


def test_vqp_restart_replaces_codes_below_the_threshold_by_rows():
    torch.manual_seed(0)
    cb = _vqp(dead_code_threshold=0.5, reset_cluster_size=2.0)
    with torch.no_grad():
        cb.cluster_size.copy_(torch.tensor([[1.0, 0.1, 1.0, 0.2, 1.0, 1.0, 1.0, 1.0]]))
    rows = torch.randn(6, 4)
    cb.step_(torch.zeros(1, 8), torch.zeros(1, 8, 4), [rows], [None], ema_step=False)
    # ema_step=False: vqp still moves the statistics (for its threshold), then restarts
    for k in (1, 3):
        assert any(torch.equal(cb.codebook[0, k], r) for r in rows)
        assert cb.cluster_size[0, k] == 2.0
        torch.testing.assert_close(cb.embed_avg[0, k], 2.0 * cb.codebook[0, k])


def test_vqp_kmeans_is_vqp_sampling_then_kmeans_py_lloyd():
    x = torch.randn(64, 4)
    cb = _vqp(kmeans_init=True)
    torch.manual_seed(3)
    assert cb.kmeans_init_([x], [None])
    torch.manual_seed(3)
    start = vqp_rules.sample_vectors(x, 8)
    centres, counts = kmeans(x, 8, iters=cb.kmeans_iters, init=start)
    want = rules.smoothed_codes(counts[None], (centres * counts[:, None])[None],
                                counts.sum(), cb.eps, 8)  # fmt: skip
    torch.testing.assert_close(cb.codebook, want)
    torch.testing.assert_close(cb.cluster_size, counts[None])
    assert bool(cb.initted)
