"""The precision rules every op with a reduction follows, on every backend (part of each op's spec).

* Math type: float32 for float16, bfloat16 and float32 inputs, float64 for float64.
* Reductions (``reduction=``): 'none' keeps the op's elementwise (or per-pixel)
  values; 'sum' sums them over all but the first dimension ([B], zeros for an
  empty row, [0] for an empty batch); 'mean' averages those sums over the batch.
* Output dtype: a reduced output ('sum', 'mean') of float16 or bfloat16 inputs
  is float32 (a sum over a row of 80000 KL terms or a 64x64 RGB image's NLL
  passes float16's largest value, 65504, where float32 holds it); every other
  output keeps the input's dtype. Autograd casts the gradient back.
"""
import math

import torch

REDUCTIONS = ("sum", "mean", "none")


def compute_dtype(dtype):
    """The math type for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_dtype(dtype, reduction):
    """The dtype of an output of ``reduction`` for inputs of ``dtype`` (module docstring)."""
    if reduction != "none" and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def reduce_rows(t, reduction):
    """'none': ``t``; 'sum': ``t`` summed over all but the first dimension; 'mean': those sums averaged over
    the batch. In ``t``'s dtype (the caller casts to output_dtype)."""
    if reduction == "none":
        return t
    rows = t.reshape(t.shape[0], math.prod(t.shape[1:])).sum(1)
    return rows if reduction == "sum" else rows.mean()
