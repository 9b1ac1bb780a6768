"""Triton kernels of discretized_mix_logistic_nll (spec: fastgen.ref.dmol).

One program takes BLOCK pixels of one image (grid (B, pixel blocks)) and
loops over the mixture's components, reading each parameter once per pass:

* forward: log P of every colour under component k, L_k = logit_k + sum_c,
  and running (online) log-sum-exps of the logits and of L; writes only the
  per-pixel NLL (fp32);
* backward: pass 1 repeats the forward's log-sum-exps, pass 2 recomputes each
  component and writes the gradient of every parameter: logits pi_k - r_k,
  means and log-scales -r_k dlp/dm, -r_k dlp/dlog_scale, coefficients through
  the colour means (see csrc/cpu/dmol.cpp for the derivatives). Nothing but
  x, params, the per-pixel upstream gradient and grad_params touches memory.

Params are read with their strides (NCHW or channels_last); grad_params is
written in params' layout. Math in fp32. tanh is 2 sigmoid(2v) - 1 and the
sigmoids and softplus take exp(-|v|) (no overflow; libdevice's tanh fails in
the interpreter).
"""
import torch
import triton
import triton.language as tl

from ._launch import INTERPRET, Launch, start
from .gated import _sigmoid, _tanh
from .masked_conv import _round_out

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# log(127.5); a global read inside a kernel must be a tl.constexpr: the compiler refuses a plain float (the
# interpreter takes it)
LOG_HALF_BINS = tl.constexpr(4.8481163645546632)


@triton.jit
def _softplus(v):
    return tl.maximum(v, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(v)))


@triton.jit
def _colour(x, m, ls_raw):
    """(log P(x | component), d/d mean, d/d raw log-scale) of one colour."""
    ls = tl.maximum(ls_raw, -7.0)
    s = tl.exp(-ls)
    d = x - m
    p = s * (d + 1.0 / 255.0)
    q = s * (d - 1.0 / 255.0)
    t = s * d
    # sigmoid and its complement, each without cancellation (1 - sigmoid(v) loses digits as v grows)
    ep = tl.exp(-tl.abs(p))
    eq = tl.exp(-tl.abs(q))
    sp = tl.where(p >= 0, 1.0 / (1.0 + ep), ep / (1.0 + ep))
    sp_c = tl.where(p >= 0, ep / (1.0 + ep), 1.0 / (1.0 + ep))
    sq = tl.where(q >= 0, 1.0 / (1.0 + eq), eq / (1.0 + eq))
    sq_c = tl.where(q >= 0, eq / (1.0 + eq), 1.0 / (1.0 + eq))
    delta = tl.where(q > 0, sq_c - sp_c, sp - sq)  # the bin's mass from the side where both terms are small
    left = x < -0.999
    right = x > 0.999
    mid = (delta > 1e-5) & ~left & ~right
    fallback = ~left & ~right & ~mid
    safe = tl.maximum(delta, 1e-12)
    lp = tl.where(left, -_softplus(-p), tl.where(right, -_softplus(q), tl.where(
        mid, tl.log(safe), t - ls - 2.0 * _softplus(t) - LOG_HALF_BINS)))
    gp = tl.where(left, sp_c, tl.where(mid, sp * sp_c / safe, 0.0))
    gq = tl.where(right, -sq, tl.where(mid, -sq * sq_c / safe, 0.0))
    gt = tl.where(fallback, 1.0 - 2.0 * _sigmoid(t), 0.0)
    d_mean = -s * (gp + gq + gt)
    d_ls = tl.where(fallback, -1.0, 0.0) - (p * gp + q * gq + t * gt)
    d_ls = tl.where(ls_raw >= -7.0, d_ls, 0.0)  # the clamp passes no gradient below -7
    return lp, d_mean, d_ls


@triton.jit
def _load(ptr, mask):
    return tl.load(ptr, mask=mask, other=0).to(tl.float32)


