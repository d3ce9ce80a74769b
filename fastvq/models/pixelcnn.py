"""Gated PixelCNN prior over maps of code indices (van den Oord et al., 2016, "Conditional Image
Generation with PixelCNN Decoders"), with the vertical/horizontal stacks that remove the blind spot.

Causality is built from padding and shifts instead of masked weights:
  * vertical stack: a (k//2 + 1, k) conv over rows i - k//2 .. i; its output is shifted down one row
    before it feeds the horizontal stack, so position (i, j) only sees rows < i through it;
  * horizontal stack: a (1, k//2 + 1) conv over columns j - k//2 .. j of row i; in the first
    layer the input is shifted right one column so position (i, j) never sees its own index
    (mask "A").
Hence the logits at (i, j) depend exactly on the indices before (i, j) in raster order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PixelCNNConfig:
    num_codes: int = 256  # K, size of the VQ codebook
    channels: int = 32  # width of both stacks
    n_layers: int = 6  # gated layers; receptive field grows by k//2 per layer
    kernel_size: int = 3  # odd
    num_classes: int | None = None  # class-conditional when set


class GatedLayer(nn.Module):
    def __init__(self, c: int, k: int, first: bool, num_classes: int | None):
        super().__init__()
        assert k % 2 == 1, "kernel_size must be odd"
        self.p, self.first = k // 2, first
        self.v_conv = nn.Conv2d(c, 2 * c, (k // 2 + 1, k))
        self.v_to_h = nn.Conv2d(2 * c, 2 * c, 1)
        self.h_conv = nn.Conv2d(c, 2 * c, (1, k // 2 + 1))
        self.h_out = nn.Conv2d(c, c, 1)
        self.cond = nn.Embedding(num_classes, 2 * c) if num_classes else None

    @staticmethod
    def gate(x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.tanh(a) * torch.sigmoid(b)

    def forward(self, v, h, y=None):
        H, W = v.shape[-2:]
        p = self.p
        v_pre = self.v_conv(F.pad(v, (p, p, p, 0)))  # (B, 2c, H, W); row i sees rows i-p..i
        v_down = F.pad(v_pre, (0, 0, 1, 0))[:, :, :H]  # row i now sees rows < i
        h_in = F.pad(h, (1, 0))[..., :W] if self.first else h  # mask A: drop own column
        h_pre = self.h_conv(F.pad(h_in, (p, 0))) + self.v_to_h(v_down)  # (B, 2c, H, W)
        if self.cond is not None and y is not None:
            c = self.cond(y)[:, :, None, None]  # (B, 2c, 1, 1)
            v_pre, h_pre = v_pre + c, h_pre + c
        h_new = self.h_out(self.gate(h_pre))
        if not self.first:  # a residual in layer 1 would leak the current index
            h_new = h_new + h
        return self.gate(v_pre), h_new


class PixelCNN(nn.Module):
    """Autoregressive prior p(c) = prod_i p(c_i | c_<i [, y]) over (B, H, W) int64 code maps.

    Args:
        cfg: the architecture; None: ``PixelCNNConfig()``.
    """

    def __init__(self, cfg: PixelCNNConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or PixelCNNConfig()
        self.embed = nn.Embedding(cfg.num_codes, cfg.channels)
        self.layers = nn.ModuleList(
            GatedLayer(cfg.channels, cfg.kernel_size, i == 0, cfg.num_classes)
            for i in range(cfg.n_layers)
        )
        self.head = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(cfg.channels, 4 * cfg.channels, 1),
            nn.ReLU(),
            nn.Conv2d(4 * cfg.channels, cfg.num_codes, 1),
        )

    def forward_embedded(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) embedded codes -> (B, K, H, W) logits.

        Args:
            x: float (B, channels, H, W), the code embeddings (as :meth:`forward` makes them).
            y: int64 (B,) class labels in [0, num_classes), or None (unconditional); ignored
                when ``cfg.num_classes`` is None.
        """
        v = h = x
        for layer in self.layers:
            v, h = layer(v, h, y)
        return self.head(h)

    def forward(self, indices: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, W) int64 -> (B, K, H, W) logits of p(c_ij | c_<ij).

        Args:
            indices: int64 (B, H, W) code maps, values in [0, num_codes).
            y: int64 (B,) class labels in [0, num_classes), or None (unconditional); ignored
                when ``cfg.num_classes`` is None.
        """
        x = self.embed(indices).permute(0, 3, 1, 2)  # (B, C, H, W)
        return self.forward_embedded(x, y)

    def nll_bits(self, indices: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Per-map negative log-likelihood in bits per code, (B,).

        Args:
            indices: int64 (B, H, W) code maps, values in [0, num_codes).
            y: int64 (B,) class labels, or None; as in :meth:`forward`.
        """
        logits = self(indices, y)
        nll = F.cross_entropy(logits, indices, reduction="none")  # nats (B, H, W)
        return nll.flatten(1).mean(1) / math.log(2)

    def training_loss(self, indices: torch.Tensor, y: torch.Tensor | None = None):
        loss = self.nll_bits(indices, y).mean()
        return loss, {"bits_per_code": loss.item()}

    @torch.no_grad()
    def sample(
        self,
        n: int,
        shape: tuple[int, int],
        y: torch.Tensor | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw n code maps of ``shape`` (H, W) in raster order; returns (n, H, W) int64.

        Args:
            n: number of maps.
            shape: ``(H, W)`` of each map.
            y: int64 (n,) class labels, or None; as in :meth:`forward`.
            temperature: the logits are divided by it before the softmax (> 0; 1 samples the
                model, lower is greedier).
            generator: a CPU ``torch.Generator`` for the draws (taken on the CPU); None: torch's
                global CPU RNG.
        """
        device = next(self.parameters()).device
        H, W = shape
        out = torch.zeros(n, H, W, dtype=torch.long, device=device)
        for i in range(H):
            for j in range(W):
                # rows below i cannot influence row i (causal), so run on rows 0..i only
                logits = self(out[:, : i + 1], y)[:, :, i, j] / temperature  # (n, K)
                probs = torch.softmax(logits.float(), dim=1).cpu()
                out[:, i, j] = (
                    torch.multinomial(probs, 1, generator=generator).squeeze(1).to(device)
                )
        return out
