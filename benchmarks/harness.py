"""The benchmarks' harness: baselines, contenders, the checks before timing, memory, the table. Not part of
the installed package: the benchmarks (and the tests that check a baseline) import it as ``harness``
(pyproject's pytest ``pythonpath``).

* :class:`MaskBufferConv2d`: the common masked convolution found in the wild
  (a ``mask`` buffer, ``self.weight.data *= self.mask`` then the full conv);
* ``RefMaskedConv2d``, ``PlainGatedMaskedConv2d``, ``plain_gated_pixelcnn``,
  ``OtherLoad`` come from fastgen.demo (the demo times the same baseline);
* :func:`make_masked_conv`: one contender of the masked-conv benchmarks by name;
* :func:`relative_error` / :func:`tolerance`: the numbers contract of DESIGN.md;
* :func:`peak_rss`: peak resident memory of a contender's steps, measured in a
  fresh subprocess;
* :class:`OtherLoad`: how much CPU other processes took while a timing ran
  (shared machines);
* :func:`format_table` / :func:`table_from_json`: the compact benchmark table
  (``python benchmarks/harness.py results.json [more runs ...]`` prints it for
  ``--benchmark-json`` files).
"""
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.demo import OtherLoad, PlainGatedMaskedConv2d, RefMaskedConv2d, plain_gated_pixelcnn
from fastgen.ref.masked_conv import causal_mask

HERE = os.path.dirname(os.path.abspath(__file__))


