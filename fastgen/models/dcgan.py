"""DCGAN (Radford, Metz and Chintala 2016), unconditional or class-conditional, for square grey or RGB images
of 28x28 (MNIST, Fashion-MNIST), 32x32, 64x64 and any size s * 2^n with s in {4, 7}, n >= 1.

The five rules: strided convolutions in D and fractionally-strided (transposed) ones in G instead of pooling;
batch norm in both (not on G's output nor D's input layer); no fully connected hidden layers (G's projection of
z is a transposed convolution from 1x1 to s x s, D's last layer a convolution from s x s to one logit); ReLU in
G with tanh at the output (images in [-1, 1]); LeakyReLU (0.2) in D. Weights are drawn from N(0, 0.02) and
batch-norm scales from N(1, 0.02), biases zero, as in DCGAN. Batch norm and its activation are one layer,
``fastgen.BatchNormAct2d`` (one fused op forward and backward; ``BatchNormAct2d.to_modules`` gives the plain
``nn.BatchNorm2d`` + activation pair on the same tensors, e.g. for a gradient penalty's double backward).

Conditional: G(z, y) joins a learned label embedding to z; D(x, y) either projects (Miyato and Koyama 2018: the
logit gains <embed(y), sum-pooled features>, ``conditioning="projection"``) or reads one-hot label maps
concatenated to the image (``"concat"``). Labels follow fastgen.nn.conditioning's one rule.

Layout: both networks keep their weights and maps in channels_last by default. oneDNN computes a strided
convolution's input gradient at about half its forward's speed in NCHW, and a 1- or 3-channel convolution far
slower than its FLOPs; in channels_last, with G's first layer as a Projection and the image layers as
ImageConv2d / ImageConvTranspose2d, a DCGAN step ran 1.11-1.25x (28x28) and 1.20x (64x64) faster than
pytorch/examples' on a 2-core CPU (benchmarks/RESULTS.md). ``channels_last=False`` keeps NCHW.

Packing (PacGAN, Lin et al. 2018): ``DCGANDiscriminator(..., pack=m)`` judges m samples at once, stacked along
the channels, and returns one logit per pack of m consecutive images (the batch must divide by m).
"""
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastgen._seed import prior_draws
from fastgen.nn.batch_norm_act import BatchNormAct2d, recomputed_outputs
from fastgen.nn.conditioning import check_label

CONDITIONINGS = ("projection", "concat")


def _stages(who, image_shape):
    """(C, S, base, n): images [C, S, S] with S = base * 2^n, base in (4, 7), n >= 1."""
    if len(image_shape) != 3 or image_shape[1] != image_shape[2] or image_shape[0] < 1:
        raise ValueError(f"{who}: image_shape must be (channels, size, size) of square images, got "
                         f"{tuple(image_shape)}")
    c, size = int(image_shape[0]), int(image_shape[1])
    n, s = 0, size
    while s % 2 == 0 and s > 7:
        s, n = s // 2, n + 1
    if s not in (4, 7) or n < 1:
        raise ValueError(f"{who}: DCGAN makes sizes 4 * 2^n and 7 * 2^n (n >= 1: 8, 14, 16, 28, 32, 56, 64, ...), "
                         f"got {size}")
    return c, size, s, n


