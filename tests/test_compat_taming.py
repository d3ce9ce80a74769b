"""fastvq.compat.taming against taming-transformers' ``VectorQuantizer2``.

taming-transformers does not install cleanly, so the reference is ``TamingReference`` below: the
forward and ``get_codebook_entry`` of ``VectorQuantizer2`` (taming/modules/vqvae/quantize.py,
CompVis/taming-transformers at commit 049bd9154dd94d8672c4f4fc73a89e6e8d5ca568) with
``remap=None``, transcribed step by step: channel-last rows, distances by the explicit expansion
``|z|^2 + |e|^2 - 2 z.e``, ``argmin``, an ``nn.Embedding`` lookup, the legacy beta placement,
the ``z + (z_q - z).detach()`` straight-through, ``(perplexity, min_encodings) = (None, None)``.
Where diffusers is installed, ``test_reference_agrees_with_diffusers_copy`` checks the
transcription against diffusers' ``VectorQuantizer``, which is taming's class copied (it differs
only in searching with ``torch.cdist``).

Tolerance: fp32 rounding (``torch.testing.assert_close`` defaults), indices identical; inputs are
checked to hold no near-tie (``check_no_near_tie``), and exact ties are tested apart.
"""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_functional import oracle_dists, rounding_bound
from torch import nn

from fastvq.compat.taming import VectorQuantizer2, swap_quantizer

ROOT = Path(__file__).resolve().parents[1]


class TamingReference(nn.Module):
    """taming's ``VectorQuantizer2`` with ``remap=None`` (see the module docstring)."""

    def __init__(self, n_e, e_dim, beta, sane_index_shape=False, legacy=True):
        super().__init__()
        self.n_e, self.e_dim, self.beta = n_e, e_dim, beta
        self.sane_index_shape, self.legacy = sane_index_shape, legacy
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

    def forward(self, z):
        z = z.permute(0, 2, 3, 1).contiguous()  # (B, H, W, C)
        rows = z.view(-1, self.e_dim)
        w = self.embedding.weight
        d = (
            rows.pow(2).sum(dim=1, keepdim=True)
            + w.pow(2).sum(dim=1)
            - 2 * torch.einsum("bd,dn->bn", rows, w.t())
        )
        idx = torch.argmin(d, dim=1)
        z_q = self.embedding(idx).view(z.shape)
        commit = torch.mean((z_q.detach() - z) ** 2)
        codebook = torch.mean((z_q - z.detach()) ** 2)
        loss = commit + self.beta * codebook if self.legacy else self.beta * commit + codebook
        z_q = z + (z_q - z).detach()
        z_q = z_q.permute(0, 3, 1, 2).contiguous()
        if self.sane_index_shape:
            idx = idx.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
        return z_q, loss, (None, None, idx)

    def get_codebook_entry(self, indices, shape):
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q


def check_no_near_tie(rows: torch.Tensor, codes: torch.Tensor) -> None:
    """A test-input guard: every row's two nearest squared distances (fp64) differ by more than
    ``rounding_bound``, the gap within which two correct fp32 searches may disagree. So identical
    indices are the right expectation, and no comparison passes or fails by a near-tie's luck."""
    rows, codes = rows.detach().reshape(-1, rows.shape[-1]), codes.detach()
    two = oracle_dists(rows, codes).topk(2, dim=1, largest=False).values
    worst = float(((two[:, 1] - two[:, 0]) / rounding_bound(rows, codes)).min())
    assert worst > 1, f"test input has a near-tie ({worst:.2f}x the rounding bound): change it"


def _pair(legacy=True, sane=False, n_e=32, e_dim=5, beta=0.3, backend="auto"):
    """(reference, fastvq) with the same codes, spread like trained codes (N(0, 1))."""
    theirs = TamingReference(n_e, e_dim, beta, sane_index_shape=sane, legacy=legacy)
    theirs.embedding.weight.data.normal_()
    ours = VectorQuantizer2(n_e, e_dim, beta, sane_index_shape=sane, legacy=legacy, backend=backend)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


