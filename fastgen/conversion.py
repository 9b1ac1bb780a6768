"""``fastgen.convert(model)``: another project's PixelCNN on fastgen's layers, in place, with its parameters,
checkpoint and optimizer unchanged (as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does for batch norm).

What it converts:

* a masked convolution: any ``nn.Conv2d`` (or subclass) that holds a fixed 0/1 mask, as a buffer or a tensor
  attribute of the weight's shape or of shape [1, 1, kh, kw], and computes ``conv2d(x, weight * mask)``: the
  ``weight.data *= mask`` before ``super().forward`` of jzbontar/pixelcnn-pytorch and pytorch-generative, or
  ``F.conv2d(x, self.weight * self.mask, ...)``. That it computes this is checked, not assumed: a float64 copy of
  the module is run on a random input against the masked convolution. It becomes a ``fastgen.MaskedConv2d``
  holding the same weight and bias Parameters (the same tensor objects: an optimizer built before still trains
  them) in the same training mode, with ``mask_type`` and ``data_channels`` read off the mask: van den Oord's
  layout, colour channels as contiguous blocks of equal size (block g of the output sees input blocks < g,
  mask A, or <= g, mask B, at the centre tap), for any number of blocks that divides both channel counts; colours
  interleaved across the channels (channel i of colour i % 3) and unequal blocks (C // 3, C // 3 and the rest,
  when C does not divide by 3) are not recognised: fastgen.MaskedConv2d cannot compute them. A mask
  that is not causal (a tap below the centre row or right of the centre) is an error naming the module and the
  tap; a causal mask in another layout (colours interleaved, a tap hidden that the layout shows, a stride) is
  an error naming the module and what differs. ``strict=False``: such a module is left as it is, with a
  warning.
* ``nn.BatchNorm2d`` directly followed by ``nn.ReLU`` or ``nn.LeakyReLU`` (slope >= 0) inside an
  ``nn.Sequential``: the batch norm becomes a ``fastgen.BatchNormAct2d`` on its own tensors and the activation an
  ``nn.Identity`` (the Sequential's indices, so the state_dict keys, stay as they were).

Everything else is left alone. A module used in several places is converted once and replaced everywhere.
"""
import copy
import warnings
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.nn import BatchNormAct2d, MaskedConv2d
from fastgen.ref.masked_conv import causal_mask


class ConvertError(ValueError):
    """A module that looks like a masked convolution but cannot become a fastgen.MaskedConv2d."""


def convert(model: nn.Module, *, strict: bool = True, report: bool = False):
    """Convert ``model`` in place (module docstring) and return it (a bare masked convolution: its replacement);
    ``report=True``: return (model, what was converted: a list of "path: old -> new" lines)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastgen.convert: model must be an nn.Module, got {type(model).__name__}")
    done: dict = {}  # id(old module) -> (it, its replacement): a shared module is converted once; holding the old
    # module keeps its id from being reused by a new object
    lines: List[str] = []
    new = _replacement(model, "", strict, done, lines)  # a bare masked convolution: its replacement is returned
    if new is None:
        new = model
        _walk(model, "", strict, done, lines)
    return (new, lines) if report else new


def _walk(parent: nn.Module, prefix: str, strict: bool, done: dict, lines: List[str]):
    names = list(parent._modules)
    for i, name in enumerate(names):
        child = parent._modules[name]
        if child is None:
            continue
        path = f"{prefix}{name}"
        if id(child) in done:
            new = done[id(child)][1]
        else:
            new = _replacement(child, path, strict, done, lines)
            if new is None:
                done[id(child)] = (child, child)
                _walk(child, path + ".", strict, done, lines)
                new = child
        parent._modules[name] = new
        if isinstance(parent, nn.Sequential) and type(new) is nn.BatchNorm2d and i + 1 < len(names):
            act = parent._modules[names[i + 1]]
            if _fusable(act):
                # not recorded in done: the same BatchNorm2d elsewhere, without its activation, stays a plain one
                # (on the same tensors)
                fused = BatchNormAct2d.from_modules(new, act)
                parent._modules[name] = fused
                parent._modules[names[i + 1]] = nn.Identity().train(act.training)
                lines.append(f"{path} + {prefix}{names[i + 1]}: BatchNorm2d + {type(act).__name__} -> "
                             f"BatchNormAct2d({fused.activation})")


def _fusable(act) -> bool:
    return type(act) is nn.ReLU or (type(act) is nn.LeakyReLU and act.negative_slope >= 0)


def _replacement(m: nn.Module, path: str, strict: bool, done: dict, lines: List[str]):
    """The MaskedConv2d that replaces ``m``, or None (not a masked convolution, or skipped)."""
    if not isinstance(m, nn.Conv2d) or isinstance(m, MaskedConv2d):
        return None
    mask = _mask_of(m)
    if mask is None or not _computes_masked_conv(m, mask):
        return None
    try:
        mask_type, data_channels = _layout(m, mask, path or type(m).__name__)
    except ConvertError as e:
        if strict:
            raise
        warnings.warn(f"fastgen.convert: {e}; left as it is", stacklevel=4)
        return None
    new = MaskedConv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                       dilation=m.dilation, groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode,
                       mask_type=mask_type, data_channels=data_channels, device="meta")
    new.weight = m.weight  # the same Parameter objects
    new.bias = m.bias
    new.train(m.training)
    done[id(m)] = (m, new)
    lines.append(f"{path}: {type(m).__name__} -> MaskedConv2d(mask_type={mask_type!r}, data_channels="
                 f"{data_channels})")
    return new


def _mask_of(m: nn.Conv2d):
    """The module's 0/1 mask as a full [out, in, kh, kw] float tensor, or None."""
    w = m.weight
    kh, kw = w.shape[2:]
    candidates = [t for _, t in m.named_buffers(recurse=False)]
    candidates += [v for k, v in vars(m).items() if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter)]
    for t in candidates:
        if t.dim() == 4 and (tuple(t.shape) == tuple(w.shape) or tuple(t.shape) == (1, 1, kh, kw)) and \
                t.numel() and bool(((t == 0) | (t == 1)).all()):
            return t.detach().to("cpu", torch.float64).expand(w.shape).clone()
    return None