@triton.jit
def _component(base, k, M, sk, x0, x1, x2, mask, C: tl.constexpr):
    """L_k = logit_k + sum_c lp_ck of component k, with the derivatives by each colour's mean and log-scale
    and the tanh'd coefficients (zeros for one colour)."""
    logit = _load(base + k * sk, mask)
    PER: tl.constexpr = 3 if C == 3 else 2
    a0 = tl.zeros_like(x0)
    a1 = tl.zeros_like(x0)
    a2 = tl.zeros_like(x0)
    if C == 3:
        a0 = _tanh(_load(base + (M + 2 * M + k) * sk, mask))
        a1 = _tanh(_load(base + (M + 3 * M + 2 * M + k) * sk, mask))
        a2 = _tanh(_load(base + (M + 6 * M + 2 * M + k) * sk, mask))
    lp0, dm0, dl0 = _colour(x0, _load(base + (M + k) * sk, mask), _load(base + (2 * M + k) * sk, mask))
    total = logit + lp0
    dm1 = tl.zeros_like(x0)
    dl1 = tl.zeros_like(x0)
    dm2 = tl.zeros_like(x0)
    dl2 = tl.zeros_like(x0)
    if C == 3:
        m1 = _load(base + (M + PER * M + k) * sk, mask) + a0 * x0
        lp1, dm1, dl1 = _colour(x1, m1, _load(base + (M + PER * M + M + k) * sk, mask))
        m2 = _load(base + (M + 2 * PER * M + k) * sk, mask) + a1 * x0 + a2 * x1
        lp2, dm2, dl2 = _colour(x2, m2, _load(base + (M + 2 * PER * M + M + k) * sk, mask))
        total += lp1 + lp2
    return logit, total, dm0, dl0, dm1, dl1, dm2, dl2, a0, a1, a2


@triton.jit
def _pixels(x_ptr, b, pos, mask, HW, C: tl.constexpr):
    x0 = _load(x_ptr + (b * C) * HW + pos, mask)
    x1 = tl.zeros_like(x0)
    x2 = tl.zeros_like(x0)
    if C == 3:
        x1 = _load(x_ptr + (b * C + 1) * HW + pos, mask)
        x2 = _load(x_ptr + (b * C + 2) * HW + pos, mask)
    return x0, x1, x2


@triton.jit
def _log_sum_exps(base, M, sk, x0, x1, x2, mask, C: tl.constexpr, BLOCK: tl.constexpr):
    """(logsumexp_k logit_k, logsumexp_k L_k), online over the components."""
    max_logit = tl.full([BLOCK], float("-inf"), tl.float32)
    sum_logit = tl.zeros([BLOCK], tl.float32)
    max_l = tl.full([BLOCK], float("-inf"), tl.float32)
    sum_l = tl.zeros([BLOCK], tl.float32)
    for k in range(M):
        logit, total, _, _, _, _, _, _, _, _, _ = _component(base, k, M, sk, x0, x1, x2, mask, C)
        new = tl.maximum(max_logit, logit)
        sum_logit = sum_logit * tl.exp(max_logit - new) + tl.exp(logit - new)
        max_logit = new
        new = tl.maximum(max_l, total)
        sum_l = sum_l * tl.exp(max_l - new) + tl.exp(total - new)
        max_l = new
    return max_logit + tl.log(sum_logit), max_l + tl.log(sum_l)


