"""scikit-learn's bundled 8x8 digits (1797 images, 10 classes): tiny real data for quick tests.

sklearn stores pixels as 0..16; they are scaled to uint8 0..255 by
round(v * 255 / 16). Fixed split, in sklearn's order: 'train' = the first
1500 images, 'test' = the remaining 297.
"""
import threading

import numpy as np
import torch

from fastgen.data.errors import DatasetMissingError

INSTALL = "pip install scikit-learn"
SPLITS = ("train", "test")
N_TRAIN = 1500

_cache = {}
_lock = threading.Lock()


def load_digits(split: str = "train") -> "tuple[torch.Tensor, torch.Tensor]":
    """(images uint8 [N, 1, 8, 8], labels int64 [N]) of one split of
    sklearn's digits: 'train' (1500) or 'test' (297)."""
    if split not in SPLITS:
        raise ValueError(f"load_digits: split must be one of {SPLITS}, got {split!r}")
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise DatasetMissingError(f"the 8x8 digits come with scikit-learn, which is not installed: "
                                  f"install it with `{INSTALL}`") from None
    with _lock:
        if not _cache:
            d = sklearn_digits()
            images = torch.from_numpy(np.rint(d.images * (255 / 16)).astype(np.uint8)[:, None])
            labels = torch.from_numpy(d.target.astype(np.int64))
            _cache["train"] = (images[:N_TRAIN], labels[:N_TRAIN])
            _cache["test"] = (images[N_TRAIN:], labels[N_TRAIN:])
    return _cache[split]
