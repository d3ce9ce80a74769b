"""ResidualVQ options against literal references, brute force and vector-quantize-pytorch 1.32:
codebook sizes per depth, a shared codebook, quantize dropout, per-depth losses, beam search,
GroupedResidualVQ, argument errors."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import fastvq
from fastvq.residual import (
    GroupedResidualVQ,
    ResidualVQ,
    nearest_codes_topk,
    residual_beam_search,
)

vqp = pytest.importorskip("vector_quantize_pytorch")
pytestmark = pytest.mark.extras  # `pip install -e ".[bench]"`

# k-means and restart off: the codes are exactly the loaded ones, so references can be literal
PLAIN = dict(kmeans_init=False, dead_code_steps=0, backend="torch")


def _load_from_vqp(rvq, vqp_rvq):
    for i, layer in enumerate(rvq.layers):
        layer.load_codebook(vqp_rvq.layers[i]._codebook.embed[0])


def _nearest64(rows, codes):
    return torch.cdist(rows.double(), codes.double()).argmin(-1)


def _greedy64(x, codebooks):
    """Literal greedy residual quantization in fp64: per depth (residual, index)."""
    r, out = x.double(), []
    for c in codebooks:
        i = _nearest64(r, c)
        out.append((r, i))
        r = r - c.double()[i]
    return out


# --- codebook sizes per depth ---------------------------------------------------------------------


def test_codebook_sizes_per_depth_match_vqp():
    torch.manual_seed(0)
    ref = vqp.ResidualVQ(dim=4, codebook_size=(8, 16, 4), num_quantizers=3).eval()
    rvq = ResidualVQ(4, (8, 16, 4), **PLAIN).eval()  # num_quantizers from the sizes
    assert rvq.num_quantizers == 3 and [la.codebook_size for la in rvq.layers] == [8, 16, 4]
    _load_from_vqp(rvq, ref)
    x = torch.randn(3, 7, 4)
    q_ref, idx_ref, _ = ref(x)
    q, idx, _ = rvq(x)
    assert torch.equal(idx, idx_ref)
    assert torch.equal(q, q_ref)
    assert torch.equal(rvq.codes_from_indices(idx), q)
    per_depth = ref.get_codes_from_indices(idx_ref)  # vqp: (Q, ..., D)
    torch.testing.assert_close(rvq.depth_codes(idx), per_depth.movedim(0, -2))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 4\).*depth 2"):
        rvq.codes_from_indices(torch.tensor([[0, 0, 4]]))


# --- shared codebook ------------------------------------------------------------------------------


def test_shared_codebook_indices_match_vqp():
    torch.manual_seed(1)
    ref = vqp.ResidualVQ(dim=4, codebook_size=8, num_quantizers=3, shared_codebook=True).eval()
    rvq = ResidualVQ(4, 8, 3, shared_codebook=True, **PLAIN).eval()
    assert len(rvq.layers) == 1 and all(rvq.depth_layer(i) is rvq.layers[0] for i in range(3))
    _load_from_vqp(rvq, ref)
    x = torch.randn(3, 7, 4)
    q_ref, idx_ref, _ = ref(x)
    q, idx, _ = rvq(x)
    assert torch.equal(idx, idx_ref)
    assert torch.equal(q, q_ref)


def test_shared_codebook_one_pooled_ema_step():
    """One training step equals the literal EMA step over every depth's rows pooled: searched
    with the codes before the step, n_k and s_k summed over depths, decayed once."""
    torch.manual_seed(2)
    k, d, gamma, eps = 8, 4, 0.9, 1e-5
    w = torch.randn(k, d)
    rvq = ResidualVQ(d, k, 3, shared_codebook=True, decay=gamma, eps=eps, beta=0.3, **PLAIN)
    rvq.layers[0].load_codebook(w)
    x = torch.randn(40, d)
    q, idx, loss, losses = rvq(x, return_losses=True)

    steps = _greedy64(x, [w] * 3)
    for i, (_, ref_idx) in enumerate(steps):
        assert torch.equal(idx[:, i], ref_idx)
    rows = torch.cat([r for r, _ in steps])
    assign = torch.cat([i for _, i in steps])
    n = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, torch.ones(len(assign)).double())
    s = torch.zeros(k, d, dtype=torch.float64).index_add_(0, assign, rows)
    big_n = gamma * 1.0 + (1 - gamma) * n  # buffers start at N_k = 1, m_k = c_k
    m = gamma * w.double() + (1 - gamma) * s
    c = m / ((big_n + eps) / (big_n.sum() + k * eps) * big_n.sum())[:, None]
    layer = rvq.layers[0]
    torch.testing.assert_close(layer.cluster_size[0].double(), big_n, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.codebook[0].double(), c, rtol=1e-5, atol=1e-6)
    # loss: beta * mse of every depth against the codes before the step
    ref_losses = torch.stack([0.3 * (r - w.double()[i]).square().mean() for r, i in steps])
    torch.testing.assert_close(losses.double(), ref_losses, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss, losses.sum())
    torch.testing.assert_close(q.double(), sum(w.double()[i] for _, i in steps), rtol=0, atol=1e-6)


def test_shared_gradient_codebook_equals_literal_autograd():
    torch.manual_seed(3)
    k, d, beta = 6, 3, 0.25
    w0 = torch.randn(k, d)
    rvq = ResidualVQ(d, k, 3, shared_codebook=True, ema=False, beta=beta, **PLAIN)
    rvq.layers[0].load_codebook(w0)
    x = torch.randn(30, d, requires_grad=True)
    q, idx, loss = rvq(x)
    (q.square().sum() + loss).backward()

    w = w0.clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    r, total, ref_loss = xr, 0.0, 0.0
    for i in range(3):
        c = w[idx[:, i]]
        codebook_term = (r.detach() - c).square().mean()
        ref_loss = ref_loss + codebook_term + beta * (r - c.detach()).square().mean()
        total = total + c.detach()
        r = r - c.detach()
    ref_q = xr + (total - xr).detach()
    (ref_q.square().sum() + ref_loss).backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(rvq.layers[0].codebook.grad[0], w.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)


def test_shared_codebook_kmeans_on_depth0_and_one_restart_step_per_forward():
    torch.manual_seed(4)
    x = torch.randn(64, 4)
    rvq = ResidualVQ(4, 8, 3, shared_codebook=True, ema=False, dead_code_steps=1000, seed=5,
                     backend="torch")  # fmt: skip
    ref = fastvq.VectorQuantizer(4, 8, ema=False, dead_code_steps=1000, seed=5, backend="torch")
    rvq(x)
    ref(x)  # k-means on the same rows (depth 0 is x itself)
    assert torch.equal(rvq.layers[0].codebook, ref.codebook)
    rvq(x)
    # steps_unused counts forwards, not depths: codes no depth used twice are at 2, not 6
    used = torch.zeros(8, dtype=torch.bool)
    used[rvq.eval()(x).indices.reshape(-1)] = True
    steps = rvq.layers[0].steps_unused[0]
    assert steps.max() <= 2 and torch.all(steps[used] == 0)
    assert set(rvq.state_dict()) >= {"layers.0.codebook"} and not any(
        key.startswith("layers.1.") for key in rvq.state_dict()
    )


def test_pooled_routes_ignore_masked_nan_rows():
    """Shared codebook and beam search: masked rows (NaN padding) change neither the loss, nor
    the gradients, nor the state; the result equals a run on the real rows only."""
    torch.manual_seed(6)
    w = [torch.randn(8, 4) for _ in range(3)]
    x = torch.randn(20, 4)
    mask = torch.rand(20) > 0.3
    xn = torch.where(mask[:, None], x, float("nan")).requires_grad_(True)
    for kw in (dict(shared_codebook=True), dict(beam_size=3)):
        a = ResidualVQ(4, 8, 3, dead_code_steps=5, kmeans_init=False, backend="torch", **kw)
        b = ResidualVQ(4, 8, 3, dead_code_steps=5, kmeans_init=False, backend="torch", **kw)
        for m in (a, b):
            for layer, c in zip(m.layers, w, strict=False):
                layer.load_codebook(c)
        q, idx, loss = a(xn, mask)
        q2, idx2, loss2 = b(x[mask])
        assert torch.equal(idx[mask], idx2)
        torch.testing.assert_close(loss, loss2)
        loss.backward()
        assert torch.all(xn.grad[~mask] == 0) and torch.isfinite(xn.grad).all()
        xn.grad = None
        for sa, sb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
            torch.testing.assert_close(sa, sb)


# --- quantize dropout -----------------------------------------------------------------------------


def test_quantize_dropout_step_matches_vqp():
    """vqp with a fixed dropout seed and fastvq with the same number of depths: the same indices
    (-1 past the cut), output and EMA codebooks; the dropped depths' state is untouched."""
    import random

    torch.manual_seed(7)
    ref = vqp.ResidualVQ(dim=4, codebook_size=8, num_quantizers=4, quantize_dropout=True,
                         decay=0.8).train()  # fmt: skip
    rvq = ResidualVQ(4, 8, 4, quantize_dropout=True, decay=0.8, **PLAIN).train()
    _load_from_vqp(rvq, ref)
    before = [layer.codebook.clone() for layer in rvq.layers]
    x = torch.randn(3, 7, 4)
    seed = 3
    n = random.Random(seed).randrange(0, 4) + 1
    assert n < 4  # the seed must drop something for this test to mean anything
    q_ref, idx_ref, _ = ref(x, rand_quantize_dropout_fixed_seed=seed)
    q, idx, loss, losses = rvq(x, num_active=n, return_losses=True)
    assert torch.equal(idx, idx_ref) and torch.all(idx[..., n:] == -1)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=1e-6)
    for i, layer in enumerate(rvq.layers):
        torch.testing.assert_close(layer.codebook[0], ref.layers[i]._codebook.embed[0])
        assert torch.equal(layer.codebook, before[i]) == (i >= n)
    assert torch.all(losses[n:] == 0) and torch.all(losses[:n] > 0)
    assert torch.equal(loss, losses[:n].sum())


