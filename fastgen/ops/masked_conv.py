"""masked_conv2d: checks, backends, the registered ops with autograd, and the
functional. Backends:

* ``ref``        conv with weight * mask (fastgen.ref.masked_conv)
* ``decomposed`` only the unmasked taps, with the framework's convolutions: the
                 k//2 rows above as one conv, the centre row's left part (and the
                 centre, where visible) as another; any device
* ``halfconv``   one conv over the kernel's upper half (rows 0..k//2), the right
                 part of the centre row zeroed: wastes kw//2 taps of
                 (k//2+1)*kw but makes one call instead of two; any device
* ``cpp``        C++ CPU kernel (csrc/cpu/masked_conv.cpp), fastgen._C
* ``cuda``       direct CUDA kernels (csrc/cuda/masked_conv.cu), built where torch has CUDA
* ``triton``     implicit GEMM over the unmasked taps (kernels/masked_conv.py)
"""
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from fastgen import _ext
from fastgen._dispatch import BadCall, Examples, autocast, example_randn, explicit, new_op, takes, vjp
from fastgen.ref import masked_conv as ref

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Call(NamedTuple):
    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    mask_type: str
    data_channels: int
    padding: Tuple[int, int]
    dilation: Tuple[int, int]


def _pair(v, name):
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return tuple(v)
    raise TypeError(f"masked_conv2d: {name} must be an int or a pair of ints, got {v!r}")


def check_layer_args(in_channels, out_channels, kernel_size, mask_type, data_channels,
                     stride=1, groups=1, padding_mode="zeros"):
    """The checks that need no input tensor (shared by MaskedConv2d.__init__)."""
    kh, kw = _pair(kernel_size, "kernel_size")
    if mask_type not in ("A", "B"):
        raise ValueError(f"masked_conv2d: mask_type must be 'A' or 'B', got {mask_type!r}")
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"masked_conv2d: kernel_size must be odd in both dimensions (a causal mask needs "
                         f"a centre tap), got {(kh, kw)}")
    if not isinstance(data_channels, int) or data_channels < 1:
        raise ValueError(f"masked_conv2d: data_channels must be a positive int, got {data_channels!r}")
    if in_channels % data_channels or out_channels % data_channels:
        raise ValueError(f"masked_conv2d: in_channels ({in_channels}) and out_channels ({out_channels}) must both "
                         f"be divisible by data_channels ({data_channels}): channels are split into "
                         f"data_channels contiguous colour blocks")
    if _pair(stride, "stride") != (1, 1):
        raise ValueError(f"masked_conv2d: only stride 1 is supported (a strided masked conv is not causal "
                         f"position by position), got stride={stride!r}")
    if groups != 1:
        raise ValueError(f"masked_conv2d: only groups=1 is supported, got groups={groups!r}")
    if padding_mode != "zeros":
        raise ValueError(f"masked_conv2d: only padding_mode='zeros' is supported (other modes copy future "
                         f"pixels into the padding), got {padding_mode!r}")


