"""Shapes, losses, PixelCNN causality, checkpoints and tiny overfits for fastvq.models."""

import importlib.util

import pytest
import torch

from fastvq.app.checkpoint import load_run, save_run
from fastvq.app.loop import fit
from fastvq.models import (
    AE,
    VAE,
    AEConfig,
    Classifier,
    ClassifierConfig,
    PixelCNN,
    PixelCNNConfig,
    VAEConfig,
)
from fastvq.models.vae import discretized_logistic_log_prob

HAS_LAYER = importlib.util.find_spec("fastvq.layer") is not None
needs_layer = pytest.mark.skipif(not HAS_LAYER, reason="fastvq.layer (issue 3) not there yet")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from threads, and on a busy 2-core box OpenMP's thread
    synchronisation makes each op ~20x slower; run these tests single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_vqvae(**kw):
    from fastvq.models import VQVAE, VQVAEConfig

    return VQVAE(VQVAEConfig(hidden=16, res_hidden=8, n_res=1, dim=8, codebook_size=16, **kw))


def test_shapes_and_losses():
    x = torch.rand(3, 1, 28, 28)
    ae = AE(AEConfig(hidden=8, latent_dim=4))
    assert ae.encode(x).shape == (3, 4) and ae(x).shape == x.shape
    vae = VAE(VAEConfig(hidden=8, latent_dim=4))
    bpd, parts = vae.neg_elbo_bits_per_dim(x)
    assert bpd.shape == (3,) and torch.allclose(bpd, parts["recon_bpd"] + parts["kl_bpd"])
    assert vae.sample(5).shape == (5, 1, 28, 28)
    clf = Classifier(ClassifierConfig(hidden=8, feature_dim=12))
    assert clf.features(x).shape == (3, 12) and clf(x).shape == (3, 10)
    pc = PixelCNN(PixelCNNConfig(num_codes=11, channels=8, n_layers=2))
    assert pc(torch.randint(0, 11, (2, 5, 6))).shape == (2, 11, 5, 6)


def test_discretized_logistic_is_a_pmf():
    """Summed over the 256 pixel levels, the likelihood is 1 for any (mean, scale)."""
    levels = torch.arange(256.0) / 255
    mean = torch.tensor([-1.3, -0.2, 0.0, 0.7, 1.1]).view(-1, 1)
    log_scale = torch.tensor([-6.0, -3.0, -1.0, 0.0, 1.0]).view(-1, 1)
    lp = discretized_logistic_log_prob(levels.expand(5, 256), mean, log_scale)
    torch.testing.assert_close(lp.exp().sum(1), torch.ones(5), atol=1e-4, rtol=0)


