"""fastgen.sample: naive or cached pixel-by-pixel generation, and the
teacher-forced logits of the cached path (its exactness check).

Every network the cached path can read compiles to one schedule
(fastgen/sampling/schedule.py), run by the backends of the op
``sample_scheduled``:
* ``cpp``: the C++ engine (csrc/cpu/schedule.cpp): the whole generation loop in
  one call (one per row to show progress), float32 / float64 CPU tensors;
* ``cuda``: the CUDA engine (csrc/cuda/schedule.cu): one thread block per image
  runs the whole loop in one launch; float32 / float64 CUDA tensors. Compiled
  (nvcc) but not yet run on a GPU: it stays out of the default order until it
  has been tested and measured there (benchmarks/RESULTS.md), so opt-in;
* ``ref``: the torch executor (fastgen/sampling/cached.py), any device and dtype.
"""
import inspect
import itertools
from typing import Any, Callable, Optional, Tuple

import torch
from torch import nn

from fastgen import _ext
from fastgen._dispatch import new_op
from fastgen._progress import Progress
from fastgen._seed import check_seed
from fastgen.sampling import causality
from fastgen.sampling.cached import run_schedule_torch
from fastgen.sampling.common import feed_table, uniforms
from fastgen.sampling.naive import naive_sample

LIKELIHOODS = ("bernoulli", "categorical", "logistic-mixture")
METHODS = ("cached", "naive")
MIXTURE_LEVELS = 256  # the discretized logistic mixture's bins (fastgen.ref.dmol)

# The C++ engine is the CPU's only compiled engine (benchmarks/RESULTS.md, bench_sampling.py); the CUDA engine
# (csrc/cuda/schedule.cu) compiles but has not run on a GPU: opt-in (backend='cuda') until measured.
OP = new_op("sample_scheduled", {"cpu": ["cpp"]}, contract="engine")  # a job, not tensors: tests/test_sampling*.py


def _engine_why_not(device_type, name):
    def why_not(job):
        prog = job["prog"]
        if prog.device.type != device_type:
            return f"the {name} engine runs {device_type} models, got {prog.device.type}"
        if prog.dtype not in (torch.float32, torch.float64):
            return f"the {name} engine takes float32 or float64 models, got {prog.dtype}"
        from fastgen import _C
        if not hasattr(_C, "sample_scheduled"):
            return "fastgen._C predates this engine (sample_scheduled): rebuild it (`make build`)"
        return None
    return why_not


def _run_ref(job):
    return run_schedule_torch(job["prog"], job["u"], job["feed"], temperature=job["temperature"],
                              images=job["images"], progress=job["progress"])


