"""VAE reparameterization + KL: fastgen.reparameterize_kl beside the textbook code.

Contenders, forward + backward (loss = sum(z * g) + sum(kl), the KL per image):

* ``common``           pytorch/examples' VAE: ``std = exp(0.5 logvar)``,
                       ``eps = randn_like(std)``, ``z = mu + eps * std``,
                       ``kl = -0.5 * sum(1 + logvar - mu^2 - exp(logvar), dim=1)``;
                       autograd keeps eps, std and exp(logvar) for the backward;
* ``compile(common)``  ``torch.compile`` of it (compile time excluded, reported apart);
* ``fastgen``          fastgen.reparameterize_kl, dispatch default (CPU: cpp, GPU: triton):
                       one pass each way, eps drawn in the kernel from the seed twice,
                       nothing saved but mu and logvar.

Each contender is checked against the float64 reference (fastgen.ref) with the
same eps first (the common code gets fastgen's eps for the check, randn_like
when timed). Memory: a fresh subprocess's peak RSS on the CPU, peak allocated
on a GPU. GPU: ``GB/s`` is the bytes that must move (forward reads mu, logvar
and writes z; backward reads grad_z, mu, logvar and writes both gradients;
the per-row KL is negligible) over the median time.
"""

import pytest
import torch

import fastgen
from fastgen.ops.reparameterize_kl import OP, make_call
from fastgen.ref import reparameterize_kl as ref
from harness import (check_outcome, first_call, prepare_contender, record_peak_rss, relative_error, start_record, sync,
                     time_step)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(256, 128), (4096, 512), (65536, 1024)]
SMOKE_SHAPES = [(4, 37)]
DTYPES = [torch.float32, torch.bfloat16]
CONTENDERS = ["common", "compile(common)", "fastgen"]
SEED = 12345


def textbook(mu, logvar, eps=None):
    std = torch.exp(0.5 * logvar)
    eps = torch.randn_like(std) if eps is None else eps
    z = mu + eps * std
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)
    return z, kl


def fused(mu, logvar, eps=None):
    return fastgen.reparameterize_kl(mu, logvar, seed=SEED)


def make_contender(name):
    if name == "common":
        return textbook
    if name == "compile(common)":
        return torch.compile(textbook)
    return fused


def inputs(shape, dtype, device):
    g = torch.Generator().manual_seed(0)
    mu, logvar, gz = [torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(3)]
    return mu.requires_grad_(), logvar.requires_grad_(), gz


def step_fn(f, mu, logvar, gz, eps=None):
    def step():
        mu.grad = logvar.grad = None
        z, kl = f(mu, logvar, eps)
        torch.autograd.backward([z, kl], [gz, torch.ones_like(kl)])
        return z, kl
    return step


def rss_step(spec):
    """(step, reset) for harness.peak_rss: one contender's fwd+bwd on the spec's shape."""
    mu, logvar, gz = inputs(tuple(spec["shape"]), getattr(torch, spec["dtype"]), "cpu")
    step = step_fn(make_contender(spec["contender"]), mu, logvar, gz)

    def reset():
        mu.grad = logvar.grad = None
    return step, reset


def outcome(f, shape, dtype, eps):
    mu, logvar, gz = inputs(shape, dtype, DEVICE)
    z, kl = step_fn(f, mu, logvar, gz, eps.to(dtype))()
    return {"z": z.detach(), "kl": kl.detach(), "grad mu": mu.grad, "grad logvar": logvar.grad}


def reference(shape, dtype, eps):
    """The float64 outcome with this eps, and the error of the reference run in ``dtype``."""
    runs = {}
    for run_dtype in (torch.float64, dtype):
        mu, logvar, gz = inputs(shape, dtype, DEVICE)
        mu = mu.detach().to(run_dtype).requires_grad_()
        logvar = logvar.detach().to(run_dtype).requires_grad_()
        z, kl = ref.reparameterize_kl(mu, logvar, seed=SEED, eps=eps.to(run_dtype))
        torch.autograd.backward([z, kl], [gz.to(run_dtype), torch.ones_like(kl)])
        runs[run_dtype] = {"z": z.detach(), "kl": kl.detach(), "grad mu": mu.grad, "grad logvar": logvar.grad}
    want = runs[torch.float64]
    return want, {n: relative_error(runs[dtype][n], want[n]) for n in want}


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    smoke = bool(metafunc.config.getoption("benchmark_disable", False))
    cases = [(shape, dtype, c) for shape in (SMOKE_SHAPES if smoke else SHAPES) for dtype in DTYPES
             for c in CONTENDERS]
    metafunc.parametrize("case", cases, ids=[f"{DEVICE}-{str(d)[6:]}-{s[0]}x{s[1]}-{c}" for s, d, c in cases])


@pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_vae(benchmark, smoke, bench_results, case):
    shape, dtype, contender = case
    group = f"{DEVICE} {str(dtype)[6:]} reparameterize_kl {shape[0]}x{shape[1]} fwd+bwd"
    record = start_record(benchmark, group, contender, dtype=str(dtype)[6:], shape=list(shape), mode="fwd+bwd")
    probe = make_call(torch.empty(1, 1, device=DEVICE, dtype=dtype), torch.empty(1, 1, device=DEVICE, dtype=dtype),
                      None, None, 0, "sum")
    prepare_contender(benchmark, contender, OP, probe)

    # fastgen's eps, read back through z = 0 + exp(0) eps, so every contender is checked with the same noise
    zeros = torch.zeros(shape, device=DEVICE, dtype=torch.float32)
    eps = fastgen.reparameterize_kl(zeros, zeros, seed=SEED)[0]
    f = make_contender(contender)
    def first():
        got = outcome(f, shape, dtype, eps)
        sync()
        return got

    got, first_call_s = first_call(first, record, bench_results, contender, contender == "fastgen")
    want, ref_err = reference(shape, dtype, eps)
    check_outcome(got, want, ref_err, dtype, record, bench_results, contender, contender == "fastgen")
    del eps, zeros, got

    mu, logvar, gz = inputs(shape, dtype, DEVICE)
    step = step_fn(f, mu, logvar, gz)

    def timed():
        step()
        sync()

    median = time_step(benchmark, record, bench_results, timed,
                       first_call_s if contender == "compile(common)" else None)
    if median is None:
        return
    info = benchmark.extra_info
    bytes_moved = 8 * mu.numel() * mu.element_size()
    info["bandwidth_gbs"] = round(bytes_moved / median / 1e9, 1)
    if DEVICE == "cpu" and not smoke:
        record_peak_rss(info, contender, shape, "fwd+bwd", dtype=str(dtype)[6:], builder="bench_vae:rss_step")
    bench_results.append(record)
