"""PixelCNN++'s discretized logistic mixture: the NLL and the sampler. See
fastgen.ref.dmol for the math and the parameter layout.

``discretized_mix_logistic_nll(x, params)`` backends:
* ``ref``     plain PyTorch (fastgen.ref.dmol): any device
* ``cpp``     one fused pass each way on CPU (csrc/cpu/dmol.cpp): the forward writes
              only the per-pixel NLL, the backward only the gradient of params
* ``triton``  the same on GPUs (kernels/dmol.py; CPU tensors under TRITON_INTERPRET=1)

``sample_discretized_mix_logistic(params)``: the ref sampler with uniforms from
a seeded CPU generator (same seed, same images on every device).
"""
from typing import NamedTuple

import torch

from fastgen import _ext
from fastgen._dispatch import BadCall, Examples, example_randn, explicit, new_op, takes, vjp
from fastgen._seed import generator
from fastgen.ref import dmol as ref
from fastgen.ref.dmol import infer_nr_mix
from fastgen.ref.precision import REDUCTIONS, compute_dtype, output_dtype, reduce_rows

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
OP_NAME = "discretized_mix_logistic_nll"


class Call(NamedTuple):
    x: torch.Tensor
    params: torch.Tensor
    nr_mix: int
    reduction: str


def _layout_error(op, c, k, nr_mix=None):
    want = f"{3 if c == 1 else 10} * nr_mix" if c in (1, 3) else "3 * nr_mix (C = 1) or 10 * nr_mix (C = 3)"
    given = f" with nr_mix={nr_mix}" if nr_mix is not None else ""
    return ValueError(f"{op}: params has {k} channels{given}, which fits no PixelCNN++ layout for {c}-channel data: "
                      f"K must be {want} (logits, then means, log-scales{' and coefficients' if c == 3 else ''})")


def check_params(op, params, channels, nr_mix):
    """nr_mix for params [B, K, H, W] of ``channels``-channel data (given or inferred), or a clear error."""
    if not isinstance(params, torch.Tensor):
        raise TypeError(f"{op}: params must be a tensor, got {type(params).__name__}")
    if params.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: params must be float16, bfloat16, float32 or float64, got {params.dtype}")
    if params.dim() != 4:
        raise ValueError(f"{op}: params must be 4-D [B, K, H, W], got shape {tuple(params.shape)}")
    if channels not in (1, 3):
        raise ValueError(f"{op}: the data must have 1 or 3 channels, got {channels}")
    k = params.shape[1]
    if nr_mix is None:
        nr_mix = infer_nr_mix(channels, k)
        if nr_mix is None:
            raise _layout_error(op, channels, k)
    elif not isinstance(nr_mix, int) or nr_mix < 1 or k != (3 if channels == 1 else 10) * nr_mix:
        raise _layout_error(op, channels, k, nr_mix)
    return nr_mix


def make_call(x, params, nr_mix, reduction):
    op = OP_NAME
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D [B, C, H, W] with C = 1 or 3, got shape {tuple(x.shape)}")
    nr_mix = check_params(op, params, x.shape[1], nr_mix)
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating tensor in [-1, 1] (2v/255 - 1 for pixel values v), got {x.dtype}")
    if x.device != params.device:
        raise ValueError(f"{op}: x and params must be on one device, got {x.device} and {params.device}")
    if (x.shape[0], x.shape[2], x.shape[3]) != (params.shape[0], params.shape[2], params.shape[3]):
        raise ValueError(f"{op}: x {tuple(x.shape)} and params {tuple(params.shape)} must agree in batch, height "
                         f"and width")
    if x.numel():
        lo, hi = torch.aminmax(x)  # one pass over x
        if lo < -1 or hi > 1:
            raise ValueError(f"{op}: x must be in [-1, 1] (pixel value v as 2v/255 - 1), got values in "
                             f"[{lo.item():.4g}, {hi.item():.4g}]")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return Call(x, params, nr_mix, reduction)


# ---- kernels and autograd -----------------------------------------------------------------------------------

@torch.library.custom_op("fastgen::dmol_nll_triton_forward", mutates_args=())
def triton_forward(x: torch.Tensor, params: torch.Tensor, nr_mix: int) -> torch.Tensor:
    from fastgen.kernels import dmol as k
    return k.dmol_nll_forward(x, params, nr_mix)