def _run_engine(job):
    """The compiled engines (C++ on CPU tensors, CUDA on CUDA tensors): one call
    for all steps, or one per row to show progress."""
    from fastgen import _C
    prog = job["prog"]
    dev = prog.device
    slots, code, params, scalars = prog.encode()
    params = [p.to(dev) for p in params]  # the queues are built on the CPU
    c, h, w = prog.shape
    # channels padded to 16: the CPU micro-kernel's vectors never leave a position
    bufs = [torch.zeros(prog.batch, s.ring, -(-s.channels // 16) * 16, dtype=prog.dtype, device=dev)
            for s in prog.slots]
    images = job["images"]
    teacher = images is not None
    out_images = images.to(dev).long().contiguous() if teacher else \
        torch.zeros(prog.batch, c, h, w, dtype=torch.long, device=dev)
    out_params = torch.zeros(prog.batch, prog.out_channels, h, w, dtype=prog.dtype, device=dev) if teacher else \
        torch.empty(0, dtype=prog.dtype, device=dev)
    config = prog.config()
    u, feed = job["u"].to(dev).contiguous(), job["feed"].to(dev).contiguous()
    n = prog.steps
    bar = Progress(n, f"sampling (cached, {'C++' if dev.type == 'cpu' else dev.type})",
                   enabled=job["progress"])
    step = w * prog.pixel_steps if job["progress"] else n  # a row at a time, to show progress
    try:
        for t0 in range(0, n, step):
            _C.sample_scheduled(slots, code, params, scalars, bufs, u, feed, out_images, out_params, config,
                                float(job["temperature"]), t0, min(n, t0 + step), teacher)
            bar.update(min(n, t0 + step) - bar.n)
    finally:
        bar.close()
    return out_images, (out_params if teacher else None)


OP.register("ref", _run_ref)
OP.register("cpp", _run_engine, why_not=_engine_why_not("cpu", "C++"), unavailable=_ext.cpp_unavailable)
OP.register("cuda", _run_engine, why_not=_engine_why_not("cuda", "CUDA"), unavailable=_ext.cuda_ext_unavailable)


def _settings(model, likelihood, levels, shape):
    """likelihood, levels, shape: given, else the model's (fastgen's models know theirs)."""
    likelihood = likelihood or getattr(model, "likelihood", None) or "bernoulli"
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    if likelihood == "bernoulli":
        levels = 2
    elif likelihood == "logistic-mixture":
        if levels not in (None, MIXTURE_LEVELS):
            raise ValueError(f"a discretized logistic mixture has {MIXTURE_LEVELS} levels, got levels={levels!r}")
        levels = MIXTURE_LEVELS
    else:
        levels = levels or getattr(model, "levels", None) or 256
    if not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an int >= 2, got {levels!r}")
    shape = shape or getattr(model, "image_shape", None)
    if shape is None:
        raise ValueError("shape=(C, H, W) is required for a model that does not know its image shape")
    shape = tuple(shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s >= 1 for s in shape):
        raise ValueError(f"shape must be (channels, height, width) of positive ints, got {shape!r}")
    return likelihood, levels, shape


def _draw_shape(likelihood, shape):
    """(uniforms per pixel, H, W): one per channel; a mixture's pixel one more, for the component."""
    c, h, w = shape
    return (c + 1 if likelihood == "logistic-mixture" else c), h, w


def _dtype_device(model):
    """The network's dtype and device: its first floating parameter or buffer's (float32 on the CPU if none)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastgen.sample: model must be a torch.nn.Module mapping the image [n, C, H, W] to logits, "
                        f"got {type(model).__name__} (wrap a function in an nn.Module whose forward calls it)")
    t = next((t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()), None)
    return (t.dtype, t.device) if t is not None else (torch.float32, torch.device("cpu"))


def _check_condition(model, condition, n):
    """One rule for conditions: a conditional model needs one, a network that takes none refuses one.
    fastgen's models know whether they are conditional (check_label: fastgen.nn.conditioning); for another
    network, forward's signature says whether it takes a second argument."""
    if hasattr(model, "check_label"):
        model.check_label(condition, n)
        return
    params = list(inspect.signature(model.forward).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_more = len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)
    name = type(model).__name__
    if condition is not None and not takes_more:
        raise ValueError(f"fastgen.sample: condition= was given but {name}.forward takes only the image")
    if condition is None and len(positional) >= 2 and positional[1].default is inspect.Parameter.empty:
        raise ValueError(f"fastgen.sample: {name}.forward needs a second argument ({positional[1].name!r}): "
                         f"pass it as condition=")


def _run(prog, table, temperature, u, images, progress, backend):
    """A compiled schedule (fastgen.sampling.causality.check) on the dispatched engine."""
    job = dict(prog=prog, u=u, feed=table, temperature=temperature, images=images, progress=progress)
    return OP.run(job, prog.device, backend)


def _checked(model, n, likelihood, levels, shape, condition, feed):
    """The checks every sampling path shares, then the causality check: (schedule or None, why not, table)."""
    dtype, device = _dtype_device(model)
    _check_condition(model, condition, n)
    table = feed_table(feed, likelihood, levels, dtype, device)
    prog, why = causality.check(model, n=n, likelihood=likelihood, levels=levels, shape=shape,
                                condition=condition, table=table)
    return prog, why, table


def engine_backend(backend: Optional[str]) -> Optional[str]:
    """``backend`` if the cached engine has it, else None (dispatch): like the
    layers, a forced name applies to each op that has it (a command's --backend)."""
    return backend if backend in OP.backends else None


@torch.no_grad()
def sample(model: nn.Module, n: int, *, likelihood: Optional[str] = None, levels: Optional[int] = None,
           shape: Optional[Tuple[int, int, int]] = None, condition: Any = None, temperature: float = 1.0,
           seed: Optional[int] = None, method: str = "cached", backend: Optional[str] = None,
           feed: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, progress: bool = False) -> torch.Tensor:
    """``n`` images [n, C, H, W] (int64 values) from an autoregressive image model.

    ``model(x)`` (or ``model(x, condition)``) maps the image as fed, [n, C, H, W],
    to Bernoulli logits [n, C, H, W], categorical logits [n, C*levels, H, W]
    with channel c's logits in block c, or ('logistic-mixture', PixelCNN++) a
    discretized logistic mixture's parameters [n, K, H, W] in fastgen.ref.dmol's
    layout (256 levels; all of a pixel's colours drawn from its mixture).
    ``likelihood``, ``levels`` and ``shape`` = (C, H, W) default to the model's
    own (fastgen's models know them). ``feed`` maps sampled values (a tensor) to
    the network's input, elementwise; default binary as {0, 1}, categorical as
    value / (levels - 1), a mixture's as 2 value / 255 - 1.
    ``method``: 'cached' computes each activation once (fastgen/sampling/schedule.py
    and tracing.py say which networks it takes, and name any operation it cannot);
    'naive' runs the whole network per pixel (and colour channel). Both read the same uniforms: for one seed they give the same
    images (exactly in float64).
    ``backend``: the cached engine, 'cpp', 'cuda' or 'ref' (torch); default: dispatch.
    Colour images follow the sub-pixel order (R, then G, then B at each pixel).
    Every method first checks that the network is causal (fastgen.sampling.causality): one whose output
    at a value sees that value or a later one is refused with a CausalityError naming the first such
    output and what it sees. ``condition`` is required by a conditional model and refused by a network
    that takes none; ``seed``: an int in [0, 2**63).
    """
    _dtype_device(model)  # a module, before anything reads its attributes
    likelihood, levels, shape = _settings(model, likelihood, levels, shape)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    check_seed(seed, "fastgen.sample")
    was_training = model.training
    model.eval()
    try:
        prog, why, table = _checked(model, n, likelihood, levels, shape, condition, feed)
        u = uniforms(n, _draw_shape(likelihood, shape), seed, table.device)
        if method == "naive":
            return naive_sample(model, u, likelihood=likelihood, levels=levels, shape=shape, condition=condition,
                                temperature=temperature, feed_table=table, progress=progress)
        if prog is None:
            raise why
        images, _ = _run(prog, table, temperature, u, None, progress, backend)
        return images
    finally:
        model.train(was_training)


@torch.no_grad()
def cached_logits(model: nn.Module, images: torch.Tensor, *, likelihood: Optional[str] = None,
                  levels: Optional[int] = None, condition: Any = None, backend: Optional[str] = None,
                  feed: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Teacher forcing through the cached path: feed ``images`` (int values
    [B, C, H, W]) pixel by pixel and return the logits each step computed,
    [B, C_out, H, W] (channel c's block from the step of colour channel c; a
    mixture's parameters from the pixel's step). Equals ``model(feed(images))``
    for an exact cached path."""
    _dtype_device(model)
    likelihood, levels, shape = _settings(model, likelihood, levels, tuple(images.shape[1:]))
    was_training = model.training
    model.eval()
    try:
        prog, why, table = _checked(model, images.shape[0], likelihood, levels, shape, condition, feed)
        if prog is None:
            raise why
        c, h, w = _draw_shape(likelihood, shape)
        u = torch.zeros(h, w, c, images.shape[0], dtype=torch.float64, device=table.device)
        _, logits = _run(prog, table, 1.0, u, images, False, backend)
        return logits
    finally:
        model.train(was_training)