def dcgan_init(module):
    """DCGAN's initialisation: conv weights N(0, 0.02), batch-norm scales N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, BatchNormAct2d)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Projection(nn.ConvTranspose2d):
    """G's first layer, a transposed convolution from 1x1 to s x s (no bias), computed as the one matrix product
    it is: y[b, o, i, j] = sum_c z[b, c] w[c, o, i, j]. In a profile of the training step on a 2-core CPU
    (batch 64, 100 -> 128 x 7 x 7) oneDNN's transposed convolution of the 1x1 input took 2.9 ms forward and
    reordered its channels_last weight at every call; the product took 1.7. The output is channels_last when
    the weight is."""

    def __init__(self, in_channels: int, out_channels: int, size: int):
        super().__init__(in_channels, out_channels, size, 1, 0, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 4 or z.shape[2:] != (1, 1):
            raise ValueError(f"Projection: input must be [B, C, 1, 1], got {tuple(z.shape)}")
        w = self.weight.permute(0, 2, 3, 1)  # [C, s, s, out]: a view of a channels_last weight
        y = torch.mm(z.flatten(1), w.reshape(w.shape[0], -1))
        return y.view(z.shape[0], *w.shape[1:]).permute(0, 3, 1, 2)


def _to_few_channels(h: torch.Tensor, w: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """conv_transpose2d(h, w, stride=2, padding=1) onto ``size`` (its output's H, W) for a w [C_in, C, 4, 4]
    with few output channels C, as one matrix product and a scatter of its 4 x 4 patches: oneDNN computes this
    shape (G's output layer, and D's input layer's input gradient) at a small fraction of its FLOP rate
    (about 2.0 ms against 0.75 for [64, 64, 14, 14] -> [64, 1, 28, 28] on a 2-core CPU). Differentiable
    (double backward for a gradient penalty). Returns [B, C, H, W] in channels_last memory."""
    b, c_in, hh, ww = h.shape
    c, k = w.shape[1], w.shape[2]
    rows = torch.mm(h.permute(0, 2, 3, 1).reshape(b * hh * ww, c_in), w.permute(0, 2, 3, 1).reshape(c_in, -1))
    patches = rows.view(b, hh, ww, k, k, c)
    out = rows.new_zeros(b, size[0], size[1], c)
    s, p = 2, 1
    for i in range(k):  # output row s y + i - p gets input row y's tap i (those inside the output only)
        y0, y1 = max(0, -((i - p) // s)), min(hh - 1, (size[0] - 1 + p - i) // s)
        for j in range(k):
            x0, x1 = max(0, -((j - p) // s)), min(ww - 1, (size[1] - 1 + p - j) // s)
            if y0 <= y1 and x0 <= x1:
                r, q = s * y0 + i - p, s * x0 + j - p
                out[:, r:r + s * (y1 - y0) + 1:s, q:q + s * (x1 - x0) + 1:s] += patches[:, y0:y1 + 1, x0:x1 + 1, i, j]
    return out.permute(0, 3, 1, 2)


def _conv_backward(gy, x, w, transposed, mask):
    return torch.ops.aten.convolution_backward(gy, x, w, None, [2, 2], [1, 1], [1, 1], transposed, [0, 0], 1,
                                               [*mask, False])[:2]


class _ImageConv(torch.autograd.Function):
    """conv2d(x, w, stride=2, padding=1) by oneDNN, its input gradient by _to_few_channels"""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return F.conv2d(x, w, None, 2, 1)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gx = _to_few_channels(gy, w, x.shape[2:]) if ctx.needs_input_grad[0] else None
        gw = _conv_backward(gy, x, w, False, (False, True))[1] if ctx.needs_input_grad[1] else None
        return gx, gw


class _ImageConvTranspose(torch.autograd.Function):
    """conv_transpose2d(h, w, stride=2, padding=1) by _to_few_channels, its gradients by oneDNN"""

    @staticmethod
    def forward(ctx, h, w):
        ctx.save_for_backward(h, w)
        return _to_few_channels(h, w, (2 * h.shape[2], 2 * h.shape[3]))

    @staticmethod
    def backward(ctx, gy):
        h, w = ctx.saved_tensors
        return _conv_backward(gy, h, w, True, ctx.needs_input_grad[:2])


class ImageConv2d(nn.Conv2d):
    """D's input layer, a 4 x 4 stride-2 convolution of the images (few channels, no bias), whose input gradient
    (G's update) is computed by a matrix product: oneDNN takes about 2.3 ms for it at [64, 1, 28, 28] where the
    forward takes 0.3."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 4, 2, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ImageConv.apply(x, self.weight)


class ImageConvTranspose2d(nn.ConvTranspose2d):
    """G's output layer, a 4 x 4 stride-2 transposed convolution to the images' few channels (no bias), computed
    as a matrix product (see _to_few_channels); its gradients by oneDNN."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 4, 2, 1, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return _ImageConvTranspose.apply(h, self.weight)


PRODUCTS = (Projection, ImageConv2d, ImageConvTranspose2d)


def as_torch_layers(net: nn.Module) -> nn.Module:
    """``net`` with each of the layers above turned back into the torch layer it computes (same parameters:
    oneDNN's convolutions), in place."""
    for m in net.modules():
        if isinstance(m, PRODUCTS):
            m.__class__ = m.__class__.__bases__[0]
    return net


class DCGANGenerator(nn.Module):
    """G(z) or G(z, y): z [B, z_dim] (or [B, z_dim, 1, 1]) -> images [B, C, S, S] in [-1, 1].

    Channels: ``width * 2^(n-1)`` at the first s x s map, halving at each doubling of the size to ``width``
    before the output layer. ``channels_last`` (default): weights and maps in that layout (see the module
    docstring); False: NCHW."""

    def __init__(self, z_dim: int = 100, image_shape: Sequence[int] = (1, 28, 28), num_classes: Optional[int] = None,
                 width: int = 64, embed_dim: Optional[int] = None, channels_last: bool = True):
        super().__init__()
        who = "DCGANGenerator"
        c, size, s, n = _stages(who, image_shape)
        if z_dim < 1 or width < 1:
            raise ValueError(f"{who}: z_dim and width must be positive, got {z_dim} and {width}")
        self.z_dim, self.image_shape, self.num_classes = z_dim, (c, size, size), num_classes
        self.embed = None
        z_in = z_dim
        if num_classes is not None:
            if num_classes < 2:
                raise ValueError(f"{who}: num_classes must be >= 2 (or None), got {num_classes}")
            self.embed = nn.Embedding(num_classes, embed_dim or min(z_dim, 50))
            z_in += self.embed.embedding_dim
        chans = [width * 2 ** (n - 1 - i) for i in range(n)]  # at sizes s, 2s, ..., s * 2^(n-1)
        layers = [Projection(z_in, chans[0], s), BatchNormAct2d(chans[0], "relu")]
        for a, b in zip(chans, chans[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), BatchNormAct2d(b, "relu")]
        layers += [ImageConvTranspose2d(chans[-1], c), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        dcgan_init(self)
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, z: torch.Tensor, label: Optional[torch.Tensor] = None) -> torch.Tensor:
        who = "DCGANGenerator"
        if not isinstance(z, torch.Tensor) or z.dim() not in (2, 4) or z.shape[1] != self.z_dim \
                or (z.dim() == 4 and z.shape[2:] != (1, 1)):
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"{who}: z must be [B, {self.z_dim}] or [B, {self.z_dim}, 1, 1], got {got}")
        check_label(who, label, z.shape[0], self.num_classes)
        z = z.reshape(z.shape[0], self.z_dim)
        if self.embed is not None:
            z = torch.cat([z, self.embed(label).to(z.dtype)], 1)
        with recomputed_outputs():  # each ConvTranspose2d keeps its input as a recipe (relu's x), not a copy
            # with channels_last weights every map after the projection is channels_last; the images (1 or 3
            # channels: a small copy at most) are handed out in the default layout
            return self.net(z[:, :, None, None]).contiguous()

    @torch.no_grad()
    def sample(self, n: int, label: Optional[torch.Tensor] = None, *, seed: Optional[int] = None,
               temperature: float = 1.0) -> torch.Tensor:
        """``n`` images, uint8 [n, C, S, S] on 0..255, from z ~ N(0, temperature^2 I) (float64 draws from a CPU
        generator: the same seed gives the same z on every device; None: torch's default generator), in the
        module's current mode (eval: batch norm's running statistics)."""
        z, _ = prior_draws("DCGANGenerator.sample", n, self.z_dim, seed, temperature, next(self.parameters()))
        x = self(z, label)
        return torch.round((x.float().clamp(-1, 1) + 1) * 127.5).to(torch.uint8)


class DCGANDiscriminator(nn.Module):
    """D(x) or D(x, y): images [B, C, S, S] (in [-1, 1]) -> logits [B // pack]. ``channels_last`` (default):
    weights and maps in that layout (see the module docstring); False: NCHW."""

    def __init__(self, image_shape: Sequence[int] = (1, 28, 28), num_classes: Optional[int] = None,
                 width: int = 64, conditioning: str = "projection", pack: int = 1, channels_last: bool = True):
        super().__init__()
        who = "DCGANDiscriminator"
        c, size, s, n = _stages(who, image_shape)
        if width < 1:
            raise ValueError(f"{who}: width must be positive, got {width}")
        if not isinstance(pack, int) or pack < 1:
            raise ValueError(f"{who}: pack must be a positive int, got {pack!r}")
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"{who}: conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"{who}: num_classes must be >= 2 (or None), got {num_classes}")
        if num_classes is not None and conditioning == "projection" and pack > 1:
            raise ValueError(f"{who}: a projection head judges one label per logit; with pack={pack} use "
                             f"conditioning='concat'")
        self.image_shape, self.num_classes, self.pack = (c, size, size), num_classes, pack
        self.conditioning = conditioning if num_classes is not None else None
        c_in = (c + (num_classes if self.conditioning == "concat" else 0)) * pack
        chans = [width * 2 ** i for i in range(n)]  # at sizes S/2, S/4, ..., s
        layers = [ImageConv2d(c_in, chans[0]), nn.LeakyReLU(0.2, True)]
        for a, b in zip(chans, chans[1:]):
            layers += [nn.Conv2d(a, b, 4, 2, 1, bias=False), BatchNormAct2d(b, "leaky_relu", 0.2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(chans[-1], 1, s, 1, 0, bias=False)
        self.embed = nn.Embedding(num_classes, chans[-1]) if self.conditioning == "projection" else None
        dcgan_init(self)
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, label: Optional[torch.Tensor] = None) -> torch.Tensor:
        who = "DCGANDiscriminator"
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{who}: images must be [B, {', '.join(map(str, self.image_shape))}], got {got}")
        b = x.shape[0]
        if b % self.pack:
            raise ValueError(f"{who}: with pack={self.pack} the batch must divide by {self.pack}, got {b}")
        check_label(who, label, b, self.num_classes)
        if self.conditioning == "concat":
            maps = F.one_hot(label, self.num_classes).to(x.dtype)[:, :, None, None]
            x = torch.cat([x, maps.expand(-1, -1, *x.shape[2:])], 1)
        x = x.reshape(b // self.pack, -1, *x.shape[2:])  # pack consecutive images along the channels
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.features(x)
        logit = self.head(h).flatten()
        if self.embed is not None:
            logit = logit + (self.embed(label).to(h.dtype) * h.sum((2, 3))).sum(1)
        return logit