class MaskBufferConv2d(nn.Conv2d):
    """The common implementation: ``MaskBufferConv2d('A', 1, 64, 7, 1, 3)``.
    Multiplies the weight by a stored mask in place, then runs the full
    convolution (every tap, half of them on zeros). Its weight gradient is
    not masked; the next forward zeroes those entries again."""

    def __init__(self, mask_type, *args, data_channels=1, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask_type, self.data_channels = mask_type, data_channels
        self.register_buffer("mask", causal_mask(self.out_channels, self.in_channels, self.kernel_size, mask_type,
                                                 data_channels, dtype=self.weight.dtype))

    def forward(self, x):
        self.weight.data *= self.mask
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


COMMON = "common"
COMPILED = "compile(ref)"


def contender_names(backends):
    """Benchmark contenders: the common implementation, torch.compile of the
    ref, fastgen's dispatch default, and each named fastgen backend."""
    return [COMMON, COMPILED, "fastgen"] + [f"fastgen[{b}]" for b in backends]


def make_masked_conv(contender, in_channels, out_channels, kernel_size, mask_type, *, weight=None, bias=None,
                     device="cpu", dtype=torch.float32, compile_mode=None):
    """A masked-conv module for a contender name (see :func:`contender_names`),
    with causal same padding, holding copies of ``weight``/``bias`` if given."""
    args = (in_channels, out_channels, kernel_size, 1, kernel_size // 2)
    if contender == COMMON:
        mod = MaskBufferConv2d(mask_type, *args)
    elif contender == COMPILED:
        mod = RefMaskedConv2d(mask_type, *args)
    elif contender == "fastgen" or contender.startswith("fastgen["):
        from fastgen import MaskedConv2d
        backend = contender[len("fastgen["):-1] if contender.startswith("fastgen[") else None
        mod = MaskedConv2d(*args, mask_type=mask_type, backend=backend)
    else:
        raise ValueError(f"unknown contender {contender!r}")
    mod = mod.to(device=device, dtype=dtype)
    with torch.no_grad():
        if weight is not None:
            mod.weight.copy_(weight)
        if bias is not None:
            mod.bias.copy_(bias)
    if contender == COMPILED:
        return torch.compile(mod, dynamic=False, **({"mode": compile_mode} if compile_mode else {}))
    return mod


GATED_CONTENDERS = ("common", "compile(common)", "fastgen", "fastgen[triton]")


def make_gated(kind, contender, shape, device="cpu", dtype=torch.float32):
    """One contender of the gated benchmarks, seeded so that every contender has
    the same weights: ``kind`` 'layer' (shape (batch, channels, hw, kernel): a
    mask-B GatedMaskedConv2d with residual) or 'model' (shape (batch,
    data_channels, hw, channels, layers, likelihood): a GatedPixelCNN).
    'common' is the plain-PyTorch twin, 'compile(common)' torch.compile of it,
    'fastgen' the dispatch default and 'fastgen[name]' a forced backend."""
    from fastgen.models import GatedPixelCNN
    from fastgen.nn import GatedMaskedConv2d
    if contender not in GATED_CONTENDERS and not contender.startswith("fastgen["):
        raise ValueError(f"unknown contender {contender!r}")
    backend = contender[len("fastgen["):-1] if contender.startswith("fastgen[") else None
    torch.manual_seed(0)
    if kind == "layer":
        b, c, hw, k = shape
        fast = GatedMaskedConv2d(c, c, k, "B", backend=backend)
        if contender.startswith("fastgen"):
            mod = fast
        else:
            mod = PlainGatedMaskedConv2d(c, c, k, "B")
            mod.load_state_dict(fast.state_dict(), strict=False)
    else:
        b, dc, hw, channels, layers, likelihood = shape
        fast = GatedPixelCNN((dc, hw, hw), channels, layers, likelihood, backend=backend)
        mod = fast if contender.startswith("fastgen") else plain_gated_pixelcnn(fast)
    mod = mod.to(device=device, dtype=dtype)
    if contender == "compile(common)":
        return torch.compile(mod, dynamic=False)
    return mod


def gated_inputs(kind, shape, device="cpu", dtype=torch.float32):
    """Seeded inputs of the gated benchmarks: (v, h, grads of v/h/skip) for a
    layer, (images, labels=None) for a model."""
    gen = torch.Generator().manual_seed(1)
    if kind == "layer":
        b, c, hw, _ = shape
        ts = [torch.randn(b, c, hw, hw, generator=gen) for _ in range(5)]
        return [t.to(device, dtype) for t in ts]
    b, dc, hw, _, _, likelihood = shape
    levels = 2 if likelihood == "bernoulli" else 256
    return [torch.randint(0, levels, (b, dc, hw, hw), generator=gen, dtype=torch.uint8).to(device)]


def gated_step(kind, mod, inputs, mode="fwd+bwd", optimizer=True):
    """The timed step: forward (no grad) or forward + backward (+ Adam for a model)."""
    params = list(mod.parameters())
    if kind == "layer":
        v, h, gv, gh, gs = inputs
        if mode == "fwd":
            def step():
                with torch.no_grad():
                    return mod(v, h)
            return step
        vg, hg = v.detach().requires_grad_(), h.detach().requires_grad_()

        def step():
            vg.grad = hg.grad = None
            for p in params:
                p.grad = None
            outs = mod(vg, hg)
            torch.autograd.backward(outs, (gv, gh, gs))
            return outs, vg.grad, hg.grad
        return step
    (images,) = inputs
    opt = torch.optim.Adam(params, lr=1e-4) if optimizer else None

    def step():
        for p in params:
            p.grad = None
        loss = mod.loss(images)
        loss.backward()
        if opt is not None:
            opt.step()
        return loss
    return step


def gated_rss_step(spec):
    """peak_rss builder for the gated benchmarks (see :func:`peak_rss`)."""
    kind = spec["kind"]
    dtype = getattr(torch, spec.get("dtype", "float32"))
    mod = make_gated(kind, spec["contender"], tuple(spec["shape"]), dtype=dtype)
    step = gated_step(kind, mod, gated_inputs(kind, tuple(spec["shape"]), dtype=dtype), spec["mode"])

    def reset():
        for p in mod.parameters():
            p.grad = None
    return step, reset


# ---- the numbers contract --------------------------------------------------------------------------------

def relative_error(got, want):
    """max |got - want| / max |want| (computed in float64); 0 for two empty tensors;
    inf for a missing result, a shape mismatch or a non-finite difference."""
    if got is None or want is None:
        return 0.0 if got is want else math.inf
    got, want = got.detach().to(torch.float64), want.detach().to(torch.float64)
    if got.shape != want.shape:
        return math.inf
    if want.numel() == 0:
        return 0.0
    diff = (got - want).abs().max().item()
    if math.isnan(diff):
        return math.inf
    return diff / max(want.abs().max().item(), 1e-30)


# ---- PixelCNN++'s loss as the usual PyTorch port writes it -----------------------------------------------

def dmol_loss_common(x, l):
    """The discretized logistic mixture NLL (summed over everything) written the
    way the usual PyTorch port of PixelCNN++ writes it: NHWC permutes, about
    twenty full-size temporaries, autograd keeping most of them. x [B, 3, H, W]
    in [-1, 1], l [B, 10 M, H, W] (fastgen.ref.dmol's layout). The baseline of
    benchmarks/bench_dmol.py."""
    x = x.permute(0, 2, 3, 1)
    l = l.permute(0, 2, 3, 1)
    xs, ls = list(x.shape), list(l.shape)
    nr_mix = ls[-1] // 10
    logit_probs = l[:, :, :, :nr_mix]
    l = l[:, :, :, nr_mix:].contiguous().view(xs + [nr_mix * 3])
    means = l[:, :, :, :, :nr_mix]
    log_scales = torch.clamp(l[:, :, :, :, nr_mix:2 * nr_mix], min=-7.0)
    coeffs = torch.tanh(l[:, :, :, :, 2 * nr_mix:3 * nr_mix])
    x = x.contiguous().unsqueeze(-1) + torch.zeros(xs + [nr_mix], device=x.device, dtype=x.dtype)
    m2 = (means[:, :, :, 1, :] + coeffs[:, :, :, 0, :] * x[:, :, :, 0, :]).view(xs[0], xs[1], xs[2], 1, nr_mix)
    m3 = (means[:, :, :, 2, :] + coeffs[:, :, :, 1, :] * x[:, :, :, 0, :]
          + coeffs[:, :, :, 2, :] * x[:, :, :, 1, :]).view(xs[0], xs[1], xs[2], 1, nr_mix)
    means = torch.cat((means[:, :, :, 0, :].unsqueeze(3), m2, m3), dim=3)
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered_x + 1.0 / 255.0)
    cdf_plus = torch.sigmoid(plus_in)
    min_in = inv_stdv * (centered_x - 1.0 / 255.0)
    cdf_min = torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)
    log_one_minus_cdf_min = -F.softplus(min_in)
    cdf_delta = cdf_plus - cdf_min
    mid_in = inv_stdv * centered_x
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
    inner_inner_cond = (cdf_delta > 1e-5).float()
    inner_inner_out = inner_inner_cond * torch.log(torch.clamp(cdf_delta, min=1e-12)) \
        + (1.0 - inner_inner_cond) * (log_pdf_mid - math.log(127.5))
    inner_cond = (x > 0.999).float()
    inner_out = inner_cond * log_one_minus_cdf_min + (1.0 - inner_cond) * inner_inner_out
    cond = (x < -0.999).float()
    log_probs = cond * log_cdf_plus + (1.0 - cond) * inner_out
    log_probs = torch.sum(log_probs, dim=3) + torch.log_softmax(logit_probs, -1)
    return -torch.sum(torch.logsumexp(log_probs, dim=-1))


