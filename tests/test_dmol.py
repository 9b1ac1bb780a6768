"""PixelCNN++'s discretized logistic mixture (fastgen.ref.dmol / fastgen.ops.dmol):
the NLL against the usual port's formulation, the likelihood summing to 1,
edge cases and extreme log-scales, gradients, layouts, the sampler's
distribution, errors."""
import math

import pytest
import torch

import fastgen
from fastgen.ops import dmol as ops
from fastgen.ref import dmol as ref

from conftest import require_backend
from harness import dmol_loss_common

KERNELS = ["cpp", pytest.param("triton", marks=pytest.mark.triton)]


def levels_x(shape, generator=None):
    """x on the 256 levels (2v/255 - 1), with both edge levels present."""
    v = torch.randint(0, 256, shape, generator=generator)
    v.view(-1)[0], v.view(-1)[-1] = 0, 255
    return v.double() / 127.5 - 1


@pytest.mark.parametrize("nr_mix", [1, 5, 10])
def test_rgb_matches_the_usual_formulation(nr_mix):
    x = levels_x((2, 3, 5, 6))
    params = torch.randn(2, 10 * nr_mix, 5, 6, dtype=torch.float64) * 2
    want = dmol_loss_common(x, params)
    got = fastgen.discretized_mix_logistic_nll(x, params, backend="ref")
    assert got.shape == (2,)
    # the port's F.softplus returns v itself above 20 (off by < 2e-9 per term); the ref's softplus is exact
    torch.testing.assert_close(got.sum(), want, rtol=1e-9, atol=1e-7)


@pytest.mark.parametrize("channels, per", [(1, 3), (3, 10)])
@pytest.mark.parametrize("nr_mix", [1, 5, 10])
def test_likelihood_sums_to_one_over_the_256_values(channels, per, nr_mix):
    """In float64, with extreme log-scales mixed in: one channel, the sum over its 256 values is 1; RGB, the
    sum over every (x1, x2) for a fixed x0 is the first colour's marginal mixture at x0. Not to 1e-15: bins
    of mass below 1e-5 take the original's fallback (density at the centre times the width), which is
    close to but not the bin's mass."""
    params = torch.randn(1, per * nr_mix, 1, 1, dtype=torch.float64) * 3
    if channels == 1:
        params[:, 2 * nr_mix:] = torch.tensor([-9.0, 4.0, 0.3, -2.0, 1.0] * 2)[:nr_mix].view(1, nr_mix, 1, 1)
    v = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    if channels == 1:
        x = v.view(256, 1, 1, 1)
    else:
        # two fixed first colours, every value of the third: the sum is p(x0, x1), which then must equal the
        # sum over x2 computed the same way for any x1: check the total over a grid of (x1, x2) for fixed x0
        x1, x2 = torch.meshgrid(v, v, indexing="ij")
        x = torch.stack([torch.full_like(x1, v[100]), x1, x2], 0).reshape(3, -1).t().reshape(-1, 3, 1, 1)
    p = torch.exp(-fastgen.discretized_mix_logistic_nll(x, params.expand(len(x), -1, -1, -1), reduction="none"))
    total = p.sum()
    if channels == 3:  # sum over x1, x2 = the marginal p(x0 = level 100): check against the sum over x0 too
        # marginal of x0 alone: one channel's mixture with the same logits, mean and scale of colour 0
        m = nr_mix
        p0 = torch.cat([params[:, :m], params[:, m:2 * m], params[:, 2 * m:3 * m]], 1)
        want = torch.exp(-fastgen.discretized_mix_logistic_nll(v[100].view(1, 1, 1, 1), p0, reduction="none"))
        torch.testing.assert_close(total, want.sum(), rtol=1e-6, atol=1e-12)
    else:
        torch.testing.assert_close(total, torch.tensor(1.0, dtype=torch.float64), rtol=1e-6, atol=1e-12)


