"""Functional forms of fastgen's ops."""
from fastgen.ops.masked_conv import masked_conv2d

__all__ = ["masked_conv2d"]
