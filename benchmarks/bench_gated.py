"""Gated PixelCNN: fastgen beside the plain-PyTorch Gated PixelCNN.

Contenders, same weights and inputs (harness.make_gated):

* ``common``           the layer as it is commonly written: padded convolutions
                       cropped to the causal window, a mask multiply for the
                       mask-A pixel, ``chunk``, ``tanh * sigmoid``
                       (fastgen.demo.PlainGatedMaskedConv2d);
* ``compile(common)``  ``torch.compile`` of it (compile time excluded, reported apart);
* ``fastgen``          fastgen.GatedMaskedConv2d with the dispatch default;
* ``fastgen[triton]``  forced onto the Triton kernels (GPU only).

Groups:
* ``layer``: one mask-B GatedMaskedConv2d with residual, ``fwd`` (no grad) and
  ``fwd+bwd`` (outputs v, h, skip; gradients of both inputs and every weight);
* ``model``: one training step (loss, backward, Adam) of a whole GatedPixelCNN
  against the same network built from the common layers (steps/s = 1 / median);
* ``vertical``: the vertical stack's 2 x 3 convolution alone (``vertical_conv2d``,
  C -> 2C, forward + backward): ``common`` (zero-pad, F.conv2d: backend 'ref'),
  ``fastgen[direct]`` (the cpp kernel's direct path, FASTGEN_CPU_KERNEL=direct)
  and ``fastgen`` (the default: Winograd F(2x2, 2x3) on AVX-512). CPU only.

Every contender is checked against the float64 reference (fastgen's layer or
model forced onto backend 'ref') before it is timed. Memory: peak allocated on
a GPU, a fresh subprocess's peak RSS on the CPU (fwd+bwd, real runs).
"""
import functools

import pytest
import torch

from fastgen.ops.gated import CONV, VERTICAL, make_conv_call, make_vertical_call
from harness import (check_outcome, first_call, gated_inputs, gated_step, make_gated, prepare_contender,
                     record_peak_rss, relative_error, start_record, sync, time_step)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# layer: (batch, channels, hw, kernel); model: (batch, data_channels, hw, channels, layers, likelihood)
SHAPES = {
    "cpu": {"layer": [(16, 64, 28, 3), (32, 128, 32, 3)], "model": [(16, 1, 28, 64, 8, "bernoulli")]},
    "cuda": {"layer": [(64, 128, 32, 3), (128, 256, 32, 3)],
             "model": [(64, 1, 28, 128, 12, "bernoulli"), (32, 3, 32, 128, 12, "categorical")]},
}
SMOKE = {"layer": [(2, 8, 10, 3)], "model": [(2, 1, 8, 8, 2, "bernoulli")]}
DTYPES = {"cpu": [torch.float32], "cuda": [torch.float32, torch.bfloat16]}
CONTENDERS = ["common", "compile(common)", "fastgen", "fastgen[triton]"]


def shape_id(kind, shape):
    if kind == "layer":
        b, c, hw, k = shape
        return f"layer {b}x{c}x{hw}x{hw} k{k}"
    b, dc, hw, c, n, lik = shape
    return f"model {b}x{dc}x{hw}x{hw} {c}ch {n}layers {lik}"


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    smoke = bool(metafunc.config.getoption("benchmark_disable", False))
    shapes = SMOKE if smoke else SHAPES[DEVICE]
    cases, ids = [], []
    for kind in ("layer", "model"):
        for shape in shapes[kind]:
            for dtype in DTYPES[DEVICE]:
                for mode in (["fwd", "fwd+bwd"] if kind == "layer" else ["train"]):
                    for contender in CONTENDERS:
                        if contender == "compile(common)" and kind == "model" and DEVICE == "cpu":
                            continue  # compiling the whole model takes minutes on 2 cores; the layer shows it
                        cases.append((kind, shape, dtype, mode, contender))
                        ids.append(f"{DEVICE}-{str(dtype)[6:]}-{shape_id(kind, shape).replace(' ', '-')}-{mode}-"
                                   f"{contender}")
    metafunc.parametrize("case", cases, ids=ids)


def _grads(mod):
    """Parameter gradients by name; the mask-buffer 1x1 convs' masked taps (whose
    gradient they leave for the next forward's mask multiply to discard) masked."""
    mod = getattr(mod, "_orig_mod", mod)
    buffers = dict(mod.named_buffers())
    out = {}
    for name, p in mod.named_parameters():
        g = p.grad
        mask = buffers.get(name.rsplit(".", 1)[0] + ".mask")
        if g is not None and mask is not None and name.endswith("weight") and mask.shape == g.shape:
            g = g * mask
        out[name] = g
    return out


def outcome(kind, mod, inputs, mode):
    """What the check compares: outputs and every gradient (one step, no optimizer)."""
    step = gated_step(kind, mod, inputs, "fwd" if mode == "fwd" else "fwd+bwd", optimizer=False)
    res = step()
    if kind == "layer":
        if mode == "fwd":
            return {n: o for n, o in zip(("v", "h", "skip"), res)}
        outs, gv, gh = res
        got = {n: o.detach() for n, o in zip(("v", "h", "skip"), outs)}
        got.update(grad_v=gv, grad_h=gh)
    else:
        got = {"loss": res.detach()}
    got.update({f"grad {n}": g for n, g in _grads(mod).items()})
    return got


