"""PixelCNN++'s discretized logistic mixture loss: fastgen beside the usual port.

Contenders, forward + backward of the loss summed over the batch (gradient of
the parameters), RGB, nr_mix = 10:

* ``common``           the loss as the usual PyTorch port of PixelCNN++ writes it
                       (harness.dmol_loss_common: NHWC permutes, ~20
                       full-size temporaries kept for autograd);
* ``compile(common)``  ``torch.compile`` of it (compile time excluded, reported apart);
* ``fastgen``          fastgen.discretized_mix_logistic_nll, dispatch default.

Every contender's loss and gradient are checked against the float64 reference
(fastgen.ref.dmol) before timing; a wrong one is reported as WRONG, not timed
(DESIGN.md: inductor's CPU code has been seen to get this loss wrong). Memory:
a fresh subprocess's peak RSS on the CPU, peak allocated on a GPU.
"""

import pytest
import torch

import fastgen
from fastgen.ops.dmol import OP, make_call
from fastgen.ref import dmol as ref
from harness import (check_outcome, dmol_loss_common, first_call, prepare_contender, record_peak_rss, relative_error,
                     start_record, sync, time_step)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NR_MIX = 10
SHAPES = {"cpu": [(8, 3, 32, 32)], "cuda": [(64, 3, 32, 32)]}
SMOKE_SHAPES = [(2, 3, 4, 5)]
DTYPES = {"cpu": [torch.float32], "cuda": [torch.float32, torch.bfloat16]}
CONTENDERS = ["common", "compile(common)", "fastgen"]


def fused(x, params):
    return fastgen.discretized_mix_logistic_nll(x, params).sum()


def make_contender(name):
    if name == "common":
        return dmol_loss_common
    if name == "compile(common)":
        return torch.compile(dmol_loss_common)
    return fused


def inputs(shape, dtype, device):
    g = torch.Generator().manual_seed(0)
    b, c, h, w = shape
    x = (torch.randint(0, 256, shape, generator=g).double() / 127.5 - 1).to(device=device, dtype=dtype)
    params = torch.randn(b, 10 * NR_MIX, h, w, generator=g).to(device=device, dtype=dtype).requires_grad_()
    return x, params


def step_fn(f, x, params):
    def step():
        params.grad = None
        loss = f(x, params)
        loss.backward()
        return loss
    return step


def rss_step(spec):
    """(step, reset) for harness.peak_rss."""
    x, params = inputs(tuple(spec["shape"]), getattr(torch, spec["dtype"]), "cpu")
    step = step_fn(make_contender(spec["contender"]), x, params)

    def reset():
        params.grad = None
    return step, reset


def reference(shape, dtype):
    runs = {}
    for run_dtype in (torch.float64, dtype):
        x, params = inputs(shape, dtype, DEVICE)
        params = params.detach().to(run_dtype).requires_grad_()
        loss = ref.discretized_mix_logistic_nll(x.to(run_dtype), params, NR_MIX).sum()
        loss.backward()
        runs[run_dtype] = {"loss": loss.detach(), "grad": params.grad}
    want = runs[torch.float64]
    return want, {n: relative_error(runs[dtype][n], want[n]) for n in want}


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    smoke = bool(metafunc.config.getoption("benchmark_disable", False))
    cases = [(shape, dtype, c) for shape in (SMOKE_SHAPES if smoke else SHAPES[DEVICE]) for dtype in DTYPES[DEVICE]
             for c in CONTENDERS]
    metafunc.parametrize("case", cases, ids=[f"{DEVICE}-{str(d)[6:]}-{'x'.join(map(str, s))}-{c}" for s, d, c in cases])


@pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_dmol(benchmark, smoke, bench_results, case):
    shape, dtype, contender = case
    group = f"{DEVICE} {str(dtype)[6:]} dmol {'x'.join(map(str, shape))} nr_mix {NR_MIX} fwd+bwd"
    record = start_record(benchmark, group, contender, dtype=str(dtype)[6:], shape=list(shape), mode="fwd+bwd")
    x, params = inputs(shape, dtype, DEVICE)
    prepare_contender(benchmark, contender, OP, make_call(x, params.detach(), NR_MIX, "sum"))
    f = make_contender(contender)
    step = step_fn(f, x, params)
    def first():
        loss = step()
        sync()
        return {"loss": loss.detach(), "grad": params.grad}

    got, first_call_s = first_call(first, record, bench_results, contender, contender == "fastgen")
    want, ref_err = reference(shape, dtype)
    check_outcome(got, want, ref_err, dtype, record, bench_results, contender, contender == "fastgen")

    def timed():
        step()
        sync()

    if time_step(benchmark, record, bench_results, timed,
                 first_call_s if contender == "compile(common)" else None) is None:
        return
    if DEVICE == "cpu" and not smoke:
        record_peak_rss(benchmark.extra_info, contender, shape, "fwd+bwd", dtype=str(dtype)[6:],
                        builder="bench_dmol:rss_step")
    bench_results.append(record)
