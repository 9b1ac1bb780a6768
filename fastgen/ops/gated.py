"""The gated ops of the Gated PixelCNN: checks, backends, registered ops with
autograd, and the functionals. See fastgen.ref.gated for the channel layout.

``gated_activation(x, cond)``: tanh(f) * sigmoid(g) of x + cond.
* ``ref``     plain PyTorch (fastgen.ref.gated)
* ``cpp``     one fused pass each way on CPU (csrc/cpu/gated.cpp)
* ``triton``  one fused pass each way (kernels/gated.py)

``gated_conv2d(x, weight, bias, cond, stack=...)``: the gated convolution of
one stack of a Gated PixelCNN layer.
* ``ref``       fastgen.ref.gated
* ``composed``  the stack's convolution through fastgen (the horizontal stack is
                a masked convolution: fastgen.functional.masked_conv2d's fastest
                backend), then gated_activation's fastest backend
* ``triton``    one implicit GEMM that computes f and g together, adds bias and
                cond and writes only the gated C channels: the 2C pre-activation
                never reaches memory; the backward recomputes it

``vertical_conv2d(x, weight, bias, shift=0)``: the vertical stack's convolution
(and, with shift=1 and a 1x1 kernel, its link to the horizontal stack).
* ``ref``  zero-pad, conv2d
* ``cpp``  the masked-conv CPU kernel in its 'V' mode (csrc/masked_conv_shape.h)
"""
from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F

from fastgen import _ext
from fastgen._dispatch import BadCall, Examples, autocast, example_randn, explicit, new_op, takes, vjp
from fastgen.ops.masked_conv import (_CPP_FAST, FLOAT_DTYPES, _kernel_layout, asked_grads, masked_conv2d,
                                     masked_conv2d_op)
from fastgen.ref import gated as ref
from fastgen.ref.gated import STACKS

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
F32_F64 = (torch.float32, torch.float64)


class ActCall(NamedTuple):
    x: torch.Tensor
    cond: Optional[torch.Tensor]
    data_channels: int


class ConvCall(NamedTuple):
    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    cond: Optional[torch.Tensor]
    stack: str
    mask_type: str
    data_channels: int


# ---- checks ---------------------------------------------------------------------------------------------------

def _check_float(op, named):
    dtype = named[0][1].dtype
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dtype != dtype:
            raise TypeError(f"{op}: all tensors must share one dtype, got {named[0][0]} {dtype} and {name} {t.dtype}")
        if t.device != named[0][1].device:
            raise ValueError(f"{op}: all tensors must be on one device, got {named[0][0]} on {named[0][1].device} "
                             f"and {name} on {t.device}")


def _check_cond(op, cond, b, c2, full_shape):
    if cond is None:
        return
    if tuple(cond.shape) not in ((b, c2), tuple(full_shape)):
        raise ValueError(f"{op}: cond must have shape ({b}, {c2}) (one bias per sample and channel) or the "
                         f"pre-activation's shape {tuple(full_shape)} (a conditioning map), got {tuple(cond.shape)}")


def make_act_call(x, cond, data_channels):
    op = "gated_activation"
    _check_float(op, [("input", x)] + ([("cond", cond)] if cond is not None else []))
    if x.dim() < 2:
        raise ValueError(f"{op}: input must be [batch, 2*C, ...], got shape {tuple(x.shape)}")
    if not isinstance(data_channels, int) or data_channels < 1:
        raise ValueError(f"{op}: data_channels must be a positive int, got {data_channels!r}")
    if x.shape[1] == 0 or x.shape[1] % (2 * data_channels):
        raise ValueError(f"{op}: input has {x.shape[1]} channels; it needs a positive multiple of 2*data_channels "
                         f"(= {2 * data_channels}): each of the data_channels colour blocks holds f and g halves")
    _check_cond(op, cond, x.shape[0], x.shape[1], x.shape)
    return ActCall(x, cond, data_channels)