@functools.lru_cache(maxsize=4)
def reference(kind, shape, mode, dtype):
    """The float64 outcome, and the error of the reference run in ``dtype`` (the tolerance rule)."""
    runs = {}
    for run_dtype in (torch.float64, dtype):
        mod = make_gated(kind, "fastgen[ref]", shape, DEVICE, run_dtype)
        inputs = [t if not t.is_floating_point() else t.to(run_dtype) for t in gated_inputs(kind, shape, DEVICE, dtype)]
        runs[run_dtype] = outcome(kind, mod, inputs, mode)
    want = runs[torch.float64]
    return want, {n: relative_error(runs[dtype][n], want[n]) for n in want}


@pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_gated(benchmark, smoke, bench_results, case):
    kind, shape, dtype, mode, contender = case
    group = f"{DEVICE} {str(dtype)[6:]} {shape_id(kind, shape)} {mode}"
    record = start_record(benchmark, group, contender, dtype=str(dtype)[6:], shape=shape_id(kind, shape), mode=mode)
    # a small call of the horizontal stack's op: which backend takes this device and dtype
    probe = make_conv_call(torch.empty(1, 2, 4, 4, device=DEVICE, dtype=dtype),
                           torch.empty(4, 2, 1, 2, device=DEVICE, dtype=dtype), None, None, "horizontal", "B", 1)
    prepare_contender(benchmark, contender, CONV, probe)

    inputs = gated_inputs(kind, shape, DEVICE, dtype)
    mod = make_gated(kind, contender, shape, DEVICE, dtype)
    def first():
        got = outcome(kind, mod, inputs, mode)
        sync()
        return got

    ours = contender.startswith("fastgen")
    got, first_call_s = first_call(first, record, bench_results, contender, ours)
    want, ref_err = reference(kind, shape, mode, dtype)
    check_outcome(got, want, ref_err, dtype, record, bench_results, contender, ours)

    step = gated_step(kind, mod, inputs, "fwd" if mode == "fwd" else "fwd+bwd")

    def timed():
        step()
        sync()

    median = time_step(benchmark, record, bench_results, timed,
                       first_call_s if contender == "compile(common)" else None)
    if median is None:
        return
    if kind == "model":
        benchmark.extra_info["steps_per_s"] = round(1 / median, 2)
    if DEVICE == "cpu" and mode != "fwd" and not smoke:
        record_peak_rss(benchmark.extra_info, contender, shape, "fwd+bwd" if mode == "fwd+bwd" else "train",
                        dtype=str(dtype)[6:], builder="harness:gated_rss_step", kind=kind)
    bench_results.append(record)


# ---- the vertical stack's convolution: direct kernel against Winograd ---------------------------------------------

VERTICAL_SHAPES = {"cpu": [(16, 64, 28), (32, 128, 32)], "cuda": []}  # (batch, C, hw): C -> 2C channels
VERTICAL_CONTENDERS = ["common", "fastgen[direct]", "fastgen"]


def _vertical_case(shape, dtype, seed=2):
    b, c, hw = shape
    gen = torch.Generator().manual_seed(seed)
    x, w, bias, g = (torch.randn(*s, generator=gen) for s in ((b, c, hw, hw), (2 * c, c, 2, 3), (2 * c,),
                                                                (b, 2 * c, hw, hw)))
    return [t.to(DEVICE, dtype) for t in (x, w, bias)], g.to(DEVICE, dtype)


def _vertical_outcome(contender, leaves, g):
    from fastgen.functional import vertical_conv2d
    backend = "ref" if contender == "common" else "cpp"
    x, w, b = (t.detach().requires_grad_() for t in leaves)
    y = vertical_conv2d(x, w, b, backend=backend)
    y.backward(g)
    return {"output": y.detach(), "grad_x": x.grad, "grad_w": w.grad, "grad_b": b.grad}


@functools.lru_cache(maxsize=2)
def _vertical_reference(shape, dtype):
    runs = {}
    for run_dtype in (torch.float64, dtype):
        leaves, g = _vertical_case(shape, run_dtype)
        runs[run_dtype] = _vertical_outcome("common", leaves, g)
    want = runs[torch.float64]
    return want, {n: relative_error(runs[dtype][n], want[n]) for n in want}


@pytest.mark.parametrize("contender", VERTICAL_CONTENDERS)
@pytest.mark.parametrize("shape", VERTICAL_SHAPES[DEVICE] or [None], ids=lambda s: "x".join(map(str, s or ())))
def test_vertical(benchmark, smoke, bench_results, monkeypatch, shape, contender):
    if shape is None:
        pytest.skip("the vertical stack's cpp kernel is CPU only")
    shape = (2, 16, 8) if smoke else shape
    dtype = torch.float32
    b, c, hw = shape
    group = f"{DEVICE} float32 vertical 2x3 {b}x{c}->{2 * c}x{hw}x{hw} fwd+bwd"
    record = start_record(benchmark, group, contender, dtype="float32", shape=f"{b}x{c}x{hw}x{hw}", mode="fwd+bwd")
    leaves, g = _vertical_case(shape, dtype)
    if contender.startswith("fastgen"):
        why = VERTICAL.reason("cpp", make_vertical_call(*leaves, 0))
        if why:
            pytest.skip(f"backend cpp: {why}")
        if contender == "fastgen[direct]":
            monkeypatch.setenv("FASTGEN_CPU_KERNEL", "direct")
    got, _ = first_call(lambda: _vertical_outcome(contender, leaves, g), record, bench_results, contender,
                        contender.startswith("fastgen"))
    want, ref_err = _vertical_reference(shape, dtype)
    check_outcome(got, want, ref_err, dtype, record, bench_results, contender, contender.startswith("fastgen"))
    if time_step(benchmark, record, bench_results, lambda: _vertical_outcome(contender, leaves, g)) is None:
        return
    bench_results.append(record)