def test_quantize_dropout_draws_are_seeded_and_follow_the_rule():
    kw = dict(quantize_dropout=True, quantize_dropout_cutoff_index=1,
              quantize_dropout_multiple_of=2, ema=False, **PLAIN)  # fmt: skip
    a, b, c, twin, fresh = (ResidualVQ(4, 4, 5, seed=s, **kw) for s in (0, 0, 1, 0, 0))
    rng = torch.get_rng_state()
    draws = [[m.draw_num_active() for _ in range(200)] for m in (a, b, c)]
    assert torch.equal(torch.get_rng_state(), rng)  # the global generator is not consumed
    assert draws[0] == draws[1] and draws[0] != draws[2]
    # last kept depth uniform in [1, 5), count rounded up to even, capped at 5
    assert set(draws[0]) == {2, 4, 5}
    # a training forward keeps as many depths as its twin draws, and decodes to its output
    x = torch.randn(6, 4)
    for _ in range(4):
        q, idx, _ = twin(x)
        assert torch.all((idx >= 0).sum(-1) == fresh.draw_num_active())
        assert torch.equal(twin.codes_from_indices(idx), q.detach())
    twin.eval()
    assert torch.all(twin(x).indices >= 0)  # eval uses every depth
    assert torch.all(twin(x, num_active=2).indices[:, 2:] == -1)