def make_conv_call(x, weight, bias, cond, stack, mask_type, data_channels):
    op = "gated_conv2d"
    named = [("input", x), ("weight", weight)] + [(n, t) for n, t in (("bias", bias), ("cond", cond)) if t is not None]
    _check_float(op, named)
    if stack not in STACKS:
        raise ValueError(f"{op}: stack must be one of {STACKS}, got {stack!r}")
    if mask_type not in ("A", "B"):
        raise ValueError(f"{op}: mask_type must be 'A' or 'B', got {mask_type!r}")
    if not isinstance(data_channels, int) or data_channels < 1:
        raise ValueError(f"{op}: data_channels must be a positive int, got {data_channels!r}")
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"{op}: input and weight must be 4-D, got input {tuple(x.shape)} and weight "
                         f"{tuple(weight.shape)}")
    c2, ci, kh, kw = weight.shape
    if x.shape[1] != ci:
        raise ValueError(f"{op}: input has {x.shape[1]} channels but weight expects {ci}")
    if c2 == 0 or c2 % (2 * data_channels) or ci % data_channels:
        raise ValueError(f"{op}: weight [{c2}, {ci}, ...]: output channels must be a positive multiple of "
                         f"2*data_channels (= {2 * data_channels}) and input channels of data_channels")
    if stack == "vertical" and (kw % 2 == 0 or kh < 1):
        raise ValueError(f"{op}: the vertical stack's kernel [{kh}, {kw}] needs an odd width (it is centred on the "
                         f"column) and at least one row")
    if stack == "horizontal" and (kh != 1 or kw < 1):
        raise ValueError(f"{op}: the horizontal stack's kernel must be 1 x kc (kc-1 pixels to the left, then the "
                         f"pixel itself), got {kh} x {kw}")
    if bias is not None and tuple(bias.shape) != (c2,):
        raise ValueError(f"{op}: bias must have shape ({c2},), got {tuple(bias.shape)}")
    _check_cond(op, cond, x.shape[0], c2, (x.shape[0], c2, *x.shape[2:]))
    return ConvCall(x, weight, bias, cond, stack, mask_type, data_channels)


# ---- the stack convolution through fastgen's other ops -------------------------------------------------------

def stack_conv2d(x, weight, bias=None, stack="horizontal", mask_type="B", data_channels=1, backend=None):
    """The ungated convolution of one stack (see fastgen.ref.gated), output the
    size of the input. The horizontal 1 x kc kernel is a masked convolution of
    width 2kc-1 whose right half is masked: it runs on masked_conv2d's backends,
    which compute only the visible taps. The vertical one is vertical_conv2d."""
    if stack == "vertical":
        return vertical_conv2d(x, weight, bias)
    kc = weight.shape[3]
    return masked_conv2d(x, F.pad(weight, (0, kc - 1)), bias, (0, kc - 1), mask_type=mask_type,
                         data_channels=data_channels, backend=backend)


class VCall(NamedTuple):
    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    shift: int


