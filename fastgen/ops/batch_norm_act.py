"""batch_norm_act: 2-D batch normalisation and its activation (relu or leaky_relu) as one op, forward and
backward, that keeps ONE activation-sized tensor for the backward where nn.BatchNorm2d + the activation keep
two (InPlace-ABN's idea, Rota Bulo et al. 2018). See fastgen.ref.batch_norm_act for the math. Backends:

* ``ref``     plain PyTorch (autograd keeps what the framework's ops keep)
* ``cpp``     csrc/cpu/batch_norm_act.cpp: one pass each way per channel (statistics and normalisation, the
              two backward sums and grad_x, each pair over data still in L2), AVX-512 or portable
* ``triton``  kernels/batch_norm_act.py: statistics + normalise + act, the backward sums + grad_x

What the kernel backends save (the one activation-sized tensor, and it is exact):

* ``leaky_relu`` (slope > 0): the output y. leaky_relu is invertible: z = y where y > 0, y / slope
  elsewhere; the affine map too when every weight is non-zero: xhat = (z - bias) / weight. So y is all the
  backward needs, and y is what the next layer (a convolution) keeps anyway: the layer adds no tensor of its
  own to the autograd graph, and its input is freed. y is saved when every channel has weight != 0 and
  |bias| <= 8 |weight| (``INVERTIBLE_RATIO``): the recovered xhat carries y's rounding times (1 + |bias /
  weight|), so the ratio bounds the extra gradient error to a few roundings of y's dtype. Otherwise (a zero
  weight, e.g. a zero-initialised residual branch, or a bias that dwarfs the weight) the input x is saved
  instead: the same one tensor, exact, without the memory the output gives back. Under torch.compile the
  input is saved (no data-dependent choice in a traced graph).
* ``relu``: the input x. relu's output cannot be inverted: where y = 0 it has lost z <= 0, and the backward
  needs xhat there too (grad_x = weight invstd (dz - mean(dz) - xhat mean(dz xhat)) is non-zero at every
  element, also where dz = 0). A 1-bit mask of y > 0 would not help: y itself says where y > 0; the missing
  part is xhat's value. So relu keeps x (with the per-channel statistics) and recomputes xhat and z > 0
  bit for bit as the forward made them: one activation-sized tensor where BatchNorm2d + ReLU keep two (x and
  y). Followed by a convolution, which keeps y, both keep x and y, unless the forward runs under
  ``recomputed_outputs()``: there the next layer keeps, in y's place, a recipe (x, the statistics and the
  parameters, all kept already) from which the forward kernel recomputes y bit for bit when that layer's
  backward asks for it (one elementwise pass): one activation-sized tensor per layer again.

Double backward (gradient penalties through this op) is not supported: a backward run with create_graph=True
raises an error saying so (use nn.BatchNorm2d + the activation there).
"""
import contextlib
import math
import weakref
from typing import List, NamedTuple, Optional, Tuple

import torch

from fastgen import _ext
from fastgen._dispatch import BadCall, Examples, autocast, example_randn, explicit, new_op, takes
from fastgen.ops.masked_conv import _kernel_layout
from fastgen.ref import batch_norm_act as ref
from fastgen.ref.batch_norm_act import ACTIVATIONS
from fastgen.ref.precision import compute_dtype

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
OP_NAME = "batch_norm_act"
# y is saved (leaky_relu) when |bias| <= INVERTIBLE_RATIO |weight| in every channel (module docstring)
INVERTIBLE_RATIO = 8.0
DOUBLE_BACKWARD = ("BatchNormAct2d does not support double backward (gradient penalties); use nn.BatchNorm2d + "
                   "activation")


class Call(NamedTuple):
    x: torch.Tensor
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    mean: Optional[torch.Tensor]  # the statistics to use (evaluation), or None: the batch's
    var: Optional[torch.Tensor]
    eps: float
    activation: str
    negative_slope: float


# ---- checks ----------------------------------------------------------------------------------------------------

