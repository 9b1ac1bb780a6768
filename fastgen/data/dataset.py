"""One entry point for every dataset: ``load_dataset(name, split, root=...)``.

It returns an ImageData: the split's tensors (``.images`` uint8 [N, C, H, W],
``.labels`` int64 [N]) plus what a model needs to know (``.num_classes``,
``.levels``), and it is a torch Dataset (item = (image uint8 [C, H, W], label
int64 scalar)) to hand to a DataLoader.

Binarized MNIST, 'train' split: every item draw binarizes afresh (dynamic
binarization) with torch's default generator. That is deterministic when
- num_workers=0: seed the process with torch.manual_seed(s);
- num_workers>0: pass DataLoader(..., generator=torch.Generator().manual_seed(s));
  the DataLoader seeds each worker's torch generator from it (base seed +
  worker id), so runs repeat draw for draw.
Code that indexes tensors itself can call ``data.draw(index, generator)``.
``.images`` of that split holds the fixed seeded binarization (as the
evaluation splits do); ``.source`` holds the grey images drawn from.
"""
import os
from typing import Optional, Tuple

import torch

from fastgen.data import cifar10, digits, fashion_mnist, files, mnist, stacked_mnist
from fastgen.data.mnist import binarize

DATASETS = {  # name -> splits
    "mnist": mnist.SPLITS,
    "binarized-mnist": mnist.SPLITS,
    "fashion-mnist": fashion_mnist.SPLITS,
    "stacked-mnist": stacked_mnist.SPLITS,
    "digits": digits.SPLITS,
    "cifar10": cifar10.SPLITS,
    "files": files.SPLITS,
}
ALIASES = {"cifar-10": "cifar10", "fashion": "fashion-mnist", "binary-mnist": "binarized-mnist"}


class ImageData(torch.utils.data.Dataset):
    """A loaded split. Attributes: name, split, images (uint8 [N, C, H, W];
    0..255, or 0/1 when levels == 2), labels (int64 [N]), num_classes, levels
    (256, or 2 for binarized), classes (class names or None), source (grey
    uint8 images binarized afresh on every draw, or None), dynamic (source is
    not None). The tensors may be shared with a cache: copy before writing."""

    def __init__(self, name, split, images, labels, num_classes, levels, classes=None, source=None):
        self.name, self.split = name, split
        self.images, self.labels = images, labels
        self.num_classes, self.levels = num_classes, levels
        self.classes = list(classes) if classes is not None else None
        self.source = source

    @property
    def dynamic(self):
        return self.source is not None

    @property
    def shape(self):
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        if self.source is not None:
            return binarize(self.source[i]), self.labels[i]  # torch's default generator: see the module docstring
        return self.images[i], self.labels[i]

    def draw(self, index, generator=None):
        """Images at ``index`` (an int, slice or index tensor) as training sees
        them: a fresh binarization from ``generator`` for a dynamic split,
        else the stored images."""
        if self.source is not None:
            return binarize(self.source[index], generator=generator)
        return self.images[index]

    def __repr__(self):
        kind = ", dynamic binarization" if self.dynamic else ""
        return (f"ImageData({self.name!r}, split={self.split!r}, {len(self)} images of {self.shape}, "
                f"{self.num_classes} classes, levels={self.levels}{kind})")


def load_dataset(name: str, split: str = "train", *, root: "str | os.PathLike[str] | None" = None,
                 expect_shape: Optional[Tuple[Optional[int], ...]] = None,
                 num_classes: Optional[int] = None) -> ImageData:
    """Load one split of a dataset as an ImageData.

    name: 'mnist', 'binarized-mnist', 'stacked-mnist' (splits train/valid/test), 'fashion-mnist',
      'digits', 'cifar10' (root = the cifar-10-batches-py folder) (train/test),
      'files' (root = an .npz, an IDX images file or folder, or a folder of
      PNG / JPEG / BMP images; splits train/test/all; see fastgen.data.files).
    root: where the files are; only for 'files', 'cifar10' and (optionally) 'fashion-mnist'.
    expect_shape: (C, H, W) the caller needs, None entries matching anything.
    num_classes: labels must lie in 0..num_classes-1; it becomes .num_classes.
    Errors: ValueError for a bad name, split, shape or label;
    DatasetMissingError (naming the install command) for a missing dataset."""
    key = ALIASES.get(str(name).lower().replace("_", "-"), str(name).lower().replace("_", "-"))
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if split not in DATASETS[key]:
        raise ValueError(f"dataset {key!r} has splits {', '.join(DATASETS[key])}; got split {split!r}")
    if root is not None and key not in ("files", "cifar10", "fashion-mnist"):
        raise ValueError(f"dataset {key!r} takes no root (it is found automatically); root is for "
                         f"'files', 'cifar10' and 'fashion-mnist'")

    classes, source, levels, n_classes = None, None, 256, 10
    if key == "mnist":
        images, labels = mnist.load_mnist(split)
    elif key == "binarized-mnist":
        images, labels = mnist.load_binarized_mnist(split)
        levels = 2
        if split == "train":
            source = mnist.load_mnist(split)[0]
    elif key == "fashion-mnist":
        images, labels = fashion_mnist.load_fashion_mnist(split, root=root)
        classes = fashion_mnist.CLASSES
    elif key == "stacked-mnist":
        images, labels = stacked_mnist.load_stacked_mnist(split)
        n_classes = stacked_mnist.NUM_CLASSES
    elif key == "digits":
        images, labels = digits.load_digits(split)
    elif key == "cifar10":
        images, labels = cifar10.load_cifar10(root, split)
        classes = cifar10.CLASSES
    else:
        found = files.load_files(root, split)
        images, labels, n_classes, levels, classes = found

    if expect_shape is not None:
        _check_shape(key, images.shape[1:], expect_shape)
    if num_classes is not None:
        _check_labels(key, split, labels, num_classes)
        n_classes = num_classes
    return ImageData(key, split, images, labels, n_classes, levels, classes=classes, source=source)


def _check_shape(name, found, expect):
    found = tuple(found)
    expect = tuple(expect)
    if len(expect) != 3 or any(e != f for e, f in zip(expect, found) if e is not None):
        allowed = "(" + ", ".join("any" if e is None else str(e) for e in expect) + ")"
        raise ValueError(f"dataset {name!r} has images of shape {found} (C, H, W), but {allowed} is expected")


def _check_labels(name, split, labels, num_classes):
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"dataset {name!r} ({split}) has labels {labels.min().item()}..{labels.max().item()}, "
                         f"but labels must lie in 0..{num_classes - 1} for num_classes={num_classes}")