@pytest.mark.parametrize("sane", [False, True], ids=["flat", "sane"])
@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "nonlegacy"])
def test_matches_taming(backend, legacy, sane):
    theirs, ours = _pair(legacy, sane, backend=backend)
    z = torch.randn(3, 5, 4, 6)
    check_no_near_tie(z.permute(0, 2, 3, 1).reshape(-1, 5), theirs.embedding.weight)
    zt, zo = z.clone().requires_grad_(), z.clone().requires_grad_()
    q_t, loss_t, (ppl_t, enc_t, idx_t) = theirs(zt)
    q_o, loss_o, (ppl_o, enc_o, idx_o) = ours(zo)
    assert ppl_o is None and enc_o is None and ppl_t is None and enc_t is None
    assert idx_o.dtype == torch.int64 and torch.equal(idx_o, idx_t)
    assert idx_o.shape == ((3, 4, 6) if sane else (3 * 4 * 6,))
    assert q_o.shape == z.shape
    torch.testing.assert_close(q_o, q_t)
    torch.testing.assert_close(loss_o, loss_t)
    w = torch.randn_like(q_t)  # an upstream gradient that is not all ones
    ((q_t * w).sum() + 3.0 * loss_t).backward()
    ((q_o * w).sum() + 3.0 * loss_o).backward()
    torch.testing.assert_close(zo.grad, zt.grad)
    torch.testing.assert_close(ours.embedding.weight.grad, theirs.embedding.weight.grad)
    flat = idx_t.reshape(-1)
    for shape in ((3, 4, 6, 5), None):
        got, want = ours.get_codebook_entry(flat, shape), theirs.get_codebook_entry(flat, shape)
        assert torch.equal(got, want)  # a plain lookup: bit-identical


def test_legacy_and_beta_are_read_at_every_forward():
    """taming reads ``self.legacy`` and ``self.beta`` per call; code that sets them after
    construction gets the same loss from fastvq."""
    theirs, ours = _pair(legacy=True)
    z = torch.randn(2, 5, 3, 3)
    for legacy, beta in ((False, 0.3), (True, 0.7), (False, 0.0)):
        theirs.legacy = ours.legacy = legacy
        theirs.beta = ours.beta = beta
        zt, zo = z.clone().requires_grad_(), z.clone().requires_grad_()
        loss_t, loss_o = theirs(zt)[1], ours(zo)[1]
        torch.testing.assert_close(loss_o, loss_t)
        loss_t.backward()
        loss_o.backward()
        torch.testing.assert_close(zo.grad, zt.grad)


def test_exact_ties_go_to_the_lowest_index_in_both():
    theirs, ours = _pair(n_e=4, e_dim=2)
    codes = torch.tensor([[3.0, 3.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    theirs.embedding.weight.data.copy_(codes)
    ours.embedding.weight.data.copy_(codes)
    # (0.5, 0.5) is equidistant from codes 1, 2 and 3; (1, 0) equals codes 1 and 3
    z = torch.tensor([[0.5, 0.5], [1.0, 0.0]]).T.reshape(1, 2, 1, 2)
    idx_t, idx_o = theirs(z)[2][2], ours(z)[2][2]
    assert idx_t.tolist() == idx_o.tolist() == [1, 1]


class _TamingVQModel(nn.Module):
    """The layout of taming's (and latent diffusion's) ``VQModel``: encoder, quant_conv,
    ``quantize``, post_quant_conv, decoder; ``forward`` returns ``(dec, emb_loss)``."""

    def __init__(self, quantize):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU())
        self.quant_conv = nn.Conv2d(8, 4, 1)
        self.quantize = quantize
        self.post_quant_conv = nn.Conv2d(4, 8, 1)
        self.decoder = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        quant, emb_loss, _ = self.quantize(self.quant_conv(self.encoder(x)))
        return self.decoder(self.post_quant_conv(quant)), emb_loss


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "nonlegacy"])
def test_swapped_model_trains_like_taming(legacy):
    theirs = _TamingVQModel(TamingReference(16, 4, 0.25, legacy=legacy))
    with torch.no_grad():  # codes spread over the latents, as trained codes are
        h = theirs.quant_conv(theirs.encoder(torch.randn(4, 3, 6, 6)))
        theirs.quantize.embedding.weight.normal_().mul_(h.std())
    ours = swap_quantizer(copy.deepcopy(theirs))
    assert isinstance(ours.quantize, VectorQuantizer2) and ours.quantize.legacy is legacy
    assert list(ours.state_dict()) == list(theirs.state_dict())
    opt_t = torch.optim.SGD(theirs.parameters(), lr=0.05)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.05)
    torch.manual_seed(1)
    for _ in range(3):
        x = torch.randn(2, 3, 6, 6)
        with torch.no_grad():
            h = theirs.quant_conv(theirs.encoder(x))
            check_no_near_tie(
                h.permute(0, 2, 3, 1).reshape(-1, 4), theirs.quantize.embedding.weight
            )
        (dec_t, loss_t), (dec_o, loss_o) = theirs(x), ours(x)
        torch.testing.assert_close(dec_o, dec_t)
        torch.testing.assert_close(loss_o, loss_t)
        for dec, loss, opt in ((dec_t, loss_t, opt_t), (dec_o, loss_o, opt_o)):
            opt.zero_grad()
            ((dec - x).square().mean() + loss).backward()
        named = dict(theirs.named_parameters())
        for name, p in ours.named_parameters():
            torch.testing.assert_close(p.grad, named[name].grad, msg=lambda m, n=name: f"{n}: {m}")
        opt_t.step()
        opt_o.step()


