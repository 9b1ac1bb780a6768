"""Executable spec of PixelCNN++'s discretized logistic mixture likelihood
(Salimans et al. 2017, "PixelCNN++", section 2.1-2.2), and of its sampler.

Data: x in [-1, 1], [B, C, H, W] with C = 1 or 3, each value one of the 256
levels (2v/255 - 1 for v = 0..255). Parameters: [B, K, H, W] per pixel,
channel layout of the original code (its NHWC last axis, read along K):

* C = 1, K = 3 * nr_mix: mixture logits [0, M), means [M, 2M), log-scales [2M, 3M);
* C = 3, K = 10 * nr_mix: mixture logits [0, M), then for each colour c = 0, 1, 2
  the block [M + 3Mc, M + 3M(c+1)) holds that colour's means, log-scales and
  raw linear coefficients (M each; coefficients go through tanh).

The pixel's colours share the mixture component. Component k's mean for
colour c is autoregressive in the earlier colours of the same pixel:
m_0 = mu_0, m_1 = mu_1 + a_0 x_0, m_2 = mu_2 + a_1 x_0 + a_2 x_1 (a = tanh(raw)).
Log-scales are clamped below at -7. With s = exp(-log_scale), d = x - m:

* x = -1 (level 0):   log sigmoid(s (d + 1/255))        (the bin extends to -inf)
* x = +1 (level 255): log(1 - sigmoid(s (d - 1/255)))   (the bin extends to +inf)
* otherwise log(sigmoid(s (d + 1/255)) - sigmoid(s (d - 1/255))), and where that
  difference is below 1e-5 the original's fallback, the log density at the bin
  centre times the bin width: s d - log_scale - 2 softplus(s d) - log(127.5).

log p(pixel) = logsumexp_k (log_softmax(logits)_k + sum_c log p_c,k); the NLL
is its negative, summed over pixels per image ('sum'), averaged over images
('mean'), or per pixel [B, H, W] ('none'). Math in float32 for float16,
bfloat16 and float32 parameters (float64 for float64); the per-pixel NLL in
params' dtype, a reduced one ('sum', 'mean') of float16/bfloat16 params in
float32 (fastgen.ref.precision: one rule for every op with a reduction).
"""
import math

import torch

from fastgen.ref.precision import compute_dtype, output_dtype, reduce_rows

LOG_SCALE_MIN = -7.0
EDGE = 0.999  # x below -EDGE is level 0, above EDGE level 255 (the original's thresholds)
CDF_DELTA_MIN = 1e-5
LOG_HALF_BINS = math.log(127.5)


def infer_nr_mix(channels, k):
    """nr_mix from the data's channels and the parameters' K (3M for C = 1, 10M for C = 3), or None."""
    per = {1: 3, 3: 10}.get(channels)
    if per is None or k % per or k == 0:
        return None
    return k // per


def split_params(params, channels, nr_mix):
    """(logits [B, M, H, W], means, log_scales, coeffs [B, C, M, H, W]; coeffs None for C = 1), raw
    (log-scales not clamped, coefficients not tanh'd)."""
    b, _, h, w = params.shape
    m = nr_mix
    logits = params[:, :m]
    rest = params[:, m:].reshape(b, channels, 3 if channels == 3 else 2, m, h, w)  # [B, C, 2 or 3, M, H, W]
    coeffs = rest[:, :, 2] if channels == 3 else None
    return logits, rest[:, :, 0], rest[:, :, 1], coeffs


def softplus(v):
    """log(1 + e^v), exact everywhere (F.softplus returns v itself above 20: off by up to 2e-9)."""
    return torch.clamp_min(v, 0) + torch.log1p(torch.exp(-v.abs()))


