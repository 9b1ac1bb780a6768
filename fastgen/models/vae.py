"""A convolutional variational autoencoder (Kingma & Welling 2014) for small
grey images, with the importance-weighted likelihood bound of Burda et al. 2016.

``VAE(image_shape=(1, 28, 28), channels=32, latent=32, hidden=256, decoder='bernoulli'|'gaussian')``

* encoder: two 4x4 stride-2 convolutions (C -> channels -> 2 channels, 28x28 ->
  14x14 -> 7x7), a linear layer to ``hidden`` features, and a
  ``fastgen.nn.GaussianLatent`` (the posterior's mu and logvar, then the fused
  ``fastgen.reparameterize_kl``: z and the KL to the N(0, I) prior in one pass);
* decoder: the mirror image (linear layers, two 4x4 stride-2 transposed convolutions).

Images go in as integer pixel values (uint8 0..levels-1: 0/1 for binarized
data, 0..255 for grey), as fastgen.data loads them. Likelihoods p(x|z):

* ``'bernoulli'``: one logit per pixel; for binary images (binarized MNIST:
  fresh draws for training, the fixed seeded draw for evaluation, as the
  PixelCNN runs use).
* ``'gaussian'``: a *discretized* Gaussian over the ``levels`` pixel values
  (default 256). The decoder gives each pixel a mean m and a log-scale s
  (clamped to [LOG_SCALE_MIN, LOG_SCALE_MAX]) on the [0, 1] scale where value v
  sits at v / (levels - 1); P(v) is the Gaussian mass of the bin
  [v - 1/2, v + 1/2] / (levels - 1), the first and last bins extended to -inf and
  +inf (see :func:`discretized_gaussian_log_prob`). The probabilities of the
  levels sum to 1, so its NLL is a true discrete likelihood in nats, comparable
  with other models' (PixelCNN's) and convertible to bits/dim.

All likelihoods are in nats per image. ``elbo(x)`` (one z per image),
``loss(x)`` (the mean negative ELBO, what training minimises), ``iw_nll(x, k)``
(the importance-weighted bound with k samples: tighter than -ELBO, and exact
as k -> inf). Images for display (``sample``, ``reconstruct``, ``interpolate``)
are uint8 on the 0..255 grey scale whatever the decoder.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.nn import GaussianLatent
from fastgen.ops.reparameterize_kl import OP as REPARAMETERIZE_KL
from fastgen._seed import generator, prior_draws
from fastgen.nn.conditioning import check_label
from fastgen.ops.reparameterize_kl import reparameterize_kl

DECODERS = ("bernoulli", "gaussian")
LOG_SCALE_MIN, LOG_SCALE_MAX = -7.0, 2.0  # sigma in [0.0009, 7.4] on the [0, 1] pixel scale
LOG_2PI = math.log(2 * math.pi)
DISPLAY_MODES = ("mean", "draw")


def _log1mexp(d):
    """log(1 - exp(d)) for d < 0, accurate at both ends (Maechler 2012). Each
    branch sees only its own range (-1 elsewhere): a branch that is not taken
    must not make inf, whose zeroed gradient would still be NaN."""
    near = d > -math.log(2)
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, d, -1.0))),
                       torch.log1p(-torch.exp(torch.where(near, -1.0, d))))


def discretized_gaussian_log_prob(values, mean, log_scale, levels=256):
    """log P(values) elementwise, in nats, of the discretized Gaussian: value v
    (integer 0..levels-1) gets the N(mean, exp(log_scale)^2) mass of
    [(v - 1/2) / (levels - 1), (v + 1/2) / (levels - 1)], the first bin
    extended to -inf and the last to +inf, so that the levels' probabilities
    sum to 1. ``mean`` and ``log_scale`` are on the [0, 1] scale.

    Computed in log space with log_ndtr: a middle bin is Phi(b) - Phi(a) for
    the standardized edges a < b; it is taken on the side of the mean where
    both CDFs are small (Phi(b) - Phi(a) = Phi(-a) - Phi(-b)), as
    log Phi(hi) + log(1 - Phi(lo) / Phi(hi)), so neither cancellation in the
    tails nor log(0) occurs. In float64 whatever the inputs' dtype (the result
    is cast back): float32 log_ndtr's gradient goes wrong far in the tail (5%
    off at 1e3 scales from the mean, inf at 1e5), and with sigma = e^-7 a mean
    off by 1 is already 1100 scales away; the cost is per pixel, small."""
    dtype = mean.dtype
    mean, log_scale = mean.double(), log_scale.double()
    x = values.double() / (levels - 1)
    half = 0.5 / (levels - 1)
    inv_scale = torch.exp(-log_scale)
    a = (x - half - mean) * inv_scale  # the bin's lower edge, standardized
    b = (x + half - mean) * inv_scale  # and its upper edge
    flip = (a + b) > 0  # the bin lies above the mean: mirror it below
    lo, hi = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_hi = torch.special.log_ndtr(hi)
    # lo < hi, so d < 0; the clamp only guards a degenerate float (a == b for an absurd mean) from log(0)
    d = (torch.special.log_ndtr(lo) - log_hi).clamp(max=-1e-12)
    middle = log_hi + _log1mexp(d)
    first = torch.special.log_ndtr(b)  # v = 0: (-inf, upper edge]
    last = torch.special.log_ndtr(-a)  # v = levels - 1: [lower edge, +inf)
    return torch.where(values == 0, first, torch.where(values == levels - 1, last, middle)).to(dtype)


def _seeds(seed, n):
    """``n`` seeds of reparameterize_kl's stream, derived from ``seed`` (None: torch's default generator)."""
    gen = generator(seed, "VAE")
    return [int(s) for s in torch.randint(0, 2 ** 62, (n,), generator=gen)]


class VAE(nn.Module):
    """Convolutional VAE for [C, H, W] images with H and W multiples of 4 (the
    encoder halves them twice): MNIST-like 28x28x1 by default. See the module
    docstring for the architecture, likelihoods and units.

    ``levels``: pixel values of the data (256 for 8-bit grey); the Bernoulli
    decoder takes binary images (levels 2). ``backend``: passed to the latent
    layer's reparameterize_kl when it has a backend of that name."""

    def __init__(self, image_shape=(1, 28, 28), channels=32, latent=32, hidden=256, decoder="bernoulli",
                 levels=256, backend=None):
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"VAE: decoder must be one of {DECODERS}, got {decoder!r}")
        image_shape = tuple(image_shape)
        if (len(image_shape) != 3 or image_shape[0] < 1 or min(image_shape[1:]) < 4
                or image_shape[1] % 4 or image_shape[2] % 4):
            raise ValueError(f"VAE: image_shape must be (channels, height, width) with height and width multiples "
                             f"of 4 (e.g. (1, 28, 28) for MNIST, (1, 8, 8) for the 8x8 digits), got {image_shape!r}")
        for name, value in (("channels", channels), ("latent", latent), ("hidden", hidden)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"VAE: {name} must be an int >= 1, got {value!r}")
        if decoder == "bernoulli":
            levels = 2
        if not isinstance(levels, int) or levels < 2:
            raise ValueError(f"VAE: levels must be an int >= 2, got {levels!r}")
        self.image_shape, self.decoder, self.levels = image_shape, decoder, levels
        self.latent_features = latent
        self.num_classes = None  # unconditional (the trainer and the sample command ask)
        c, h, w = image_shape
        feat = (2 * channels, h // 4, w // 4)
        self.encoder = nn.Sequential(
            nn.Conv2d(c, channels, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 4, 2, 1), nn.ReLU(),
            nn.Flatten(), nn.Linear(math.prod(feat), hidden), nn.ReLU())
        self.latent = GaussianLatent(hidden, latent, reduction="sum",
                                     backend=backend if backend in REPARAMETERIZE_KL.backends else None)
        out = c if decoder == "bernoulli" else 2 * c  # logits, or (mean, log-scale) per channel
        self.decoder_net = nn.Sequential(
            nn.Linear(latent, hidden), nn.ReLU(),
            nn.Linear(hidden, math.prod(feat)), nn.ReLU(), nn.Unflatten(1, feat),
            nn.ConvTranspose2d(2 * channels, channels, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(channels, out, 4, 2, 1))

    # ---- pieces -----------------------------------------------------------------------------------------------

    @property
    def likelihood(self):
        return self.decoder

    def check_images(self, images):
        c, h, w = self.image_shape
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (c, h, w):
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"VAE: images must be [B, {c}, {h}, {w}] (the model's image_shape; height and width "
                             f"are set at construction and must be multiples of 4), got {got}")
        if images.is_floating_point() and not torch.equal(images, images.round()):
            raise ValueError(f"VAE: images must hold integer pixel values 0..{self.levels - 1} "
                             f"(use the uint8 images of fastgen.data), got non-integer floats")
        if images.numel() and (images.min() < 0 or images.max() > self.levels - 1):
            hint = " (the Bernoulli decoder takes binary images, e.g. binarized-mnist)" if self.levels == 2 else ""
            raise ValueError(f"VAE: pixel values must be in 0..{self.levels - 1}{hint}, got "
                             f"{images.min().item()}..{images.max().item()}")

    def feed(self, images):
        """Integer pixel values -> the encoder's input in [-1, 1]."""
        return images.to(next(self.parameters()).dtype) * (2 / (self.levels - 1)) - 1

    def encode(self, images):
        """The posterior's (mu, logvar), each [B, latent]."""
        self.check_images(images)
        return self.latent.params(self.encoder(self.feed(images)))

    def decode(self, z):
        """The decoder's output for latents z [N, latent]: Bernoulli logits [N, C, H, W],
        or the Gaussian's (mean, log-scale) [N, 2C, H, W] (means first)."""
        return self.decoder_net(z)

    def _gaussian_params(self, out):
        mean, log_scale = out.chunk(2, dim=1)
        return mean, log_scale.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)

    def log_px(self, images, out):
        """log p(x|z) per image in nats [N] from the decoder's output (float32 at least)."""
        out = out.to(torch.promote_types(out.dtype, torch.float32))  # bf16 under autocast: the likelihood in fp32
        if self.decoder == "bernoulli":
            nll = F.binary_cross_entropy_with_logits(out, images.to(out.dtype), reduction="none")
            return -nll.flatten(1).sum(1)
        mean, log_scale = self._gaussian_params(out.double())  # float64: the sum over pixels too
        log_p = discretized_gaussian_log_prob(images, mean, log_scale, self.levels).flatten(1).sum(1)
        return log_p.to(out.dtype)

    # ---- likelihoods ------------------------------------------------------------------------------------------

    def elbo_terms(self, images, seed=None):
        """(log p(x|z), KL(q(z|x) || p(z))), each [B] in nats, for one z per image
        drawn with ``seed`` (None: from torch's default generator)."""
        self.check_images(images)
        z, kl = self.latent(self.encoder(self.feed(images)), seed=seed)
        return self.log_px(images, self.decode(z)), kl.to(torch.promote_types(kl.dtype, torch.float32))

    def elbo(self, images, seed=None):
        """The evidence lower bound log p(x|z) - KL per image, in nats: [B]."""
        log_px, kl = self.elbo_terms(images, seed)
        return log_px - kl

    def loss(self, images, label=None, seed=None):
        """Mean negative ELBO per image, in nats (what training minimises). ``label``
        must be None (the model is unconditional; the argument matches the pixel models' loss)."""
        check_label("VAE", label, images.shape[0], None)
        return -self.elbo(images, seed).mean()

    def bits_per_dim(self, nats_per_image):
        return nats_per_image / (math.prod(self.image_shape) * math.log(2))

    @torch.no_grad()
    def iw_nll(self, images, k=100, *, seed=None, max_rows=4096):
        """The importance-weighted estimate of -log p(x) per image, in nats [B]
        (Burda et al. 2016): -log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x) over k
        draws z_i ~ q(z|x). Its expectation is an upper bound on the NLL that
        tightens as k grows (k = 1: -ELBO). The k draws run in chunks of at most
        ``max_rows`` decoded images. ``seed``: the draws' seed (None: from
        torch's default generator)."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"VAE.iw_nll: k must be an int >= 1, got {k!r}")
        # z and log q in float32 at least: bf16 z (autocast) would blur eps = (z - mu) / sigma and so log q
        mu, logvar = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in self.encode(images))
        b = len(images)
        per_chunk = max(1, max_rows // max(b, 1))
        chunks = [(s, min(per_chunk, k - s)) for s in range(0, k, per_chunk)]
        log_w = []
        for (start, n), chunk_seed in zip(chunks, _seeds(seed, len(chunks))):
            mu_k, logvar_k = mu.repeat(n, 1), logvar.repeat(n, 1)  # [n * B, latent], draw j of image i at j*B + i
            z, _ = reparameterize_kl(mu_k, logvar_k, seed=chunk_seed, backend=self.latent.backend)
            log_px = self.log_px(images.repeat(n, 1, 1, 1), self.decode(z))
            log_pz = -0.5 * (z ** 2 + LOG_2PI).sum(1)
            eps = (z - mu_k) * torch.exp(-0.5 * logvar_k)
            log_qz = -0.5 * (eps ** 2 + logvar_k + LOG_2PI).sum(1)
            log_w.append((log_px + log_pz - log_qz).double().view(n, b))
        log_w = torch.cat(log_w)  # [k, B]
        return -(torch.logsumexp(log_w, 0) - math.log(k))

    # ---- images for display (uint8, 0..255 grey) --------------------------------------------------------------

    def to_display(self, out, mode="mean", generator=None):
        """uint8 [N, C, H, W] images on 0..255 from the decoder's output.
        mode 'mean': Bernoulli: p(x = 1 | z) as grey (the usual way to show a
        binary VAE: draws are speckled); Gaussian: the most probable level (the
        mean's nearest). 'draw': one draw of every pixel (Bernoulli 0/255)."""
        if mode not in DISPLAY_MODES:
            raise ValueError(f"VAE: mode must be one of {DISPLAY_MODES}, got {mode!r}")
        out = out.float()
        if self.decoder == "bernoulli":
            probs = torch.sigmoid(out)
            if mode == "draw":
                probs = (torch.rand(probs.shape, generator=generator).to(probs.device) < probs).float()
            return (probs * 255).round().to(torch.uint8)
        mean, log_scale = self._gaussian_params(out)
        if mode == "draw":  # rounding and clamping a Gaussian draw is a draw of the discretized Gaussian
            mean = mean + torch.exp(log_scale) * torch.randn(mean.shape, generator=generator).to(mean.device)
        values = (mean * (self.levels - 1)).round().clamp(0, self.levels - 1)
        return (values * (255 / (self.levels - 1))).round().to(torch.uint8)

    @torch.no_grad()
    def sample(self, n, *, seed=None, temperature=1.0, mode="mean"):
        """``n`` images from the prior, uint8 [n, C, H, W] on 0..255: z ~ N(0,
        temperature^2 I), decoded for display (``to_display``'s ``mode``).
        ``seed``: same seed, same images (None: torch's default generator)."""
        z, gen = prior_draws("VAE.sample", n, self.latent_features, seed, temperature, next(self.parameters()))
        return self.to_display(self.decode(z), mode, gen)

    @torch.no_grad()
    def reconstruct(self, images, mode="mean"):
        """The images decoded from their posterior means: uint8 [B, C, H, W] on 0..255."""
        mu, _ = self.encode(images)
        return self.to_display(self.decode(mu), mode)

    @torch.no_grad()
    def interpolate(self, images_a, images_b, steps=10, mode="mean"):
        """Decode the straight line between the posterior means of ``images_a``
        and ``images_b`` (each [B, C, H, W], or one [C, H, W]) at ``steps``
        evenly spaced points, ends included: uint8 [B, steps, C, H, W] on 0..255."""
        if not isinstance(steps, int) or steps < 2:
            raise ValueError(f"VAE.interpolate: steps must be an int >= 2, got {steps!r}")
        if images_a.dim() == 3:
            images_a, images_b = images_a[None], images_b[None]
        if images_a.shape != images_b.shape:
            raise ValueError(f"VAE.interpolate: images_a and images_b must have one shape, got "
                             f"{tuple(images_a.shape)} and {tuple(images_b.shape)}")
        mu_a, _ = self.encode(images_a)
        mu_b, _ = self.encode(images_b)
        t = torch.linspace(0, 1, steps, dtype=mu_a.dtype, device=mu_a.device)[None, :, None]
        z = (mu_a[:, None] * (1 - t) + mu_b[:, None] * t).flatten(0, 1)  # [B * steps, latent]
        return self.to_display(self.decode(z), mode).view(len(images_a), steps, *self.image_shape)

    def extra_repr(self):
        return (f"image_shape={self.image_shape}, decoder={self.decoder!r}, levels={self.levels}, "
                f"latent={self.latent_features}")
