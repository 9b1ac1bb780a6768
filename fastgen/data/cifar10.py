"""CIFAR-10 from a user-supplied copy of the python-format batches.

No offline package exists: download cifar-10-python.tar.gz from
https://www.cs.toronto.edu/~kriz/cifar.html where there is a network, extract
it, and pass root=<the cifar-10-batches-py folder> (or the folder that holds
it). Each batch is a pickle of a dict with b'data' (uint8 [N, 3072], the
red, green then blue planes of a 32x32 image) and b'labels' (N ints).
Splits: 'train' = data_batch_1..5 (50000), 'test' = test_batch (10000).

The batches are unpickled with an allow-list (numpy arrays, plain containers),
so a tampered file cannot run code.
"""
import os
import pickle

import numpy as np
import torch

from fastgen.data.errors import DatasetMissingError

SPLITS = ("train", "test")
BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
FOLDER = "cifar-10-batches-py"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
HOW = ("CIFAR-10 has no offline package: download cifar-10-python.tar.gz from "
       "https://www.cs.toronto.edu/~kriz/cifar.html, extract it, and pass root=<path to cifar-10-batches-py>")


def _numpy_global(module, name):
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to numpy._core
    allowed = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): core.multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): core.multiarray._reconstruct,
        ("numpy.core.numeric", "_frombuffer"): core.numeric._frombuffer,
        ("numpy._core.numeric", "_frombuffer"): core.numeric._frombuffer,
    }
    return allowed.get((module, name))


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):  # how protocol-2 pickles from Python 3 store bytes
            import codecs
            return codecs.encode
        found = _numpy_global(module, name)
        if found is None:
            raise pickle.UnpicklingError(f"CIFAR-10 batch refers to {module}.{name}, which is not allowed "
                                         f"(only numpy arrays and plain containers)")
        return found


def cifar10_dir(root):
    """The folder holding the batches: ``root`` itself or root/cifar-10-batches-py."""
    if root is None:
        raise DatasetMissingError(f"CIFAR-10 needs root=: {HOW}")
    root = os.fspath(root)
    for folder in (os.path.join(root, FOLDER), root):
        if all(os.path.isfile(os.path.join(folder, b)) for bs in BATCHES.values() for b in bs):
            return folder
    missing = [b for bs in BATCHES.values() for b in bs if not os.path.isfile(os.path.join(root, b))]
    raise DatasetMissingError(f"CIFAR-10 not found in {root} (missing {', '.join(missing)}): {HOW}")


def _read_batch(path):
    with open(path, "rb") as f:
        try:
            d = _SafeUnpickler(f, encoding="bytes").load()  # encoding: the batches were pickled by Python 2
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a CIFAR-10 python batch ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: not a CIFAR-10 python batch (a {type(d).__name__}, expected a dict)")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: CIFAR-10 batch without b'data' / b'labels' (keys: {sorted(map(str, d))})")
    data, labels = np.asarray(data), np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (len(data),):
        raise ValueError(f"{path}: expected b'data' uint8 [N, 3072] and N labels, got data {data.dtype} "
                         f"{data.shape}, labels {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: CIFAR-10 labels must be 0..9, found {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar10(root: "str | os.PathLike[str] | None", split: str = "train") -> "tuple[torch.Tensor, torch.Tensor]":
    """(images uint8 [N, 3, 32, 32], labels int64 [N]) of one CIFAR-10 split,
    'train' (data_batch_1..5) or 'test' (test_batch), read from ``root``."""
    if split not in SPLITS:
        raise ValueError(f"load_cifar10: split must be one of {SPLITS}, got {split!r}")
    folder = cifar10_dir(root)
    parts = [_read_batch(os.path.join(folder, b)) for b in BATCHES[split]]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)
