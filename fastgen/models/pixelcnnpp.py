"""PixelCNN++ (Salimans, Karpathy, Chen and Kingma 2017, "PixelCNN++: Improving
the PixelCNN with Discretized Logistic Mixture Likelihood and Other
Modifications"), written from the paper.

``PixelCNNpp(image_shape=(3, 32, 32), nr_resnet=5, nr_filters=160,
nr_logistic_mix=10, dropout=0.5, num_classes=None)`` is the paper's CIFAR-10
model (about 53M parameters); small values of nr_resnet / nr_filters make it
usable on a CPU.

The network (section 2 of the paper):
* two streams, as in the Gated PixelCNN but without masks: ``u`` sees the rows
  above the pixel (down-shifted convolutions, kernel 2x3), ``ul`` sees the rows
  above and the pixels to the left in the current row (down-right-shifted
  convolutions, kernel 2x2). Zero padding plus a shift of the first layer's
  output keeps every output at (i, j) blind to pixel (i, j) and everything after
  it in raster order; the image enters with a channel of ones so that the
  network can tell the padding from black pixels;
* gated ResNet blocks: concat_elu, a shifted convolution, (an optional 1x1
  "nin" of a short-cut input ``a``), concat_elu, dropout, a shifted convolution
  to 2F channels, a class bias (``num_classes``), then ``x + a * sigmoid(b)``;
* three scales (H, H/2, H/4): ``nr_resnet`` blocks per scale on the way up,
  down-sampling between scales with stride-2 shifted convolutions; on the way
  down ``nr_resnet`` blocks at the coarsest scale and ``nr_resnet + 1`` at the
  other two, up-sampling with stride-2 shifted transposed convolutions, every
  block taking the matching output of the up pass as its short-cut input (the
  u stream gets u's, the ul stream u's and ul's concatenated);
* a final 1x1 "nin" of elu(ul) to K parameters per pixel: 3 * nr_mix for one
  channel, 10 * nr_mix for RGB, in the layout of fastgen.ref.dmol.

The likelihood is the discretized logistic mixture,
``fastgen.discretized_mix_logistic_nll``: the colours of a pixel are coupled
through the mixture's linear coefficients, so the network itself never sees any
colour of the pixel it predicts. Left out from the paper: weight normalization
(plain convolutions with PyTorch's initialisation; the gated blocks' last
convolution starts at a tenth of it, as the paper's init_scale=0.1, so each
block starts close to the identity) and Polyak averaging.

Images go in as integer pixel values 0..255 (uint8, as fastgen.data loads
them) and become 2v/255 - 1 in [-1, 1]. ``forward(x, label)`` takes that
[-1, 1] tensor and returns the parameters [B, K, H, W]. ``log_prob`` /
``loss`` are in nats per image (``loss`` is the mean NLL per image, as the
other pixel models'); ``bits_per_dim(nats)`` converts. ``sample`` is
fastgen.sample: cached multi-scale sampling (fastgen/sampling/schedule.py) or
naive.
"""
import math
from typing import Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fastgen.nn.conditioning import check_label
from fastgen.ops.dmol import OP as DMOL
from fastgen.ops.dmol import discretized_mix_logistic_nll

LEVELS = 256  # the mixture's bins are fixed at 2/255 wide (fastgen.ref.dmol)
PARAMS_PER_MIX = {1: 3, 3: 10}  # logits, means, log-scales (+ 3 coefficients and 2 more colours for RGB)
LAST_CONV_INIT_SCALE = 0.1


def levels_to_x(images, dtype, levels=LEVELS):
    """Integer pixel values v -> 2v/(levels-1) - 1 in [-1, 1], correctly rounded in ``dtype`` (one division of
    exact integers: 0 and 255 become exactly -1 and 1, never a hair outside)."""
    return (images.to(dtype) * 2 - (levels - 1)) / (levels - 1)


def down_shift(x):
    """Move every row one down (row 0 becomes zeros): row i then sees only rows < i."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def right_shift(x):
    """Move every column one right (column 0 becomes zeros)."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


def concat_elu(x):
    """ELU of x and of -x, concatenated along channels (the paper's non-linearity: no information is lost)."""
    return F.elu(torch.cat([x, -x], 1))


