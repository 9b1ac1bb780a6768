"""reparameterize_kl on every backend against fastgen.ref.reparameterize_kl (outputs
and gradients, with the kernel's own eps) and against the textbook formulas; the
noise stream (Philox known answers, Triton's tl.randn4x, statistics,
independence, seeds); GaussianLatent; errors."""
import math

import pytest
import torch

import fastgen
from fastgen import BackendError
from fastgen.nn import GaussianLatent
from fastgen.ops import reparameterize_kl as ops
from fastgen.ref import reparameterize_kl as ref
from fastgen.ref.precision import output_dtype

from conftest import require_backend

TRITON = pytest.param("triton", marks=pytest.mark.triton)
BACKENDS = ["ref", "cpp", TRITON]
SHAPES = [(1,), (7,), (3, 7), (5, 33, 2), (2, 4099)]  # 4099: rows cross the C++ tiles and Triton's splits


def device_for(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def run(backend, *args, **kwargs):
    return fastgen.reparameterize_kl(*args, backend=backend, **kwargs)


def leaf(t, dtype=None, device=None):
    return None if t is None else t.detach().to(dtype=dtype or t.dtype, device=device).requires_grad_()


def kernel_eps(backend, shape, seed, device):
    """The noise a backend draws, read back through z = 0 + exp(0) * eps (float64 keeps it exact)."""
    zeros = torch.zeros(shape, dtype=torch.float64 if device == "cpu" else torch.float32, device=device)
    return run(backend, zeros, zeros, seed=seed)[0]


def prior_for(kind, shape, dtype, device):
    """(prior_mu, prior_logvar) of a kind: none, full, broadcast (trailing dims), mu only, logvar only."""
    pshape = shape[1:] if kind == "broadcast" else shape
    pm = torch.randn(pshape, dtype=torch.float64).to(dtype=dtype, device=device)
    plv = torch.randn(pshape, dtype=torch.float64).to(dtype=dtype, device=device)
    return {"none": (None, None), "full": (pm, plv), "broadcast": (pm, plv), "mu": (pm, None),
            "logvar": (None, plv)}[kind]


def check_against_ref(backend, shape, reduction, prior, dtype, tol):
    device = device_for(backend)
    require_backend(ops.OP, backend, ops.make_call(torch.zeros(shape, dtype=dtype, device=device),
                                                   torch.zeros(shape, dtype=dtype, device=device), None, None, 0,
                                                   reduction))
    mu = torch.randn(shape, dtype=torch.float64).to(dtype=dtype, device=device)
    logvar = torch.randn(shape, dtype=torch.float64).to(dtype=dtype, device=device)
    pm, plv = prior_for(prior, shape, dtype, device)
    seed = 1234
    eps = kernel_eps(backend, shape, seed, device).double()
    ins = [leaf(t) for t in (mu, logvar, pm, plv)]
    z, kl = run(backend, ins[0], ins[1], prior_mu=ins[2], prior_logvar=ins[3], seed=seed, reduction=reduction)
    assert z.dtype == dtype and kl.dtype == output_dtype(dtype, reduction) and z.shape == mu.shape
    assert kl.shape == {"sum": mu.shape[:1], "mean": (), "none": mu.shape}[reduction]
    gz = torch.randn(z.shape, dtype=torch.float64).to(device)
    gk = torch.randn(kl.shape, dtype=torch.float64).to(device)
    grads = torch.autograd.grad((z.double() * gz).sum() + (kl.double() * gk).sum(), [t for t in ins if t is not None])

    ins64 = [leaf(t, torch.float64) for t in (mu, logvar, pm, plv)]
    z_r, kl_r = ref.reparameterize_kl(*ins64, seed, reduction, eps=eps)
    grads_r = torch.autograd.grad((z_r * gz).sum() + (kl_r * gk).sum(), [t for t in ins64 if t is not None])
    torch.testing.assert_close(z.double(), z_r, **tol)
    torch.testing.assert_close(kl.double(), kl_r, **tol)
    for g, g_r in zip(grads, grads_r):
        torch.testing.assert_close(g.double(), g_r, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("prior", ["none", "full"])
def test_matches_ref_outputs_and_gradients(backend, shape, reduction, prior):
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    check_against_ref(backend, shape, reduction, prior, dtype, tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prior", ["broadcast", "mu", "logvar"])
def test_prior_forms(backend, prior):
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    check_against_ref(backend, (4, 3, 5), "sum", prior, dtype, tol)


@pytest.mark.parametrize("backend", ["cpp", TRITON])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prior", ["none", "full"])
def test_reduced_precision(backend, dtype, prior):
    """Math in fp32: the error is the output's rounding (bf16 8 bits, fp16 11), nothing more."""
    tol = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
           torch.float16: dict(rtol=2e-3, atol=2e-3)}[dtype]
    check_against_ref(backend, (6, 37), "sum", prior, dtype, tol)
    check_against_ref(backend, (6, 37), "none", prior, dtype, tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_kl_of_half_inputs_is_float32(backend, dtype):
    """(2, 1000) with mu = 16, logvar = 0: every KL term is 128, a row's sum 128000 passes float16's largest value
    (65504). A reduced KL of half inputs is float32 (fastgen.ref.precision) and exact here; z and the elementwise
    KL keep the inputs' dtype; the gradient of the float32 loss flows back to the half inputs."""
    device = device_for(backend)
    mu = torch.full((2, 1000), 16.0, dtype=dtype, device=device, requires_grad=True)
    logvar = torch.zeros(2, 1000, dtype=dtype, device=device, requires_grad=True)
    require_backend(ops.OP, backend, ops.make_call(mu, logvar, None, None, 0, "sum"))
    for reduction, want in (("sum", [128000.0, 128000.0]), ("mean", 128000.0)):
        z, kl = run(backend, mu, logvar, seed=3, reduction=reduction)
        assert z.dtype == dtype and kl.dtype == torch.float32
        assert torch.equal(kl.cpu(), torch.tensor(want))
        g_mu, g_lv = torch.autograd.grad(kl.sum(), [mu, logvar])  # d/dmu = mu, over the batch of 2 for 'mean'
        assert g_mu.dtype == dtype and torch.all(g_mu == (16.0 if reduction == "sum" else 8.0))
        assert g_lv.dtype == dtype and torch.all(g_lv == 0)
    z, kl = run(backend, mu, logvar, seed=3, reduction="none")
    assert kl.dtype == dtype and torch.all(kl == 128)


@pytest.mark.parametrize("backend", BACKENDS)
def test_textbook_formulas_with_the_same_eps(backend):
    """pytorch/examples' VAE: z = mu + eps * exp(0.5 logvar), KLD = -0.5 sum(1 + logvar - mu^2 - exp(logvar))."""
    device = device_for(backend)
    require_backend(ops.OP, backend, ops.make_call(torch.zeros(2, device=device), torch.zeros(2, device=device),
                                                   None, None, 0, "sum"))
    dtype = torch.float32 if backend == "triton" else torch.float64
    mu, logvar = [torch.randn(8, 20, dtype=dtype, device=device, requires_grad=True) for _ in range(2)]
    eps = kernel_eps(backend, (8, 20), 7, device).to(dtype)
    z, kl = run(backend, mu, logvar, seed=7, reduction="mean")
    z_t = mu + eps * torch.exp(0.5 * logvar)
    kl_t = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / 8
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z, z_t, **tol)
    torch.testing.assert_close(kl, kl_t, **tol)
    w = torch.randn_like(z)
    g = torch.autograd.grad((z * w).sum() + 3 * kl, [mu, logvar])
    g_t = torch.autograd.grad((z_t * w).sum() + 3 * kl_t, [mu, logvar])
    for a, b in zip(g, g_t):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("backend", ["ref", "cpp"])
@pytest.mark.parametrize("prior", [False, True])
def test_gradcheck(backend, prior):
    require_backend(ops.OP, backend, ops.make_call(torch.zeros(2), torch.zeros(2), None, None, 0, "sum"))
    ins = [torch.randn(3, 5, dtype=torch.float64, requires_grad=True) for _ in range(4 if prior else 2)]
    for reduction in ("sum", "none"):
        def f(*t):
            return run(backend, t[0], t[1], prior_mu=t[2] if prior else None, prior_logvar=t[3] if prior else None,
                       seed=99, reduction=reduction)
        assert torch.autograd.gradcheck(f, ins)


def test_noncontiguous_input_is_read_in_logical_order():
    """Element i is the i-th in row-major order, whatever the strides: a transposed view gives the z of its
    contiguous copy."""
    base_mu, base_lv = torch.randn(9, 6), torch.randn(9, 6)
    mu, lv = base_mu.t(), base_lv.t()
    assert not mu.is_contiguous()
    for backend in ("ref", "cpp"):
        z, kl = run(backend, mu, lv, seed=3)
        z_c, kl_c = run(backend, mu.contiguous(), lv.contiguous(), seed=3)
        assert torch.equal(z, z_c)
        torch.testing.assert_close(kl, kl_c, rtol=1e-6, atol=0)  # the ref's strided sum may add in another order


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_vector_and_portable_paths_are_bit_identical(dtype, monkeypatch):
    """The AVX-512 kernels do the scalar code's operations in its order (no FMA): same bits, noise included."""
    require_backend(ops.OP, "cpp")
    mu, lv, pm, plv = [torch.randn(3, 2100).to(dtype) for _ in range(4)]
    results = []
    for kernel in ("auto", "generic"):
        monkeypatch.setenv("FASTGEN_CPU_KERNEL", kernel)
        ins = [leaf(t) for t in (mu, lv, pm, plv)]
        z, kl = run("cpp", *ins[:2], prior_mu=ins[2], prior_logvar=ins[3], seed=8, reduction="none")
        grads = torch.autograd.grad((z.float() * 1.5).sum() + kl.float().sum(), ins)
        results.append([z, kl, *grads])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows_have_zero_kl(backend):
    """Rows of no elements (an empty batch is the op contract's: tests/test_op_contract.py): each row's KL is 0."""
    device = device_for(backend)
    mu = torch.zeros(3, 0, device=device, requires_grad=True)
    require_backend(ops.OP, backend, ops.make_call(mu, mu, None, None, 0, "sum"))
    z, kl = run(backend, mu, torch.zeros(3, 0, device=device), seed=1)
    assert z.shape == (3, 0) and kl.shape == (3,) and torch.all(kl == 0)
    (z.sum() + kl.sum()).backward()
    assert mu.grad.shape == (3, 0)


# ---- the noise stream ------------------------------------------------------------------------------------------

def test_philox_known_answer():
    """Random123's known-answer test for Philox-4x32-10: counter 0, key 0."""
    out = ref.philox4x32(0, torch.zeros(1, dtype=torch.int64))
    assert [int(v) for v in out] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("seed", [0, 1, 2 ** 32 + 5, 2 ** 62 + 3])
def test_cpp_noise_is_the_ref_stream(seed):
    """Same Philox integers; log/cos/sin rounded by different libraries: a few float32 ulps."""
    require_backend(ops.OP, "cpp")
    n = 40000
    eps = kernel_eps("cpp", (n,), seed, "cpu")
    want = ref.normal_stream(seed, n).double()
    torch.testing.assert_close(eps, want, rtol=0, atol=3e-6)
    assert (eps.float() == want.float()).float().mean() > 0.5  # most are bit-identical


@pytest.mark.triton
def test_ref_stream_is_tritons_randn4x():
    """The ref's Philox integers are tl.randint4x's, bit for bit, and its normals tl.randn4x's to float32 ulps;
    tl.randn is the first of each group."""
    from fastgen import _ext
    if _ext.triton_why_not(device_for("triton")):
        pytest.skip(_ext.triton_why_not(device_for("triton")))
    import triton
    import triton.language as tl

    @triton.jit
    def draw(ints_ptr, normals_ptr, first_ptr, seed, n_groups, BLOCK: tl.constexpr):
        q = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = q < n_groups
        i0, i1, i2, i3 = tl.randint4x(seed, q)
        n0, n1, n2, n3 = tl.randn4x(seed, q)
        tl.store(ints_ptr + 4 * q, i0, mask=m)
        tl.store(ints_ptr + 4 * q + 1, i1, mask=m)
        tl.store(ints_ptr + 4 * q + 2, i2, mask=m)
        tl.store(ints_ptr + 4 * q + 3, i3, mask=m)
        tl.store(normals_ptr + 4 * q, n0, mask=m)
        tl.store(normals_ptr + 4 * q + 1, n1, mask=m)
        tl.store(normals_ptr + 4 * q + 2, n2, mask=m)
        tl.store(normals_ptr + 4 * q + 3, n3, mask=m)
        tl.store(first_ptr + q, tl.randn(seed, q), mask=m)

    device = device_for("triton")
    for seed in (0, 77, 2 ** 40 + 9):
        groups = 1000
        ints = torch.empty(4 * groups, dtype=torch.int32, device=device)
        normals = torch.empty(4 * groups, device=device)
        first = torch.empty(groups, device=device)
        draw[(triton.cdiv(groups, 256),)](ints, normals, first, seed, groups, BLOCK=256)
        want = torch.stack(ref.philox4x32(seed, torch.arange(groups)), 1).reshape(-1)
        assert torch.equal(ints.cpu().long() & 0xFFFFFFFF, want)
        torch.testing.assert_close(normals.cpu(), ref.normal_stream(seed, 4 * groups), rtol=0, atol=2e-6)
        assert torch.equal(first, normals[::4])


@pytest.mark.triton
def test_same_z_on_cpp_and_triton():
    require_backend(ops.OP, "cpp")
    device = device_for("triton")
    mu, lv = torch.randn(5, 301), torch.randn(5, 301)
    z_c, kl_c = run("cpp", mu, lv, seed=2024)
    z_t, kl_t = run("triton", mu.to(device), lv.to(device), seed=2024)
    torch.testing.assert_close(z_t.cpu(), z_c, rtol=0, atol=1e-5)
    torch.testing.assert_close(kl_t.cpu(), kl_c, rtol=1e-5, atol=1e-5)


def normal_cdf(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def test_noise_is_standard_normal():
    """Mean, variance, and a Kolmogorov-Smirnov test (alpha = 1e-3) on 2^20 draws; the seed is fixed, so this
    is a check of the generator, not a flaky test."""
    require_backend(ops.OP, "cpp")
    n = 1 << 20
    x = kernel_eps("cpp", (n,), 31337, "cpu")
    assert abs(x.mean().item()) < 5 / math.sqrt(n)
    assert abs(x.var().item() - 1) < 5 * math.sqrt(2 / n)
    xs, _ = torch.sort(x)
    cdf = normal_cdf(xs)
    ranks = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum(ranks - cdf, cdf - (ranks - 1 / n)).max().item()
    assert ks < 1.95 / math.sqrt(n), ks
    assert xs.abs().max() <= math.sqrt(-2 * math.log(1e-7)) + 1e-5  # the clamp of u1 bounds the tails


def test_noise_is_independent_across_elements_and_seeds():
    require_backend(ops.OP, "cpp")
    n = 1 << 18
    a = kernel_eps("cpp", (n,), 5, "cpu")
    bound = 5 / math.sqrt(n)
    for lag in range(1, 9):  # within a Philox group (lags 1-3), a Box-Muller pair (1), across groups (4+)
        assert abs(torch.corrcoef(torch.stack([a[:-lag], a[lag:]]))[0, 1]) < bound
        assert abs(torch.corrcoef(torch.stack([a[:-lag] ** 2, a[lag:] ** 2]))[0, 1]) < bound
    for other in (6, 5 + 2 ** 32):  # neighbouring seeds, and seeds that differ only in the high word
        b = kernel_eps("cpp", (n,), other, "cpu")
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < bound
    assert torch.equal(a, kernel_eps("cpp", (n,), 5, "cpu"))


@pytest.mark.parametrize("backend", ["ref", "cpp"])
def test_seed_none_follows_torch_manual_seed(backend):
    require_backend(ops.OP, backend, ops.make_call(torch.zeros(2), torch.zeros(2), None, None, 0, "sum"))
    mu, lv = torch.randn(4, 10), torch.randn(4, 10)
    torch.manual_seed(11)
    z1, _ = run(backend, mu, lv)
    z2, _ = run(backend, mu, lv)
    torch.manual_seed(11)
    z3, _ = run(backend, mu, lv)
    assert torch.equal(z1, z3) and not torch.equal(z1, z2)


def test_backward_uses_the_forward_seed():
    """With seed=None the backward regenerates the forward's eps (d z / d logvar = 0.5 std eps)."""
    mu, lv = torch.zeros(3, 50), torch.zeros(3, 50, requires_grad=True)
    z, _ = fastgen.reparameterize_kl(mu, lv, backend="cpp")
    (g,) = torch.autograd.grad(z.sum(), [lv])
    torch.testing.assert_close(g, 0.5 * z.detach(), rtol=0, atol=0)


# ---- GaussianLatent ----------------------------------------------------------------------------------------------

def test_gaussian_latent():
    layer = GaussianLatent(16, 4)
    h = torch.randn(5, 16)
    z, kl = layer(h, seed=3)
    mu, logvar = layer.params(h)
    assert z.shape == (5, 4) and kl.shape == (5,)
    want_z, want_kl = fastgen.reparameterize_kl(mu, logvar, seed=3)
    torch.testing.assert_close(z, want_z)
    torch.testing.assert_close(kl, want_kl)
    (z.sum() + kl.sum()).backward()
    assert layer.proj.weight.grad is not None and layer.proj.weight.grad.abs().sum() > 0
    pm = torch.zeros(5, 4)
    z2, kl2 = layer(h, prior_mu=pm, prior_logvar=torch.zeros(5, 4), seed=3)
    torch.testing.assert_close(kl2, want_kl)  # an explicit standard normal prior is the default one
    with pytest.raises(ValueError, match="reduction"):
        GaussianLatent(4, 2, reduction="avg")


# ---- errors ------------------------------------------------------------------------------------------------------

def test_explicit_backend_that_cannot_run_says_why():
    if torch.cuda.is_available():
        pytest.skip("the triton backend runs CPU tensors only without a GPU here")
    from fastgen import _ext
    if _ext.interpreting():
        pytest.skip("under TRITON_INTERPRET=1 triton takes CPU tensors")
    with pytest.raises(BackendError, match="triton"):
        fastgen.reparameterize_kl(torch.zeros(2, 3), torch.zeros(2, 3), backend="triton")


@pytest.mark.parametrize("backend", ["cpp", TRITON])
def test_opcheck(backend):
    device = device_for(backend)
    require_backend(ops.OP, backend, ops.make_call(torch.zeros(2, device=device), torch.zeros(2, device=device),
                                                   None, None, 0, "sum"))
    fwd, bwd = ops._kernels(backend)
    mu, lv, pm, plv, gz = [torch.randn(3, 5, device=device) for _ in range(5)]
    for elementwise in (False, True):
        torch.library.opcheck(fwd, (mu, lv, None, None, 4, elementwise))
        torch.library.opcheck(fwd, (mu, lv, pm, plv, 4, elementwise))
    gk_rows = torch.randn(3, device=device)
    torch.library.opcheck(bwd, (gz, gk_rows, mu, lv, pm, plv, 4, [True, True, True, True]))
    torch.library.opcheck(bwd, (None, torch.randn(3, 5, device=device), mu, lv, None, None, 4,
                                [True, False, False, False]))


@pytest.mark.filterwarnings("error:Dynamo detected a call to a `functools.lru_cache`")  # dispatch must not warn
def test_compiles():
    """torch.compile sees the kernels as opaque ops (fake implementations) and gets the eager result."""
    require_backend(ops.OP, "cpp")
    mu, lv = torch.randn(4, 9, requires_grad=True), torch.randn(4, 9, requires_grad=True)

    def f(mu, lv):
        z, kl = fastgen.reparameterize_kl(mu, lv, seed=5, backend="cpp")
        return (z * z).sum() + kl.sum()

    eager = f(mu, lv)
    g_eager = torch.autograd.grad(eager, [mu, lv])
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(mu, lv)
    g = torch.autograd.grad(compiled, [mu, lv])
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b)