def make_vertical_call(x, weight, bias, shift):
    op = "vertical_conv2d"
    _check_float(op, [("input", x), ("weight", weight)] + ([("bias", bias)] if bias is not None else []))
    if x.dim() != 4 or weight.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"{op}: input [B, Cin, H, W] and weight [Cout, Cin, kh, kw] must be 4-D with matching Cin, "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.shape[3] % 2 == 0:
        raise ValueError(f"{op}: the kernel width must be odd (centred on the column), got {weight.shape[3]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not isinstance(shift, int) or shift < 0:
        raise ValueError(f"{op}: shift must be an int >= 0, got {shift!r}")
    return VCall(x, weight, bias, shift)


def _vertical_ref(c):
    kh, kw = c.weight.shape[2:]
    return F.conv2d(F.pad(c.x, (kw // 2, kw // 2, kh - 1 + c.shift, -c.shift)), c.weight, c.bias)


def _vertical_cpp(c):
    kh, kw = c.weight.shape[2:]
    return masked_conv2d_op(c.x, c.weight, c.bias, "V", 1, [kh - 1 + c.shift, kw // 2], [1, 1], "cpp")


def vertical_conv2d(input, weight, bias=None, *, shift=0, backend=None):
    """The vertical stack's convolution: every tap of a [Cout, Cin, kh, kw]
    kernel (kw odd), output the size of the input, output row y reading input
    rows y-shift-kh+1 .. y-shift. ``shift=0``: the stack itself (rows up to its
    own); ``shift=1`` with a 1x1 kernel: the link to the horizontal stack, which
    reads the row above. Backends: ``ref`` (zero-pad, conv2d) and ``cpp`` (the
    masked-conv CPU kernel in its 'V' mode: no padded copy, no crop)."""
    if isinstance(input, torch.Tensor):
        input, weight, bias = autocast(input.device.type, input, weight, bias)
    c = make_vertical_call(input, weight, bias, shift)
    return VERTICAL.run(c, input.device, backend)


# ---- registered kernel ops with autograd -----------------------------------------------------------------------

def _act_kernels(backend):
    if backend == "triton":
        from fastgen.kernels import gated as k
        return k.gated_activation_forward, k.gated_activation_backward
    return torch.ops.fastgen.gated_activation_forward, torch.ops.fastgen.gated_activation_backward


def _act_out_shape(x):
    return (x.shape[0], x.shape[1] // 2, *x.shape[2:])


def _fake_act_out(x):
    if x.dim() == 4:
        return torch.empty(_act_out_shape(x), dtype=x.dtype, device=x.device, memory_format=_kernel_layout(x))
    return x.new_empty(_act_out_shape(x))


def _fake_act_grads(x, cond, output_mask):
    gx = (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_kernel_layout(x)) if x.dim() == 4
          else x.new_empty(x.shape)) if output_mask[0] else x.new_empty(0)
    gc = torch.empty_like(cond) if (output_mask[1] and cond is not None) else x.new_empty(0)  # cond's layout
    return gx, gc


@torch.library.custom_op("fastgen::gated_activation", mutates_args=())
def gated_activation_op(x: torch.Tensor, cond: Optional[torch.Tensor], data_channels: int,
                        backend: str) -> torch.Tensor:
    return _act_kernels(backend)[0](x, cond, data_channels)


@gated_activation_op.register_fake
def _(x, cond, data_channels, backend):
    return _fake_act_out(x)


@torch.library.custom_op("fastgen::gated_activation_grad", mutates_args=())
def gated_activation_grad_op(grad_out: torch.Tensor, x: torch.Tensor, cond: Optional[torch.Tensor],
                             data_channels: int, backend: str, output_mask: List[bool]) -> List[torch.Tensor]:
    grads = _act_kernels(backend)[1](grad_out, x, cond, data_channels, output_mask)
    return asked_grads(grads, output_mask, x)


@gated_activation_grad_op.register_fake
def _(grad_out, x, cond, data_channels, backend, output_mask):
    return list(_fake_act_grads(x, cond, output_mask))


def _act_setup(ctx, inputs, output):
    x, cond, data_channels, backend = inputs
    ctx.save_for_backward(x, cond)
    ctx.args = (data_channels, backend)
    ctx.explicit = explicit()


def _act_backward(ctx, grad_out):
    x, cond = ctx.saved_tensors
    need = [ctx.needs_input_grad[0], cond is not None and ctx.needs_input_grad[1]]
    # a conditioning map enters as x + cond: its gradient is grad_x itself, handed to both (as add's backward
    # does) rather than written twice
    full_map = cond is not None and cond.shape == x.shape
    ask = [need[0] or (need[1] and full_map), need[1] and not full_map]
    data_channels, backend = ctx.args

    def ref_grads():
        return vjp(lambda x, c: ref.gated_activation(x, c, data_channels), (x, cond), ask, (grad_out,))

    grads = ACT.backward(backend, ctx.explicit, lambda: gated_activation_grad_op(
        grad_out.contiguous(memory_format=_kernel_layout(grad_out)) if grad_out.dim() == 4 else grad_out.contiguous(),
        x, cond, *ctx.args, ask), ref_grads)
    grad_cond = (grads[0] if full_map else grads[1]) if need[1] else None
    return grads[0] if need[0] else None, grad_cond, None, None


gated_activation_op.register_autograd(_act_backward, setup_context=_act_setup)


def _conv_out_shape(x, weight):
    return (x.shape[0], weight.shape[0] // 2, x.shape[2], x.shape[3])


@torch.library.custom_op("fastgen::gated_conv2d", mutates_args=())
def gated_conv2d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    cond: Optional[torch.Tensor], stack: str, mask_type: str, data_channels: int) -> torch.Tensor:
    from fastgen.kernels import gated as k
    return k.gated_conv2d_forward(x, weight, bias, cond, stack, mask_type, data_channels)


@gated_conv2d_op.register_fake
def _(x, weight, bias, cond, stack, mask_type, data_channels):
    return torch.empty(_conv_out_shape(x, weight), dtype=x.dtype, device=x.device, memory_format=_kernel_layout(x))


@torch.library.custom_op("fastgen::gated_conv2d_grad", mutates_args=())
def gated_conv2d_grad_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         cond: Optional[torch.Tensor], stack: str, mask_type: str, data_channels: int,
                         output_mask: List[bool]) -> List[torch.Tensor]:
    """[grad_x, grad_weight, grad_bias, grad_cond]; an entry not asked for is empty."""
    from fastgen.kernels import gated as k
    grads = k.gated_conv2d_backward(grad_out, x, weight, bias, cond, stack, mask_type, data_channels, output_mask)
    return asked_grads(grads, output_mask, x)


@gated_conv2d_grad_op.register_fake
def _(grad_out, x, weight, bias, cond, stack, mask_type, data_channels, output_mask):
    # grad_x, and a conditioning map's gradient (the gradient of the pre-activation), follow x's layout
    full_cond = cond is not None and cond.dim() == 4
    out = [torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_kernel_layout(x)),
           weight.new_empty(weight.shape), weight.new_empty(weight.shape[:1]),
           None if cond is None else (torch.empty(cond.shape, dtype=cond.dtype, device=cond.device,
                                                  memory_format=_kernel_layout(x)) if full_cond
                                      else cond.new_empty(cond.shape))]
    return [g if (need and g is not None) else x.new_empty(0) for g, need in zip(out, output_mask)]


def _conv_setup(ctx, inputs, output):
    x, weight, bias, cond, stack, mask_type, data_channels = inputs
    ctx.save_for_backward(x, weight, bias, cond)
    ctx.args = (stack, mask_type, data_channels)
    ctx.explicit = explicit()


def _conv_backward(ctx, grad_out):
    x, weight, bias, cond = ctx.saved_tensors
    need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2],
            cond is not None and ctx.needs_input_grad[3]]

    def ref_grads():
        return vjp(lambda x, w, b, c: ref.gated_conv2d(x, w, b, c, *ctx.args), (x, weight, bias, cond), need,
                   (grad_out,))

    grads = CONV.backward("triton", ctx.explicit, lambda: gated_conv2d_grad_op(
        grad_out.contiguous(memory_format=_kernel_layout(grad_out)), x, weight, bias, cond, *ctx.args, need),
        ref_grads)
    return tuple(g if n else None for g, n in zip(grads, need)) + (None, None, None)


gated_conv2d_op.register_autograd(_conv_backward, setup_context=_conv_setup)


def _register_cpp_fakes():
    @torch.library.register_fake("fastgen::gated_activation_forward")
    def _(x, cond, data_channels):
        return _fake_act_out(x)

    @torch.library.register_fake("fastgen::gated_activation_backward")
    def _(grad_out, x, cond, data_channels, output_mask):
        return _fake_act_grads(x, cond, output_mask)


def _cpp_unavailable():
    return _ext.cpp_op_unavailable("gated_activation_forward", "gated_activation")


if _cpp_unavailable() is None:
    _register_cpp_fakes()


# ---- backends and dispatch -------------------------------------------------------------------------------------

def _triton_why_not(dtypes):
    def why_not(c):
        return _ext.triton_why_not(c.x.device.type) or takes("triton", c.x.device.type, dtypes)(c)
    return why_not


def _composed(c):
    pre = stack_conv2d(c.x, c.weight, c.bias, c.stack, c.mask_type, c.data_channels)
    return gated_activation(pre, c.cond, data_channels=c.data_channels)


# Measured preference (benchmarks/RESULTS.md; 2-core AVX-512 CPU, fp32, 2 threads):
# * gated_activation: cpp 5.4-6.7x faster than eager forward, 3.5-6.4x forward+backward at [16,128,28,28]
#   and [32,256,32,32] (1 thread); its portable path (AVX2 build) still ~2.5x faster than eager per element.
# * vertical_conv2d, fwd+bwd, 2x3 (bench_gated.py 'vertical'): cpp (Winograd F(2x2, 2x3)) 13.8-14.0 ms against
#   conv2d (oneDNN, with its padded copy) 20.2-21.2 at [16,64->128,28x28], 113-140 against 209-241 at
#   [32,128->256,32x32]; the 1x1 link with its shift: cpp 2.7 / 6.2 ms fwd / bwd against 2.6 / 6.8 plus a
#   slice copy and a pad copy. cpp first on AVX-512 CPUs only (as masked_conv2d).
# CUDA: not yet measured on a GPU; the framework's ops (ref / composed) until the Triton kernels have been
# timed there.
ACT_PREFERENCE = {"cpu": ["cpp", "ref"], "cuda": ["ref"]}
CONV_PREFERENCE = {"cpu": ["composed", "ref"], "cuda": ["composed", "ref"]}
VERTICAL_PREFERENCE = {"cpu": (["cpp"] if _CPP_FAST else []) + ["ref"], "cuda": ["ref"]}

def _act_kernel_runner(backend):
    def run(c):
        cond = c.cond
        if cond is not None and cond.dim() == 4:  # a conditioning map in x's layout: one layout rule for all kernels
            cond = cond.contiguous(memory_format=_kernel_layout(c.x))
        return gated_activation_op(c.x, cond, c.data_channels, backend)
    return run


ACT = new_op("gated_activation", ACT_PREFERENCE)
ACT.register("ref", lambda c: ref.gated_activation(*c))
ACT.register("cpp", _act_kernel_runner("cpp"), why_not=takes("cpp", "cpu", F32_F64), unavailable=_cpp_unavailable)
ACT.register("triton", _act_kernel_runner("triton"), why_not=_triton_why_not(TRITON_DTYPES),
             unavailable=_ext.triton_unavailable)

VERTICAL = new_op("vertical_conv2d", VERTICAL_PREFERENCE)
VERTICAL.register("ref", _vertical_ref)
VERTICAL.register("cpp", _vertical_cpp, why_not=takes("cpp", "cpu", F32_F64), unavailable=_ext.cpp_unavailable)

CONV = new_op("gated_conv2d", CONV_PREFERENCE)
CONV.register("ref", lambda c: ref.gated_conv2d(*c))
CONV.register("composed", _composed)
CONV.register("triton", lambda c: gated_conv2d_op(*c), why_not=_triton_why_not(TRITON_DTYPES),
              unavailable=_ext.triton_unavailable)


def gated_activation(input, cond=None, *, data_channels=1, backend=None):
    """``tanh(f) * sigmoid(g)`` of ``input + cond``: input [B, 2C, ...] -> [B, C, ...].
    ``cond``: None, [B, 2C] (a bias per sample and channel, e.g. a class
    embedding) or input's shape (a conditioning map). With ``data_channels``
    colour blocks, each block is split into its f and g halves (fastgen.ref.gated)."""
    if isinstance(input, torch.Tensor):
        input, cond = autocast(input.device.type, input, cond)
    c = make_act_call(input, cond, data_channels)
    return ACT.run(c, input.device, backend)


def gated_conv2d(input, weight, bias=None, cond=None, *, stack="horizontal", mask_type="B", data_channels=1,
                 backend=None):
    """The gated convolution of one stack of a Gated PixelCNN layer:
    ``gated_activation(conv(input) + bias + cond)``, output [B, C, H, W] for a
    weight of 2C output channels. ``stack``: 'vertical' (weight [2C, Cin, kv, kw],
    rows y-kv+1..y) or 'horizontal' (weight [2C, Cin, 1, kc], the kc-1 pixels to
    the left and the pixel itself under ``mask_type``). See fastgen.ref.gated."""
    if isinstance(input, torch.Tensor):
        input, weight, bias, cond = autocast(input.device.type, input, weight, bias, cond)
    c = make_conv_call(input, weight, bias, cond, stack, mask_type, data_channels)
    return CONV.run(c, input.device, backend)


# ---- the op contract (tests/test_op_contract.py) -----------------------------------------------------------

def _act_example(batch, dtype, device, gen):
    """Three colour blocks, an odd 5 x 3 image, a [B, 2C] conditioning bias (its gradient sums positions)."""
    x = example_randn((batch, 12, 5, 3), dtype, device, gen)
    return (x, example_randn((batch, 12), dtype, device, gen)), dict(data_channels=3)


def _conv_example(batch, dtype, device, gen):
    """The horizontal stack, mask A, three colour blocks, a conditioning map."""
    x = example_randn((batch, 3, 5, 7), dtype, device, gen)
    w = example_randn((12, 3, 1, 3), dtype, device, gen, scale=1 / 3)
    b = example_randn((12,), dtype, device, gen)
    cond = example_randn((batch, 12, 5, 7), dtype, device, gen)
    return (x, w, b, cond), dict(stack="horizontal", mask_type="A", data_channels=3)


def _vertical_example(batch, dtype, device, gen):
    x = example_randn((batch, 5, 6, 7), dtype, device, gen)
    return (x, example_randn((6, 5, 2, 3), dtype, device, gen), example_randn((6,), dtype, device, gen)), {}


def _bad(error, message, *shapes, dtypes=(), **kwargs):
    """A call of tensors of ``shapes`` (zeros; float32 unless ``dtypes`` says otherwise; None stays None)."""
    def make(device):
        ts = [None if s is None else torch.zeros(s, device=device).to(dtypes[i] if i < len(dtypes) else torch.float32)
              for i, s in enumerate(shapes)]
        return tuple(ts), kwargs
    return BadCall(make, error, message)


ACT.set_examples(Examples(gated_activation, _act_example, [
    _bad(ValueError, "it needs a positive multiple of 2*data_channels", (2, 5, 3, 3)),
    _bad(ValueError, "it needs a positive multiple of 2*data_channels (= 4)", (2, 6, 3, 3), data_channels=2),
    _bad(TypeError, "input must be float16, bfloat16, float32 or float64", (2, 4, 3, 3), dtypes=(torch.int64,)),
    _bad(ValueError, "cond must have shape (2, 4)", (2, 4, 3, 3), (2, 4, 3)),
    _bad(TypeError, "must share one dtype", (2, 4, 3, 3), (2, 4), dtypes=(torch.float32, torch.float64)),
    _bad(ValueError, "input must be [batch, 2*C, ...]", (4,)),
    _bad(ValueError, "data_channels must be a positive int", (2, 4, 3, 3), data_channels=0),
]))

CONV.set_examples(Examples(gated_conv2d, _conv_example, [
    _bad(ValueError, "stack must be one of", (1, 2, 4, 4), (8, 2, 2, 3), stack="diagonal"),
    _bad(ValueError, "must be 1 x kc", (1, 2, 4, 4), (8, 2, 2, 3)),
    _bad(ValueError, "needs an odd width", (1, 2, 4, 4), (8, 2, 2, 2), stack="vertical"),
    _bad(ValueError, "input has 3 channels but weight expects 2", (1, 3, 4, 4), (8, 2, 1, 2)),
    _bad(ValueError, "output channels must be a positive multiple of 2*data_channels", (1, 2, 4, 4), (7, 2, 1, 2)),
    _bad(ValueError, "bias must have shape (8,)", (1, 2, 4, 4), (8, 2, 1, 2), (4,)),
    _bad(ValueError, "cond must have shape (1, 8)", (1, 2, 4, 4), (8, 2, 1, 2), None, (1, 8, 4)),
    _bad(ValueError, "mask_type must be 'A' or 'B'", (1, 2, 4, 4), (8, 2, 1, 2), mask_type="C"),
    _bad(ValueError, "input and weight must be 4-D", (2, 4, 4), (8, 2, 1, 2)),
]))

VERTICAL.set_examples(Examples(vertical_conv2d, _vertical_example, [
    _bad(ValueError, "the kernel width must be odd", (1, 2, 4, 4), (3, 2, 2, 2)),
    _bad(ValueError, "shift must be an int >= 0", (1, 2, 4, 4), (3, 2, 2, 3), shift=-1),
    _bad(ValueError, "must be 4-D with matching Cin", (1, 3, 4, 4), (3, 2, 2, 3)),
    _bad(ValueError, "bias must have shape (3,)", (1, 2, 4, 4), (3, 2, 2, 3), (2,)),
    _bad(TypeError, "must share one dtype", (1, 2, 4, 4), (3, 2, 2, 3), dtypes=(torch.float32, torch.float64)),
]))
