"""PixelCNN (van den Oord et al. 2016, "Pixel Recurrent Neural Networks") and
Gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with
PixelCNN Decoders"), built from fastgen's layers.

Input and output conventions (shared with fastgen's samplers):
* ``model(x, label=None)`` takes the image as the sampler feeds it: float in
  [0, 1], binary pixels as {0, 1}, L-level pixels as value / (L - 1);
* it returns logits: Bernoulli ``[B, C, H, W]`` (``likelihood='bernoulli'``) or
  categorical ``[B, C*L, H, W]`` with colour channel c's L logits in block c
  (``likelihood='categorical'``, ``levels=L``);
* ``log_prob(images, label=None)`` takes integer pixel values (uint8 / int,
  0..L-1; 0/1 for Bernoulli) and returns the log-likelihood per image in nats;
  ``loss`` is the mean negative log-likelihood per image in nats and
  ``bits_per_dim(nats)`` converts it.
Colour images use the sub-pixel ordering of MaskedConv2d (R, then G given R,
then B given R and G), through ``data_channels``.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.nn import GatedMaskedConv2d, MaskedConv2d
from fastgen.nn.conditioning import check_label
from fastgen.ops.masked_conv import OP as MASKED_CONV

LIKELIHOODS = ("bernoulli", "categorical")


class AutoregressiveImageModel(nn.Module):
    """Likelihood, conditioning checks and sampling shared by fastgen's pixel models."""

    def __init__(self, image_shape, likelihood, levels, num_classes):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (channels, height, width), got {image_shape!r}")
        if likelihood == "bernoulli":
            levels = 2
        if not isinstance(levels, int) or levels < 2:
            raise ValueError(f"levels must be an int >= 2, got {levels!r}")
        self.image_shape = tuple(image_shape)
        self.likelihood, self.levels, self.num_classes = likelihood, levels, num_classes

    @property
    def data_channels(self):
        return self.image_shape[0]

    @property
    def out_channels(self):
        return self.data_channels * (1 if self.likelihood == "bernoulli" else self.levels)

    def feed(self, images):
        """Integer pixel values -> the network's input (value / (levels-1) in [0, 1])."""
        return images.to(self._dtype()) / (self.levels - 1)

    def _dtype(self):
        return next(self.parameters()).dtype

    def check_images(self, images, label=None):
        c, h, w = self.image_shape
        if images.dim() != 4 or tuple(images.shape[1:]) != (c, h, w):
            raise ValueError(f"{type(self).__name__}: images must be [B, {c}, {h}, {w}] (the model's image_shape), "
                             f"got {tuple(images.shape)}")
        if images.is_floating_point() and not torch.equal(images, images.round()):
            raise ValueError(f"{type(self).__name__}: images must hold integer pixel values 0..{self.levels - 1} "
                             f"(use the uint8 images of fastgen.data), got non-integer floats")
        if images.numel() and (images.min() < 0 or images.max() > self.levels - 1):
            raise ValueError(f"{type(self).__name__}: pixel values must be in 0..{self.levels - 1} "
                             f"(levels={self.levels}), got {images.min().item()}..{images.max().item()}")
        self.check_label(label, images.shape[0])

    def check_label(self, label, batch):
        """The labels of a class-conditional model, and none for another (fastgen.nn.conditioning)."""
        check_label(type(self).__name__, label, batch, self.num_classes)

    def log_prob(self, images: torch.Tensor, label: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Log-likelihood of each image in nats: [B]."""
        self.check_images(images, label)
        logits = self(self.feed(images), label)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits: the loss in fp32
        target = images.long()
        if self.likelihood == "bernoulli":
            nll = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
        else:
            b, c, h, w = images.shape
            nll = F.cross_entropy(logits.view(b, c, self.levels, h, w).transpose(1, 2), target, reduction="none")
        return -nll.flatten(1).sum(1)

    def loss(self, images: torch.Tensor, label: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean negative log-likelihood per image, in nats."""
        return -self.log_prob(images, label).mean()

    def bits_per_dim(self, nats_per_image: float) -> float:
        return nats_per_image / (math.prod(self.image_shape) * math.log(2))

    @torch.no_grad()
    def sample(self, n: int, label: Optional[torch.Tensor] = None, *, temperature: float = 1.0,
               seed: Optional[int] = None, method: str = "cached", backend: Optional[str] = None,
               progress: bool = False) -> torch.Tensor:
        """n images (integer values as int64 [n, C, H, W]): fastgen.sample with the
        model's likelihood, levels and shape; ``label`` [n] for a class-conditional model."""
        from fastgen.sampling import sample
        return sample(self, n, condition=label, temperature=temperature, seed=seed, method=method,
                      backend=backend, progress=progress)


def _output_head(channels, out_channels, data_channels, backend):
    """ReLU -> 1x1 -> ReLU -> 1x1 logits, both mask B with colour blocks."""
    return nn.Sequential(
        nn.ReLU(), MaskedConv2d(channels, channels, 1, mask_type="B", data_channels=data_channels, backend=backend),
        nn.ReLU(), MaskedConv2d(channels, out_channels, 1, mask_type="B", data_channels=data_channels,
                                backend=backend))


class ResidualBlock(nn.Module):
    """PixelCNN's residual block: ReLU, 1x1 (2h -> h), ReLU, k x k mask B (h -> h),
    ReLU, 1x1 (h -> 2h), added to the input."""

    def __init__(self, channels, kernel_size=3, data_channels=1, backend=None):
        super().__init__()
        half = channels // 2
        self.reduce = MaskedConv2d(channels, half, 1, mask_type="B", data_channels=data_channels, backend=backend)
        self.conv = MaskedConv2d(half, half, kernel_size, padding=kernel_size // 2, mask_type="B",
                                 data_channels=data_channels, backend=backend)
        self.expand = MaskedConv2d(half, channels, 1, mask_type="B", data_channels=data_channels, backend=backend)

    def forward(self, x):
        return x + self.expand(F.relu(self.conv(F.relu(self.reduce(F.relu(x))))))


class PixelCNN(AutoregressiveImageModel):
    """PixelCNN: 7x7 mask-A convolution, ``blocks`` residual blocks of mask-B
    convolutions, a two-layer 1x1 head. ``channels`` (2h in the paper) must be a
    multiple of 2 * data_channels. ``num_classes``: an optional class-conditional
    bias after the first layer."""

    def __init__(self, image_shape=(1, 28, 28), channels=64, blocks=7, likelihood="bernoulli", levels=256,
                 num_classes=None, kernel_size=3, backend=None):
        super().__init__(image_shape, likelihood, levels, num_classes)
        dc = self.data_channels
        if channels % self.channel_multiple(dc):
            raise ValueError(f"PixelCNN: channels ({channels}) must be a multiple of 2 * data_channels ({2 * dc})")
        self.input = MaskedConv2d(dc, channels, 7, padding=3, mask_type="A", data_channels=dc, backend=backend)
        self.label_bias = nn.Embedding(num_classes, channels) if num_classes is not None else None
        self.blocks = nn.ModuleList(ResidualBlock(channels, kernel_size, dc, backend) for _ in range(blocks))
        self.head = _output_head(channels, self.out_channels, dc, backend)

    @staticmethod
    def channel_multiple(data_channels: int) -> int:
        """``channels`` must be a multiple of this: a residual block halves them, and each half keeps the
        colour blocks."""
        return 2 * data_channels

    def forward(self, x, label=None):
        self.check_label(label, x.shape[0])
        h = self.input(x * 2 - 1)
        if label is not None:
            h = h + self.label_bias(label)[:, :, None, None]
        for block in self.blocks:
            h = block(h)
        return self.head(h)


class GatedPixelCNN(AutoregressiveImageModel):
    """Gated PixelCNN: a first GatedMaskedConv2d (``first_kernel`` x ``first_kernel``,
    mask A), ``layers - 1`` more (``kernel_size``, mask B, residual), the sum
    of their skip outputs through a ReLU / 1x1 / ReLU / 1x1 head. Optional class
    conditioning (``num_classes``) in every layer."""

    def __init__(self, image_shape=(1, 28, 28), channels=64, layers=8, likelihood="bernoulli", levels=256,
                 num_classes=None, kernel_size=3, first_kernel=7, backend=None):
        super().__init__(image_shape, likelihood, levels, num_classes)
        dc = self.data_channels
        if channels % self.channel_multiple(dc):
            raise ValueError(f"GatedPixelCNN: channels ({channels}) must be a multiple of data_channels ({dc})")
        if layers < 1:
            raise ValueError(f"GatedPixelCNN: layers must be >= 1, got {layers}")
        # the last layer's only output is its skip (no res conv, no vertical gate)
        self.layers = nn.ModuleList(
            [GatedMaskedConv2d(dc, channels, first_kernel, "A", dc, num_classes, last=layers == 1, backend=backend)]
            + [GatedMaskedConv2d(channels, channels, kernel_size, "B", dc, num_classes, last=i == layers - 2,
                                 backend=backend) for i in range(layers - 1)])
        self.head = _output_head(channels, self.out_channels, dc, backend if backend in MASKED_CONV.backends else None)

    @staticmethod
    def channel_multiple(data_channels: int) -> int:
        """``channels`` must be a multiple of this: the colour blocks."""
        return data_channels

    def forward(self, x, label=None):
        self.check_label(label, x.shape[0])
        v = h = x * 2 - 1
        skip = 0
        for layer in self.layers:
            v, h, s = layer(v, h, label)
            skip = skip + s
        return self.head(skip)