# floors of the relative error allowed, per dtype; the DESIGN.md rule (2x the
# error of the reference run in the same dtype) raises them where that is larger
ERROR_FLOOR = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def tolerance(dtype, same_dtype_ref_error=0.0):
    return max(ERROR_FLOOR[dtype], 2.0 * same_dtype_ref_error)


# ---- the benchmarks' checks before timing -----------------------------------------------------------------

def start_record(benchmark, group, contender, **info):
    """Name the benchmark's group, fill its extra_info (device, torch version,
    threads, the contender and ``info``: dtype, shape, mode, ...) and return the
    record for the end-of-run table (``median_s`` set once it is timed)."""
    benchmark.group = group
    benchmark.extra_info.update({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                                 **info, "contender": contender, "torch": torch.__version__,
                                 "threads": torch.get_num_threads()})
    return {"group": group, "contender": contender, "median_s": None, "extra_info": benchmark.extra_info}


def prepare_contender(benchmark, contender, op=None, probe=None):
    """Before a contender is built: a forced fastgen backend (``fastgen[NAME]``) is skipped where it cannot run
    (Triton on a CPU runs only in the interpreter, no speed contender; ``op.reason`` for the ``probe`` call), the
    backend fastgen runs goes into extra_info, and a compiled contender (``compile(...)``) starts from a fresh
    dynamo cache (its compile time is measured, nothing reused from another case)."""
    import pytest
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if contender.startswith("fastgen["):
        backend = contender[len("fastgen["):-1]
        if backend == "triton" and device == "cpu":
            pytest.skip("triton on CPU runs only in the interpreter: not a speed contender")
        why = op.reason(backend, probe)
        if why:
            pytest.skip(f"backend {backend}: {why}")
        benchmark.extra_info["backend"] = backend
    elif contender == "fastgen" and op is not None:
        benchmark.extra_info["backend"] = op.choose(probe, device)
    if contender.startswith("compile("):
        torch._dynamo.reset()