@triton_forward.register_fake
def _(x, params, nr_mix):
    return x.new_empty((x.shape[0], x.shape[2], x.shape[3]), dtype=torch.float32)


@torch.library.custom_op("fastgen::dmol_nll_triton_backward", mutates_args=())
def triton_backward(grad_nll: torch.Tensor, x: torch.Tensor, params: torch.Tensor, nr_mix: int) -> torch.Tensor:
    from fastgen.kernels import dmol as k
    return k.dmol_nll_backward(grad_nll, x, params, nr_mix)


@triton_backward.register_fake
def _(grad_nll, x, params, nr_mix):
    return torch.empty_like(params)


def _kernels(backend):
    if backend == "triton":
        return triton_forward, triton_backward
    return torch.ops.fastgen.dmol_nll_forward, torch.ops.fastgen.dmol_nll_backward


class DmolNLL(torch.autograd.Function):
    """The per-pixel NLL [B, H, W] (float32; float64 for float64 params) on a kernel backend. Only x and
    params are saved: the backward recomputes everything else."""

    @staticmethod
    def forward(ctx, x, params, nr_mix, backend):
        ctx.save_for_backward(x, params)
        ctx.args = (nr_mix, backend)
        ctx.explicit = explicit()
        return _kernels(backend)[0](x, params, nr_mix)

    @staticmethod
    def backward(ctx, grad):
        x, params = ctx.saved_tensors
        nr_mix, backend = ctx.args
        if not ctx.needs_input_grad[1]:
            return None, None, None, None

        def ref_grads():
            return vjp(lambda p: ref.discretized_mix_logistic_nll(x, p, nr_mix, "none"), (params,), [True],
                       (grad,))[0]

        grad_params = OP.backward(backend, ctx.explicit, lambda: _kernels(backend)[1](grad.contiguous(), x, params,
                                                                                       nr_mix), ref_grads)
        return None, grad_params, None, None


def _register_cpp_fakes():
    @torch.library.register_fake("fastgen::dmol_nll_forward")
    def _(x, params, nr_mix):
        return x.new_empty((x.shape[0], x.shape[2], x.shape[3]), dtype=compute_dtype(params.dtype))

    @torch.library.register_fake("fastgen::dmol_nll_backward")
    def _(grad_nll, x, params, nr_mix):
        return torch.empty_like(params)


def _cpp_unavailable():
    return _ext.cpp_op_unavailable("dmol_nll_forward", "discretized_mix_logistic_nll")


if _cpp_unavailable() is None:
    _register_cpp_fakes()


def _kernel_runner(backend):
    def run(c):
        nll = DmolNLL.apply(c.x.to(c.params.dtype), c.params, c.nr_mix, backend)  # per pixel, in the math type
        return reduce_rows(nll, c.reduction).to(output_dtype(c.params.dtype, c.reduction))
    return run


TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _params(c):
    return c.params


def _triton_why_not(c):
    return (_ext.triton_why_not(c.params.device.type)
            or takes("triton", c.params.device.type, TRITON_DTYPES, _params)(c))


# Measured preference: see benchmarks/RESULTS.md (bench_dmol.py). CUDA: the Triton kernels have run only
# under the interpreter; they come first because ref is the usual port's ~20 full-size passes.
PREFERENCE = {"cpu": ["cpp", "ref"], "cuda": ["triton", "ref"]}
OP = new_op(OP_NAME, PREFERENCE)
OP.register("ref", lambda c: ref.discretized_mix_logistic_nll(c.x, c.params, c.nr_mix, c.reduction))
OP.register("cpp", _kernel_runner("cpp"), why_not=takes("cpp", "cpu", FLOAT_DTYPES, _params),
            unavailable=_cpp_unavailable)
OP.register("triton", _kernel_runner("triton"), why_not=_triton_why_not, unavailable=_ext.triton_unavailable)


def discretized_mix_logistic_nll(x, params, *, nr_mix=None, reduction="sum", backend=None):
    """PixelCNN++'s negative log-likelihood in nats: x [B, C, H, W] in [-1, 1]
    (C = 1 or 3), params [B, K, H, W] in the original's layout (K = 3 nr_mix
    for one channel, 10 nr_mix for RGB; nr_mix inferred when not given).
    ``reduction``: 'sum' (per image, [B]), 'mean' (over images), 'none' (per
    pixel, [B, H, W]). The per-pixel NLL has params' dtype; a reduced one of
    float16 or bfloat16 params is float32 (an image's NLL overflows float16
    where float32 holds it: fastgen.ref.precision)."""
    c = make_call(x, params, nr_mix, reduction)
    return OP.run(c, params.device, backend)