def test_edge_levels_and_the_small_probability_fallback():
    """Level 0 takes the whole left tail, level 255 the right; a bin of mass below 1e-5 falls back to the
    density at its centre times the bin width, as the original."""
    params = torch.tensor([0.0, 0.2, -7.5], dtype=torch.float64).view(1, 3, 1, 1)  # one logistic, s = e^-7 clamp
    mean, ls = 0.2, -7.0
    def nll(v):
        return fastgen.discretized_mix_logistic_nll(torch.tensor(v, dtype=torch.float64).view(1, 1, 1, 1), params)
    s = math.exp(-ls)
    softplus = lambda t: max(t, 0.0) + math.log1p(math.exp(-abs(t)))  # noqa: E731
    torch.testing.assert_close(nll(-1.0).item(), softplus(-s * (-1 - mean + 1 / 255)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(nll(1.0).item(), softplus(s * (1 - mean - 1 / 255)), rtol=1e-12, atol=1e-12)
    far = 2 * 10 / 255 - 1  # a middle level far from the mean: tiny mass, the fallback
    t = s * (far - mean)
    fallback = t - ls - 2 * softplus(t) - math.log(127.5)
    torch.testing.assert_close(nll(far).item(), -fallback, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["ref", "cpp"])  # float64: not triton
@pytest.mark.parametrize("channels, per", [(1, 3), (3, 10)])
def test_gradcheck(backend, channels, per):
    require_backend(ops.OP, backend)
    x = levels_x((2, channels, 3, 2))
    params = (torch.randn(2, per * 2, 3, 2, dtype=torch.float64) * 2).requires_grad_()
    for reduction in ("sum", "none", "mean"):
        assert torch.autograd.gradcheck(
            lambda p: fastgen.discretized_mix_logistic_nll(x, p, reduction=reduction, backend=backend), [params])


def kernel_case(channels, nr_mix, shape=(3, 5, 7), seed=0):
    """x with edge levels, params with log-scales from -9 (clamped) to +4 and coefficients far into tanh's
    tails, so every branch of the likelihood (edges, middle bins, the fallback) is taken."""
    g = torch.Generator().manual_seed(seed)
    b, h, w = shape
    x = levels_x((b, channels, h, w), generator=g)
    per = 3 if channels == 1 else 10
    params = torch.randn(b, per * nr_mix, h, w, generator=g, dtype=torch.float64) * 2
    blocks = params[:, nr_mix:].view(b, channels, -1, nr_mix, h, w)
    blocks[:, :, 1] = torch.rand(b, channels, nr_mix, h, w, generator=g, dtype=torch.float64) * 13 - 9
    return x, params


def device_for(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def rel_err(a, b):
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


def run_case(backend, x, params, nr_mix):
    """The per-pixel NLL and the gradient of params for a fixed random upstream gradient."""
    params = params.detach().clone().requires_grad_()
    if backend == "ref64":
        nll = ref.discretized_mix_logistic_nll(x.double(), params, nr_mix, "none")
    elif backend.startswith("ref"):
        nll = ref.discretized_mix_logistic_nll(x, params, nr_mix, "none")
    else:
        nll = fastgen.discretized_mix_logistic_nll(x, params, reduction="none", backend=backend)
    w = torch.randn(nll.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(nll.device)
    (grad,) = torch.autograd.grad((nll.double() * w).sum(), [params])
    return nll, grad


@pytest.mark.parametrize("backend, dtype", [("cpp", torch.float64), ("cpp", torch.float32),
                                            pytest.param("triton", torch.float32, marks=pytest.mark.triton)])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("nr_mix", [1, 5, 10])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_kernel_matches_ref(backend, dtype, channels, nr_mix, layout):
    """float64 against the ref to cancellation's ~1e-10 (the bins' sigmoid differences); float32 (cpp's
    AVX-512 path, triton) within 2x the error of the ref run in float32, both against float64."""
    require_backend(ops.OP, backend)
    device = device_for(backend)
    x, params = kernel_case(channels, nr_mix)
    x, params = x.to(device, dtype), params.to(device, dtype)
    if layout == "channels_last":
        params = params.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        params = torch.cat([params, params], 3)[..., ::2]  # every other column: neither layout, copied
    got, grad = run_case(backend, x, params, nr_mix)
    want, grad_want = run_case("ref64", x.cpu(), params.cpu().double(), nr_mix)
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(grad, grad_want, rtol=1e-7, atol=1e-8)
    else:
        same, grad_same = run_case("ref32", x.cpu(), params.cpu(), nr_mix)
        assert rel_err(got, want) <= max(1e-6, 2 * rel_err(same, want))
        # ~2x (DESIGN.md): 2.5x, as the logits' gradient pi_k - r_k cancels where a component explains the pixel
        # as well as the prior says, and there fp32 errors of either side dominate the norm
        assert rel_err(grad, grad_want) <= max(1e-5, 2.5 * rel_err(grad_same, grad_want))
    if layout == "channels_last":
        assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_reduced_precision(backend, dtype):
    """Math in float32 whatever the dtype: the error is at most ~2x the ref's in that dtype (DESIGN.md)."""
    require_backend(ops.OP, backend)
    device = device_for(backend)
    x, params = kernel_case(3, 5)
    x, params = x.to(dtype), params.to(dtype)
    want, g_want = run_case("ref64", x, params.double(), 5)
    got, g = run_case(backend, x.to(device), params.to(device), 5)
    same, g_same = run_case("ref", x, params, 5)
    floor = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert rel_err(got, want) <= max(floor, 2 * rel_err(same, want))
    assert rel_err(g, g_want) <= max(floor, 2 * rel_err(g_same, g_want))


@pytest.mark.parametrize("backend", ["ref"] + KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_nll_of_half_params_is_float32(backend, dtype):
    """A 16x16 RGB image whose means lie far from every pixel (100, ~310 nats a pixel) has an NLL past float16's
    largest value (65504): a reduced NLL of half params is float32 (fastgen.ref.precision): the sum of the
    per-pixel NLL, which keeps params' dtype, up to that dtype's rounding of each pixel; the gradient of the
    float32 loss flows back to the half params. One small image, one component: the Triton interpreter's time
    grows with both."""
    require_backend(ops.OP, backend)
    device = device_for(backend)
    x = levels_x((1, 3, 16, 16), generator=torch.Generator().manual_seed(0)).to(device, dtype)
    params = torch.zeros(1, 10, 16, 16, dtype=dtype)
    params[:, [1, 4, 7]] = 100.0  # the three colours' means (nr_mix = 1: [logit, then mean, log-scale, coeff])
    params = params.to(device).requires_grad_(True)
    per_pixel = fastgen.discretized_mix_logistic_nll(x, params, reduction="none", backend=backend)
    assert per_pixel.dtype == dtype
    want = per_pixel.detach().double().sum()
    assert want > 65504  # float16 would overflow
    nll = fastgen.discretized_mix_logistic_nll(x, params, backend=backend)  # reduction="sum"
    assert nll.dtype == torch.float32 and torch.isfinite(nll).all()
    torch.testing.assert_close(nll.double(), want.reshape(1), rtol=1e-4 if dtype == torch.float16 else 1e-3, atol=0)
    (grad,) = torch.autograd.grad(nll.sum(), [params])
    assert grad.dtype == dtype and torch.isfinite(grad).all() and grad.abs().sum() > 0
    mean = fastgen.discretized_mix_logistic_nll(x, params, reduction="mean", backend=backend)
    assert mean.dtype == torch.float32 and torch.equal(mean, nll[0])


@pytest.mark.parametrize("backend", KERNELS)
def test_kernel_opcheck(backend):
    require_backend(ops.OP, backend)
    device = device_for(backend)
    fwd, bwd = ops._kernels(backend)
    x, params = kernel_case(3, 2, shape=(2, 3, 4))
    x, params = x.float().to(device), params.float().to(device)
    torch.library.opcheck(fwd, (x, params, 2))
    torch.library.opcheck(bwd, (torch.randn(2, 3, 4, device=device), x, params, 2))


@pytest.mark.parametrize("channels", [1, 3])
def test_sampler_matches_the_mixture(channels):
    """A histogram of many draws of one pixel against the likelihood of each level (chi-square)."""
    nr_mix = 3
    per = 3 if channels == 1 else 10
    g = torch.Generator().manual_seed(4)
    params = torch.randn(1, per * nr_mix, 1, 1, generator=g, dtype=torch.float64)
    params[:, nr_mix:] *= 0.5
    n = 200000
    draws = fastgen.sample_discretized_mix_logistic(params.expand(n, -1, -1, -1).contiguous(), channels=channels,
                                                    seed=9)
    assert draws.shape == (n, channels, 1, 1) and draws.min() >= -1 and draws.max() <= 1
    levels = torch.round((draws[:, 0, 0, 0].double() + 1) * 127.5).long()
    counts = torch.bincount(levels, minlength=256).double()
    v = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    if channels == 1:
        p0 = params
    else:
        p0 = torch.cat([params[:, :nr_mix], params[:, nr_mix:2 * nr_mix], params[:, 2 * nr_mix:3 * nr_mix]], 1)
    probs = torch.exp(-fastgen.discretized_mix_logistic_nll(v.view(256, 1, 1, 1), p0.expand(256, -1, -1, -1),
                                                            reduction="none")).view(256)
    expected = probs * n
    keep = expected > 20  # chi-square over well-populated levels, the rest pooled
    chi2 = (((counts[keep] - expected[keep]) ** 2) / expected[keep]).sum()
    rest_e, rest_c = expected[~keep].sum(), counts[~keep].sum()
    if rest_e > 20:
        chi2 += (rest_c - rest_e) ** 2 / rest_e
    dof = int(keep.sum()) + (1 if rest_e > 20 else 0) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2.item(), dof)


def test_sampler_seeds_and_temperature():
    params = torch.randn(2, 50, 4, 4)  # K = 50: RGB with 5 components (the only layout it fits)
    a = fastgen.sample_discretized_mix_logistic(params, seed=1)
    assert a.shape == (2, 3, 4, 4)
    assert torch.equal(a, fastgen.sample_discretized_mix_logistic(params, seed=1))
    assert not torch.equal(a, fastgen.sample_discretized_mix_logistic(params, seed=2))
    # near zero temperature: the most probable component's mean (plus the colour coefficients), clamped
    cold = fastgen.sample_discretized_mix_logistic(params.double(), seed=1, temperature=1e-6)
    logits, means, _, coeffs = ref.split_params(params.double(), 3, 5)
    k = logits.argmax(1, keepdim=True)
    pick = lambda t: torch.gather(t, 2, k[:, None].expand(-1, 3, -1, -1, -1))[:, :, 0]  # noqa: E731
    mu, a_ = pick(means), torch.tanh(pick(coeffs))
    x0 = ref.quantize(mu[:, 0])
    x1 = ref.quantize(mu[:, 1] + a_[:, 0] * x0)
    x2 = ref.quantize(mu[:, 2] + a_[:, 1] * x0 + a_[:, 2] * x1)
    torch.testing.assert_close(cold, torch.stack([x0, x1, x2], 1), rtol=0, atol=1e-6)
    assert torch.equal(a, ref.quantize(a))  # every value is one of the 256 levels


def test_sampler_takes_an_empty_batch():
    x = fastgen.sample_discretized_mix_logistic(torch.randn(0, 20, 4, 5), seed=1)
    assert x.shape == (0, 3, 4, 5) and x.dtype == torch.float32


def test_sampler_seed_rule():
    """One seed rule (fastgen._seed): an int in [0, 2**63); None follows torch.manual_seed."""
    params = torch.randn(2, 20, 3, 3)
    for bad in (-1, 2 ** 63, 1.5, True):
        with pytest.raises(ValueError, match=r"sample_discretized_mix_logistic: seed must be an int in \[0, 2\*\*63\)"):
            fastgen.sample_discretized_mix_logistic(params, seed=bad)
    big = fastgen.sample_discretized_mix_logistic(params, seed=2 ** 63 - 1)
    assert big.shape == (2, 3, 3, 3)
    torch.manual_seed(5)
    a = fastgen.sample_discretized_mix_logistic(params)
    torch.manual_seed(5)
    assert torch.equal(a, fastgen.sample_discretized_mix_logistic(params))


def test_sampler_errors():
    with pytest.raises(ValueError, match="fits both layouts"):
        fastgen.sample_discretized_mix_logistic(torch.zeros(1, 30, 2, 2))  # 30 = 3*10 = 10*3
    with pytest.raises(ValueError, match="temperature"):
        fastgen.sample_discretized_mix_logistic(torch.zeros(1, 20, 2, 2), temperature=0)
