"""One rule for class labels and conditioning maps, for every conditional layer
and model (GatedMaskedConv2d, PixelCNN, GatedPixelCNN, PixelCNNpp, and what
comes later): a layer or model built with ``num_classes`` (``cond_channels``)
needs its labels (maps) on every call, and one built without them refuses
them. Dropping a label silently would train or sample an unconditional model
under a conditional one's name."""
import torch
import torch.fx


def check_label(who, label, batch, num_classes):
    """Raise a ValueError naming ``who`` unless ``label`` fits a model of ``num_classes`` classes (None:
    unconditional) for ``batch`` images: an integer tensor of shape (batch,) with values in 0..num_classes-1."""
    if isinstance(label, torch.fx.Proxy):  # traced by the cached sampler: checked when it binds the value
        return
    if num_classes is None:
        if label is not None:
            raise ValueError(f"{who}: a label was given but it is not class-conditional (num_classes=None)")
        return
    if label is None:
        raise ValueError(f"{who}: it is class-conditional (num_classes={num_classes}): pass label, an integer "
                         f"tensor of shape ({batch},) with values in 0..{num_classes - 1}")
    if not isinstance(label, torch.Tensor) or tuple(label.shape) != (batch,) or label.is_floating_point() \
            or label.dtype == torch.bool:
        got = f"{tuple(label.shape)} {label.dtype}" if isinstance(label, torch.Tensor) else type(label).__name__
        raise ValueError(f"{who}: label must be an integer tensor of shape ({batch},), got {got}")
    if label.numel() and (label.min() < 0 or label.max() >= num_classes):
        raise ValueError(f"{who}: labels must be in 0..{num_classes - 1}, got "
                         f"{label.min().item()}..{label.max().item()}")


def check_cond(who, cond, batch, cond_channels, hw):
    """As check_label for a conditioning map: [batch, cond_channels, H, W] when ``cond_channels`` is set."""
    if isinstance(cond, torch.fx.Proxy):
        return
    if cond_channels is None:
        if cond is not None:
            raise ValueError(f"{who}: a conditioning map was given but it has no cond_channels")
        return
    want = (batch, cond_channels, *hw)
    if cond is None:
        raise ValueError(f"{who}: it takes a conditioning map (cond_channels={cond_channels}): pass cond, a "
                         f"tensor of shape {list(want)}")
    if not isinstance(cond, torch.Tensor) or tuple(cond.shape) != want or not cond.is_floating_point():
        got = f"{tuple(cond.shape)} {cond.dtype}" if isinstance(cond, torch.Tensor) else type(cond).__name__
        raise ValueError(f"{who}: cond must be a floating tensor of shape {list(want)}, got {got}")
