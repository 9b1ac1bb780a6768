"""Executable spec of the masked (causal) 2-D convolution of PixelCNN.

Raster order: pixel (y, x) may see pixels in rows above, and pixels to its left
in its own row. The centre tap (the pixel itself) is where mask A and mask B
differ, and where colour ordering applies when ``data_channels > 1``:

* input and output channels are each split into ``data_channels`` contiguous
  blocks (for RGB: R block, G block, B block; van den Oord et al. 2016);
* at the centre tap, output block g sees input blocks h < g (mask A) or
  h <= g (mask B). With ``data_channels == 1`` mask A hides the centre, mask B
  shows it.

Everything else in fastgen is tested against :func:`masked_conv2d` here.
"""
import torch
import torch.nn.functional as F


def centre_channel_mask(out_channels, in_channels, mask_type, data_channels, device=None, dtype=None):
    """[Cout, Cin] 0/1 mask of the centre tap (the colour-ordering rule)."""
    go = torch.arange(out_channels, device=device) // (out_channels // data_channels)
    gi = torch.arange(in_channels, device=device) // (in_channels // data_channels)
    m = gi[None, :] < go[:, None] if mask_type == "A" else gi[None, :] <= go[:, None]
    return m.to(dtype or torch.float32)


def causal_mask(out_channels, in_channels, kernel_size, mask_type, data_channels=1, device=None, dtype=None):
    """Full [Cout, Cin, kh, kw] 0/1 mask for a masked convolution."""
    kh, kw = kernel_size
    ch, cw = kh // 2, kw // 2
    m = torch.zeros(out_channels, in_channels, kh, kw, device=device, dtype=dtype or torch.float32)
    m[:, :, :ch, :] = 1
    m[:, :, ch, :cw] = 1
    m[:, :, ch, cw] = centre_channel_mask(out_channels, in_channels, mask_type, data_channels, device, m.dtype)
    return m


def masked_conv2d(x, weight, bias=None, mask_type="B", data_channels=1, padding=(0, 0), dilation=(1, 1)):
    """Reference: an ordinary convolution with the weight multiplied by the mask."""
    co, ci, kh, kw = weight.shape
    mask = causal_mask(co, ci, (kh, kw), mask_type, data_channels, weight.device, weight.dtype)
    return F.conv2d(x, weight * mask, bias, padding=tuple(padding), dilation=tuple(dilation))