@pytest.mark.parametrize("num_classes", [None, 3])
def test_pixelcnn_causal_and_no_blind_spot(num_classes):
    torch.manual_seed(0)
    H, W, K = 5, 6, 7
    m = PixelCNN(PixelCNNConfig(num_codes=K, channels=8, n_layers=6, num_classes=num_classes))
    y = torch.tensor([1]) if num_classes else None
    x = torch.randint(0, K, (1, H, W))
    base = m(x, y)
    for q in range(H * W):  # changing position q never changes logits at positions <= q
        x2 = x.clone()
        x2.view(-1)[q] = (x2.view(-1)[q] + 1) % K
        changed = (m(x2, y) - base).abs().amax(1).view(-1) > 0
        assert not changed[: q + 1].any(), f"position {q} leaks into {changed[: q + 1].nonzero()}"
    e = m.embed(x).permute(0, 3, 1, 2).detach().requires_grad_()
    out = m.forward_embedded(e, y)
    for p in range(H * W):  # ... and every earlier position does influence position p
        (g,) = torch.autograd.grad(out[0, :, p // W, p % W].sum(), e, retain_graph=True)
        dep = g[0].abs().sum(0).view(-1) > 0
        assert dep[:p].all() and not dep[p:].any(), f"position {p}: deps {dep.nonzero().view(-1)}"


def test_pixelcnn_sample_valid():
    m = PixelCNN(PixelCNNConfig(num_codes=5, channels=8, n_layers=2, num_classes=2))
    s = m.sample(
        4, (3, 4), y=torch.tensor([0, 1, 0, 1]), generator=torch.Generator().manual_seed(0)
    )
    assert s.shape == (4, 3, 4) and s.dtype == torch.long and 0 <= s.min() and s.max() < 5


def _models():
    yield "ae", AE(AEConfig(hidden=8, latent_dim=4))
    yield "vae", VAE(VAEConfig(hidden=8, latent_dim=4))
    yield "pixelcnn", PixelCNN(PixelCNNConfig(num_codes=9, channels=8, n_layers=2))
    yield "classifier", Classifier(ClassifierConfig(hidden=8, feature_dim=12))
    if HAS_LAYER:
        yield "vqvae", tiny_vqvae()


@pytest.mark.parametrize(
    "kind, model", list(_models()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_checkpoint_round_trip(tmp_path, kind, model):
    x = torch.randint(0, 9, (2, 4, 4)) if kind == "pixelcnn" else torch.rand(2, 1, 28, 28)
    if kind == "vqvae":  # one training forward so EMA/k-means state, if any, is non-trivial
        model.train()
        model(x)
    model.eval()
    save_run(tmp_path, model, kind, {"note": "x"})
    loaded, meta = load_run(tmp_path)
    assert meta["kind"] == kind and meta["note"] == "x"
    with torch.no_grad():
        if kind == "vae":
            a, b = model.reconstruct(x), loaded.reconstruct(x)
        elif kind == "vqvae":
            a, b = model(x)[0], loaded(x)[0]
        else:
            a, b = model(x), loaded(x)
    assert torch.equal(a, b)


def test_resume_matches_uninterrupted(tmp_path):
    data = (torch.rand(64, 28, 28) * 255).to(torch.uint8)
    labels = torch.zeros(64, dtype=torch.long)
    cfg = AEConfig(hidden=8, latent_dim=4)
    torch.manual_seed(0)
    a = AE(cfg)
    torch.manual_seed(0)
    b = AE(cfg)
    fit(a, "ae", data, labels, steps=6, batch_size=16, run_dir=tmp_path / "a")
    fit(b, "ae", data, labels, steps=3, batch_size=16, run_dir=tmp_path / "b")
    b2 = AE(cfg)
    meta = fit(b2, "ae", data, labels, steps=6, batch_size=16, run_dir=tmp_path / "b", resume=True)
    assert meta["step"] == 6
    for p, q in zip(a.parameters(), b2.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def _overfit(model, x, y=None, steps=150, lr=3e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    first = None
    for _ in range(steps):
        loss, _ = model.training_loss(x, y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first, loss.item()


def test_overfit_tiny():
    torch.manual_seed(0)
    x = torch.rand(8, 1, 12, 12).round()  # binary images
    first, last = _overfit(AE(AEConfig(image_size=12, hidden=8, latent_dim=8)), x)
    assert last < 0.4 * first
    first, last = _overfit(VAE(VAEConfig(image_size=12, hidden=8, latent_dim=8)), x)
    assert last < 0.65 * first  # bits/dim; the KL term keeps it from memorising outright
    clf = Classifier(ClassifierConfig(image_size=12, hidden=8))
    first, last = _overfit(clf, x, torch.arange(8), steps=40)
    assert last < 0.1
    codes = torch.randint(0, 8, (4, 4, 4))
    first, last = _overfit(PixelCNN(PixelCNNConfig(num_codes=8, channels=16, n_layers=3)), codes)
    assert first > 2.5 and last < 1.0  # bits/code: from ~log2(8) towards memorisation


@needs_layer
def test_vqvae_shapes_and_overfit():
    torch.manual_seed(0)
    m = tiny_vqvae()
    x = torch.rand(8, 1, 12, 12).round()
    x_hat, idx, loss = m(x)
    assert x_hat.shape == x.shape and idx.shape == (8, 3, 3) and loss.ndim == 0
    assert m.decode_indices(idx).shape == x.shape
    first, last = _overfit(m, x)
    assert last < 0.5 * first