def _number(name, v, *, positive=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{OP_NAME}: {name} must be a finite number {'> 0' if positive else '>= 0'}, got {v!r}")
    return float(v)


def _check_vector(name, t, x, *, same_dtype):
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{OP_NAME}: {name} must be a tensor or None, got {type(t).__name__}")
    if same_dtype and t.dtype != x.dtype:
        raise TypeError(f"{OP_NAME}: {name} must have the input's dtype {x.dtype}, got {t.dtype}")
    if not t.is_floating_point():
        raise TypeError(f"{OP_NAME}: {name} must be a floating tensor, got {t.dtype}")
    if tuple(t.shape) != (x.shape[1],):
        raise ValueError(f"{OP_NAME}: {name} must have shape ({x.shape[1]},) (one value per channel of the input "
                         f"{tuple(x.shape)}), got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{OP_NAME}: {name} must be on the input's device {x.device}, got {t.device}")


def make_call(x, running_mean, running_var, weight, bias, training, eps, activation, negative_slope):
    """The checked call, and n (values per channel). ``training``: normalise with the batch's statistics."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{OP_NAME}: input must be a tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{OP_NAME}: input must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{OP_NAME}: input must be 4-D [N, C, H, W] (expected 4D input, got {x.dim()}D input)")
    for name, t in (("weight", weight), ("bias", bias)):
        _check_vector(name, t, x, same_dtype=True)
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        _check_vector(name, t, x, same_dtype=False)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{OP_NAME}: give both running_mean and running_var, or neither")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{OP_NAME}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    slope = 0.0
    if activation == "leaky_relu":
        slope = _number("negative_slope", negative_slope, positive=True)  # > 0: invertible (0 is relu)
    eps = _number("eps", eps)
    n = x.shape[0] * x.shape[2] * x.shape[3]
    if training and n == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
    if not training and running_mean is None:
        raise ValueError(f"{OP_NAME}: evaluation (training=False) normalises with the running statistics: give "
                         f"running_mean and running_var")
    mean = var = None
    if not training:
        ct = compute_dtype(x.dtype)
        mean, var = running_mean.detach().to(ct), running_var.detach().to(ct)
    return Call(x, weight, bias, mean, var, eps, activation, slope), n


# ---- kernels and autograd ---------------------------------------------------------------------------------------
#
# Each kernel backend is a pair of registered ops with fake implementations (torch.compile sees opaque ops): the
# C++ schemas fastgen::batch_norm_act_forward/backward (csrc/module.cpp) and, for Triton, the custom ops below
# around kernels/batch_norm_act.py. A plain autograd.Function joins them (a Python custom_op's register_autograd
# costs about 0.1 ms each way, a tenth of the C++ kernels' time at GAN sizes).

def _fake_forward(x):
    ct = compute_dtype(x.dtype)
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_kernel_layout(x)),
            x.new_empty(x.shape[1:2], dtype=ct), x.new_empty(x.shape[1:2], dtype=ct), x.new_empty((), dtype=torch.bool))


def _fake_backward(saved, output_mask):
    gx = (torch.empty(saved.shape, dtype=saved.dtype, device=saved.device, memory_format=_kernel_layout(saved))
          if output_mask[0] else saved.new_empty(0))
    return (gx, saved.new_empty(saved.shape[1:2] if output_mask[1] else (0,)),
            saved.new_empty(saved.shape[1:2] if output_mask[2] else (0,)))


@torch.library.custom_op("fastgen::batch_norm_act_triton_forward", mutates_args=())
def triton_forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   mean: Optional[torch.Tensor], var: Optional[torch.Tensor], eps: float, activation: str,
                   negative_slope: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastgen.kernels import batch_norm_act as k
    y, m, v = k.batch_norm_act_forward(x, weight, bias, mean, var, eps, activation, negative_slope)
    if mean is not None:  # a registered op returns fresh tensors, never its inputs
        m, v = m.clone(), v.clone()
    return y, m, v, invertible_tensor(weight, bias, x)


@triton_forward.register_fake
def _(x, weight, bias, mean, var, eps, activation, negative_slope):
    return _fake_forward(x)


@torch.library.custom_op("fastgen::batch_norm_act_triton_backward", mutates_args=())
def triton_backward(grad_y: torch.Tensor, saved: torch.Tensor, saved_is_output: bool, weight: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], mean: torch.Tensor, var: torch.Tensor, eps: float, training: bool,
                    activation: str, negative_slope: float,
                    output_mask: List[bool]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastgen.kernels import batch_norm_act as k
    grads = k.batch_norm_act_backward(grad_y, saved, saved_is_output, weight, bias, mean, var, eps, training,
                                      activation, negative_slope, output_mask)
    return tuple(g if need else saved.new_empty(0) for g, need in zip(grads, output_mask))


@triton_backward.register_fake
def _(grad_y, saved, saved_is_output, weight, bias, mean, var, eps, training, activation, negative_slope,
      output_mask):
    return _fake_backward(saved, output_mask)


def _kernels(backend):
    if backend == "triton":
        return triton_forward, triton_backward
    return torch.ops.fastgen.batch_norm_act_forward, torch.ops.fastgen.batch_norm_act_backward


def invertible_tensor(weight, bias, like):
    """A 0-d bool tensor: whether leaky_relu's output y can stand for the input in the backward (module
    docstring): every weight non-zero and |bias| <= INVERTIBLE_RATIO |weight| (weight 1 and bias 0 when None).
    The C++ forward kernel computes the same rule itself (its fourth output)."""
    if weight is None and bias is None:
        return torch.ones((), dtype=torch.bool, device=like.device)
    w = torch.ones_like(bias) if weight is None else weight.detach()
    b = torch.zeros_like(w) if bias is None else bias.detach()
    return ((w != 0) & (b.abs() <= INVERTIBLE_RATIO * w.abs())).all()


class BatchNormAct(torch.autograd.Function):
    """(y, mean, var) of a contiguous (NCHW or channels_last) x on a kernel backend. mean / var: the statistics
    used (the batch's, or the given ones), not differentiable. Saves one activation-sized tensor: y or x."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, eps, activation, slope, backend, may_save_output):
        y, m, v, inv = _kernels(backend)[0](x, weight, bias, mean, var, eps, activation, slope)
        # the kernel's verdict on the parameters (no data-dependent choice while torch.compile traces)
        save_output = may_save_output and not torch.compiler.is_compiling() and bool(inv)
        ctx.save_for_backward(y if save_output else x, weight, bias, m, v)
        ctx.args = (save_output, eps, mean is None, activation, slope, backend)
        ctx.explicit = explicit()
        ctx.mark_non_differentiable(m, v)
        return y, m, v

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError(DOUBLE_BACKWARD)  # create_graph=True: the gradients would not be differentiable
        saved, weight, bias, mean, var = ctx.saved_tensors
        save_output, eps, training, activation, slope, backend = ctx.args
        need = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2]]
        grad_y = grad_y.contiguous(memory_format=_kernel_layout(saved))
        args = (saved, save_output, weight, bias, mean, var, eps, training, activation, slope)

        def ref_grads():  # the kernels' math in torch ops, from the same saved tensor
            return list(ref.backward(grad_y, *args))

        grads = OP.backward(backend, ctx.explicit, lambda: _kernels(backend)[1](grad_y, *args, need), ref_grads)
        return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * 7


