"""reparameterize_kl: the VAE's z = mu + exp(logvar/2) eps and its Gaussian KL in
one pass, eps drawn inside the kernel from a seed and drawn again in the
backward pass, never stored. See fastgen.ref.reparameterize_kl for the math and
the noise stream. Backends:

* ``ref``     plain PyTorch (the stream's Philox on int64 tensors): any device
* ``cpp``     one fused pass each way on CPU (csrc/cpu/reparameterize_kl.cpp)
* ``triton``  one fused pass each way (kernels/reparameterize_kl.py)

All backends draw the same stream: the same seed gives the same z on every
backend and device, to the last bits of float32 log/cos/sin (each backend's
math library rounds those its own way; the Philox integers are identical).
"""
from typing import List, NamedTuple, Optional, Tuple

import torch

from fastgen import _ext
from fastgen._dispatch import BadCall, Examples, example_randn, explicit, new_op, takes, vjp
from fastgen._seed import check_seed, draw_seed
from fastgen.ref import reparameterize_kl as ref
from fastgen.ref.precision import REDUCTIONS, compute_dtype, output_dtype

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
OP_NAME = "reparameterize_kl"


class Call(NamedTuple):
    mu: torch.Tensor
    logvar: torch.Tensor
    prior_mu: Optional[torch.Tensor]
    prior_logvar: Optional[torch.Tensor]
    seed: int
    reduction: str


# ---- checks ----------------------------------------------------------------------------------------------------

def _check_tensor(name, t, mu):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{OP_NAME}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{OP_NAME}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if mu is not None and t.dtype != mu.dtype:
        raise TypeError(f"{OP_NAME}: {name} must have mu's dtype {mu.dtype}, got {t.dtype}")
    if mu is not None and t.device != mu.device:
        raise ValueError(f"{OP_NAME}: {name} must be on mu's device {mu.device}, got {t.device}")