def first_call(run, record, bench_results, contender, ours):
    """(result, seconds) of a contender's first call. One that raises is recorded as
    'error', then re-raised if it is fastgen's (``ours``) or xfailed if it is a
    baseline that cannot run the case."""
    import pytest
    t0 = time.perf_counter()
    try:
        got = run()
    except Exception as e:  # noqa: BLE001
        record["extra_info"]["status"] = "error"
        bench_results.append(record)
        if ours:
            raise
        pytest.xfail(f"{contender} cannot run this case: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    return got, time.perf_counter() - t0


def check_outcome(got, want, ref_err, dtype, record, bench_results, contender, ours, explain=None):
    """Check a contender's outcome ({name: tensor}) against the float64 reference
    ``want`` under the rule of :func:`tolerance` (``ref_err``: the reference's own
    error in ``dtype`` by name, 0 where missing); records max_rel_error. A wrong contender is recorded as
    WRONG and fails (fastgen's, ``ours``) or xfails (a baseline): reported as
    wrong, never timed. ``explain(name)`` may add to the message."""
    import pytest
    errors = {n: relative_error(got.get(n), want[n]) for n in want}
    tols = {n: tolerance(dtype, ref_err.get(n, 0.0)) for n in want}
    wrong = {n: (e, tols[n]) for n, e in errors.items() if not e <= tols[n]}
    record["extra_info"]["max_rel_error"] = max(errors.values())
    if not wrong:
        return
    record["extra_info"]["status"] = "WRONG"
    bench_results.append(record)
    msg = f"{contender} is WRONG on {record['group']}: " + ", ".join(
        f"{n} rel. error {e:.3g} > tol {t:.3g}" + (explain(n) if explain else "") for n, (e, t) in wrong.items())
    if ours:
        pytest.fail(msg)
    pytest.xfail(msg)


# ---- memory: peak RSS of a fresh subprocess --------------------------------------------------------------

# the child imports this file and the benchmark builders by module name: benchmarks/ goes on its path
_RSS_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
from harness import _rss_child_main
_rss_child_main(json.loads(sys.argv[1]))
"""


def _current_rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _peak_rss_kb():
    """This process's peak RSS (VmHWM). Not ru_maxrss: exec carries the parent's
    peak into the child's ru_maxrss (vfork/posix_spawn share the parent's memory
    map until exec), and RUSAGE_CHILDREN keeps the maximum over every child."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak_rss():
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_child_main(spec):
    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec.get("builder"):  # "module:function" returning (step, reset_grads) for the spec
        import importlib
        module, func = spec["builder"].split(":")
        step, reset = getattr(importlib.import_module(module), func)(spec)
        _measure_steps(step, reset, spec.get("steps", 2))
        return
    b, ci, co, hw, k, mask_type = spec["shape"]
    dtype = getattr(torch, spec.get("dtype", "float32"))
    x = torch.randn(b, ci, hw, hw, dtype=dtype, requires_grad=spec["mode"] == "fwd+bwd")
    mod = make_masked_conv(spec["contender"], ci, co, k, mask_type, dtype=dtype)
    g = torch.randn(b, co, hw, hw, dtype=dtype)

    def step():
        if spec["mode"] == "fwd":
            with torch.no_grad():
                mod(x)
        else:
            x.grad = None
            for p in mod.parameters():
                p.grad = None
            mod(x).backward(g)

    def reset():
        x.grad = None
        for p in mod.parameters():
            p.grad = None

    _measure_steps(step, reset, spec.get("steps", 2))


def _measure_steps(step, reset, steps):
    step()  # warm-up: compiles, creates the framework's one-time state
    reset()
    base_kb = _current_rss_kb()
    peak_reset = _reset_peak_rss()
    for _ in range(steps):
        step()
    print(json.dumps({"base_kb": base_kb, "peak_kb": _peak_rss_kb(), "peak_reset": peak_reset}))