def _register_cpp_fakes():
    @torch.library.register_fake("fastgen::batch_norm_act_forward")
    def _(x, weight, bias, mean, var, eps, activation, negative_slope):
        return _fake_forward(x)

    @torch.library.register_fake("fastgen::batch_norm_act_backward")
    def _(grad_y, saved, saved_is_output, weight, bias, mean, var, eps, training, activation, negative_slope,
          output_mask):
        return _fake_backward(saved, output_mask)


def _cpp_unavailable():
    return _ext.cpp_op_unavailable("batch_norm_act_forward", "batch_norm_act")


if _cpp_unavailable() is None:
    _register_cpp_fakes()


# ---- backends and dispatch -------------------------------------------------------------------------------------

def _kernel_runner(backend):
    def run(c):
        x = c.x.contiguous(memory_format=_kernel_layout(c.x))
        grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, c.weight, c.bias))
        # without a backward nothing is saved: the kernel's verdict is not read (no device sync)
        may_save_output = grads and c.activation == "leaky_relu"
        y, m, v = BatchNormAct.apply(x, c.weight, c.bias, c.mean, c.var, c.eps, c.activation, c.negative_slope,
                                     backend, may_save_output)
        if grads and c.activation == "relu" and _RECIPES:  # x is saved: y can be recomputed from it
            _RECIPES[-1][id(y)] = (weakref.ref(y), y._version, (x, c.weight, c.bias, m, v, c.eps, backend))
        return y, m, v
    return run