def test_quantize_dropout_generator_resumes_with_fastvq_train_rng_state():
    from fastvq.train import rng_state, set_rng_state

    kw = dict(quantize_dropout=True, **PLAIN)
    a, b = ResidualVQ(4, 8, 4, **kw), ResidualVQ(4, 8, 4, **kw)
    a(torch.randn(5, 4))  # one step consumed
    set_rng_state(b, rng_state(a))
    assert [a.draw_num_active() for _ in range(20)] == [b.draw_num_active() for _ in range(20)]


def test_quantize_dropout_replayed_by_activation_checkpointing():
    """The recomputation inside backward quantizes the same depths as the forward (no second
    draw): gradients equal an uncheckpointed twin's and both generators advance alike."""
    from torch.utils.checkpoint import checkpoint

    kw = dict(quantize_dropout=True, ema=False, **PLAIN)
    a, b = ResidualVQ(4, 8, 4, **kw), ResidualVQ(4, 8, 4, **kw)
    b.load_state_dict(a.state_dict())
    x = torch.randn(10, 4)
    kept = set()
    for _ in range(4):
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out_a = checkpoint(a, xa, use_reentrant=False)
        out_b = b(xb)
        for out in (out_a, out_b):
            (out.quantized.square().sum() + out.loss).backward()
        assert torch.equal(out_a.indices, out_b.indices)
        kept.add(int((out_a.indices[0] >= 0).sum()))
        assert torch.equal(xa.grad, xb.grad)
        for la, lb in zip(a.layers, b.layers, strict=True):
            assert (la.codebook.grad is None) == (lb.codebook.grad is None)
            if la.codebook.grad is not None:
                assert torch.equal(la.codebook.grad, lb.codebook.grad)
    assert len(kept) > 1  # the draws varied, so a second draw would have shown
    assert a.draw_num_active() == b.draw_num_active()


