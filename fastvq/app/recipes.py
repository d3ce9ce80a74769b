"""The four training stages of the VQ-VAE story, and sampling from what they train.

``fastvq demo`` runs all four in a row; ``fastvq train KIND`` runs one. Both build a model from
:func:`model_config`, seed it themselves (:func:`fastvq.app.rng.seed_everything`), and call:

1. :func:`train_images` with ``"ae"``: a plain autoencoder, then a diagonal Gaussian fitted to
   its train latents (``latent_mean``/``latent_std`` in ``run.json``), to decode random latents;
2. :func:`train_images` with ``"vae"``: the VAE;
3. :func:`train_images` with ``"vqvae"``: the VQ-VAE (its loss scaled by the data variance);
4. :func:`encode_dataset` then :func:`train_prior`: a PixelCNN prior on the VQ-VAE's code maps.

Each stage trains with :func:`fastvq.app.loop.fit` into its own run directory and evaluates on the
test split; ``fit_kwargs`` pass through to ``fit`` (``steps``, ``seed``, ``resume``, ...).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from ..models import AE, VAE, VQVAE, PixelCNN
from . import metrics as M
from .checkpoint import MODELS, read_meta, save_run
from .data import Dataset, to_float
from .evaluate import encode_codes, eval_prior, eval_recon, eval_vae, eval_vqvae
from .loop import fit

STAT_IMAGES = 10000  # train images behind the AE latent statistics and the data variance

_EVALUATE = {"ae": eval_recon, "vae": eval_vae, "vqvae": eval_vqvae}


def data_variance(images_u8: torch.Tensor) -> float:
    """Pixel variance of the first :data:`STAT_IMAGES` uint8 images, scaled to [0, 1]."""
    return float(to_float(images_u8[:STAT_IMAGES]).var())


def model_config(kind: str, ds: Dataset, **options) -> dict:
    """The config dict of a ``kind`` model for the images of ``ds``.

    ``options`` are fields of the model's config; a None value keeps the model's default. The
    VQ-VAE's reconstruction loss is MSE / Var(x) (as in the paper), Var(x) from ``ds``'s train set.
    """
    C, H, _ = ds.image_shape
    sized = {
        "ae": {"in_channels": C, "image_size": H},
        "vae": {"in_channels": C, "image_size": H},
        "vqvae": {"in_channels": C},
        "pixelcnn": {},
    }[kind]
    if kind == "vqvae":
        sized["data_variance"] = data_variance(ds.train.images)
    set_options = {k: v for k, v in options.items() if v is not None}
    return dataclasses.asdict(MODELS[kind][1](**sized, **set_options))


@torch.no_grad()
def latent_stats(ae: AE, images_u8: torch.Tensor, device="cpu") -> dict:
    """Mean and standard deviation of ``ae``'s latents over the first :data:`STAT_IMAGES`
    images, as lists (``run.json``'s ``latent_mean`` and ``latent_std``)."""
    z = M.batched(lambda b: ae.encode(to_float(b).to(device)).cpu(), images_u8[:STAT_IMAGES])
    return {"latent_mean": z.mean(0).tolist(), "latent_std": z.std(0).tolist()}


def train_images(
    kind: str, model, ds: Dataset, run_dir, *, device="cpu", eval_limit=None, **fit_kwargs
) -> dict:
    """Stages 1-3: train an ``"ae"``, ``"vae"`` or ``"vqvae"`` on ``ds``'s train images.

    Evaluates on the first ``eval_limit`` test images (all if None); returns ``fit``'s meta. An
    AE's latent statistics are then added to its checkpoint (for ``fastvq sample``) and the meta.
    """
    evaluate = _EVALUATE[kind]
    meta = fit(
        model,
        kind,
        ds.train.images,
        ds.train.labels,
        device=device,
        run_dir=run_dir,
        evaluate=lambda m: evaluate(m, ds.test, device, limit=eval_limit),
        **fit_kwargs,
    )
    if kind == "ae":
        stats = latent_stats(model, ds.train.images, device)
        save_run(run_dir, model, "ae", {**read_meta(run_dir), **stats})
        meta.update(stats)
    return meta


@dataclass
class Codes:
    """A data set's code maps under one VQ-VAE: int64 ``(N, h, w)`` on the CPU."""

    train: torch.Tensor
    test: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """``(h, w)`` of one code map."""
        return tuple(self.train.shape[1:])


def encode_dataset(vqvae: VQVAE, ds: Dataset, device="cpu", test_limit=None) -> Codes:
    """Stage 4's data: the code maps of every train image and of the first ``test_limit`` test
    images (all if None)."""
    train = encode_codes(vqvae, ds.train.images, device, desc="encode train codes")
    test = ds.test.images[:test_limit] if test_limit else ds.test.images
    return Codes(train, encode_codes(vqvae, test, device))


def train_prior(
    model: PixelCNN,
    codes: Codes,
    ds: Dataset,
    run_dir,
    vqvae_dir,
    *,
    device="cpu",
    conditional: bool = False,
    eval_limit=None,
    meta: dict | None = None,
    **fit_kwargs,
) -> dict:
    """Stage 4: train a PixelCNN prior on ``codes.train`` (on the class labels too when
    ``conditional``); returns ``fit``'s meta.

    Evaluates the NLL on the first ``eval_limit`` test code maps (all if None). ``run.json``
    records the VQ-VAE's run directory relative to ``run_dir`` and the code map shape, which is
    what ``fastvq sample`` needs to decode samples.
    """
    test = codes.test[:eval_limit] if eval_limit else codes.test
    labels = ds.test.labels[: test.shape[0]] if conditional else None
    vqvae_rel = os.path.relpath(vqvae_dir, run_dir)
    return fit(
        model,
        "pixelcnn",
        codes.train,
        ds.train.labels,
        device=device,
        prepare=lambda c: c,  # code maps are model inputs as they are
        conditional=conditional,
        evaluate=lambda m: eval_prior(m, test, labels, device),
        run_dir=run_dir,
        meta=dict(meta or {}, vqvae=vqvae_rel, code_shape=list(codes.shape)),
        **fit_kwargs,
    )


# ---------------------------------------------------------------- sampling


@torch.no_grad()
def sample_ae(ae: AE, stats: dict, n: int, generator=None, device="cpu") -> torch.Tensor:
    """``n`` AE decodings of latents drawn from the Gaussian of :func:`latent_stats` (``stats``
    holds its lists, e.g. an AE run's meta); CPU images ``(n, C, H, W)``."""
    mu, sd = torch.tensor(stats["latent_mean"]), torch.tensor(stats["latent_std"])
    z = mu + sd * torch.randn(n, mu.numel(), generator=generator)
    return M.batched(lambda b: ae.decode(b.to(device)).cpu(), z)


@torch.no_grad()
def sample_vae(vae: VAE, n: int, generator=None, batch_size: int = 500) -> torch.Tensor:
    """``n`` VAE samples (decoder means of z ~ N(0, I)), drawn in batches; CPU images."""
    chunks = range(0, n, batch_size)
    return torch.cat(
        [vae.sample(min(batch_size, n - i), generator=generator).cpu() for i in chunks]
    )


@torch.no_grad()
def decode_codes(vqvae: VQVAE, codes: torch.Tensor, device="cpu") -> torch.Tensor:
    """Code maps ``(n, h, w)`` -> the VQ-VAE's decoded CPU images ``(n, C, H, W)``."""
    return M.batched(lambda c: vqvae.decode_indices(c.to(device)).cpu(), codes)


@torch.no_grad()
def sample_prior(
    prior: PixelCNN,
    vqvae: VQVAE,
    n: int,
    shape: tuple[int, int],
    generator=None,
    device="cpu",
    y: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``n`` code maps of ``shape`` from the prior (of class ``y`` if conditional), decoded by
    the VQ-VAE; CPU images."""
    codes = prior.sample(n, shape, y=y, temperature=temperature, generator=generator)
    return decode_codes(vqvae, codes, device)