class DownShiftedConv2d(nn.Conv2d):
    """Convolution whose output at (i, j) sees rows i-kh+1..i and columns
    j-(kw-1)/2..j+(kw-1)/2 of its input: padded on the top and on both sides,
    never below. Stride 2 halves the height and width (even sizes)."""

    def __init__(self, in_channels, out_channels, kernel_size=(2, 3), stride=1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride)
        kh, kw = self.kernel_size
        if kw % 2 == 0:
            raise ValueError(f"DownShiftedConv2d: the kernel width must be odd (centred), got {kw}")
        self.pad = ((kw - 1) // 2, (kw - 1) // 2, kh - 1, 0)

    def forward(self, x):
        return super().forward(F.pad(x, self.pad))


class DownRightShiftedConv2d(nn.Conv2d):
    """Convolution whose output at (i, j) sees rows i-kh+1..i and columns
    j-kw+1..j of its input: padded on the top and the left only."""

    def __init__(self, in_channels, out_channels, kernel_size=(2, 2), stride=1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride)
        kh, kw = self.kernel_size
        self.pad = (kw - 1, 0, kh - 1, 0)

    def forward(self, x):
        return super().forward(F.pad(x, self.pad))


class DownShiftedConvTranspose2d(nn.ConvTranspose2d):
    """Stride-2 up-sampling of the u stream (kernel 2x3): coarse row i feeds fine
    rows 2i and 2i+1 (never an earlier row), coarse column j fine columns
    2j-1..2j+1."""

    def __init__(self, in_channels, out_channels):
        super().__init__(in_channels, out_channels, (2, 3), stride=2)

    def forward(self, x):
        # output width 2W + 1: drop the first column so that column j's kernel is centred on 2j
        return super().forward(x)[:, :, :, 1:]


class DownRightShiftedConvTranspose2d(nn.ConvTranspose2d):
    """Stride-2 up-sampling of the ul stream (kernel 2x2): coarse (i, j) feeds
    the fine block (2i..2i+1, 2j..2j+1), whose pixels all come at or after
    (2i, 2j) in raster order."""

    def __init__(self, in_channels, out_channels):
        super().__init__(in_channels, out_channels, (2, 2), stride=2)


class GatedResnet(nn.Module):
    """The paper's gated ResNet block around a shifted convolution ``conv``
    (DownShiftedConv2d for u, DownRightShiftedConv2d for ul): ``skip_channels``
    > 0 adds a 1x1 of concat_elu(a) for a short-cut input ``a``; ``num_classes``
    adds a learned bias per class to the gate's input (zero at the start: the
    block begins unconditional)."""

    def __init__(self, filters, conv, skip_channels=0, dropout=0.5, num_classes=None):
        super().__init__()
        self.conv_in = conv(2 * filters, filters)
        self.skip = nn.Conv2d(2 * skip_channels, filters, 1) if skip_channels else None
        self.dropout = nn.Dropout(dropout)
        self.conv_out = conv(2 * filters, 2 * filters)
        with torch.no_grad():  # start close to the identity (the paper's init_scale=0.1)
            self.conv_out.weight.mul_(LAST_CONV_INIT_SCALE)
            self.conv_out.bias.mul_(LAST_CONV_INIT_SCALE)
        self.label = None
        if num_classes is not None:
            self.label = nn.Embedding(num_classes, 2 * filters)
            nn.init.zeros_(self.label.weight)

    def forward(self, x, a=None, label=None):
        c = self.conv_in(concat_elu(x))
        if a is not None:
            c = c + self.skip(concat_elu(a))
        c = self.conv_out(self.dropout(concat_elu(c)))
        if label is not None:
            c = c + self.label(label)[:, :, None, None]
        value, gate = c.chunk(2, 1)
        return x + value * torch.sigmoid(gate)


def _check_shape(x, what, image_shape):
    c, h, w = image_shape
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != (c, h, w):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"PixelCNNpp: {what} must be [B, {c}, {h}, {w}] (the model's image_shape), got {got}")


def _check_forward(x, label, image_shape, num_classes):
    """forward's checks of its input. Wrapped for torch.fx: a traced forward
    (cached sampling, fastgen/sampling/schedule.py) records this call instead
    of running its data-dependent tests on proxies."""
    _check_shape(x, "x", image_shape)
    if not x.is_floating_point():
        raise ValueError(f"PixelCNNpp: x must be a floating tensor in [-1, 1] (2v/255 - 1; log_prob and loss "
                         f"take the integer images), got {x.dtype}")
    if x.numel() and (x.min() < -1 or x.max() > 1):
        raise ValueError(f"PixelCNNpp: x must be in [-1, 1] (2v/255 - 1 for pixel values v), got values in "
                         f"[{x.min().item():.4g}, {x.max().item():.4g}]")
    check_label("PixelCNNpp", label, x.shape[0], num_classes)


torch.fx.wrap("_check_forward")


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"PixelCNNpp: {name} must be an int >= {low}, got {value!r}")


