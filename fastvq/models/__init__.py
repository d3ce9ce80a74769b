"""The VQ-VAE story models: AE, VAE, VQ-VAE, a gated PixelCNN prior, and the small classifier used
for sample-quality metrics. Each is built in one line from its dataclass config."""

from .ae import AE, AEConfig
from .classifier import Classifier, ClassifierConfig
from .pixelcnn import PixelCNN, PixelCNNConfig
from .vae import VAE, VAEConfig
from .vqvae import VQVAE, VQVAEConfig

__all__ = [
    "AE",
    "AEConfig",
    "VAE",
    "VAEConfig",
    "VQVAE",
    "VQVAEConfig",
    "PixelCNN",
    "PixelCNNConfig",
    "Classifier",
    "ClassifierConfig",
]