def make_call(mu, logvar, prior_mu, prior_logvar, seed, reduction):
    _check_tensor("mu", mu, None)
    _check_tensor("logvar", logvar, mu)
    if mu.dim() == 0:
        raise ValueError(f"{OP_NAME}: mu must have a batch dimension (the KL is summed over all but the first), "
                         f"got a 0-d tensor")
    if logvar.shape != mu.shape:
        raise ValueError(f"{OP_NAME}: logvar must have mu's shape {tuple(mu.shape)}, got {tuple(logvar.shape)}")
    for name, p in (("prior_mu", prior_mu), ("prior_logvar", prior_logvar)):
        if p is None:
            continue
        _check_tensor(name, p, mu)
        try:
            shape = torch.broadcast_shapes(p.shape, mu.shape)
        except RuntimeError:
            shape = None
        if shape != mu.shape:
            raise ValueError(f"{OP_NAME}: {name} must have mu's shape {tuple(mu.shape)} or broadcast to it, "
                             f"got {tuple(p.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{OP_NAME}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    seed = draw_seed() if seed is None else check_seed(seed, OP_NAME)
    return Call(mu, logvar, prior_mu, prior_logvar, seed, reduction)


# ---- kernels and autograd ---------------------------------------------------------------------------------------
#
# Each kernel backend is a pair of registered ops with fake implementations (torch.compile sees opaque ops):
# the C++ schemas fastgen::reparameterize_kl_forward/backward (csrc/module.cpp) and, for Triton, the custom
# ops below around kernels/reparameterize_kl.py. A plain autograd.Function joins forward and backward: the op
# is elementwise and cheap, so the per-call overhead of a Python custom_op with register_autograd (about
# 0.1 ms each way) would cost more than the kernel itself at VAE sizes.

def _fake_forward(mu, elementwise):
    kl = torch.empty_like(mu) if elementwise else mu.new_empty(mu.shape[:1], dtype=compute_dtype(mu.dtype))
    return torch.empty_like(mu), kl


def _fake_backward(mu, output_mask):
    return tuple(torch.empty_like(mu) if need else mu.new_empty(0) for need in output_mask)


@torch.library.custom_op("fastgen::reparameterize_kl_triton_forward", mutates_args=())
def triton_forward(mu: torch.Tensor, logvar: torch.Tensor, prior_mu: Optional[torch.Tensor],
                   prior_logvar: Optional[torch.Tensor], seed: int,
                   elementwise: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    from fastgen.kernels import reparameterize_kl as k
    return k.reparameterize_kl_forward(mu, logvar, prior_mu, prior_logvar, seed, elementwise)


@triton_forward.register_fake
def _(mu, logvar, prior_mu, prior_logvar, seed, elementwise):
    return _fake_forward(mu, elementwise)


@torch.library.custom_op("fastgen::reparameterize_kl_triton_backward", mutates_args=())
def triton_backward(grad_z: Optional[torch.Tensor], grad_kl: Optional[torch.Tensor], mu: torch.Tensor,
                    logvar: torch.Tensor, prior_mu: Optional[torch.Tensor], prior_logvar: Optional[torch.Tensor],
                    seed: int, output_mask: List[bool]) -> List[torch.Tensor]:
    from fastgen.kernels import reparameterize_kl as k
    grads = k.reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, seed, output_mask)
    return [g if need else mu.new_empty(0) for g, need in zip(grads, output_mask)]  # fresh tensors only


@triton_backward.register_fake
def _(grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, seed, output_mask):
    return list(_fake_backward(mu, output_mask))


def _kernels(backend):
    if backend == "triton":
        return triton_forward, triton_backward
    return torch.ops.fastgen.reparameterize_kl_forward, torch.ops.fastgen.reparameterize_kl_backward


class ReparameterizeKL(torch.autograd.Function):
    """(z, kl) of contiguous tensors of one shape on a kernel backend; kl elementwise, or the row sums in
    float32 (float64 for float64). The backward draws eps again from the saved seed."""

    @staticmethod
    def forward(ctx, mu, logvar, prior_mu, prior_logvar, seed, elementwise, backend):
        z, kl = _kernels(backend)[0](mu, logvar, prior_mu, prior_logvar, seed, elementwise)
        ctx.save_for_backward(mu, logvar, prior_mu, prior_logvar)
        ctx.args = (seed, backend, elementwise)
        ctx.explicit = explicit()
        return z, kl

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        mu, logvar, prior_mu, prior_logvar = ctx.saved_tensors
        seed, backend, elementwise = ctx.args
        prior = prior_mu is not None
        need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], prior and ctx.needs_input_grad[2],
                prior and ctx.needs_input_grad[3]]
        if grad_kl is not None:  # the kernels read it in the math type
            grad_kl = grad_kl.to(compute_dtype(mu.dtype)).contiguous()

        def ref_grads():  # ref draws the same noise from the seed
            return vjp(lambda m, lv, pm, plv: ref.reparameterize_kl(m, lv, pm, plv, seed,
                                                                    "none" if elementwise else "sum"),
                       (mu, logvar, prior_mu, prior_logvar), need, (grad_z, grad_kl))

        grads = OP.backward(backend, ctx.explicit, lambda: _kernels(backend)[1](
            None if grad_z is None else grad_z.contiguous(), grad_kl, mu, logvar, prior_mu, prior_logvar, seed, need),
            ref_grads)
        return tuple(g if n else None for g, n in zip(grads, need)) + (None, None, None)


def _register_cpp_fakes():
    @torch.library.register_fake("fastgen::reparameterize_kl_forward")
    def _(mu, logvar, prior_mu, prior_logvar, seed, elementwise):
        return _fake_forward(mu, elementwise)

    @torch.library.register_fake("fastgen::reparameterize_kl_backward")
    def _(grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, seed, output_mask):
        return _fake_backward(mu, output_mask)


def _cpp_unavailable():
    return _ext.cpp_op_unavailable("reparameterize_kl_forward", "reparameterize_kl")


if _cpp_unavailable() is None:
    _register_cpp_fakes()


# ---- backends and dispatch -------------------------------------------------------------------------------------

def _kernel_runner(backend):
    def run(c):
        mu = c.mu.contiguous()
        # A missing prior parameter is the standard normal's (0); a broadcast one is expanded here and its
        # gradient summed back by autograd.
        prior = [None, None]
        if c.prior_mu is not None or c.prior_logvar is not None:
            prior = [(mu.new_zeros(()) if p is None else p).expand(mu.shape).contiguous()
                     for p in (c.prior_mu, c.prior_logvar)]
        z, kl = ReparameterizeKL.apply(mu, c.logvar.contiguous(), *prior, c.seed, c.reduction == "none", backend)
        if c.reduction == "mean":  # the kernels' row sums are in the math type already
            kl = kl.mean()
        return z, kl.to(output_dtype(mu.dtype, c.reduction))
    return run


def _mu(c):
    return c.mu


def _triton_why_not(c):
    return _ext.triton_why_not(c.mu.device.type) or takes("triton", c.mu.device.type, FLOAT_DTYPES, _mu)(c)