def test_empty_batch_every_route():
    for kw in ({}, dict(shared_codebook=True), dict(beam_size=3)):
        rvq = ResidualVQ(4, 8, 3, **PLAIN, **kw)
        q, idx, loss = rvq(torch.randn(0, 4))
        assert q.shape == (0, 4) and idx.shape == (0, 3) and loss.item() == 0


# --- per-depth losses -----------------------------------------------------------------------------


def test_per_depth_losses_literal():
    torch.manual_seed(8)
    w = [torch.randn(k, 4) for k in (8, 5, 6)]
    x = torch.randn(2, 9, 4)
    for kw in ({}, dict(ema=False, beta=0.5)):
        rvq = ResidualVQ(4, (8, 5, 6), **PLAIN, **kw).eval()
        for layer, c in zip(rvq.layers, w, strict=True):
            layer.load_codebook(c)
        q, idx, loss, losses, stats = rvq(x, return_losses=True, return_stats=True)
        beta, w_cb = rvq.layers[0].beta, 0.0 if rvq.layers[0].ema else 1.0
        ref = [(w_cb + beta) * (r - c.double()[i]).square().mean()
               for (r, i), c in zip(_greedy64(x.reshape(-1, 4), w), w, strict=True)]  # fmt: skip
        torch.testing.assert_close(losses.double(), torch.stack(ref), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(loss, losses.sum())
        assert len(stats) == 3 and stats[1].counts.shape == (1, 5)


# --- beam search ----------------------------------------------------------------------------------


def test_topk_tiled_equals_full_stable_sort_with_ties():
    """Small tiles (rows 5, codes 3) against a full stable sort; integer data makes distances
    exact, and duplicated codes make ties that must go to the lowest index."""
    g = torch.Generator().manual_seed(9)
    codes = torch.randint(-3, 4, (11, 3), generator=g).float()
    codes[7] = codes[2]
    codes[10] = codes[2]
    rows = torch.randint(-3, 4, (13, 3), generator=g).float()
    dist = (rows[:, None] - codes[None]).square().sum(-1)  # exact: small integers
    ref = dist.sort(dim=1, stable=True).indices
    for k in (1, 4, 11):
        for blocks in (dict(code_block=3), dict()):
            _, idx = nearest_codes_topk(rows, codes, k, **blocks)
            assert torch.equal(idx, ref[:, :k]), (k, blocks)
    # a NaN code is ranked last; a NaN row (all distances NaN) gets codes 0, 1, ...
    codes[0] = float("nan")
    rows[0] = float("nan")
    _, idx = nearest_codes_topk(rows, codes, 11, code_block=3)
    assert torch.equal(idx[0], torch.arange(11)) and torch.all(idx[1:, -1] == 0)


@pytest.mark.parametrize("q,k", [(2, 4), (2, 8), (3, 4), (3, 5)])
def test_exhaustive_beam_finds_brute_force_optimum(q, k):
    g = torch.Generator().manual_seed(10 * q + k)
    codebooks = [torch.randn(k, 3, generator=g) / (j + 1) for j in range(q)]
    x = torch.randn(25, 3, generator=g)
    combos = torch.tensor(list(itertools.product(range(k), repeat=q)))  # (K^Q, Q)
    recon = sum(codebooks[j].double()[combos[:, j]] for j in range(q))  # (K^Q, D)
    best = (x.double()[:, None] - recon[None]).square().sum(-1).min(1).values
    idx, err = residual_beam_search(x, codebooks, k**q)
    found = x.double() - sum(codebooks[j].double()[idx[:, j]] for j in range(q))
    torch.testing.assert_close(found.square().sum(-1), best, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(err.double(), best, rtol=1e-5, atol=1e-6)
    # greedy is worse somewhere on these shapes, so the test separates the two
    greedy = x.double() - sum(codebooks[j].double()[i] for j, (_, i) in
                              enumerate(_greedy64(x, codebooks)))  # fmt: skip
    assert (greedy.square().sum(-1) > best + 1e-6).any()


def test_beam_one_equals_greedy_and_module_routes():
    torch.manual_seed(11)
    rvq = ResidualVQ(4, (16, 9, 12), **PLAIN).eval()
    x = torch.randn(50, 4)
    greedy = rvq(x).indices
    codebooks = [layer.get_codebook() for layer in rvq.layers]
    assert torch.equal(residual_beam_search(x, codebooks, 1)[0], greedy)
    # beam_size in forward and eval_beam_size both reach the beam route: exhaustive = optimum
    full = rvq(x, beam_size=16 * 9 * 12).indices
    rvq_b = ResidualVQ(4, (16, 9, 12), eval_beam_size=16 * 9 * 12, **PLAIN).eval()
    rvq_b.load_state_dict(rvq.state_dict())
    assert torch.equal(rvq_b(x).indices, full)
    err = lambda i: (x - rvq.codes_from_indices(i)).square().sum(-1)  # noqa: E731
    assert torch.all(err(full) <= err(greedy) + 1e-6) and (err(full) < err(greedy) - 1e-6).any()


def test_beam_with_vqp_score_matches_vqp():
    torch.manual_seed(12)
    ref = vqp.ResidualVQ(dim=4, codebook_size=8, num_quantizers=3, beam_size=4).eval()
    rvq = ResidualVQ(4, 8, 3, beam_size=4, beam_score_weights=[1.0] * 3, **PLAIN).eval()
    _load_from_vqp(rvq, ref)
    x = torch.randn(3, 7, 4)
    q_ref, idx_ref, _ = ref(x)
    q, idx, _ = rvq(x)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("ema", [True, False], ids=["ema", "grad"])
def test_beam_training_loss_and_update_follow_the_chosen_sequence(ema):
    torch.manual_seed(13)
    k, d, gamma, beta = 6, 3, 0.8, 0.25
    w = [torch.randn(k, d) for _ in range(3)]
    rvq = ResidualVQ(d, k, 3, beam_size=3, decay=gamma, ema=ema, beta=beta, **PLAIN)
    for layer, c in zip(rvq.layers, w, strict=True):
        layer.load_codebook(c)
    x = torch.randn(30, d, requires_grad=True)
    idx_eval = rvq.eval()(x).indices  # the same beam search, no state change
    rvq.train()
    q, idx, loss = rvq(x)
    assert torch.equal(idx, idx_eval)
    loss.backward()
    r, ref_loss, grad_x = x.detach().double(), 0.0, 0.0
    for j in range(3):
        c = w[j].double()
        e = (r - c[idx[:, j]]).square()
        ref_loss = ref_loss + ((0.0 if ema else 1.0) + beta) * e.mean()
        layer = rvq.layers[j]
        counts = torch.bincount(idx[:, j], minlength=k).double()
        if ema:  # one EMA step from this depth's rows on the chosen sequence
            big_n = gamma + (1 - gamma) * counts
            m = gamma * c + (1 - gamma) * torch.zeros(k, d).double().index_add_(0, idx[:, j], r)
            ref_c = m / ((big_n + 1e-5) / (big_n.sum() + k * 1e-5) * big_n.sum())[:, None]
            torch.testing.assert_close(layer.codebook[0].double(), ref_c, rtol=1e-5, atol=1e-6)
        else:  # codebook term's gradient: 2 sum_{i: idx_i = k} (c_k - r_i) / (N D)
            g = torch.zeros(k, d).double().index_add_(0, idx[:, j], c[idx[:, j]] - r)
            g = g * 2 / r.numel()
            torch.testing.assert_close(layer.codebook.grad[0].double(), g, rtol=1e-5, atol=1e-6)
        grad_x = grad_x + 2 * beta * (r - c[idx[:, j]]) / r.numel()
        r = r - c[idx[:, j]]
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
    # commitment: r_j = x - sg(codes above), so d/dx sum_j beta mse(r_j, sg(c_j)) adds every depth
    torch.testing.assert_close(x.grad.double(), grad_x, rtol=1e-5, atol=1e-7)


# --- GroupedResidualVQ ----------------------------------------------------------------------------


def test_grouped_matches_vqp():
    torch.manual_seed(14)
    ref = vqp.GroupedResidualVQ(dim=8, groups=2, codebook_size=8, num_quantizers=3).eval()
    grvq = GroupedResidualVQ(8, 8, 3, groups=2, **PLAIN).eval()
    for g in range(2):
        _load_from_vqp(grvq.rvqs[g], ref.rvqs[g])
    x = torch.randn(3, 7, 8)
    q_ref, idx_ref, _ = ref(x)
    q, idx, _ = grvq(x)
    assert idx.shape == (3, 7, 2, 3)
    assert torch.equal(idx.movedim(-2, 0), idx_ref)
    assert torch.equal(q, q_ref)
    assert torch.equal(grvq.codes_from_indices(idx), ref.get_output_from_indices(idx_ref))


def test_grouped_layout_loss_and_one_dropout_draw():
    torch.manual_seed(15)
    grvq = GroupedResidualVQ(6, 8, 4, groups=3, channel_first=True, quantize_dropout=True,
                             ema=False, **PLAIN)  # fmt: skip
    x = torch.randn(2, 6, 5)
    q, idx, loss, losses = grvq(x, return_losses=True)
    assert q.shape == x.shape and idx.shape == (2, 5, 3, 4) and losses.shape == (3, 4)
    kept = idx >= 0
    assert torch.all(kept == kept[..., :1, :])  # one draw for every group
    torch.testing.assert_close(loss, losses.sum(-1).mean())
    assert torch.equal(grvq.codes_from_indices(idx), q.detach())
    grvq.eval()
    q, idx, loss, losses = grvq(x, return_losses=True)
    for g, rvq in enumerate(grvq.rvqs):  # each group is its own ResidualVQ on its slice
        out = rvq(x[:, 2 * g : 2 * g + 2].movedim(1, -1), return_losses=True)
        assert torch.equal(out.indices, idx[..., g, :])
        torch.testing.assert_close(out.losses, losses[g])
    assert [la.seed for rvq in grvq.rvqs for la in rvq.layers] == list(range(12))


# --- argument errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((8, 16), {}, "num_quantizers is required"),
        ((8, (16, 8)), dict(num_quantizers=3), "codebook_size has 2 sizes"),
        ((8, (16, 0)), {}, "codebook_size must hold positive ints.*depth 1"),
        ((8, ()), {}, "codebook_size must be a positive int"),
        ((8, (16, 8)), dict(shared_codebook=True), "shared_codebook=True needs one codebook_size"),
        ((8, 16, 3), dict(quantize_dropout_cutoff_index=3), "quantize_dropout_cutoff_index"),
        ((8, 16, 3), dict(quantize_dropout_multiple_of=0), "quantize_dropout_multiple_of"),
        ((8, 16, 3), dict(beam_size=0), "beam_size must be None or a positive int"),
        ((8, 16, 3), dict(eval_beam_size=2.0), "eval_beam_size must be None"),
        ((8, 16, 3), dict(beam_size=2, cosine=True), "beam_size > 1 is not supported"),
        ((8, 16, 3), dict(beam_score_weights=[1.0]), "beam_score_weights must hold 3"),
        ((8, 16, 3), dict(heads=2), "heads > 1"),
    ],
)
def test_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResidualVQ(*args, **kwargs)