def log_prob_components(x, params, nr_mix):
    """[B, M, H, W]: log_softmax(logits)_k + sum_c log p_c,k per pixel and component."""
    ct = compute_dtype(params.dtype)
    x, params = x.to(ct), params.to(ct)
    c = x.shape[1]
    logits, means, log_scales, coeffs = split_params(params, c, nr_mix)
    log_scales = torch.clamp(log_scales, min=LOG_SCALE_MIN)
    xs = x[:, :, None]  # [B, C, 1, H, W]
    if c == 3:
        a = torch.tanh(coeffs)
        m1 = means[:, 1] + a[:, 0] * xs[:, 0]
        m2 = means[:, 2] + a[:, 1] * xs[:, 0] + a[:, 2] * xs[:, 1]
        means = torch.stack([means[:, 0], m1, m2], 1)
    centered = xs - means
    inv_s = torch.exp(-log_scales)
    plus_in = inv_s * (centered + 1 / 255)
    min_in = inv_s * (centered - 1 / 255)
    log_cdf_plus = plus_in - softplus(plus_in)
    log_one_minus_cdf_min = -softplus(min_in)
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    mid_in = inv_s * centered
    log_pdf_mid = mid_in - log_scales - 2 * softplus(mid_in)
    inner = torch.where(cdf_delta > CDF_DELTA_MIN, torch.log(torch.clamp(cdf_delta, min=1e-12)),
                        log_pdf_mid - LOG_HALF_BINS)
    log_probs = torch.where(xs < -EDGE, log_cdf_plus, torch.where(xs > EDGE, log_one_minus_cdf_min, inner))
    return log_probs.sum(1) + torch.log_softmax(logits, 1)


def discretized_mix_logistic_nll(x, params, nr_mix, reduction="sum"):
    """The NLL in nats (module docstring), in output_dtype(params.dtype, reduction)."""
    nll = -torch.logsumexp(log_prob_components(x, params, nr_mix), 1)  # [B, H, W]
    return reduce_rows(nll, reduction).to(output_dtype(params.dtype, reduction))


def quantize(v):
    """The nearest of the 256 levels (2v/255 - 1) to v, after clamping to [-1, 1]."""
    return torch.round((torch.clamp(v, -1, 1) + 1) * 127.5) / 127.5 - 1


def sample_discretized_mix_logistic(params, channels, nr_mix, u_mix, u_logistic, temperature=1.0):
    """x on the 256 levels in [-1, 1], [B, C, H, W], from uniforms: ``u_mix``
    [B, H, W] picks the component (inverse CDF of softmax(logits / temperature)),
    ``u_logistic`` [B, C, H, W] draws each colour from its logistic (scale times
    temperature). A logistic draw rounded to the nearest level (and clamped) is
    a draw of the discretized distribution; each colour is rounded before it
    shifts the next colours' means, as the likelihood conditions on levels."""
    ct = compute_dtype(params.dtype)
    params = params.to(ct)
    logits, means, log_scales, coeffs = split_params(params, channels, nr_mix)
    probs = torch.softmax(logits / temperature, 1)
    cdf = torch.cumsum(probs, 1)
    k = torch.clamp((cdf < u_mix.to(ct)[:, None]).sum(1, keepdim=True), max=nr_mix - 1)  # [B, 1, H, W]
    pick = lambda t: torch.gather(t, 2, k[:, None].expand(-1, t.shape[1], -1, -1, -1))[:, :, 0]  # noqa: E731
    mu, ls = pick(means), torch.clamp(pick(log_scales), min=LOG_SCALE_MIN)
    u = u_logistic.to(ct).clamp(1e-5, 1 - 1e-5)
    draw = mu + torch.exp(ls) * temperature * (torch.log(u) - torch.log1p(-u))
    if channels == 1:
        return quantize(draw)
    a = torch.tanh(pick(coeffs))
    x0 = quantize(draw[:, 0])
    x1 = quantize(draw[:, 1] + a[:, 0] * x0)
    x2 = quantize(draw[:, 2] + a[:, 1] * x0 + a[:, 2] * x1)
    return torch.stack([x0, x1, x2], 1)
