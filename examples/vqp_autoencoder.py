"""vqp's examples/autoencoder.py on Fashion-MNIST, with vqp or fastvq by one import line.

A small conv autoencoder with ``VectorQuantize(dim=32, accept_image_fmap=True,
codebook_size=256)`` (vqp's defaults otherwise: EMA codebook, rotation trick) inside vqp's
special ``Sequential``, trained as vqp's example trains it (AdamW 3e-4, L1 reconstruction plus 10
times the commitment loss, batches of 256). Prints one JSON line: test reconstruction L1 and MSE,
codebook usage and perplexity on the test set, median step time.

    python examples/vqp_autoencoder.py --impl fastvq --steps 200
    python examples/vqp_autoencoder.py --impl vqp --steps 200
"""

import torch
from torch import nn
from vqp_example_common import parse_args, train_and_report

NUM_CODES = 256


def main():
    args = parse_args(__doc__, steps=200)
    torch.set_num_threads(args.threads)
    if args.impl == "vqp":
        from vector_quantize_pytorch import Sequential, VectorQuantize
    else:
        from fastvq.compat.vqp import Sequential, VectorQuantize

    torch.manual_seed(args.seed)
    model = Sequential(
        nn.Conv2d(1, 16, kernel_size=3, stride=1, padding=1),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.GELU(),
        nn.Conv2d(16, 32, kernel_size=3, stride=1, padding=1),
        nn.MaxPool2d(kernel_size=2, stride=2),
        VectorQuantize(dim=32, accept_image_fmap=True, codebook_size=NUM_CODES),
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(32, 16, kernel_size=3, stride=1, padding=1),
        nn.GELU(),
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(16, 1, kernel_size=3, stride=1, padding=1),
    )
    train_and_report(model, args, args.impl, NUM_CODES)


if __name__ == "__main__":
    main()