def sample_discretized_mix_logistic(params, *, channels=None, nr_mix=None, seed=None, temperature=1.0):
    """x on the 256 levels in [-1, 1], [B, C, H, W], float32 (float64 for float64
    params: bfloat16 cannot hold every level), drawn from the mixture of every
    pixel independently (a whole image is sampled pixel by pixel: PixelCNNpp.sample).
    ``channels`` is inferred from K when it fits one layout only; ``seed``: an
    int in [0, 2**63) keying the uniforms' CPU generator (None: a seed drawn from
    torch's default generator, so torch.manual_seed makes it reproducible)."""
    op = "sample_discretized_mix_logistic"
    if not isinstance(params, torch.Tensor) or params.dim() != 4:
        raise ValueError(f"{op}: params must be a 4-D tensor [B, K, H, W]")
    if channels is None:
        fits = [c for c in (1, 3) if infer_nr_mix(c, params.shape[1]) is not None]
        if len(fits) != 1:
            raise ValueError(f"{op}: K = {params.shape[1]} fits {'both layouts' if fits else 'no layout'} "
                             f"(3 nr_mix for 1 channel, 10 nr_mix for 3): pass channels=")
        channels = fits[0]
    nr_mix = check_params(op, params, channels, nr_mix)
    if not temperature > 0:
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}")
    b, _, h, w = params.shape
    gen = generator(seed, op)
    u_mix = torch.rand(b, h, w, generator=gen, dtype=torch.float64)
    u_log = torch.rand(b, channels, h, w, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        return ref.sample_discretized_mix_logistic(params, channels, nr_mix, u_mix.to(params.device),
                                                   u_log.to(params.device), temperature)


# ---- the op contract (tests/test_op_contract.py) -----------------------------------------------------------

def _example(batch, dtype, device, gen):
    """RGB on the 256 levels (both edge levels present where there is a pixel), an odd 5 x 3 image, 2 components;
    x takes no gradient."""
    v = torch.randint(0, 256, (batch, 3, 5, 3), generator=gen)
    if v.numel():
        v.view(-1)[0], v.view(-1)[-1] = 0, 255
    x = (v.double() / 127.5 - 1).to(device=device, dtype=dtype)
    return (x, example_randn((batch, 20, 5, 3), dtype, device, gen)), {}


def _bad(error, message, x=(1, 3, 2, 2), params=(1, 30, 2, 2), dtypes=(torch.float32, torch.float32), fill=0.0,
         **kwargs):
    def make(device):
        return (torch.full(x, fill, device=device).to(dtypes[0]), torch.zeros(params, device=device).to(dtypes[1])), \
            kwargs
    return BadCall(make, error, message)


OP.set_examples(Examples(discretized_mix_logistic_nll, _example, [
    _bad(ValueError, "params has 31 channels, which fits no PixelCNN++ layout", params=(1, 31, 2, 2)),
    _bad(ValueError, "K must be 3 * nr_mix", x=(1, 1, 2, 2), params=(1, 10, 2, 2)),
    _bad(ValueError, "params has 30 channels with nr_mix=4", nr_mix=4),
    _bad(ValueError, "the data must have 1 or 3 channels, got 2", x=(1, 2, 2, 2)),
    _bad(ValueError, "x must be in [-1, 1]", fill=1.5),
    _bad(ValueError, "must agree in batch, height and width", params=(2, 30, 2, 2)),
    _bad(ValueError, "must agree in batch, height and width", x=(1, 3, 2, 3)),
    _bad(TypeError, "x must be a floating tensor", dtypes=(torch.int64, torch.float32)),
    _bad(TypeError, "params must be float16, bfloat16, float32 or float64", dtypes=(torch.float32, torch.int64)),
    _bad(ValueError, "x must be 4-D", x=(3, 2, 2)),
    _bad(ValueError, "reduction must be one of", reduction="avg"),
    BadCall(lambda device: (([0.0], torch.zeros(1, 30, 2, 2)), {}), TypeError, "x must be a tensor"),
]))