def same_padding(kernel_size, dilation):
    """The causal 'same' padding: output the size of the input."""
    return tuple(d * (k // 2) for k, d in zip(kernel_size, dilation))


def make_call(x, weight, bias, mask_type, data_channels, padding, dilation, stride=1, groups=1):
    """Check every argument; return a Call or raise an error that says what is wrong."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("masked_conv2d: input and weight must be tensors")
    if x.dim() != 4:
        raise ValueError(f"masked_conv2d: input must be 4-D [batch, channels, height, width], got shape "
                         f"{tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"masked_conv2d: weight must be 4-D [out_channels, in_channels, kh, kw], got shape "
                         f"{tuple(weight.shape)}")
    co, ci, kh, kw = weight.shape
    check_layer_args(ci, co, (kh, kw), mask_type, data_channels, stride, groups)
    for name, t in (("input", x), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"masked_conv2d: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"masked_conv2d: input, weight and bias must share a dtype, got input {x.dtype}, "
                        f"weight {weight.dtype}" + (f", bias {bias.dtype}" if bias is not None else ""))
    if weight.device != x.device or (bias is not None and bias.device != x.device):
        raise ValueError(f"masked_conv2d: input, weight and bias must be on one device, got input on {x.device}, "
                         f"weight on {weight.device}")
    if x.shape[1] != ci:
        raise ValueError(f"masked_conv2d: input has {x.shape[1]} channels but weight expects {ci}")
    if bias is not None and tuple(bias.shape) != (co,):
        raise ValueError(f"masked_conv2d: bias must have shape ({co},), got {tuple(bias.shape)}")
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"masked_conv2d: padding must be 'same', 'valid', an int or a pair, got {padding!r}")
        dilation = _pair(dilation, "dilation")
        padding = same_padding((kh, kw), dilation) if padding == "same" else (0, 0)
    padding, dilation = _pair(padding, "padding"), _pair(dilation, "dilation")
    if min(padding) < 0:
        raise ValueError(f"masked_conv2d: padding must be >= 0, got {padding}")
    if min(dilation) < 1:
        raise ValueError(f"masked_conv2d: dilation must be >= 1, got {dilation}")
    ho, wo = out_size(x.shape, (kh, kw), padding, dilation)
    if ho < 1 or wo < 1:
        raise ValueError(f"masked_conv2d: input {tuple(x.shape[2:])} is too small for kernel {(kh, kw)} with "
                         f"padding {padding} and dilation {dilation} (output would be {(ho, wo)})")
    return Call(x, weight, bias, mask_type, data_channels, padding, dilation)


def out_size(x_shape, kernel_size, padding, dilation):
    return tuple(x_shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) for i in range(2))


# ---- backends built from the framework's own convolutions -------------------------------------------------

def _subconv(c, w_sub, bias, r0, c0, ho, wo):
    """Convolution with the kernel's sub-block starting at tap (r0, c0): pad the
    input asymmetrically (negative pads crop) so a padding-free conv lines up."""
    (ph, pw), (dh, dw) = c.padding, c.dilation
    h, w = c.x.shape[2:]
    top, left = ph - r0 * dh, pw - c0 * dw
    bottom = ho + (w_sub.shape[2] - 1) * dh - h - top
    right = wo + (w_sub.shape[3] - 1) * dw - w - left
    return F.conv2d(F.pad(c.x, (left, right, top, bottom)), w_sub, bias, dilation=c.dilation)


def _centre_row(c, with_right_part):
    """Weight of the centre row [Co, Ci, 1, n]: the taps left of the centre, and
    the centre itself under the colour/mask-A/B rule where any of it is visible.
    ``with_right_part`` keeps the full row width (right part zeroed)."""
    w = c.weight
    co, ci, kh, kw = w.shape
    ch, cw = kh // 2, kw // 2
    centre_open = c.mask_type == "B" or c.data_channels > 1
    n = kw if with_right_part else cw + centre_open
    row = w[:, :, ch:ch + 1, :n]
    if n == 0:
        return row
    m = torch.zeros(co, ci, 1, n, dtype=w.dtype, device=w.device)
    m[:, :, 0, :cw] = 1
    if centre_open:
        m[:, :, 0, cw] = ref.centre_channel_mask(co, ci, c.mask_type, c.data_channels, w.device, w.dtype)
    if c.mask_type == "B" and c.data_channels == 1 and n == cw + 1:
        return row  # the mask is all ones: skip the multiply
    return row * m


def _unmasked(c):
    """A 1x1 mask-B layer with one data channel masks nothing: it is a plain conv."""
    return c.weight.shape[2:] == (1, 1) and c.mask_type == "B" and c.data_channels == 1


def _decomposed(c):
    if _unmasked(c):
        return F.conv2d(c.x, c.weight, c.bias, padding=c.padding)
    kh, kw = c.weight.shape[2:]
    ch = kh // 2
    ho, wo = out_size(c.x.shape, (kh, kw), c.padding, c.dilation)
    row = _centre_row(c, with_right_part=False)
    if row.shape[3] == 0:  # 1-row kernel, mask A: nothing but the rows above (or nothing at all)
        return _halfconv(c) if ch == 0 else _subconv(c, c.weight[:, :, :ch], c.bias, 0, 0, ho, wo)
    out = _subconv(c, row, c.bias, ch, 0, ho, wo)
    if ch > 0:
        out = out + _subconv(c, c.weight[:, :, :ch], None, 0, 0, ho, wo)
    return out


def _halfconv(c):
    if _unmasked(c):
        return F.conv2d(c.x, c.weight, c.bias, padding=c.padding)
    kh, kw = c.weight.shape[2:]
    ch = kh // 2
    ho, wo = out_size(c.x.shape, (kh, kw), c.padding, c.dilation)
    w_half = torch.cat([c.weight[:, :, :ch], _centre_row(c, with_right_part=True)], dim=2)
    return _subconv(c, w_half, c.bias, 0, 0, ho, wo)


def _ref(c):
    return ref.masked_conv2d(*c)


# ---- kernel backends: registered ops with autograd ---------------------------------------------------------

def _kernels(backend):
    """The forward/backward pair of a kernel backend (imported on first use)."""
    if backend == "triton":
        from fastgen.kernels import masked_conv as k
        return k.masked_conv2d_forward, k.masked_conv2d_backward
    if backend in ("cpp", "cuda"):  # one registered op, the dispatcher picks the device's kernel
        return torch.ops.fastgen.masked_conv2d_forward, torch.ops.fastgen.masked_conv2d_backward
    raise ValueError(f"masked_conv2d: {backend!r} is not a kernel backend")


@torch.library.custom_op("fastgen::masked_conv2d", mutates_args=())
def masked_conv2d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mask_type: str,
                     data_channels: int, padding: List[int], dilation: List[int], backend: str) -> torch.Tensor:
    fwd, _ = _kernels(backend)
    return fwd(x, weight, bias, mask_type, data_channels, padding, dilation)


def _kernel_layout(x):
    """Layout rule of every kernel backend, as torch's conv: channels_last (and not
    also contiguous) in -> output and grad_x channels_last; else NCHW-contiguous."""
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def _fake_output(x, weight, padding, dilation, mask_type="B"):
    ho, wo = out_size(x.shape, weight.shape[2:], padding, dilation)
    if mask_type == "V":  # the vertical stack's mode of the cpp kernel: as tall as the input (fastgen.ops.gated)
        ho = x.shape[2]
    return torch.empty((x.shape[0], weight.shape[0], ho, wo), dtype=x.dtype, device=x.device,
                       memory_format=_kernel_layout(x))


def _fake_grads(x, weight, output_mask):
    gx = (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_kernel_layout(x))
          if output_mask[0] else x.new_empty((0,)))
    gw = weight.new_empty(weight.shape if output_mask[1] else (0,))
    gb = weight.new_empty(weight.shape[:1] if output_mask[2] else (0,))
    return gx, gw, gb


@masked_conv2d_op.register_fake
def _(x, weight, bias, mask_type, data_channels, padding, dilation, backend):
    return _fake_output(x, weight, padding, dilation, mask_type)


@torch.library.custom_op("fastgen::masked_conv2d_grad", mutates_args=())
def masked_conv2d_grad_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask_type: str,
                          data_channels: int, padding: List[int], dilation: List[int], backend: str,
                          output_mask: List[bool]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias); an entry not asked for in output_mask is empty."""
    _, bwd = _kernels(backend)
    grads = bwd(grad_out, x, weight, mask_type, data_channels, padding, dilation, output_mask)
    return tuple(asked_grads(grads, output_mask, x))


def asked_grads(grads, output_mask, like):
    """A registered backward op's gradients: each one asked for is the kernel's, whatever its size (an empty
    batch's grad_x has no elements and is still grad_x, of its input's shape); each one not asked for is a
    fresh empty tensor (a registered op may not return its inputs or one tensor twice)."""
    out = []
    for i, (g, need) in enumerate(zip(grads, output_mask)):
        if need and not isinstance(g, torch.Tensor):
            raise RuntimeError(f"fastgen internal error: a backward kernel returned no gradient {i} though it was "
                               f"asked for")
        out.append(g if need else like.new_empty(0))
    return out


@masked_conv2d_grad_op.register_fake
def _(grad_out, x, weight, mask_type, data_channels, padding, dilation, backend, output_mask):
    return _fake_grads(x, weight, output_mask)


def _setup_context(ctx, inputs, output):
    x, weight, bias, mask_type, data_channels, padding, dilation, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (mask_type, data_channels, padding, dilation, backend)
    ctx.has_bias = bias is not None
    ctx.explicit = explicit()


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    mask_type, data_channels, padding, dilation, backend = ctx.args

    def ref_grads():
        gx, gw = vjp(lambda x, w: ref.masked_conv2d(x, w, None, mask_type, data_channels, padding, dilation),
                     (x, weight), need[:2], (grad_out,))
        return gx, gw, grad_out.sum((0, 2, 3)).to(weight.dtype) if need[2] else None

    # channels_last grad_out is read in place; anything else (e.g. expanded) is made dense
    grads = OP.backward(backend, ctx.explicit, lambda: masked_conv2d_grad_op(
        grad_out.contiguous(memory_format=_kernel_layout(grad_out)), x, weight, *ctx.args, need), ref_grads)
    return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * 5


masked_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


def _register_kernel_fakes():
    """Fake (shape-only) versions of the C++ ops, for torch.compile and opcheck."""
    @torch.library.register_fake("fastgen::masked_conv2d_forward")
    def _(x, weight, bias, mask_type, data_channels, padding, dilation):
        return _fake_output(x, weight, padding, dilation, mask_type)

    @torch.library.register_fake("fastgen::masked_conv2d_backward")
    def _(grad_out, x, weight, mask_type, data_channels, padding, dilation, output_mask):
        return _fake_grads(x, weight, output_mask)


if _ext.cpp_unavailable() is None:
    _register_kernel_fakes()


def _kernel_runner(backend):
    def run(c):
        return masked_conv2d_op(c.x, c.weight, c.bias, c.mask_type, c.data_channels,
                                list(c.padding), list(c.dilation), backend)
    return run


def _triton_why_not(c):
    return _ext.triton_why_not(c.x.device.type) or takes("triton", c.x.device.type, TRITON_DTYPES)(c)


TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
F32_F64 = (torch.float32, torch.float64)


# Measured preference: the first backend here that can take a call runs it.
# CPU (benchmarks/RESULTS.md, 2 threads AMD EPYC, fp32, fwd+bwd median ms, common = mask-buffer conv):
#   (16, 64->64, 28x28, 7x7 A):  common 66.8, halfconv 46.7, decomposed 41.5, cpp 36.1
#   (16, 64->64, 28x28, 3x3 B):  common 14.3, halfconv 12.8, decomposed 12.5, cpp 8.8
#   (32, 128->128, 32x32, 3x3 B): common 141.0, halfconv 105.1, decomposed 123.1, cpp 87.6
# cpp wins everywhere it runs (fp32/fp64); halfconv is the steadier of the other two (forward:
# decomposed is 0.87x common on the large 3x3 B shape) and takes fp16/bf16.
# CUDA: not yet measured on a GPU; cuDNN through halfconv until the Triton kernel has been timed there.
# The cpp kernel's fast path needs AVX-512; its portable path (one BLAS GEMM per tap) measured
# 1.5-2x slower than halfconv here (7x7 A fwd+bwd 99.8 vs 51.5 ms), so elsewhere halfconv leads.
_CPP_FAST = torch.backends.cpu.get_cpu_capability() == "AVX512"
PREFERENCE = {
    "cpu": (["cpp"] if _CPP_FAST else []) + ["halfconv", "decomposed", "ref"],
    "cuda": ["halfconv", "decomposed", "ref"],
}

OP = new_op("masked_conv2d", PREFERENCE)
OP.register("ref", _ref)
OP.register("decomposed", _decomposed)
OP.register("halfconv", _halfconv)
OP.register("cpp", _kernel_runner("cpp"), why_not=takes("cpp", "cpu", F32_F64), unavailable=_ext.cpp_unavailable)
OP.register("cuda", _kernel_runner("cuda"), why_not=takes("cuda", "cuda", F32_F64),
            unavailable=_ext.cuda_ext_unavailable)
OP.register("triton", _kernel_runner("triton"), why_not=_triton_why_not, unavailable=_ext.triton_unavailable)


def masked_conv2d(input, weight, bias=None, padding=0, dilation=1, *, mask_type="B", data_channels=1,
                  stride=1, groups=1, backend=None):
    """Masked (causal) convolution: ``F.conv2d(input, weight * mask, bias, padding=padding,
    dilation=dilation)`` computing only the taps the mask keeps. Masked entries of
    ``weight`` are ignored and get zero gradient. ``padding="same"`` gives
    the causal same-size output (the fast path). See fastgen.ref.masked_conv for the mask."""
    if isinstance(input, torch.Tensor):
        input, weight, bias = autocast(input.device.type, input, weight, bias)
    c = make_call(input, weight, bias, mask_type, data_channels, padding, dilation, stride, groups)
    return OP.run(c, input.device, backend)


# ---- the op contract (tests/test_op_contract.py) -----------------------------------------------------------

def _example(batch, dtype, device, gen):
    """Mask A with three colour blocks, an odd 7 x 5 image, bias: the centre tap's colour rule in play."""
    x = example_randn((batch, 6, 7, 5), dtype, device, gen)
    w = example_randn((9, 6, 3, 3), dtype, device, gen)
    b = example_randn((9,), dtype, device, gen)
    return (x, w, b), dict(padding="same", mask_type="A", data_channels=3)


def _bad(error, message, kernel=3, x_shape=(1, 6, 8, 8), x_dtype=torch.float32, w_dtype=torch.float32,
         bias_shape=(6,), **kwargs):
    def make(device):
        x = torch.zeros(x_shape, device=device).to(x_dtype)
        w = torch.zeros(6, 6, kernel, kernel, dtype=w_dtype, device=device)
        return (x, w, torch.zeros(bias_shape, device=device)), dict(dict(padding="same"), **kwargs)
    return BadCall(make, error, message)


OP.set_examples(Examples(masked_conv2d, _example, [
    _bad(ValueError, "odd in both dimensions", kernel=4),
    _bad(ValueError, "only stride 1", stride=2),
    _bad(ValueError, "only groups=1", groups=2),
    _bad(ValueError, "mask_type must be 'A' or 'B'", mask_type="C"),
    _bad(ValueError, "mask_type must be 'A' or 'B'", mask_type="V"),  # 'V' is internal to the cpp kernel
    _bad(ValueError, "must both be divisible by data_channels (4)", data_channels=4),
    _bad(TypeError, "input must be float16, bfloat16, float32 or float64", x_dtype=torch.int64),
    _bad(TypeError, "must share a dtype", w_dtype=torch.float64),
    _bad(ValueError, "input has 5 channels but weight expects 6", x_shape=(1, 5, 8, 8)),
    _bad(ValueError, "input must be 4-D", x_shape=(6, 8, 8)),
    _bad(ValueError, "is too small for kernel", x_shape=(1, 6, 1, 1), padding=0),
    _bad(ValueError, "padding must be >= 0", padding=-1),
    _bad(ValueError, "padding must be 'same', 'valid'", padding="full"),
    _bad(ValueError, "dilation must be >= 1", dilation=0),
    _bad(ValueError, "bias must have shape (6,)", bias_shape=(5,)),
    BadCall(lambda device: (([1.0], torch.zeros(6, 6, 3, 3)), {}), TypeError, "input and weight must be tensors"),
]))