def peak_rss(contender, shape, mode="fwd+bwd", *, dtype="float32", steps=2, threads=None, timeout=600,
             builder=None, **spec_extra):
    """Peak RSS of ``steps`` fwd (no grad) or fwd+bwd steps of one contender on
    ``shape = (batch, in_ch, out_ch, hw, kernel, mask_type)``, in a fresh Python
    process. After a warm-up step (which compiles, where the contender does) the
    child records its RSS (``base_mb``: torch, inputs, weights) and resets its
    peak counter (Linux ``clear_refs``), so ``peak_mb`` (the child's VmHWM) is
    the peak of the measured steps and ``extra_mb = peak_mb - base_mb`` what
    they needed on top. ``builder``: "module:function" that builds another
    benchmark's ``(step, reset_grads)`` from the spec (default: a masked conv);
    ``spec_extra`` goes into the spec it receives. glibc is told to return freed large blocks to the
    system at once (fixed ``MALLOC_MMAP_THRESHOLD_``) so buffers freed during
    the warm-up are not silently reused below the peak counter."""
    spec = {"contender": contender, "shape": list(shape), "mode": mode, "dtype": dtype, "steps": steps,
            "threads": threads, "builder": builder, **spec_extra}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072",
               PYTHONPATH=os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", _RSS_CHILD, json.dumps(spec), HERE], capture_output=True, text=True,
                          env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"peak_rss({contender!r}, {shape}, {mode!r}) failed (exit {proc.returncode}):\n"
                           + proc.stderr[-3000:])
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    peak_kb = info["peak_kb"]
    return {"peak_mb": round(peak_kb / 1024, 1), "base_mb": round(info["base_kb"] / 1024, 1),
            "extra_mb": round(max(peak_kb - info["base_kb"], 0) / 1024, 1), "peak_reset": info["peak_reset"]}


def record_peak_rss(info, contender, shape, mode, **spec):
    """peak_rss of one contender (this process's thread count unless ``spec`` says) into a benchmark's
    extra_info: ``peak_rss_mb`` and ``peak_rss_extra_mb`` (what the measured steps needed above the base)."""
    spec.setdefault("threads", torch.get_num_threads())
    rss = peak_rss(contender, shape, mode, **spec)
    info["peak_rss_mb"], info["peak_rss_extra_mb"] = rss["peak_mb"], rss["extra_mb"]
    return rss


# ---- how much of the machine others used while we measured ----------------------------------------------

