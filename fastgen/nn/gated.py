import torch
import torch.fx
from torch import nn

from fastgen.nn.conditioning import check_cond, check_label
from fastgen.nn.masked_conv import MaskedConv2d
from fastgen.ops import gated as gated_ops
from fastgen.ops import masked_conv as masked_conv_ops
from fastgen.ops.gated import gated_activation, gated_conv2d, vertical_conv2d

_OPS = (gated_ops.ACT, gated_ops.CONV, gated_ops.VERTICAL, masked_conv_ops.OP)


def _check_stacks(v, h, in_channels):
    """forward's check of its stacks. Wrapped for torch.fx: a traced forward records this call (and drops it)
    instead of testing proxies."""
    if v.dim() != 4 or v.shape[1] != in_channels or h.shape != v.shape:
        raise ValueError(f"GatedMaskedConv2d: v and h must both be [B, {in_channels}, H, W], got "
                         f"{tuple(v.shape)} and {tuple(h.shape)}")


torch.fx.wrap("_check_stacks")


class GatedMaskedConv2d(nn.Module):
    """One layer of the Gated PixelCNN (van den Oord et al. 2016, "Conditional
    Image Generation with PixelCNN Decoders"), with no blind spot.

    Two stacks of ``channels`` feature maps each:
    * vertical: a (k//2+1) x k convolution over the rows above and the current
      row (``v_conv``), gated; its pre-activation reaches the horizontal stack
      through a 1x1 convolution (``link``) shifted down one row, so a row never
      sees itself;
    * horizontal: a 1 x (k//2+1) convolution over the pixels to the left and the
      pixel itself under ``mask_type`` ('A' in the first layer, 'B' after),
      plus the link, gated (one fused op: fastgen.functional.gated_conv2d), then
      a 1x1 ``res`` convolution with a residual connection (when the input has
      ``channels`` maps and the mask is B) and a 1x1 ``skip`` output.
    Conditioning: ``num_classes`` adds a learned per-channel bias per class to
    both stacks; ``cond_channels`` adds a 1x1 convolution of a spatial
    conditioning map [B, cond_channels, H, W] to both; a layer built with either
    needs it on every call, and refuses it otherwise (fastgen.nn.conditioning). ``data_channels``: colour
    blocks as in ``MaskedConv2d`` (channels split into that many blocks; block g
    at a pixel sees colour blocks < g (A) or <= g (B) of that pixel).

    ``backend``: force one backend name on each fastgen op of the layer that
    has it (e.g. 'ref' or 'triton'; see ``fastgen.backends()``); default: dispatch.

    ``last=True``: the last layer of a stack, whose only output is ``skip``
    (no ``res`` convolution, no vertical gate or vertical conditioning).

    ``forward(v, h=None, label=None, cond=None) -> (v, h, skip)``; the first
    layer takes the image as ``v`` (and ``h``); a last layer returns (None, None, skip).
    """

    def __init__(self, in_channels, channels, kernel_size=3, mask_type="B", data_channels=1, num_classes=None,
                 cond_channels=None, residual=None, last=False, backend=None):
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"GatedMaskedConv2d: kernel_size must be an odd positive int, got {kernel_size!r}")
        if mask_type not in ("A", "B"):
            raise ValueError(f"GatedMaskedConv2d: mask_type must be 'A' or 'B', got {mask_type!r}")
        if not isinstance(data_channels, int) or data_channels < 1:
            raise ValueError(f"GatedMaskedConv2d: data_channels must be a positive int, got {data_channels!r}")
        if in_channels % data_channels or channels % data_channels or channels < 1:
            raise ValueError(f"GatedMaskedConv2d: in_channels ({in_channels}) and channels ({channels}) must be "
                             f"positive multiples of data_channels ({data_channels})")
        known = sorted({name for op in _OPS for name in op.backends})
        if backend is not None and backend not in known:
            raise ValueError(f"GatedMaskedConv2d: backend must be None or one of {known}, got {backend!r}")
        if residual is None:
            residual = mask_type == "B" and in_channels == channels
        if residual and (mask_type == "A" or in_channels != channels):
            raise ValueError("GatedMaskedConv2d: a residual connection needs mask B (mask A must not see the "
                             "pixel itself) and in_channels == channels")
        self.in_channels, self.channels, self.kernel_size = in_channels, channels, kernel_size
        self.mask_type, self.data_channels, self.residual, self.backend = mask_type, data_channels, residual, backend
        self.last = last
        half = kernel_size // 2 + 1
        self.v_conv = nn.Conv2d(in_channels, 2 * channels, (half, kernel_size))
        self.h_conv = nn.Conv2d(in_channels, 2 * channels, (1, half))
        self.link = nn.Conv2d(2 * channels, 2 * channels, 1, bias=False)
        conv_backend = self._backend(masked_conv_ops.OP)
        if not last:
            self.res = MaskedConv2d(channels, channels, 1, mask_type="B", data_channels=data_channels,
                                    backend=conv_backend)
        self.skip = MaskedConv2d(channels, channels, 1, mask_type="B", data_channels=data_channels,
                                 backend=conv_backend)
        self.num_classes, self.cond_channels = num_classes, cond_channels
        if num_classes is not None:
            if not last:
                self.label_v = nn.Embedding(num_classes, 2 * channels)
                nn.init.zeros_(self.label_v.weight)
            self.label_h = nn.Embedding(num_classes, 2 * channels)
            nn.init.zeros_(self.label_h.weight)
        if cond_channels is not None:
            if not last:
                self.cond_v = nn.Conv2d(cond_channels, 2 * channels, 1, bias=False)
            self.cond_h = nn.Conv2d(cond_channels, 2 * channels, 1, bias=False)

    def _backend(self, op):
        return self.backend if self.backend in op.backends else None

    def _conditioning(self, label, cond, b, hw):
        """(bias for the vertical stack: [B, 2C], a map or None; bias for the horizontal stack: [B, 2C, 1, 1], a
        map or None). A layer built with num_classes (cond_channels) needs its labels (maps):
        fastgen.nn.conditioning."""
        check_label("GatedMaskedConv2d", label, b, self.num_classes)
        check_cond("GatedMaskedConv2d", cond, b, self.cond_channels, hw)
        cv = ch = None
        if label is not None:
            cv, ch = None if self.last else self.label_v(label), self.label_h(label)[:, :, None, None]
        if cond is not None:
            mh = self.cond_h(cond)
            if not self.last:
                mv = self.cond_v(cond)
                cv = mv if cv is None else mv + cv[:, :, None, None]
            ch = mh if ch is None else mh + ch
        return cv, ch

    def forward(self, v, h=None, label=None, cond=None):
        # written in fastgen's public ops, no test on a traced value: the cached samplers trace it with torch.fx
        # (fastgen/sampling/tracing.py) and read vertical_conv2d, gated_conv2d and gated_activation
        h = v if h is None else h
        _check_stacks(v, h, self.in_channels)
        cv, ch = self._conditioning(label, cond, v.shape[0], v.shape[2:])
        dc = self.data_channels
        vb = self._backend(gated_ops.VERTICAL)
        v_pre = vertical_conv2d(v, self.v_conv.weight, self.v_conv.bias, backend=vb)
        v_out = None
        if not self.last:  # a last layer only needs v_pre, for the link
            v_out = gated_activation(v_pre, cv, data_channels=dc, backend=self._backend(gated_ops.ACT))
        # row y of the horizontal stack reads the vertical pre-activation of row y-1 (row 0: nothing)
        link = vertical_conv2d(v_pre, self.link.weight, shift=1, backend=vb)
        if ch is not None:
            link = link + ch
        gated = gated_conv2d(h, self.h_conv.weight, self.h_conv.bias, link, stack="horizontal",
                             mask_type=self.mask_type, data_channels=dc, backend=self._backend(gated_ops.CONV))
        if self.last:
            return None, None, self.skip(gated)
        h_out = self.res(gated)
        if self.residual:
            h_out = h_out + h
        return v_out, h_out, self.skip(gated)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.channels}, kernel_size={self.kernel_size}, mask_type={self.mask_type!r}, "
                f"data_channels={self.data_channels}, residual={self.residual}" + (", last=True" if self.last else ""))
