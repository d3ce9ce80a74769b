"""Small CNN classifier used as the feature extractor for Fréchet distances (an offline,
dataset-specific stand-in for the Inception network of FID)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ClassifierConfig:
    in_channels: int = 1
    image_size: int = 28  # divisible by 4
    num_classes: int = 10
    hidden: int = 32
    feature_dim: int = 128  # penultimate features used for Fréchet distance


class Classifier(nn.Module):
    def __init__(self, cfg: ClassifierConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ClassifierConfig()
        s = cfg.image_size // 4
        self.trunk = nn.Sequential(
            nn.Conv2d(cfg.in_channels, cfg.hidden, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(cfg.hidden, 2 * cfg.hidden, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * cfg.hidden * s * s, cfg.feature_dim),
            nn.ReLU(),
        )
        self.fc = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, feature_dim)."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def training_loss(self, x: torch.Tensor, y: torch.Tensor):
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"ce": loss.item(), "acc": (logits.argmax(1) == y).float().mean().item()}