class PixelCNNpp(nn.Module):
    """PixelCNN++ (module docstring). ``image_shape`` (C, H, W): C = 1 or 3, H
    and W multiples of 4 (the network down-samples twice by 2). ``backend``:
    forced backend of the loss op (a name it does not have is ignored: one
    name is passed to every op of a training run)."""

    likelihood = "logistic-mixture"
    SCALES = 3

    def __init__(self, image_shape=(3, 32, 32), nr_resnet=5, nr_filters=160, nr_logistic_mix=10, dropout=0.5,
                 num_classes=None, levels=LEVELS, backend=None):
        super().__init__()
        if len(image_shape) != 3:
            raise ValueError(f"PixelCNNpp: image_shape must be (channels, height, width), got {image_shape!r}")
        c, h, w = (int(s) for s in image_shape)
        if c not in PARAMS_PER_MIX:
            raise ValueError(f"PixelCNNpp: images must have 1 or 3 channels (the discretized logistic mixture's "
                             f"layouts: grey or RGB), got {c}")
        if h < 4 or w < 4 or h % 4 or w % 4:
            raise ValueError(f"PixelCNNpp: image height and width must be multiples of 4 (the network down-samples "
                             f"twice by 2), got {h}x{w}")
        if levels != LEVELS:
            raise ValueError(f"PixelCNNpp: the discretized logistic mixture models {LEVELS} pixel levels (bins "
                             f"2/255 wide), got levels={levels!r}")
        _check_int("nr_resnet", nr_resnet, 1)
        _check_int("nr_filters", nr_filters, 1)
        _check_int("nr_logistic_mix", nr_logistic_mix, 1)
        if num_classes is not None:
            _check_int("num_classes", num_classes, 1)
        if not 0 <= dropout < 1:
            raise ValueError(f"PixelCNNpp: dropout must be in [0, 1), got {dropout!r}")
        self.image_shape = (c, h, w)
        self.nr_resnet, self.nr_filters, self.nr_mix = nr_resnet, nr_filters, nr_logistic_mix
        self.num_classes, self.levels = num_classes, LEVELS
        self.backend = backend if backend in DMOL.backends else None
        f = nr_filters

        def blocks(n, u_skip, ul_skip):
            return (nn.ModuleList(GatedResnet(f, DownShiftedConv2d, u_skip, dropout, num_classes)
                                  for _ in range(n)),
                    nn.ModuleList(GatedResnet(f, DownRightShiftedConv2d, ul_skip, dropout, num_classes)
                                  for _ in range(n)))

        # the first layer: the image and a channel of ones
        self.u_in = DownShiftedConv2d(c + 1, f, (2, 3))
        self.ul_in_above = DownShiftedConv2d(c + 1, f, (1, 3))
        self.ul_in_left = DownRightShiftedConv2d(c + 1, f, (2, 1))
        # up pass: the ul blocks take u as their short-cut
        up = [blocks(nr_resnet, 0, f) for _ in range(self.SCALES)]
        self.up_u = nn.ModuleList(u for u, _ in up)
        self.up_ul = nn.ModuleList(ul for _, ul in up)
        self.down_sample_u = nn.ModuleList(DownShiftedConv2d(f, f, (2, 3), stride=2) for _ in range(2))
        self.down_sample_ul = nn.ModuleList(DownRightShiftedConv2d(f, f, (2, 2), stride=2) for _ in range(2))
        # down pass, coarsest scale first: short-cuts from the up pass (u: u's; ul: u and ul's)
        down = [blocks(nr_resnet + (s > 0), f, 2 * f) for s in range(self.SCALES)]
        self.down_u = nn.ModuleList(u for u, _ in down)
        self.down_ul = nn.ModuleList(ul for _, ul in down)
        self.up_sample_u = nn.ModuleList(DownShiftedConvTranspose2d(f, f) for _ in range(2))
        self.up_sample_ul = nn.ModuleList(DownRightShiftedConvTranspose2d(f, f) for _ in range(2))
        self.out = nn.Conv2d(f, self.out_channels, 1)

    @property
    def data_channels(self):
        return self.image_shape[0]

    @property
    def out_channels(self):
        """K: parameters per pixel (3 nr_mix for one channel, 10 nr_mix for RGB)."""
        return PARAMS_PER_MIX[self.data_channels] * self.nr_mix

    def extra_repr(self):
        return (f"image_shape={self.image_shape}, nr_resnet={self.nr_resnet}, nr_filters={self.nr_filters}, "
                f"nr_logistic_mix={self.nr_mix}, num_classes={self.num_classes}")

    # ---- checks ------------------------------------------------------------------------------------------------

    def check_images(self, images, label=None):
        """Integer pixel values 0..255 of the model's shape, and a label if the model is class-conditional."""
        _check_shape(images, "images", self.image_shape)
        if images.is_floating_point() and not torch.equal(images, images.round()):
            raise ValueError(f"PixelCNNpp: images must hold integer pixel values 0..{self.levels - 1} (use the "
                             f"uint8 images of fastgen.data), got non-integer floats")
        if images.numel() and (images.min() < 0 or images.max() > self.levels - 1):
            raise ValueError(f"PixelCNNpp: pixel values must be in 0..{self.levels - 1}, got "
                             f"{images.min().item()}..{images.max().item()}")
        self.check_label(label, images.shape[0])

    def check_label(self, label, batch):
        check_label("PixelCNNpp", label, batch, self.num_classes)

    # ---- the network -------------------------------------------------------------------------------------------

    def feed(self, images):
        """Integer pixel values -> the network's input, 2v/255 - 1 in [-1, 1], in the model's dtype."""
        return levels_to_x(images, next(self.parameters()).dtype, self.levels)

    def forward(self, x, label=None):
        """Mixture parameters [B, K, H, W] (fastgen.ref.dmol's layout) for x in [-1, 1], [B, C, H, W]."""
        _check_forward(x, label, self.image_shape, self.num_classes)
        x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
        # every later output sees only the rows above (u) or the earlier pixels (ul): shift the first layer
        u_list = [down_shift(self.u_in(x))]
        ul_list = [down_shift(self.ul_in_above(x)) + right_shift(self.ul_in_left(x))]
        for s in range(self.SCALES):
            for u_block, ul_block in zip(self.up_u[s], self.up_ul[s]):
                u_list.append(u_block(u_list[-1], label=label))
                ul_list.append(ul_block(ul_list[-1], u_list[-1], label=label))
            if s < self.SCALES - 1:
                u_list.append(self.down_sample_u[s](u_list[-1]))
                ul_list.append(self.down_sample_ul[s](ul_list[-1]))

        u, ul = u_list.pop(), ul_list.pop()
        for s in range(self.SCALES):
            for u_block, ul_block in zip(self.down_u[s], self.down_ul[s]):
                u = u_block(u, u_list.pop(), label=label)
                ul = ul_block(ul, torch.cat([u, ul_list.pop()], 1), label=label)
            if s < self.SCALES - 1:
                u = self.up_sample_u[s](u)
                ul = self.up_sample_ul[s](ul)
        assert not u_list and not ul_list  # every output of the up pass was used once
        return self.out(F.elu(ul))

    # ---- likelihood --------------------------------------------------------------------------------------------

    def log_prob(self, images: torch.Tensor, label: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Log-likelihood of each image in nats: [B]. ``images``: integer pixel values 0..255."""
        self.check_images(images, label)
        params = self(self.feed(images), label)
        # bf16 parameters under autocast: the loss in float32 (a bf16 sum over pixels would lose whole nats), on
        # the exact levels (not the network's input rounded to a half-precision model's dtype)
        params = params.to(torch.promote_types(params.dtype, torch.float32))
        x = levels_to_x(images, params.dtype, self.levels)
        return -discretized_mix_logistic_nll(x, params, nr_mix=self.nr_mix, reduction="sum", backend=self.backend)

    def loss(self, images: torch.Tensor, label: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean negative log-likelihood per image, in nats."""
        return -self.log_prob(images, label).mean()

    def bits_per_dim(self, nats_per_image: float) -> float:
        return nats_per_image / (math.prod(self.image_shape) * math.log(2))

    # ---- sampling ----------------------------------------------------------------------------------------------

    def sample(self, n: int, label: Optional[torch.Tensor] = None, *, temperature: float = 1.0,
               seed: Optional[int] = None, method: str = "cached", backend: Optional[str] = None,
               progress: bool = False) -> torch.Tensor:
        """n images, int64 [n, C, H, W] with values 0..255: fastgen.sample, which
        draws each pixel's colours from the mixture there (``temperature``
        scaling the logistics and the mixture logits), each rounded to its level
        before it shifts the next colour's mean. method='cached' runs every
        layer of every scale once per position (fastgen/sampling/schedule.py);
        'naive' the whole network per pixel. ``seed``: the same seed gives the
        same images with either method; ``label`` [n]: the classes of a
        class-conditional model."""
        from fastgen.sampling import sample
        return sample(self, n, condition=label, temperature=temperature, seed=seed, method=method,
                      backend=backend, progress=progress)