# ---- relu's output recomputed for the layer after it -------------------------------------------------------

_RECIPES = []  # per active recomputed_outputs(): id(y) -> (weakref to y, y's version, what recomputes y)


class _Recipe(NamedTuple):
    x: torch.Tensor
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    mean: torch.Tensor
    var: torch.Tensor
    eps: float
    backend: str
    versions: Tuple[int, ...]  # of x, weight, bias when y was made: an in-place change since is an error


def _versions(*tensors):
    return tuple(-1 if t is None else t._version for t in tensors)


@contextlib.contextmanager
def recomputed_outputs():
    """While active, a relu batch_norm_act output (a kernel backend's, under autograd) that a later op saves
    for its backward (a convolution its input) is saved as a recipe instead: the op's own saved input and
    statistics, from which the forward kernel remakes the output bit for bit when that backward runs (module
    docstring). The output itself is freed once the forward is done with it: relu layers keep one
    activation-sized tensor each, as leaky_relu ones do. Only the exact tensor object the op returned, unchanged
    since, is replaced; under torch.compile nothing is."""
    if torch.compiler.is_compiling():
        yield
        return
    recipes = {}

    def pack(t):
        entry = recipes.get(id(t))
        if entry is None or entry[0]() is not t or t._version != entry[1]:
            return t
        x, w, b, m, v, eps, backend = entry[2]
        return _Recipe(x, w, b, m, v, eps, backend, _versions(x, w, b))

    def unpack(saved):
        if not isinstance(saved, _Recipe):
            return saved
        if _versions(saved.x, saved.weight, saved.bias) != saved.versions:
            raise RuntimeError(f"{OP_NAME}: the input, weight or bias of a relu batch_norm_act was modified in place "
                               f"after the forward; its output, saved by the next layer, cannot be recomputed")
        with torch.no_grad():
            return _kernels(saved.backend)[0](saved.x, saved.weight, saved.bias, saved.mean, saved.var, saved.eps,
                                              "relu", 0.0)[0]

    _RECIPES.append(recipes)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        _RECIPES.pop()


def _x(c):
    return c.x


def _triton_why_not(c):
    return _ext.triton_why_not(c.x.device.type) or takes("triton", c.x.device.type, FLOAT_DTYPES)(c)


# Preference. CPU (benchmarks/bench_batch_norm_act.py, AVX-512, float32 fwd+bwd, 2 threads, RESULTS.md): cpp
# 1.86-2.68x faster than BatchNorm2d + the activation at (64, 128, 16, 16), (64, 64, 32, 32), (64, 256, 8, 8),
# and ahead of torch.compile of the pair but for (64, 64, 32, 32) leaky_relu (3% behind).
# CUDA: the Triton kernels have run only under the interpreter; ref (cuDNN's batch norm + the activation)
# stays first there until they are timed on a GPU (bench_batch_norm_act.py's (128, 256, 16, 16) bf16).
PREFERENCE = {"cpu": ["cpp", "ref"], "cuda": ["ref"]}

OP = new_op(OP_NAME, PREFERENCE)
OP.register("ref", lambda c: ref.batch_norm_act(*c))
OP.register("cpp", _kernel_runner("cpp"), why_not=takes("cpp", "cpu", FLOAT_DTYPES, _x), unavailable=_cpp_unavailable)
OP.register("triton", _kernel_runner("triton"), why_not=_triton_why_not, unavailable=_ext.triton_unavailable)


