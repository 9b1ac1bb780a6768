"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, offline.

The package puts the four IDX files, gzipped, under
/usr/share/datasets/fashion-mnist/: {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz.
Splits: 'train' (60000) and 'test' (10000), uint8 [N, 1, 28, 28], 10 classes.
"""
import os
import threading

import torch

from fastgen.data.errors import DatasetMissingError
from fastgen.data.files import IDX_SPLIT_PREFIXES, find_idx_pair, load_idx

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL = "apt-get install dataset-fashion-mnist"
SPLITS = ("train", "test")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

_cache = {}
_lock = threading.Lock()


def load_fashion_mnist(split: str = "train", root: "str | os.PathLike[str] | None" = None
                       ) -> "tuple[torch.Tensor, torch.Tensor]":
    """(images uint8 [N, 1, 28, 28], labels int64 [N]) of one Fashion-MNIST
    split, 'train' or 'test'. ``root``: a folder with the IDX files (default:
    where the Debian package puts them). Decoded once per process per split;
    the tensors are shared, so copy them before writing into them."""
    if split not in SPLITS:
        raise ValueError(f"load_fashion_mnist: split must be one of {SPLITS}, got {split!r}")
    folder = os.fspath(root) if root is not None else FASHION_MNIST_DIR
    with _lock:
        key = (os.path.abspath(folder), split)
        if key not in _cache:
            found = find_idx_pair(folder, IDX_SPLIT_PREFIXES[split])
            if found is None or found[1] is None:
                prefix = IDX_SPLIT_PREFIXES[split][0]
                raise DatasetMissingError(
                    f"Fashion-MNIST is not installed: no {prefix}-images-idx3-ubyte[.gz] with its labels file in "
                    f"{folder}; install it with `{INSTALL}` (Debian/Ubuntu, as root), or pass root=<folder with "
                    f"the IDX files>")
            _cache[key] = load_idx(*found)
    return _cache[key]
