"""VQ-VAE (van den Oord et al., 2017): conv encoder -> a quantizer -> conv decoder.

The quantizer is ``cfg.quantizer``: ``"vq"`` (fastvq.VectorQuantizer, the default and every run
saved before the choice existed), ``"fsq"`` (fastvq.FSQ, ``vq_kwargs["levels"]``), ``"lfq"``
(fastvq.LFQ), ``"bsq"`` (fastvq.LFQ with ``spherical=True``), ``"ibq"`` (fastvq.IBQ) or
``"simvq"`` (fastvq.VectorQuantizer with ``simvq=True``). Any layer of the family works:
it returns ``(quantized, indices, loss)`` and decodes indices with ``codes_from_indices``.

Encoder: two 4x4 stride-2 convs, a 3x3 conv, residual blocks (ReLU, 3x3 conv, ReLU, 1x1 conv),
a 1x1 conv to the quantizer's dim. Decoder: a 3x3 conv, residual blocks, two 4x4 stride-2
transposed convs. A 28x28 image becomes a 7x7 map of code indices.

Loss = ||x - x_hat||^2 / Var(x) + the layer's loss (VQ: codebook + beta * commitment; FSQ: zero;
LFQ/BSQ: the entropy terms + beta * commitment; IBQ: its own four weighted terms, beta unused;
SimVQ: as VQ).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VQVAEConfig:
    in_channels: int = 1  # channels C of the images
    hidden: int = 64  # channels of the conv trunks
    res_hidden: int = 32  # bottleneck channels inside a residual block
    n_res: int = 2  # residual blocks in the encoder and in the decoder
    dim: int = 16  # channels of the encoder output = the quantizer's input dim
    # K; None: 256, or for "fsq" prod(levels) (the only value it may have there)
    codebook_size: int | None = None  # K (None: 256, or prod(levels) for "fsq")
    # commitment weight: vq's beta, LFQ/BSQ's commitment_loss_weight (FSQ has no loss). LFQ's
    # own default is 0: its entropy term alone then lets the encoder's output grow without bound
    # (|z| ~ 3e5 at step 100, an infinite loss at step 107: benchmarks/lfq_vqvae_probe.py)
    beta: float = 0.25  # commitment weight of vq, simvq, lfq and bsq; unused by fsq and ibq
    data_variance: float = 1.0  # recon loss = MSE / data_variance (set from the train set)
    # passed as-is to the quantizer (VectorQuantizer: e.g. ema, kmeans_init, codebook_dim,
    # cosine, dead-code threshold; FSQ: levels; LFQ: entropy_loss_weight); empty = its defaults
    vq_kwargs: dict = field(default_factory=dict)  # extra quantizer arguments, passed as-is
    quantizer: str = "vq"  # one of QUANTIZERS; configs saved before the choice have none: "vq"

    def __post_init__(self):
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if self.quantizer == "fsq":
            if "levels" not in self.vq_kwargs:
                raise ValueError('quantizer "fsq" needs vq_kwargs["levels"]')
            from fastvq.fsq import FSQ

            # FSQ's own rule, on a layer without projections (it draws no random weights)
            sym = self.vq_kwargs.get("preserve_symmetry", False)
            size = FSQ(self.vq_kwargs["levels"], preserve_symmetry=sym).codebook_size
            if self.codebook_size not in (None, size):
                raise ValueError(
                    f"codebook_size must be None or prod(levels) = {size} for quantizer "
                    f'"fsq", got {self.codebook_size!r}'
                )
            self.codebook_size = size
        elif self.codebook_size is None:
            self.codebook_size = 256


QUANTIZERS = ("vq", "fsq", "lfq", "bsq", "ibq", "simvq")


def make_quantizer(cfg: VQVAEConfig) -> nn.Module:
    """The quantizer layer of ``cfg``: channel-first, it takes the encoder's ``(B, dim, h, w)``
    and returns ``(quantized (B, dim, h, w), indices (B, h, w) int64, loss)``."""
    from fastvq.fsq import FSQ
    from fastvq.ibq import IBQ
    from fastvq.layer import VectorQuantizer
    from fastvq.lfq import LFQ

    k = cfg.codebook_size
    kw = dict(cfg.vq_kwargs, channel_first=True)
    if cfg.quantizer == "vq":
        return VectorQuantizer(cfg.dim, k, beta=cfg.beta, **kw)
    if cfg.quantizer == "simvq":
        return VectorQuantizer(cfg.dim, k, beta=cfg.beta, simvq=True, **kw)
    if cfg.quantizer == "ibq":  # SEED-Voken's weights are IBQ's own (vq_kwargs), not beta
        return IBQ(cfg.dim, k, **kw)
    if cfg.quantizer == "fsq":
        return FSQ(kw.pop("levels"), dim=cfg.dim, **kw)
    kw.setdefault("commitment_loss_weight", cfg.beta)
    return LFQ(dim=cfg.dim, codebook_size=k, spherical=cfg.quantizer == "bsq", **kw)


class ResidualBlock(nn.Module):
    def __init__(self, c: int, c_res: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(), nn.Conv2d(c, c_res, 3, padding=1), nn.ReLU(), nn.Conv2d(c_res, c, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class VQVAE(nn.Module):
    """Conv encoder -> ``make_quantizer(cfg)`` (channel-first) -> conv decoder with a sigmoid
    output; a (B, C, H, W) image in [0, 1] becomes a (B, H/4, W/4) map of code indices.

    Args:
        cfg: the architecture and quantizer; None: ``VQVAEConfig()``.
    """

    def __init__(self, cfg: VQVAEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or VQVAEConfig()
        h = cfg.hidden
        self.encoder = nn.Sequential(
            nn.Conv2d(cfg.in_channels, h // 2, 4, 2, 1),
            nn.ReLU(),
            nn.Conv2d(h // 2, h, 4, 2, 1),
            nn.ReLU(),
            nn.Conv2d(h, h, 3, padding=1),
            *[ResidualBlock(h, cfg.res_hidden) for _ in range(cfg.n_res)],
            nn.ReLU(),
            nn.Conv2d(h, cfg.dim, 1),
        )
        self.vq = make_quantizer(cfg)
        self.decoder = nn.Sequential(
            nn.Conv2d(cfg.dim, h, 3, padding=1),
            *[ResidualBlock(h, cfg.res_hidden) for _ in range(cfg.n_res)],
            nn.ReLU(),
            nn.ConvTranspose2d(h, h // 2, 4, 2, 1),
            nn.ReLU(),
            nn.ConvTranspose2d(h // 2, cfg.in_channels, 4, 2, 1),
        )

    def encode(self, x: torch.Tensor):
        """(B, C, H, W) -> (quantized (B, D, H/4, W/4), indices (B, H/4, W/4), vq loss).

        Args:
            x: float images (B, in_channels, H, W) in [0, 1].
        """
        z_e = self.encoder(x)  # (B, D, h, w)
        quantized, indices, loss = self.vq(z_e)
        return quantized, indices, loss

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(quantized))  # (B, C, H, W) in [0, 1]

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) int64 code map -> image (B, C, H, W).

        Args:
            indices: int (B, h, w) code indices in [0, codebook_size), as :meth:`encode` returns
                them; decoded with the quantizer's ``codes_from_indices`` (range checked).
        """
        return self.decode(self.vq.codes_from_indices(indices))

    def forward(self, x: torch.Tensor):
        """(B, C, H, W) -> (x_hat (B, C, H, W) in [0, 1], indices (B, H/4, W/4), vq loss).

        Args:
            x: float images (B, in_channels, H, W) in [0, 1]; H and W multiples of 4 (else
                ``x_hat`` comes back at a different size).
        """
        quantized, indices, vq_loss = self.encode(x)
        return self.decode(quantized), indices, vq_loss

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)[0]

    def training_loss(self, x: torch.Tensor, y: torch.Tensor | None = None):
        x_hat, _, vq_loss = self(x)
        mse = F.mse_loss(x_hat, x)
        loss = mse / self.cfg.data_variance + vq_loss
        vq_loss = vq_loss.detach()
        return loss, {"mse": mse.item(), "vq": vq_loss.item()}