def batch_norm_act(input, running_mean=None, running_var=None, weight=None, bias=None, training=False, momentum=0.1,
                   eps=1e-5, *, activation="relu", negative_slope=0.2, backend=None):
    """``act(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps))`` as one
    op; ``activation`` 'relu' or 'leaky_relu' (``negative_slope`` > 0). The arguments are F.batch_norm's:
    ``training`` normalises with the batch's statistics (mean and biased variance over N, H, W) and, when
    running statistics are given, updates them in place (``momentum``; the unbiased variance), as
    BatchNorm2d does; otherwise the running statistics normalise. An empty batch returns an empty output and
    leaves the running statistics alone (as BatchNorm2d). The backward keeps one activation-sized tensor
    (fastgen.ops.batch_norm_act); double backward is an error."""
    if isinstance(input, torch.Tensor):
        input, weight, bias = autocast(input.device.type, input, weight, bias)
    c, n = make_call(input, running_mean, running_var, weight, bias, training, eps, activation, negative_slope)
    if training and running_mean is not None and not (isinstance(momentum, (int, float))
                                                      and not isinstance(momentum, bool)):
        raise ValueError(f"{OP_NAME}: momentum must be a number (the module turns momentum=None into the "
                         f"cumulative average's factor), got {momentum!r}")
    y, mean, var = OP.run(c, input.device, backend)
    if training and running_mean is not None and n > 0:
        with torch.no_grad():  # (1 - momentum) running + momentum batch; the variance unbiased, n / (n - 1)
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((var * (n / (n - 1))).to(running_var.dtype), momentum)
    return y


# ---- the op contract (tests/test_op_contract.py) -----------------------------------------------------------

def _example(batch, dtype, device, gen):
    """7 channels of 5 x 3 in training with running statistics, leaky_relu (weights near 1: the output is
    saved and inverted)."""
    x = example_randn((batch, 7, 5, 3), dtype, device, gen)
    weight = (1 + example_randn((7,), torch.float64, "cpu", gen, grad=False, scale=0.3)).to(device, dtype)
    bias = example_randn((7,), dtype, device, gen, scale=0.5)
    stats = dict(running_mean=torch.zeros(7, device=device), running_var=torch.ones(7, device=device))
    return (x,), dict(stats, weight=weight.requires_grad_(), bias=bias, training=True, activation="leaky_relu",
                      negative_slope=0.2)


def _bad(error, message, x=(2, 3, 4, 4), dtype=torch.float32, c=3, **kwargs):
    def make(device):
        t = torch.zeros(x, device=device).to(dtype)
        params = dict(weight=torch.ones(c, device=device).to(dtype), bias=torch.zeros(c, device=device).to(dtype),
                      running_mean=torch.zeros(c, device=device), running_var=torch.ones(c, device=device),
                      training=True)
        params.update({k: v(device) if callable(v) else v for k, v in kwargs.items()})
        return (t,), params
    return BadCall(make, error, message)


OP.set_examples(Examples(batch_norm_act, _example, [
    _bad(ValueError, "input must be 4-D [N, C, H, W]", x=(2, 3, 4)),
    _bad(ValueError, "weight must have shape (3,)", c=3, weight=lambda d: torch.ones(4, device=d)),
    _bad(ValueError, "running_mean must have shape (3,)", running_mean=lambda d: torch.zeros(2, device=d)),
    _bad(TypeError, "input must be float16, bfloat16, float32 or float64, got torch.int64", dtype=torch.int64),
    _bad(TypeError, "weight must have the input's dtype",
         weight=lambda d: torch.ones(3, device=d, dtype=torch.float64)),
    _bad(ValueError, "activation must be one of ('relu', 'leaky_relu'), got 'gelu'", activation="gelu"),
    _bad(ValueError, "negative_slope must be a finite number > 0", activation="leaky_relu", negative_slope=0.0),
    _bad(ValueError, "Expected more than 1 value per channel when training", x=(1, 3, 1, 1)),
    _bad(ValueError, "give running_mean and running_var", training=False, running_mean=None, running_var=None),
    _bad(ValueError, "give both running_mean and running_var, or neither", running_var=None),
    _bad(ValueError, "eps must be a finite number >= 0", eps=-1.0),
    BadCall(lambda device: (([0.0],), {}), TypeError, "input must be a tensor"),
]))