def test_bad_call_arguments():
    rvq = ResidualVQ(4, 8, 3, **PLAIN)
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match="num_active must be None or an int in \\[1, num_"):
        rvq(x, num_active=4)
    with pytest.raises(ValueError, match="beam_size must be None or a positive int"):
        rvq(x, beam_size=-1)
    with pytest.raises(ValueError, match="mask must have x's shape"):
        ResidualVQ(4, 8, 3, shared_codebook=True, **PLAIN)(x, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="or be -1, no code"):
        rvq.codes_from_indices(torch.tensor([[0, -2, 0]]))
    with pytest.raises(TypeError, match="integer tensor"):
        rvq.codes_from_indices(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="k must be in \\[1, 8\\]"):
        nearest_codes_topk(x, torch.randn(8, 4), 9)
    with pytest.raises(ValueError, match="groups must be a positive int"):
        GroupedResidualVQ(8, 8, 2, groups=0)
    with pytest.raises(ValueError, match="divisible by groups"):
        GroupedResidualVQ(8, 8, 2, groups=3)
    with pytest.raises(ValueError, match="must end with \\(groups, num_quantizers\\)"):
        GroupedResidualVQ(8, 8, 2, groups=2).codes_from_indices(torch.zeros(5, 2, 3).long())


def test_exported():
    assert fastvq.GroupedResidualVQ is GroupedResidualVQ