# Preference. CPU (benchmarks/RESULTS.md, bench_vae.py, 2-core AVX-512, fwd+bwd against the textbook code):
# cpp 2.5x at (256, 128) to 4.3x at (65536, 1024) float32, 2.3-3.5x bfloat16; ref is the textbook's passes plus
# a Philox on int64 tensors. CUDA: the Triton kernels have run only under the interpreter; they come first
# because the only other backend, ref, is that same int64 Philox (tens of passes over memory). Re-check with
# bench_vae.py on a GPU.
PREFERENCE = {"cpu": ["cpp", "ref"], "cuda": ["triton", "ref"]}

OP = new_op(OP_NAME, PREFERENCE)
OP.register("ref", lambda c: ref.reparameterize_kl(*c))
OP.register("cpp", _kernel_runner("cpp"), why_not=takes("cpp", "cpu", FLOAT_DTYPES, _mu), unavailable=_cpp_unavailable)
OP.register("triton", _kernel_runner("triton"), why_not=_triton_why_not, unavailable=_ext.triton_unavailable)


def reparameterize_kl(mu, logvar, *, prior_mu=None, prior_logvar=None, seed=None, reduction="sum", backend=None):
    """``(z, kl)``: ``z = mu + exp(logvar / 2) * eps`` with eps ~ N(0, 1) drawn from
    ``seed``, and the KL divergence from N(mu, exp(logvar)) to the prior
    N(prior_mu, exp(prior_logvar)) (the standard normal by default; either
    parameter may be given alone, or broadcast to mu's shape).

    ``reduction``: 'sum' (default) sums the KL over all but the first dimension
    ([B]); 'mean' averages those sums over the batch (a scalar); 'none' keeps it
    elementwise. z and an elementwise KL have mu's dtype; a reduced KL of
    float16 or bfloat16 inputs is float32 (its sums overflow float16 where
    float32 holds them: fastgen.ref.precision). ``seed``: an int in [0, 2**63);
    None draws one from torch's default generator (``torch.manual_seed`` makes it
    reproducible). The same seed gives the same eps, on every backend
    (fastgen.ref.reparameterize_kl)."""
    c = make_call(mu, logvar, prior_mu, prior_logvar, seed, reduction)
    return OP.run(c, mu.device, backend)


# ---- the op contract (tests/test_op_contract.py) -----------------------------------------------------------

def _example(batch, dtype, device, gen):
    """Rows of 7 x 3 with a prior mean broadcast over the batch (its gradient sums the rows) and a full prior
    log-variance."""
    mu = example_randn((batch, 7, 3), dtype, device, gen)
    logvar = example_randn((batch, 7, 3), dtype, device, gen)
    kwargs = dict(prior_mu=example_randn((7, 3), dtype, device, gen),
                  prior_logvar=example_randn((batch, 7, 3), dtype, device, gen, scale=0.5), seed=11)
    return (mu, logvar), kwargs


def _bad(error, message, mu=(2, 3), logvar=(2, 3), dtypes=(torch.float32, torch.float32), **kwargs):
    def make(device):
        return (torch.zeros(mu, device=device).to(dtypes[0]), torch.zeros(logvar, device=device).to(dtypes[1])), {
            k: torch.zeros(v, device=device) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    return BadCall(make, error, message)


OP.set_examples(Examples(reparameterize_kl, _example, [
    _bad(ValueError, "logvar must have mu's shape (2, 3)", logvar=(2, 4)),
    _bad(ValueError, "prior_mu must have mu's shape (2, 3) or broadcast to it", prior_mu=(4,)),
    _bad(ValueError, "prior_logvar must have mu's shape", prior_logvar=(2, 3, 1)),
    _bad(TypeError, "mu must be float16, bfloat16, float32 or float64", dtypes=(torch.int64, torch.float32)),
    _bad(TypeError, "logvar must be float16, bfloat16", dtypes=(torch.float32, torch.int32)),
    _bad(TypeError, "logvar must have mu's dtype", dtypes=(torch.float32, torch.float64)),
    _bad(ValueError, "reduction must be one of", reduction="avg"),
    _bad(ValueError, "mu must have a batch dimension", mu=(), logvar=()),
    _bad(ValueError, "seed must be an int in [0, 2**63), got -1", seed=-1),
    _bad(ValueError, "seed must be an int in [0, 2**63)", seed=2 ** 63),
    _bad(ValueError, "seed must be an int in [0, 2**63)", seed=1.5),
    _bad(ValueError, "seed must be an int in [0, 2**63)", seed=True),
    BadCall(lambda device: (([0.0], torch.zeros(1)), {}), TypeError, "mu must be a tensor"),
], tol={torch.float64: dict(rtol=1e-5, atol=1e-5)}))  # eps is drawn in float32 by each backend's own log/cos/sin
