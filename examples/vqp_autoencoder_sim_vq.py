"""vqp's examples/autoencoder_sim_vq.py on Fashion-MNIST, with vqp or fastvq by one import line.

The same conv autoencoder as examples/vqp_autoencoder.py with ``SimVQ(dim=32,
codebook_size=256, channel_first=True, rotation_trick=True)`` whose codes are a frozen random
basis times a one-hidden-layer MLP (``codebook_transform``), inside vqp's special ``Sequential``,
trained as vqp's example trains it. Prints one JSON line (see examples/vqp_autoencoder.py).

    python examples/vqp_autoencoder_sim_vq.py --impl fastvq --steps 200
    python examples/vqp_autoencoder_sim_vq.py --impl vqp --steps 200
"""

import torch
from torch import nn
from vqp_example_common import parse_args, train_and_report

NUM_CODES = 256


def main():
    args = parse_args(__doc__, steps=200)
    torch.set_num_threads(args.threads)
    if args.impl == "vqp":
        from vector_quantize_pytorch import Sequential, SimVQ
    else:
        from fastvq.compat.vqp import Sequential, SimVQ

    torch.manual_seed(args.seed)
    model = Sequential(
        nn.Conv2d(1, 16, kernel_size=3, stride=1, padding=1),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.GELU(),
        nn.Conv2d(16, 32, kernel_size=3, stride=1, padding=1),
        nn.MaxPool2d(kernel_size=2, stride=2),
        SimVQ(
            dim=32,
            codebook_size=NUM_CODES,
            rotation_trick=True,
            channel_first=True,
            codebook_transform=nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 32)),
        ),
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(32, 16, kernel_size=3, stride=1, padding=1),
        nn.GELU(),
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(16, 1, kernel_size=3, stride=1, padding=1),
    )
    train_and_report(model, args, args.impl, NUM_CODES)


if __name__ == "__main__":
    main()