def test_state_dict_keys_and_init():
    torch.manual_seed(5)
    theirs = TamingReference(16, 4, 0.25)
    torch.manual_seed(5)
    ours = VectorQuantizer2(16, 4, 0.25)
    assert list(ours.state_dict()) == ["embedding.weight"]
    assert torch.equal(ours.embedding.weight, theirs.embedding.weight)  # same init, same draws
    ours.load_state_dict({"embedding.weight": torch.randn(16, 4)}, strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert (ours.n_e, ours.e_dim, ours.beta, ours.legacy) == (16, 4, 0.25, True)
    assert ours.remap is None and ours.re_embed == 16 and not ours.sane_index_shape


@pytest.mark.extras
def test_reference_agrees_with_diffusers_copy():
    """diffusers' VectorQuantizer is taming's VectorQuantizer2 copied: the transcription above
    must agree with it (same indices, outputs, loss, gradients)."""
    vae = pytest.importorskip("diffusers.models.autoencoders.vae")
    theirs, _ = _pair(legacy=True, sane=True)
    copied = vae.VectorQuantizer(32, 5, beta=0.3, sane_index_shape=True, legacy=True)
    copied.load_state_dict(theirs.state_dict(), strict=True)
    z = torch.randn(3, 5, 4, 6)
    check_no_near_tie(z.permute(0, 2, 3, 1).reshape(-1, 5), theirs.embedding.weight)
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    qa, la, (_, _, ia) = theirs(za)
    qb, lb, (_, _, ib) = copied(zb)
    assert torch.equal(ia, ib)
    torch.testing.assert_close(qa, qb)
    torch.testing.assert_close(la, lb)
    (qa.square().sum() + la).backward()
    (qb.square().sum() + lb).backward()
    torch.testing.assert_close(za.grad, zb.grad)
    torch.testing.assert_close(theirs.embedding.weight.grad, copied.embedding.weight.grad)


def test_bad_arguments_name_the_argument(tmp_path):
    with pytest.raises(NotImplementedError, match="remap"):
        VectorQuantizer2(16, 4, 0.25, remap=str(tmp_path / "used.npy"))
    with pytest.raises(ValueError, match="n_e"):
        VectorQuantizer2(0, 4, 0.25)
    with pytest.raises(ValueError, match="e_dim"):
        VectorQuantizer2(16, 2.5, 0.25)
    with pytest.raises(ValueError, match="beta"):
        VectorQuantizer2(16, 4, -0.25)
    with pytest.raises(ValueError, match="backend"):
        VectorQuantizer2(16, 4, 0.25, backend="cuda")
    vq = VectorQuantizer2(16, 4, 0.25)
    z = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="temp"):
        vq(z, temp=0.5)
    with pytest.raises(ValueError, match="rescale_logits"):
        vq(z, rescale_logits=True)
    with pytest.raises(ValueError, match="return_logits"):
        vq(z, return_logits=True)
    with pytest.raises(ValueError, match=r"z must have shape \(B, e_dim=4, H, W\)"):
        vq(torch.randn(2, 3, 3, 4))  # channel-last
    with pytest.raises(TypeError, match="z must be"):
        vq(z.numpy())
    with pytest.raises(TypeError, match="z must be"):
        vq(z.long())
    with pytest.raises(ValueError, match="shape"):
        vq.get_codebook_entry(torch.zeros(18, dtype=torch.long), (2, 9, 4))
    with pytest.raises(TypeError, match="quantize"):
        swap_quantizer(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="embedding"):
        swap_quantizer(_TamingVQModel(nn.Identity()))


def test_import_fastvq_and_compat_never_import_diffusers():
    code = (
        "import sys, fastvq, fastvq.compat, fastvq.compat.diffusers, fastvq.compat.taming\n"
        "bad = {'diffusers', 'taming'} & {m.split('.')[0] for m in sys.modules}\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