def _computes_masked_conv(m: nn.Conv2d, mask: torch.Tensor) -> bool:
    """Whether a float64 copy of ``m`` computes conv2d(x, weight * mask, bias) on a random input (its forward
    may rewrite its own weight: the copy's, not the model's). Zero padding only: another padding mode reads
    pixels past the image's edge, no PixelCNN mask."""
    if m.padding_mode != "zeros":
        return False
    try:
        probe = copy.deepcopy(m).to("cpu", torch.float64).eval()
    except Exception:  # noqa: BLE001 - a module that cannot be copied is not converted
        return False
    kh, kw = m.kernel_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, m.in_channels, kh + 3, kw + 3, generator=g, dtype=torch.float64)
    w = probe.weight.detach().clone()
    b = None if probe.bias is None else probe.bias.detach().clone()
    with torch.no_grad():
        want = F.conv2d(x, w * mask, b, m.stride, m.padding, m.dilation, m.groups)
        try:
            got = probe(x)
        except Exception:  # noqa: BLE001 - a forward that needs more than x is not a plain masked convolution
            return False
    return isinstance(got, torch.Tensor) and got.shape == want.shape and \
        torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def _layout(m: nn.Conv2d, mask: torch.Tensor, who: str) -> Tuple[str, int]:
    """(mask_type, data_channels) of a masked convolution's mask, or ConvertError."""
    co, ci, kh, kw = mask.shape
    ch, cw = kh // 2, kw // 2
    on = (mask != 0)
    future = on.clone()
    future[:, :, :ch, :] = False
    future[:, :, ch, :cw] = False
    future[:, :, ch, cw] = False
    if future.any():
        o, i, dy, dx = (int(v) for v in future.nonzero()[0])
        raise ConvertError(f"{who}: its mask is not causal: output channel {o} sees input channel {i} at tap "
                           f"({dy - ch:+d}, {dx - cw:+d}) (rows down, columns right of the centre), a pixel after "
                           f"the one it predicts in raster order")
    if kh % 2 == 0 or kw % 2 == 0:
        raise ConvertError(f"{who}: a {kh}x{kw} kernel has no centre tap; fastgen.MaskedConv2d takes odd kernels")
    if tuple(m.stride) != (1, 1) or m.groups != 1:
        raise ConvertError(f"{who}: stride {tuple(m.stride)}, groups {m.groups}: fastgen.MaskedConv2d takes stride 1 "
                           f"and groups 1")
    tried = []
    for d in [1] + [d for d in range(2, min(co, ci) + 1) if co % d == 0 and ci % d == 0]:
        for t in ("A", "B"):
            if torch.equal(on, causal_mask(co, ci, (kh, kw), t, d, dtype=torch.float64) != 0):
                return t, d
        tried.append(d)
    past = on[:, :, :ch, :].all() and on[:, :, ch, :cw].all()
    blocks = ", ".join(map(str, tried[:6])) + (", ..." if len(tried) > 6 else "")
    why = (f"its centre tap's channels follow neither mask A nor mask B for {blocks} colour blocks of contiguous "
           f"channels of equal size (colours interleaved across the channels, or blocks of unequal sizes such as "
           f"C // 3, C // 3 and the rest, are not recognised)") if past else \
        "it hides taps above or left of the centre that a PixelCNN mask shows"
    raise ConvertError(f"{who}: {why}; fastgen.MaskedConv2d cannot express it")
