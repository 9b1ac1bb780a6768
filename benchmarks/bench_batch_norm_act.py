"""BatchNorm + activation: fastgen.BatchNormAct2d beside nn.BatchNorm2d + nn.ReLU / nn.LeakyReLU.

Contenders, training mode, forward + backward (y, and the gradients of x, weight and bias), same weights and
inputs:

* ``common``           ``nn.Sequential(nn.BatchNorm2d(C), nn.LeakyReLU(0.2))`` (the DCGAN discriminator's) or
                       ``nn.ReLU()`` (the generator's); autograd keeps x for the batch norm and z (leaky_relu)
                       or y (relu) for the activation;
* ``compile(common)``  ``torch.compile`` of it (inductor; compile time excluded, reported apart);
* ``fastgen``          fastgen.BatchNormAct2d, dispatch default (CPU: cpp);
* ``fastgen[triton]``  forced onto the Triton kernels (GPU only).

Every contender is checked against the float64 reference (BatchNormAct2d on backend 'ref', the same start)
before it is timed. Memory: ``saved_mb``, the activation-sized tensors autograd keeps for the layer's backward
(saved_tensors_hooks, distinct storages), and ``saved_next_conv_mb``, the same for the layer followed by a 1x1
convolution (which keeps y itself: what a network pays per block; for relu fastgen keeps x, so there the two
come out even); a fresh subprocess's peak RSS on the CPU, peak allocated on a GPU (harness).
"""
import functools
import os

import pytest
import torch
from torch import nn

from fastgen import BatchNormAct2d
from fastgen.ops.batch_norm_act import OP, make_call
from harness import (check_outcome, first_call, peak_rss, prepare_contender, relative_error, start_record, sync,
                     time_step)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = {"cpu": [(64, 128, 16, 16), (64, 64, 32, 32), (64, 256, 8, 8)], "cuda": [(128, 256, 16, 16)]}
SMOKE_SHAPES = [(2, 8, 5, 5)]
DTYPES = {"cpu": [torch.float32], "cuda": [torch.bfloat16]}
ACTIVATIONS = ["leaky_relu", "relu"]
CONTENDERS = ["common", "compile(common)", "fastgen", "fastgen[triton]"]
SLOPE = 0.2


def make(contender, c, activation, dtype, device=DEVICE):
    """One contender's module, seeded: every contender starts from the same weight, bias and statistics."""
    g = torch.Generator().manual_seed(0)
    weight = 1 + 0.2 * torch.randn(c, generator=g)
    bias = 0.2 * torch.randn(c, generator=g)
    if contender.startswith("fastgen"):
        backend = contender[8:-1] if "[" in contender else None
        mod = BatchNormAct2d(c, activation, SLOPE, backend=backend)
        bn = mod
    else:
        bn = nn.BatchNorm2d(c)
        mod = nn.Sequential(bn, nn.ReLU() if activation == "relu" else nn.LeakyReLU(SLOPE))
    with torch.no_grad():
        bn.weight.copy_(weight), bn.bias.copy_(bias)
    mod = mod.to(device, dtype)
    return torch.compile(mod, dynamic=False) if contender == "compile(common)" else mod


def inputs(shape, dtype, device=DEVICE):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * 1.5 + 0.5
    gy = torch.randn(shape, generator=g)
    return x.to(device, dtype).requires_grad_(), gy.to(device, dtype)


def params(mod):
    mod = getattr(mod, "_orig_mod", mod)
    return mod if isinstance(mod, BatchNormAct2d) else mod[0]


def step_fn(mod, x, gy):
    bn = params(mod)

    def step():
        x.grad = bn.weight.grad = bn.bias.grad = None
        y = mod(x)
        y.backward(gy)
        return y
    return step


def outcome(mod, shape, dtype):
    x, gy = inputs(shape, dtype)
    y = step_fn(mod, x, gy)()
    bn = params(mod)
    return {"y": y.detach(), "grad x": x.grad, "grad weight": bn.weight.grad, "grad bias": bn.bias.grad,
            "running_var": bn.running_var.clone()}