@pytest.mark.parametrize("route", ["layers", "shared", "beam1"])
def test_simvq_layers_every_route_match_literal_autograd(route):
    """SimVQ codes (frozen basis x learned map) in every ResidualVQ route: indices, output, loss
    and the map's and x's gradients equal plain autograd over the explicit products."""
    kw = {"shared": dict(shared_codebook=True), "beam1": dict(beam_size=1)}.get(route, {})
    rvq = ResidualVQ(6, 16, 3, simvq=True, backend="torch", **kw)
    x = torch.randn(20, 6, requires_grad=True)
    q, idx, loss = rvq(x)
    (q.square().sum() + loss).backward()

    maps = [layer.simvq_map.detach().clone().requires_grad_() for layer in rvq.layers]
    codes = [layer.simvq_basis[0] @ m[0].T for layer, m in zip(rvq.layers, maps, strict=True)]
    xr = x.detach().clone().requires_grad_()
    res, total, ref_loss, ref_idx = xr, 0, 0, []
    for depth in range(3):
        c = codes[0 if route == "shared" else depth]
        i = torch.cdist(res.detach().double(), c.detach().double()).argmin(1)
        cq = c[i]
        ref_loss = ref_loss + F.mse_loss(res.detach(), cq) + 0.25 * F.mse_loss(res, cq.detach())
        total = total + cq.detach()
        res = res - cq.detach()
        ref_idx.append(i)
    out = total + (xr - xr.detach())
    (out.square().sum() + ref_loss).backward()
    assert torch.equal(idx, torch.stack(ref_idx, -1))
    torch.testing.assert_close(q, out)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(x.grad, xr.grad)
    for layer, m in zip(rvq.layers, maps, strict=True):
        torch.testing.assert_close(layer.simvq_map.grad, m.grad)


def test_layer_options_a_route_does_not_apply_are_rejected():
    """The pooled routes (shared codebook, beam search) do not apply freeze / sampling /
    auxiliary losses (rotation_trick is supported: tests/test_residual_rotation.py)."""
    for opt in (dict(freeze_codebook=True), dict(stochastic_sample_codes=True),
                dict(ema=False, orthogonal_reg_weight=0.1)):  # fmt: skip
        name = next(k for k in opt if k != "ema")
        for route in (dict(shared_codebook=True), dict(beam_size=2), dict(eval_beam_size=2)):
            with pytest.raises(ValueError, match=f"{name} not supported with shared_codebook"):
                ResidualVQ(4, 8, 2, **route, **opt)
        rvq = ResidualVQ(4, 8, 2, **opt)  # the plain stack applies it
        rvq(torch.randn(5, 4))
        with pytest.raises(ValueError, match=f"{name} not supported with shared_codebook"):
            rvq(torch.randn(5, 4), beam_size=2)