def sync():
    """Wait for the GPU, if there is one: a timed step ends when its kernels do."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_step(benchmark, record, bench_results, step, first_call_s=None, common="common"):
    """``benchmark(step)`` while OtherLoad watches the other processes, then
    record_timing. Returns the median, or None in a smoke run (no timings)."""
    with OtherLoad() as load:
        benchmark(step)
    if benchmark.disabled or benchmark.stats is None:
        return None
    return record_timing(benchmark, record, bench_results, load, step, first_call_s, common)


def extrapolate(benchmark, steps, total):
    """A contender timed over ``steps`` of ``total`` identical steps (a naive sampler's full forward pass per
    pixel): its pytest-benchmark statistics scaled to the whole run, the measured median kept in extra_info
    (``prefix_median_s``, ``timed_steps``, ``total_steps``, ``extrapolated``)."""
    stats = benchmark.stats.stats
    benchmark.extra_info.update(prefix_median_s=stats.median, timed_steps=steps, total_steps=total,
                                extrapolated=steps < total)
    stats.data[:] = [t * total / steps for t in stats.data]
    for name in [k for k in vars(stats) if k != "data"]:  # drop pytest-benchmark's cached statistics
        delattr(stats, name)


def record_timing(benchmark, record, bench_results, load, step, first_call_s=None, common="common"):
    """After ``benchmark(step)``: the median (and min) into ``record``, the other
    processes' load, the compile time (``first_call_s`` minus the median, for a
    compiled contender), the speedup against the group's ``common`` contender
    and, on a GPU, the peak memory of one more ``step``. Returns the median."""
    median = benchmark.stats.stats.median
    record["median_s"], record["min_s"] = median, benchmark.stats.stats.min
    info = benchmark.extra_info
    if load.fraction is not None:
        info["other_load"] = round(load.fraction, 3)
    if first_call_s is not None:
        info["compile_s"] = round(max(first_call_s - median, 0.0), 3)
    base = next((r["median_s"] for r in bench_results if r["group"] == record["group"]
                 and r["contender"] == common and r["median_s"]), None)
    if base and record["contender"] != common:
        info["speedup_vs_common"] = round(base / median, 3)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        info["peak_alloc_mb"] = round(peak / 2**20, 1)
        info["peak_alloc_extra_mb"] = round((peak - before) / 2**20, 1)
    return median


# ---- the compact table -----------------------------------------------------------------------------------

TABLE_COLUMNS = ("group", "contender", "backend", "median ms", "min ms", "vs common", "memory MB", "compile s",
                 "other load")
NOISY = 0.05  # other processes' share of the CPU above which a timing is marked


def table_rows(results):
    """Rows of the compact table from records {group, contender, median_s, min_s, extra_info}
    (one per benchmark). Speedup = common's median / the contender's median, in its group."""
    common = {r["group"]: r["median_s"] for r in results if r["contender"] == COMMON and r.get("median_s")}
    rows = []
    for r in results:
        info = r.get("extra_info", {})
        med, low = r.get("median_s"), r.get("min_s")
        base = common.get(r["group"])
        speed = f"{base / med:.2f}x" if med and base else ""
        mem = info.get("peak_rss_extra_mb", info.get("peak_alloc_extra_mb"))
        load = info.get("other_load")
        rows.append((r["group"], r["contender"], info.get("backend", ""),
                     f"{med * 1e3:.2f}" if med else (info.get("status") or "-"), f"{low * 1e3:.2f}" if low else "",
                     speed, "" if mem is None else f"{mem:.1f}", info.get("compile_s", ""),
                     "" if load is None else f"{load:.0%}" + (" NOISY" if load > NOISY else "")))
    return rows


def format_table(rows, columns=TABLE_COLUMNS):
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    out = [line, "-" * len(line)]
    last_group = None
    for r in rows:
        cells = list(r)
        if cells[0] == last_group:
            cells[0] = ""
        else:
            last_group = cells[0]
        out.append("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip())
    return "\n".join(out)


def merge_runs(runs):
    """Combine several runs of the same benchmarks (lists of records, see
    :func:`table_rows`): per benchmark, the run in which other processes used
    the least CPU (``extra_info['other_load']``; the selection never looks at
    the timings); without load figures, the median of the runs' medians.
    Keeps the order in which benchmarks first appear."""
    merged, order = {}, []
    for run in runs:
        for r in run:
            key = (r["group"], r["contender"])
            if key not in merged:
                merged[key] = []
                order.append(key)
            merged[key].append(r)
    rank = {name: i for i, name in enumerate(contender_names(["halfconv", "decomposed", "cpp", "triton"]))}
    groups = list(dict.fromkeys(k[0] for k in order))
    order.sort(key=lambda k: (groups.index(k[0]), rank.get(k[1], len(rank))))
    out = []
    for key in order:
        recs = merged[key]
        timed = [r for r in recs if r.get("median_s")]
        if not timed:
            out.append(recs[-1])
        elif all(r.get("extra_info", {}).get("other_load") is not None for r in timed):
            best = min(timed, key=lambda r: r["extra_info"]["other_load"])
            out.append(dict(best, runs=len(timed)))
        else:
            out.append(dict(timed[-1], median_s=statistics.median(r["median_s"] for r in timed),
                            min_s=min(r["min_s"] for r in timed), runs=len(timed)))
    return out


def records_from_json(path):
    """Records (see :func:`table_rows`) of a pytest-benchmark ``--benchmark-json`` file."""
    with open(path) as f:
        data = json.load(f)
    out = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        stats = b.get("stats") or {}
        out.append({"group": b.get("group") or "", "contender": info.get("contender", b["name"]),
                    "median_s": stats.get("median"), "min_s": stats.get("min"), "extra_info": info})
    return out


def table_from_json(*paths):
    """The compact table of one or more ``--benchmark-json`` files (several runs: :func:`merge_runs`)."""
    runs = [records_from_json(p) for p in paths]
    return format_table(table_rows(runs[0] if len(runs) == 1 else merge_runs(runs)))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/harness.py BENCHMARK_JSON [MORE_RUNS.json ...]")
    print(table_from_json(*sys.argv[1:]))