@functools.lru_cache(maxsize=4)
def reference(shape, dtype, activation):
    """The float64 outcome (backend 'ref'), and the error of the reference run in ``dtype``."""
    runs = {d: outcome(make("fastgen[ref]", shape[1], activation, d), shape, d) for d in (torch.float64, dtype)}
    want = runs[torch.float64]
    return want, {n: relative_error(runs[dtype][n], want[n]) for n in want}


def saved_mb(mod, shape, dtype, next_conv):
    """MB of the distinct activation-sized storages autograd keeps for mod(x) (then a 1x1 conv, if next_conv)."""
    x, _ = inputs(shape, dtype)
    conv = nn.Conv2d(shape[1], shape[1], 1, bias=False).to(x.device, dtype) if next_conv else None
    kept = {}

    def pack(t):
        if t.numel() >= x.numel():
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = mod(x)
        if conv is not None:
            conv(y)
    return round(sum(kept.values()) / 2 ** 20, 2)


def rss_step(spec):
    """(step, reset) for harness.peak_rss: one contender's fwd+bwd on the spec's shape."""
    shape, dtype = tuple(spec["shape"]), getattr(torch, spec["dtype"])
    mod = make(spec["contender"], shape[1], spec["activation"], dtype, "cpu")
    x, gy = inputs(shape, dtype, "cpu")
    step = step_fn(mod, x, gy)

    def reset():
        x.grad = params(mod).weight.grad = params(mod).bias.grad = None
    return step, reset


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    smoke = bool(metafunc.config.getoption("benchmark_disable", False))
    # the smoke run (CI): leaky_relu only (each torch.compile contender costs its compile)
    cases = [(shape, dtype, act, c) for shape in (SMOKE_SHAPES if smoke else SHAPES[DEVICE]) for dtype in DTYPES[DEVICE]
             for act in (ACTIVATIONS[:1] if smoke else ACTIVATIONS) for c in CONTENDERS]
    metafunc.parametrize("case", cases, ids=[f"{DEVICE}-{str(d)[6:]}-{'x'.join(map(str, s))}-{a}-{c}"
                                             for s, d, a, c in cases])


@pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_batch_norm_act(benchmark, smoke, bench_results, monkeypatch, case):
    shape, dtype, activation, contender = case
    group = f"{DEVICE} {str(dtype)[6:]} batch_norm_act {activation} {'x'.join(map(str, shape))} fwd+bwd"
    record = start_record(benchmark, group, contender, dtype=str(dtype)[6:], shape=list(shape), mode="fwd+bwd",
                          activation=activation)
    probe = make_call(torch.empty(2, shape[1], 1, 1, device=DEVICE, dtype=dtype), None, None, None, None, True, 1e-5,
                      activation, SLOPE)[0]
    prepare_contender(benchmark, contender, OP, probe)

    mod = make(contender, shape[1], activation, dtype)

    def first():
        got = outcome(mod, shape, dtype)
        sync()
        return got

    ours = contender.startswith("fastgen")
    got, first_call_s = first_call(first, record, bench_results, contender, ours)
    want, ref_err = reference(shape, dtype, activation)
    check_outcome(got, want, ref_err, dtype, record, bench_results, contender, ours)

    x, gy = inputs(shape, dtype)
    step = step_fn(mod, x, gy)

    def timed():
        step()
        sync()

    median = time_step(benchmark, record, bench_results, timed,
                       first_call_s if contender == "compile(common)" else None)
    if median is None:
        return
    info = benchmark.extra_info
    for key, next_conv in (("saved_mb", False), ("saved_next_conv_mb", True)):
        try:
            info[key] = saved_mb(mod, shape, dtype, next_conv)
        except Exception as e:  # noqa: BLE001 - a compiled graph may refuse the hooks: no figure, not a failure
            info[key] = f"n/a ({type(e).__name__})"
    if DEVICE == "cpu" and not smoke:
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])))
        rss = peak_rss(contender, shape, "fwd+bwd", dtype=str(dtype)[6:], threads=torch.get_num_threads(),
                       builder="bench_batch_norm_act:rss_step", activation=activation)
        info["peak_rss_mb"] = rss["peak_mb"]
        info["peak_rss_extra_mb"] = rss["extra_mb"]
    bench_results.append(record)