@triton.jit
def _fwd_kernel(x_ptr, p_ptr, nll_ptr, HW, M, sb, sk, sp, C: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    pos = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = pos < HW
    x0, x1, x2 = _pixels(x_ptr, b, pos, mask, HW, C)
    lse_logit, lse_l = _log_sum_exps(p_ptr + b * sb + pos * sp, M, sk, x0, x1, x2, mask, C, BLOCK)
    tl.store(nll_ptr + b * HW + pos, lse_logit - lse_l, mask=mask)


@triton.jit
def _bwd_kernel(x_ptr, p_ptr, g_ptr, gp_ptr, HW, M, sb, sk, sp, C: tl.constexpr, CAST_F32: tl.constexpr,
                BLOCK: tl.constexpr):
    b = tl.program_id(0)
    pos = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = pos < HW
    x0, x1, x2 = _pixels(x_ptr, b, pos, mask, HW, C)
    base = p_ptr + b * sb + pos * sp
    gbase = gp_ptr + b * sb + pos * sp
    out_ty = gp_ptr.dtype.element_ty
    lse_logit, lse_l = _log_sum_exps(base, M, sk, x0, x1, x2, mask, C, BLOCK)
    gout = tl.load(g_ptr + b * HW + pos, mask=mask, other=0)
    PER: tl.constexpr = 3 if C == 3 else 2
    for k in range(M):
        logit, total, dm0, dl0, dm1, dl1, dm2, dl2, a0, a1, a2 = _component(base, k, M, sk, x0, x1, x2, mask, C)
        r = tl.exp(total - lse_l)
        w = -gout * r
        tl.store(gbase + k * sk, _round_out(gout * (tl.exp(logit - lse_logit) - r), out_ty, CAST_F32), mask=mask)
        tl.store(gbase + (M + k) * sk, _round_out(w * dm0, out_ty, CAST_F32), mask=mask)
        tl.store(gbase + (2 * M + k) * sk, _round_out(w * dl0, out_ty, CAST_F32), mask=mask)
        if C == 3:
            tl.store(gbase + (M + PER * M + k) * sk, _round_out(w * dm1, out_ty, CAST_F32), mask=mask)
            tl.store(gbase + (M + PER * M + M + k) * sk, _round_out(w * dl1, out_ty, CAST_F32), mask=mask)
            tl.store(gbase + (M + 2 * PER * M + k) * sk, _round_out(w * dm2, out_ty, CAST_F32), mask=mask)
            tl.store(gbase + (M + 2 * PER * M + M + k) * sk, _round_out(w * dl2, out_ty, CAST_F32), mask=mask)
            # m_1 = mu_1 + a_0 x_0, m_2 = mu_2 + a_1 x_0 + a_2 x_1; d tanh = 1 - a^2
            tl.store(gbase + (M + 2 * M + k) * sk, _round_out(w * dm1 * x0 * (1.0 - a0 * a0), out_ty, CAST_F32),
                     mask=mask)
            tl.store(gbase + (M + PER * M + 2 * M + k) * sk,
                     _round_out(w * dm2 * x0 * (1.0 - a1 * a1), out_ty, CAST_F32), mask=mask)
            tl.store(gbase + (M + 2 * PER * M + 2 * M + k) * sk,
                     _round_out(w * dm2 * x1 * (1.0 - a2 * a2), out_ty, CAST_F32), mask=mask)


# ---- launchers -------------------------------------------------------------------------------------------------

def _geometry(who, x, params, nr_mix):
    if params.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{who}: params must be float16, bfloat16 or float32, got {params.dtype}")
    if x.dim() != 4 or params.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"{who}: x [B, C, H, W] (C = 1 or 3) and params [B, K, H, W], got {tuple(x.shape)} and "
                         f"{tuple(params.shape)}")
    c = x.shape[1]
    if params.shape[1] != (10 if c == 3 else 3) * nr_mix:
        raise ValueError(f"{who}: params has {params.shape[1]} channels, {c} colours with nr_mix={nr_mix} need "
                         f"{(10 if c == 3 else 3) * nr_mix}")
    if (params.shape[0], *params.shape[2:]) != (x.shape[0], *x.shape[2:]):
        raise ValueError(f"{who}: x {tuple(x.shape)} and params {tuple(params.shape)} must agree in batch, height "
                         f"and width")
    cl = params.is_contiguous(memory_format=torch.channels_last) and not params.is_contiguous()
    params = params if cl else params.contiguous()
    if params.numel() > 2 ** 31 - 1:
        raise ValueError(f"{who}: params has {params.numel()} elements; the kernels index with int32")
    return x.contiguous(), params, c, x.shape[2] * x.shape[3]


def _block(hw):
    return 32 if INTERPRET else min(128, triton.next_power_of_2(max(hw, 16)))


def dmol_nll_forward(x, params, nr_mix: int, *, launch=start):
    """The per-pixel NLL [B, H, W] in fp32. ``launch``: see kernels/_launch.py."""
    x, params, c, hw = _geometry("discretized_mix_logistic_nll (triton)", x, params, nr_mix)
    nll = torch.empty((x.shape[0], x.shape[2], x.shape[3]), dtype=torch.float32, device=x.device)
    if nll.numel() == 0:
        return nll
    block = _block(hw)
    launch(Launch(_fwd_kernel, (x.shape[0], triton.cdiv(hw, block)),
                  (x, params, nll, hw, nr_mix, params.stride(0), params.stride(1), params.stride(3)),
                  dict(C=c, BLOCK=block)))
    return nll


def dmol_nll_backward(grad_nll, x, params, nr_mix: int, *, launch=start):
    """grad_params (params' dtype and layout) for the per-pixel upstream gradient grad_nll [B, H, W] (fp32)."""
    who = "discretized_mix_logistic_nll (triton)"
    x, params, c, hw = _geometry(who, x, params, nr_mix)
    if grad_nll.dtype != torch.float32 or grad_nll.numel() != x.shape[0] * hw:
        raise ValueError(f"{who}: grad_nll must be float32 of shape ({x.shape[0]}, {x.shape[2]}, {x.shape[3]}), "
                         f"got {grad_nll.dtype} {tuple(grad_nll.shape)}")
    grad = torch.empty_like(params)
    if grad.numel() == 0:
        return grad
    block = _block(hw)
    launch(Launch(_bwd_kernel, (x.shape[0], triton.cdiv(hw, block)),
                  (x, params, grad_nll.contiguous(), grad, hw, nr_mix, params.stride(0), params.stride(1),
                   params.stride(3)),
                  dict(C=c, CAST_F32=INTERPRET, BLOCK=block)))
    return grad
