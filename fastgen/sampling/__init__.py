"""Pixel-by-pixel samplers for fastgen's autoregressive image models."""
from fastgen.sampling.naive import naive_sample

__all__ = ["naive_sample"]
