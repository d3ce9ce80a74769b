"""Plain convolutional autoencoder with a deterministic latent vector."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AEConfig:
    in_channels: int = 1  # channels C of the input and reconstructed images
    image_size: int = 28  # H = W, divisible by 4
    hidden: int = 32  # channels of the first conv; the second has 2 * hidden
    latent_dim: int = 16  # size of the latent vector z


def conv_encoder(in_channels: int, hidden: int) -> nn.Sequential:
    """(B, C, H, W) -> (B, 2*hidden, H/4, W/4): two 4x4 stride-2 convs."""
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 4, 2, 1),
        nn.ReLU(),
        nn.Conv2d(hidden, 2 * hidden, 4, 2, 1),
        nn.ReLU(),
    )


def conv_decoder(out_channels: int, hidden: int) -> nn.Sequential:
    """(B, 2*hidden, H/4, W/4) -> (B, out_channels, H, W): two 4x4 stride-2 transposed convs."""
    return nn.Sequential(
        nn.ConvTranspose2d(2 * hidden, hidden, 4, 2, 1),
        nn.ReLU(),
        nn.ConvTranspose2d(hidden, out_channels, 4, 2, 1),
    )


class AE(nn.Module):
    """x in [0, 1] -> z = encode(x) in R^latent_dim -> x_hat = sigmoid(decode(z)); MSE loss.

    Args:
        cfg: the architecture; None: ``AEConfig()``.
    """

    def __init__(self, cfg: AEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or AEConfig()
        assert cfg.image_size % 4 == 0, "image_size must be divisible by 4"
        self.s = cfg.image_size // 4
        flat = 2 * cfg.hidden * self.s * self.s
        self.encoder = nn.Sequential(
            conv_encoder(cfg.in_channels, cfg.hidden), nn.Flatten(), nn.Linear(flat, cfg.latent_dim)
        )
        self.decoder_in = nn.Sequential(nn.Linear(cfg.latent_dim, flat), nn.ReLU())
        self.decoder = conv_decoder(cfg.in_channels, cfg.hidden)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)  # (B, latent_dim)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.decoder_in(z).view(-1, 2 * self.cfg.hidden, self.s, self.s)
        return torch.sigmoid(self.decoder(h))  # (B, C, H, W) in [0, 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``sigmoid(decode(encode(x)))``, (B, C, H, W) in [0, 1].

        Args:
            x: float images (B, in_channels, image_size, image_size), values in [0, 1].
        """
        return self.decode(self.encode(x))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)

    def training_loss(self, x: torch.Tensor, y: torch.Tensor | None = None):
        mse = F.mse_loss(self(x), x)
        return mse, {"mse": mse.item()}
