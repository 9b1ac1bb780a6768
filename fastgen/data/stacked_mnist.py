"""Stacked MNIST (Metz et al. 2017; used by VEEGAN and PacGAN to count a GAN's modes): three MNIST digits as
the three colour channels of one 28x28 image, so 1000 modes; the label is 100 * the first digit + 10 * the
second + the third.

Image n of a split stacks MNIST images p0[n], p1[n] and p2[n] of the same split (train, valid, test: 50000,
10000 and 10000 images), the permutations drawn from a fixed seed per split: the same dataset on every call
and every machine."""
import torch

from fastgen.data import mnist

SPLITS = mnist.SPLITS
NUM_CLASSES = 1000
SEED = 2017  # of the permutations: never change it (it defines the dataset)


def load_stacked_mnist(split: str = "train") -> "tuple[torch.Tensor, torch.Tensor]":
    """(images uint8 [N, 3, 28, 28], labels int64 [N] in 0..999) of ``split``."""
    images, labels = mnist.load_mnist(split)
    gen = torch.Generator().manual_seed(SEED + SPLITS.index(split))
    perms = [torch.randperm(len(images), generator=gen) for _ in range(3)]
    stacked = torch.cat([images[p] for p in perms], 1)
    return stacked, labels[perms[0]] * 100 + labels[perms[1]] * 10 + labels[perms[2]]
