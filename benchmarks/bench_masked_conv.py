"""Masked convolution: fastgen beside what a user would otherwise run.

Contenders, same weights and inputs, in one run:

* ``common``        the mask-buffer layer found in the wild: ``weight.data *= mask``
                    then the full convolution (harness.MaskBufferConv2d);
* ``compile(ref)``  ``torch.compile`` of fastgen's reference (``conv2d(x, weight * mask)``);
                    compile time is excluded from the timing and reported apart
                    (extra_info ``compile_s``: a cold compile, inductor's caches off);
* ``fastgen``       fastgen.MaskedConv2d with the dispatch default (extra_info
                    ``backend`` says which backend it chose);
* ``fastgen[name]`` each fastgen backend that can run here (halfconv, decomposed,
                    cpp; triton on a GPU), forced with ``backend=``.

Modes: ``fwd`` (no grad: inference and sampling) and ``fwd+bwd`` (one training
step of the layer: output, grad of input, weight and bias). Before it is timed,
every contender's output and gradients are checked against the float64
reference (fastgen.ref.masked_conv) with a dtype-appropriate tolerance: a
wrong fastgen backend fails, a wrong baseline is reported as an xfail with its
error, never timed as fast. Memory: peak allocated on a GPU; on the CPU the
peak RSS of a fresh subprocess (fwd+bwd, real runs only).

Smoke run (CI): ``pytest benchmarks/ -q --benchmark-disable`` (tiny shapes, one call each).
Real run: ``pytest benchmarks/ --benchmark-only`` (add ``--benchmark-json=FILE`` to keep it;
``python benchmarks/harness.py FILE`` prints the compact table again).
"""
import functools
from contextlib import nullcontext

import pytest
import torch
import torch._inductor.config  # noqa: F401  (compile contender: caches off while it compiles)

from fastgen.ops.masked_conv import OP, make_call
from fastgen.ref.masked_conv import causal_mask
from fastgen.ref.masked_conv import masked_conv2d as ref_masked_conv2d
from harness import (COMMON, COMPILED, check_outcome, contender_names, first_call, make_masked_conv, peak_rss,
                     prepare_contender, record_peak_rss, relative_error, start_record, sync, time_step)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (batch, in_channels, out_channels, height = width, kernel, mask_type)
SHAPES = {
    "cpu": [(16, 64, 64, 28, 7, "A"), (16, 64, 64, 28, 3, "B"), (32, 128, 128, 32, 3, "B")],
    "cuda": [(64, 128, 128, 32, 7, "A"), (64, 128, 128, 32, 3, "B"), (128, 256, 256, 32, 3, "B")],
}
SMOKE_SHAPES = [(2, 8, 8, 12, 7, "A"), (2, 8, 8, 12, 3, "B"), (2, 16, 16, 10, 3, "B")]
DTYPES = {"cpu": [torch.float32], "cuda": [torch.float32, torch.bfloat16]}
MODES = ["fwd", "fwd+bwd"]
# fastgen backends worth timing: the ones written to be fast ('ref' is the spec,
# the same work as the common implementation)
BACKENDS = ["halfconv", "decomposed", "cpp", "triton"]


def shape_id(shape):
    b, ci, co, hw, k, m = shape
    return f"{b}x{ci}->{co}x{hw}x{hw} {k}x{k}{m}"


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    smoke = bool(metafunc.config.getoption("benchmark_disable", False))
    cases, ids = [], []
    for shape in SMOKE_SHAPES if smoke else SHAPES[DEVICE]:
        for dtype in DTYPES[DEVICE]:
            for mode in MODES:
                # the common implementation first: later contenders of the group get their speedup
                for contender in contender_names(BACKENDS):
                    if smoke and contender == COMPILED and shape != SMOKE_SHAPES[0]:
                        continue  # compiling is the slow part of a smoke run: one shape shows it works
                    cases.append((shape, dtype, mode, contender))
                    ids.append(f"{DEVICE}-{str(dtype)[6:]}-{shape_id(shape).replace(' ', '-')}-{mode}-{contender}")
    metafunc.parametrize("case", cases, ids=ids)


