"""Executable spec of the gated ops of the Gated PixelCNN (van den Oord et al. 2016).

Channel layout of a gated pre-activation with ``data_channels`` colour blocks.
A pre-activation has 2C channels split into ``data_channels`` contiguous
blocks (as everywhere in fastgen, see fastgen.ref.masked_conv); each block's
first half is the "value" f, its second half the "gate" g. The gated output
has C channels in ``data_channels`` blocks: block d = tanh(f_d) * sigmoid(g_d).
With one data channel this is ``f, g = pre.chunk(2, 1)``; with colour blocks it
keeps f, g and the output of colour d in colour d's block, so the colour
ordering of the masked convolutions carries through the gate.

* :func:`gated_activation` ``(x + cond)`` gated, ``cond`` an optional
  conditioning bias: [B, 2C] (one bias per sample and channel, e.g. a class
  embedding) or x's full shape (a conditioning map).
* :func:`gated_conv2d` the gated convolution of one stack: conv + bias + cond,
  then the gate. ``stack``:
  - ``'vertical'``: weight [2C, Cin, kv, kw] (kw odd), all taps visible; the
    output at row y sees input rows y-kv+1 .. y (every column within kw//2).
    The Gated PixelCNN shifts this stack down one row before the horizontal
    stack reads it, so no row ever sees itself.
  - ``'horizontal'``: weight [2C, Cin, 1, kc]; the output at (y, x) sees input
    (y, x-kc+1 .. x-1) and, at the last tap (the pixel itself), the centre rule
    of masked convolutions: colour block g of the output sees input blocks
    h < g (mask A) or h <= g (mask B).
  Both give an output the size of the input (stride 1, zero padding).
"""
import torch
import torch.nn.functional as F

from fastgen.ref.masked_conv import centre_channel_mask

STACKS = ("vertical", "horizontal")


def split_gate(x, data_channels=1):
    """(f, g) of a pre-activation [B, 2C, ...]: each [B, C, ...] in colour-block order."""
    b, c2 = x.shape[:2]
    blocks = x.reshape(b, data_channels, 2, c2 // (2 * data_channels), *x.shape[2:])
    f, g = blocks.unbind(2)
    return f.reshape(b, c2 // 2, *x.shape[2:]), g.reshape(b, c2 // 2, *x.shape[2:])


def join_gate(f, g, data_channels=1):
    """Inverse of :func:`split_gate`: the [B, 2C, ...] pre-activation of f and g."""
    b, c = f.shape[:2]
    fb = f.reshape(b, data_channels, 1, c // data_channels, *f.shape[2:])
    gb = g.reshape(b, data_channels, 1, c // data_channels, *g.shape[2:])
    return torch.cat([fb, gb], 2).reshape(b, 2 * c, *f.shape[2:])


def expand_cond(cond, x):
    """A [B, 2C] conditioning bias broadcast over x's positions; a full map as it is."""
    if cond is None or cond.shape == x.shape:
        return cond
    return cond.reshape(*cond.shape, *([1] * (x.dim() - 2)))


def gated_activation(x, cond=None, data_channels=1):
    """tanh(f) * sigmoid(g) of ``x + cond`` (see the module docstring)."""
    if cond is not None:
        x = x + expand_cond(cond, x)
    f, g = split_gate(x, data_channels)
    return torch.tanh(f) * torch.sigmoid(g)


def stack_conv2d(x, weight, bias=None, stack="horizontal", mask_type="B", data_channels=1):
    """The (ungated) convolution of one stack, output the size of the input."""
    co, ci, kh, kw = weight.shape
    if stack == "vertical":
        return F.conv2d(F.pad(x, (kw // 2, kw // 2, kh - 1, 0)), weight, bias)
    mask = torch.ones_like(weight)
    mask[:, :, 0, kw - 1] = centre_channel_mask(co, ci, mask_type, data_channels, weight.device, weight.dtype)
    return F.conv2d(F.pad(x, (kw - 1, 0, 0, 0)), weight * mask, bias)


def gated_conv2d(x, weight, bias=None, cond=None, stack="horizontal", mask_type="B", data_channels=1):
    """gated_activation(stack_conv2d(x, weight, bias) + cond)."""
    return gated_activation(stack_conv2d(x, weight, bias, stack, mask_type, data_channels), cond, data_channels)
