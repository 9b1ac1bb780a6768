"""Executable spec of the VAE's reparameterization + Gaussian KL, and of its noise.

``reparameterize_kl(mu, logvar, prior_mu, prior_logvar, seed, reduction)``:

* ``z = mu + exp(logvar / 2) * eps`` with eps ~ N(0, 1) from the stream below;
* ``kl`` = KL( N(mu, exp(logvar)) || N(pm, exp(plv)) ) elementwise,
  ``0.5 * (plv - logvar + (exp(logvar) + (mu - pm)^2) * exp(-plv) - 1)``, with the
  standard normal prior (pm = plv = 0) when none is given; then summed over all
  but the first dimension ('sum'), averaged over the batch of those sums
  ('mean'), or kept elementwise ('none').

Math in float32 for float16/bfloat16/float32 inputs (float64 for float64); z and an
elementwise kl in the input's dtype, a reduced kl ('sum', 'mean') of float16/bfloat16
inputs in float32 (fastgen.ref.precision: one rule for every op with a reduction).

The noise stream (what every backend draws): element i of mu, counted in
row-major order whatever mu's strides, takes output ``i % 4`` of Triton's
``tl.randn4x(seed, i // 4)``:

* Philox-4x32 with 10 rounds (Salmon et al. 2011), key = (seed's low 32 bits,
  its high 32 bits), counter = (low and high 32 bits of i // 4, 0, 0), as
  ``tl.randint4x`` does;
* each 32-bit output r to a uniform in [0, 1): r read as int32, negative values
  complemented (``~r``), times 4.6566127342e-10 (float32), as
  ``tl.uint_to_uniform_float`` does;
* Box-Muller on the pairs (u1, u2) and (u3, u4), as ``tl.pair_uniform_to_normal``:
  ``r = sqrt(-2 log(max(u1, 1e-7)))``, ``theta = 2 pi u2``, normals
  ``r cos theta`` and ``r sin theta``, every step rounded to float32.

The first output of each group is ``tl.randn(seed, i // 4)`` itself. The clamp
at 1e-7 bounds |eps| by sqrt(-2 log 1e-7) = 5.68.
"""
import torch

from fastgen._seed import check_seed
from fastgen.ref.precision import compute_dtype, output_dtype, reduce_rows

# Philox-4x32 constants (tl.philox_impl)
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_M32 = 0xFFFFFFFF
N_ROUNDS = 10
UNIFORM_SCALE = 4.6566127342e-10  # tl.uint_to_uniform_float: MAX_INT32 * scale < 1 in float32
TWO_PI = 6.283185307179586
U1_MIN = 1.0e-7


def _mul32(a, b):
    """(high, low) 32 bits of the 64-bit product of a (int64 tensor < 2^32) and
    b (an int < 2^32), through 16-bit halves so that nothing overflows int64."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    lolo = a_lo * b_lo
    mid = a_hi * b_lo + a_lo * b_hi + (lolo >> 16)
    return a_hi * b_hi + (mid >> 16), ((mid & 0xFFFF) << 16) | (lolo & 0xFFFF)


def philox4x32(seed, counter):
    """The four 32-bit outputs (int64 tensors in [0, 2^32)) of Philox-4x32-10 for
    key ``seed`` and counters (counter's low 32 bits, its high 32 bits, 0, 0)."""
    c0, c1 = counter & _M32, (counter >> 32) & _M32
    c2 = c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(N_ROUNDS):
        hi_b, lo_b = _mul32(c2, _ROUND_B)
        hi_a, lo_a = _mul32(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def uniform(r):
    """tl.uint_to_uniform_float of 32-bit outputs: float32 in [0, 1)."""
    folded = torch.where(r >= 2 ** 31, _M32 - r, r)  # int32 view, negatives complemented
    return folded.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=r.device)


def box_muller(u1, u2):
    """tl.pair_uniform_to_normal in float32."""
    u1 = torch.clamp_min(u1, torch.tensor(U1_MIN, dtype=torch.float32).item())
    theta = torch.tensor(TWO_PI, dtype=torch.float32, device=u2.device) * u2
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(theta), r * torch.sin(theta)


def normal_stream(seed, n, device="cpu"):
    """The first ``n`` normals (float32) of the stream of ``seed`` (module docstring)."""
    check_seed(seed, "reparameterize_kl")
    groups = torch.arange((n + 3) // 4, dtype=torch.int64, device=device)
    r0, r1, r2, r3 = philox4x32(seed, groups)
    n0, n1 = box_muller(uniform(r0), uniform(r1))
    n2, n3 = box_muller(uniform(r2), uniform(r3))
    return torch.stack([n0, n1, n2, n3], 1).reshape(-1)[:n]


def kl_elementwise(mu, logvar, prior_mu=None, prior_logvar=None):
    """KL( N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar)) ) per element (a
    missing prior parameter is 0: the standard normal)."""
    d = mu if prior_mu is None else mu - prior_mu
    if prior_logvar is None:
        return 0.5 * (torch.exp(logvar) + d * d - 1 - logvar)
    return 0.5 * (prior_logvar - logvar + (torch.exp(logvar) + d * d) * torch.exp(-prior_logvar) - 1)


def reparameterize_kl(mu, logvar, prior_mu=None, prior_logvar=None, seed=0, reduction="sum", eps=None):
    """(z, kl) as in the module docstring; ``eps`` replaces the stream's noise when given."""
    ct = compute_dtype(mu.dtype)
    if eps is None:
        eps = normal_stream(seed, mu.numel(), mu.device).reshape(mu.shape)
    up = [None if t is None else t.to(ct) for t in (mu, logvar, prior_mu, prior_logvar)]
    z = up[0] + torch.exp(0.5 * up[1]) * eps.to(ct)
    kl = reduce_rows(kl_elementwise(*up), reduction)
    return z.to(mu.dtype), kl.to(output_dtype(mu.dtype, reduction))