@functools.lru_cache(maxsize=4)
def inputs(shape, dtype):
    """Inputs, weights, grad_output and the float64 reference outputs and gradients
    (plus the error of the reference run in ``dtype``, for the tolerance rule)."""
    b, ci, co, hw, k, m = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, ci, hw, hw, generator=gen)
    w = torch.randn(co, ci, k, k, generator=gen) / (ci * k * k) ** 0.5
    bias = torch.randn(co, generator=gen) * 0.1
    g = torch.randn(b, co, hw, hw, generator=gen)
    x, w, bias, g = (t.to(DEVICE, dtype) for t in (x, w, bias, g))  # rounded to dtype once, for everyone
    want, ref_err = {}, {}
    for mode in MODES:
        runs = {}
        for run_dtype in (torch.float64, dtype):
            xs, ws, bs = (t.detach().to(run_dtype).requires_grad_(mode == "fwd+bwd") for t in (x, w, bias))
            with torch.set_grad_enabled(mode == "fwd+bwd"):
                y = ref_masked_conv2d(xs, ws, bs, m, 1, (k // 2, k // 2), (1, 1))
            out = {"out": y.detach()}
            if mode == "fwd+bwd":
                y.backward(g.to(run_dtype))
                out.update(grad_x=xs.grad, grad_w=ws.grad, grad_b=bs.grad)
            runs[run_dtype] = out
        want[mode] = runs[torch.float64]
        ref_err[mode] = {n: relative_error(runs[dtype][n], want[mode][n]) for n in want[mode]}
    return x, w, bias, g, want, ref_err


def make_step(mod, x, g, mode):
    """The timed function, and one run of it that returns what the check compares."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                y = mod(x)
            sync()
            return y
        return step, lambda: {"out": step()}

    xg = x.detach().requires_grad_()
    params = list(mod.parameters())

    def step():
        xg.grad = None
        for p in params:
            p.grad = None
        y = mod(xg)
        y.backward(g)
        sync()
        return y

    def checked():
        y = step()
        weight = mod._orig_mod.weight if hasattr(mod, "_orig_mod") else mod.weight
        bias = mod._orig_mod.bias if hasattr(mod, "_orig_mod") else mod.bias
        # the common implementation leaves gradient on masked weights (the next forward zeroes them)
        mask = causal_mask(*weight.shape[:2], weight.shape[2:], mask_type_of(mod), 1, weight.device, weight.dtype)
        return {"out": y.detach(), "grad_x": xg.grad, "grad_w": weight.grad * mask, "grad_b": bias.grad}
    return step, checked


def _why_inf(got, want):
    if got is None:
        return " (no gradient)"
    if tuple(got.shape) != tuple(want.shape):
        return f" (shape {tuple(got.shape)}, expected {tuple(want.shape)})"
    bad = (~torch.isfinite(got)).sum().item()
    return f" ({bad} non-finite entries)" if bad else ""


def mask_type_of(mod):
    return (mod._orig_mod if hasattr(mod, "_orig_mod") else mod).mask_type


# a skipped, wrong or failing contender is never timed: that is the point, not a forgotten fixture
@pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_masked_conv(benchmark, smoke, bench_results, case):
    shape, dtype, mode, contender = case
    b, ci, co, hw, k, m = shape
    group = f"{DEVICE} {str(dtype)[6:]} {shape_id(shape)} {mode}"
    x, w, bias, g, want, ref_err = inputs(shape, dtype)
    record = start_record(benchmark, group, contender, dtype=str(dtype)[6:], shape=shape_id(shape), mode=mode)
    if DEVICE == "cuda":  # what the framework's own convs (common, compile, halfconv) ran with
        benchmark.extra_info["cudnn_tf32"] = torch.backends.cudnn.allow_tf32

    fastgen_contender = contender.startswith("fastgen")
    call = make_call(x, w, bias, m, 1, "same", 1)
    prepare_contender(benchmark, contender, OP, call)
    mod = make_masked_conv(contender, ci, co, k, m, weight=w, bias=bias, device=DEVICE, dtype=dtype)
    step, checked = make_step(mod, x, g, mode)

    # check against the float64 reference before timing (the first call also compiles: cold, with
    # inductor's on-disk caches off, so compile_s is what a fresh process pays)
    def first():
        with torch._inductor.config.patch(force_disable_caches=True) if contender == COMPILED else nullcontext():
            return checked()

    got, first_call_s = first_call(first, record, bench_results, contender, fastgen_contender)
    check_outcome(got, want[mode], ref_err[mode], dtype, record, bench_results, contender, fastgen_contender,
                  explain=lambda n: _why_inf(got[n], want[mode][n]))

    if time_step(benchmark, record, bench_results, step, first_call_s if contender == COMPILED else None,
                 common=COMMON) is None:
        return
    if DEVICE == "cpu" and mode == "fwd+bwd" and not smoke:
        record_peak_rss(benchmark.extra_info, contender, shape, mode, dtype=str(dtype)[6:])
    bench_results.append(record)


def test_peak_rss_helper(smoke):
    """The CPU memory measurement itself, on a tiny shape (real runs measure every fwd+bwd contender)."""
    if not smoke:
        pytest.skip("real runs measure the memory of every CPU fwd+bwd benchmark")
    small = peak_rss("fastgen", (2, 8, 8, 12, 3, "B"), "fwd+bwd")
    assert small["peak_mb"] >= small["base_mb"] > 20, small  # torch alone is more than 20 MB
    if small["peak_reset"]:
        # a step that needs ~64 MB more must show it
        big = peak_rss(COMMON, (16, 128, 128, 64, 3, "B"), "fwd+bwd")
        assert big["extra_mb"] >= 40 + small["extra_mb"], (small, big)
