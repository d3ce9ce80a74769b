"""Gaussian VAE with a discretized-logistic likelihood over the 256 levels of 8-bit pixels.

The decoder outputs, per pixel, a mean ``m`` and a log-scale ``log s`` of a logistic distribution
on [-1, 1]; the probability of pixel value ``k/255`` (k = 0..255) is the logistic mass of its bin
of width 2/255, with the two edge bins extended to -inf / +inf (PixelCNN++, Salimans et al. 2017).
This is a proper probability mass function over the 256 levels, so

    neg-ELBO bits/dim = (-log p(x | z) + KL(q(z | x) || N(0, I))) / (D * ln 2),  D = C * H * W,

is an upper bound on the model's code length for the test images, comparable to published
bits/dim figures. Training minimises exactly this quantity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .ae import conv_decoder, conv_encoder


@dataclass
class VAEConfig:
    in_channels: int = 1  # channels C of the images
    image_size: int = 28  # H = W, divisible by 4
    hidden: int = 32  # channels of the first conv; the second has 2 * hidden
    latent_dim: int = 16  # size of the latent z (the encoder outputs its mean and log-variance)
    min_log_scale: float = -7.0  # floor on the logistic log-scale, for stability


def discretized_logistic_log_prob(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """log P(x) per element, natural log, for x in [0, 1] on the grid k/255.

    ``mean`` and ``log_scale`` live on the [-1, 1] scale. Edge bins absorb the tails.
    """
    x = x * 2 - 1  # [0, 1] -> [-1, 1]
    centered = x - mean
    inv_s = torch.exp(-log_scale)
    plus_in = inv_s * (centered + 1 / 255)
    min_in = inv_s * (centered - 1 / 255)
    log_cdf_plus = plus_in - F.softplus(plus_in)  # log sigmoid(plus_in), for the x = 0 bin
    log_one_minus_cdf_min = -F.softplus(min_in)  # log (1 - sigmoid(min_in)), for the x = 255 bin
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    mid_in = inv_s * centered
    # when the bin mass underflows, use density * bin width (2/255)
    log_pdf_mid = mid_in - log_scale - 2 * F.softplus(mid_in) + math.log(2 / 255)
    log_mid = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp_min(1e-12)), log_pdf_mid)
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_mid)
    )


class VAE(nn.Module):
    """q(z|x) = N(mu, diag sigma^2), p(z) = N(0, I), p(x|z) discretized logistic per pixel.

    Args:
        cfg: the architecture; None: ``VAEConfig()``.
    """

    def __init__(self, cfg: VAEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or VAEConfig()
        assert cfg.image_size % 4 == 0, "image_size must be divisible by 4"
        self.s = cfg.image_size // 4
        flat = 2 * cfg.hidden * self.s * self.s
        self.encoder = nn.Sequential(
            conv_encoder(cfg.in_channels, cfg.hidden),
            nn.Flatten(),
            nn.Linear(flat, 2 * cfg.latent_dim),
        )
        self.decoder_in = nn.Sequential(nn.Linear(cfg.latent_dim, flat), nn.ReLU())
        self.decoder = conv_decoder(2 * cfg.in_channels, cfg.hidden)  # mean and log-scale

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)  # (B, L) each
        return mu, logvar

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.decoder_in(z).view(-1, 2 * self.cfg.hidden, self.s, self.s)
        mean, log_scale = self.decoder(h).chunk(2, dim=1)  # (B, C, H, W) each, [-1, 1] scale
        return mean, log_scale.clamp_min(self.cfg.min_log_scale)

    @staticmethod
    def mean_image(mean: torch.Tensor) -> torch.Tensor:
        """Decoder mean on the [-1, 1] scale -> image in [0, 1]."""
        return ((mean + 1) / 2).clamp(0, 1)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        mu, _ = self.encode(x)
        return self.mean_image(self.decode(mu)[0])

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images from the prior, each the decoder mean of one z ~ N(0, I).

        Args:
            n: number of images; returns (n, C, H, W) in [0, 1].
            generator: a CPU ``torch.Generator`` for the z draws (drawn on the CPU, then moved to
                the model's device); None: torch's global CPU RNG.
        """
        device = next(self.parameters()).device
        z = torch.randn(n, self.cfg.latent_dim, generator=generator).to(device)
        return self.mean_image(self.decode(z)[0])

    def neg_elbo_bits_per_dim(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Per-image negative ELBO in bits/dim (B,), with its two parts in the info dict.

        Args:
            x: float images (B, in_channels, image_size, image_size) in [0, 1], on the grid
                k/255 of 8-bit pixels; z is drawn with the global RNG.
        """
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar)
        mean, log_scale = self.decode(z)
        nll = -discretized_logistic_log_prob(x, mean, log_scale).flatten(1).sum(1)  # nats (B,)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)  # nats (B,)
        d = x[0].numel() * math.log(2)
        return (nll + kl) / d, {"recon_bpd": nll / d, "kl_bpd": kl / d}

    def training_loss(self, x: torch.Tensor, y: torch.Tensor | None = None):
        bpd, parts = self.neg_elbo_bits_per_dim(x)
        loss = bpd.mean()
        return loss, {"bpd": loss.item(), "kl_bpd": parts["kl_bpd"].mean().item()}
