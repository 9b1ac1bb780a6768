"""Triton kernels of batch_norm_act (spec: fastgen.ref.batch_norm_act; what is saved and why:
fastgen.ops.batch_norm_act).

x is [N, C, H, W], NCHW- or channels_last-contiguous (element (n, c, p) at (n C + c) P + p, or (n P + p) C + c;
P = H W). Each channel's N P values are cut into SPLITS ranges of whole blocks; program (c, s) works on range
s of channel c. Every reduction writes one partial per (channel, range) (a sum of the block's tree sums, in
order), and the kernel that needs the total adds the ranges in order: no atomics, the same bits every run.

* forward: ``_stats_kernel`` (training) sums x - k and (x - k)^2, k = the channel's first element (the sums do
  not cancel when |mean| >> std); ``_fwd_kernel`` turns the partials into mean and biased variance (range 0
  writes them), then y = act(x a + b), a = weight invstd, b = bias - mean a. Evaluation: the given statistics.
* backward, from the one saved tensor (x, or y for leaky_relu): ``_bwd_reduce_kernel`` sums dz = grad_y
  act'(z) and dz u (u = z - bias from y, with z recovered by inverting leaky_relu; u = x - mean from x, the
  forward's z = x a + b recomputed for the activation's side); ``_bwd_dx_kernel`` turns them into grad_weight
  (sum dz xhat), grad_bias (sum dz) (range 0 writes them) and grad_x = a dz + bu u + c1 (training), a dz.

Math in fp32 (fp64 for fp64 inputs); outputs in the input dtype (under TRITON_INTERPRET=1 bf16 outputs are
rounded by hand: its cast truncates). Statistics out: fp32 (fp64).
"""
import torch
import triton
import triton.language as tl

from ._launch import INTERPRET, Launch, start
from .masked_conv import _round_out, _sm_count

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ACTIVATIONS = ("relu", "leaky_relu")
_INT32_MAX = 2 ** 31 - 1
BLOCK = 256 if INTERPRET else 1024


@triton.jit
def _offsets(c, i, N, C, P, CL: tl.constexpr):
    """Memory offsets of values i (a block of flat indices n P + p) of channel c."""
    n = i // P
    p = i - n * P
    if CL:
        return (n * P + p) * C + c
    return (n * C + c) * P + p


@triton.jit
def _range(c, s, count, chunk, INT64: tl.constexpr):
    if INT64:
        c = c.to(tl.int64)
        s = s.to(tl.int64)
    start = s * chunk
    return c, start, tl.minimum(start + chunk, count)


@triton.jit
def _stats_kernel(x_ptr, part_ptr, N, C, P, chunk, SPLITS, CL: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
                  BLOCK: tl.constexpr):
    c, start, end = _range(tl.program_id(0), tl.program_id(1), N * P, chunk, INT64)
    k = tl.load(x_ptr + _offsets(c, 0, N, C, P, CL)).to(ACC)
    s1 = tl.zeros([BLOCK], dtype=ACC)
    s2 = tl.zeros([BLOCK], dtype=ACC)
    for i0 in range(start, end, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        m = i < end
        d = tl.where(m, tl.load(x_ptr + _offsets(c, i, N, C, P, CL), mask=m, other=0).to(ACC) - k, 0.0)
        s1 += d
        s2 += d * d
    out = part_ptr + (c * SPLITS + tl.program_id(1)) * 2
    tl.store(out, tl.sum(s1, 0))
    tl.store(out + 1, tl.sum(s2, 0))


@triton.jit
def _partials(part_ptr, c, SPLITS, SPLITS_P2: tl.constexpr, ACC: tl.constexpr):
    """The channel's two sums: its ranges' partials added in order (a fixed tree)."""
    j = tl.arange(0, SPLITS_P2)
    m = j < SPLITS
    base = part_ptr + (c * SPLITS + j) * 2
    return (tl.sum(tl.load(base, mask=m, other=0).to(ACC), 0),
            tl.sum(tl.load(base + 1, mask=m, other=0).to(ACC), 0))


@triton.jit
def _params(w_ptr, b_ptr, c, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr):
    g = 1.0
    be = 0.0
    if HAS_W:
        g = tl.load(w_ptr + c).to(ACC)
    if HAS_B:
        be = tl.load(b_ptr + c).to(ACC)
    return g, be


@triton.jit
def _fwd_kernel(x_ptr, y_ptr, w_ptr, b_ptr, part_ptr, mean_ptr, var_ptr, N, C, P, chunk, SPLITS, eps, slope,
                TRAIN: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, LEAKY: tl.constexpr, CL: tl.constexpr,
                ACC: tl.constexpr, CAST_F32: tl.constexpr, INT64: tl.constexpr, SPLITS_P2: tl.constexpr,
                BLOCK: tl.constexpr):
    count = N * P
    c, start, end = _range(tl.program_id(0), tl.program_id(1), count, chunk, INT64)
    if TRAIN:
        s1, s2 = _partials(part_ptr, c, SPLITS, SPLITS_P2, ACC)
        k = tl.load(x_ptr + _offsets(c, 0, N, C, P, CL)).to(ACC)
        d = s1 / count
        mean = k + d
        var = tl.maximum((s2 - s1 * d) / count, 0.0)
        if tl.program_id(1) == 0:
            tl.store(mean_ptr + c, mean)
            tl.store(var_ptr + c, var)
    else:
        mean = tl.load(mean_ptr + c).to(ACC)
        var = tl.load(var_ptr + c).to(ACC)
    g, be = _params(w_ptr, b_ptr, c, HAS_W, HAS_B, ACC)
    a = g * (1.0 / tl.sqrt(var + eps))  # as _recovery: the backward recomputes z = x a + b bit for bit
    b = be - mean * a
    for i0 in range(start, end, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        m = i < end
        off = _offsets(c, i, N, C, P, CL)
        z = tl.load(x_ptr + off, mask=m, other=0).to(ACC) * a + b
        if LEAKY:
            y = tl.where(z <= 0, z * slope, z)
        else:
            y = tl.where(z <= 0, 0.0, z)  # NaN stays NaN, as torch's relu
        tl.store(y_ptr + off, _round_out(y, y_ptr.dtype.element_ty, CAST_F32), mask=m)


@triton.jit
def _recover(s, dy, p0, p1, p2, slope, islope, FROM_Y: tl.constexpr, LEAKY: tl.constexpr):
    """(dz, u) from the saved value s and grad_y (fastgen.ops.batch_norm_act): from y, p0 = bias; from x,
    p0 = a, p1 = b (the forward's z = x a + b), p2 = mean."""
    if FROM_Y:
        neg = s <= 0
        dz = tl.where(neg, dy * slope, dy)
        u = tl.where(neg, s * islope, s) - p0
    else:
        neg = s * p0 + p1 <= 0
        if LEAKY:
            dz = tl.where(neg, dy * slope, dy)
        else:
            dz = tl.where(neg, 0.0, dy)
        u = s - p2
    return dz, u


@triton.jit
def _recovery(w_ptr, b_ptr, mean_ptr, var_ptr, c, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
              ACC: tl.constexpr):
    """(invstd, weight, p0, p1, p2) of channel c."""
    g, be = _params(w_ptr, b_ptr, c, HAS_W, HAS_B, ACC)
    mean = tl.load(mean_ptr + c).to(ACC)
    r = 1.0 / tl.sqrt(tl.load(var_ptr + c).to(ACC) + eps)
    a = g * r
    return r, g, be, a, be - mean * a, mean


@triton.jit
def _bwd_reduce_kernel(gy_ptr, s_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, part_ptr, N, C, P, chunk, SPLITS, eps, slope,
                       islope, FROM_Y: tl.constexpr, LEAKY: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                       CL: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr):
    c, start, end = _range(tl.program_id(0), tl.program_id(1), N * P, chunk, INT64)
    r, g, be, a, b, mean = _recovery(w_ptr, b_ptr, mean_ptr, var_ptr, c, eps, HAS_W, HAS_B, ACC)
    if FROM_Y:
        p0 = be
    else:
        p0 = a
    s1 = tl.zeros([BLOCK], dtype=ACC)
    s2 = tl.zeros([BLOCK], dtype=ACC)
    for i0 in range(start, end, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        m = i < end
        off = _offsets(c, i, N, C, P, CL)
        s = tl.load(s_ptr + off, mask=m, other=0).to(ACC)
        dy = tl.load(gy_ptr + off, mask=m, other=0).to(ACC)
        dz, u = _recover(s, dy, p0, b, mean, slope, islope, FROM_Y, LEAKY)
        dz = tl.where(m, dz, 0.0)
        s1 += dz
        s2 += dz * u
    out = part_ptr + (c * SPLITS + tl.program_id(1)) * 2
    tl.store(out, tl.sum(s1, 0))
    tl.store(out + 1, tl.sum(s2, 0))


@triton.jit
def _bwd_dx_kernel(gy_ptr, s_ptr, dx_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, part_ptr, dw_ptr, db_ptr, N, C, P, chunk,
                   SPLITS, eps, slope, islope, FROM_Y: tl.constexpr, LEAKY: tl.constexpr, HAS_W: tl.constexpr,
                   HAS_B: tl.constexpr, TRAIN: tl.constexpr, NEED_X: tl.constexpr, NEED_W: tl.constexpr,
                   NEED_B: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr, CAST_F32: tl.constexpr,
                   INT64: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK: tl.constexpr):
    count = N * P
    c, start, end = _range(tl.program_id(0), tl.program_id(1), count, chunk, INT64)
    r, g, be, a, b, mean = _recovery(w_ptr, b_ptr, mean_ptr, var_ptr, c, eps, HAS_W, HAS_B, ACC)
    s1, s2 = _partials(part_ptr, c, SPLITS, SPLITS_P2, ACC)
    if FROM_Y:
        dgamma = s2 / g  # xhat = u / weight
        bu = -r * dgamma / count
        p0 = be
    else:
        dgamma = r * s2  # xhat = u invstd
        bu = -g * r * r * dgamma / count
        p0 = a
    if tl.program_id(1) == 0:
        if NEED_W:
            tl.store(dw_ptr + c, _round_out(dgamma, dw_ptr.dtype.element_ty, CAST_F32))
        if NEED_B:
            tl.store(db_ptr + c, _round_out(s1, db_ptr.dtype.element_ty, CAST_F32))
    if NEED_X:
        c1 = -a * s1 / count
        for i0 in range(start, end, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            m = i < end
            off = _offsets(c, i, N, C, P, CL)
            s = tl.load(s_ptr + off, mask=m, other=0).to(ACC)
            dy = tl.load(gy_ptr + off, mask=m, other=0).to(ACC)
            dz, u = _recover(s, dy, p0, b, mean, slope, islope, FROM_Y, LEAKY)
            if TRAIN:
                dx = a * dz + bu * u + c1
            else:
                dx = a * dz
            tl.store(dx_ptr + off, _round_out(dx, dx_ptr.dtype.element_ty, CAST_F32), mask=m)


# ---- launchers -------------------------------------------------------------------------------------------------

def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _math_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _layout(t):
    """(channels_last?, t contiguous in it): the CPU ops' layout rule (fastgen.ops.masked_conv._kernel_layout)."""
    cl = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return cl, t.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def _check(who, x, activation, negative_slope, vectors):
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{who}: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{who}: x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{who}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation == "leaky_relu" and not negative_slope > 0:
        raise ValueError(f"{who}: leaky_relu's negative_slope must be > 0, got {negative_slope!r}")
    out = []
    for name, (t, dtype) in vectors.items():
        if t is not None and (tuple(t.shape) != (x.shape[1],) or t.dtype != dtype or t.device != x.device):
            raise ValueError(f"{who}: {name} must be {dtype} of shape ({x.shape[1]},) on {x.device}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
        out.append(None if t is None else t.contiguous())
    return out


def _plan(N, C, P, device):
    """(chunk, splits): ranges of whole blocks; a channel is split only when channels are too few to fill the
    device (every range keeps a few blocks)."""
    count = N * P
    splits = max(1, min(triton.cdiv(4 * _sm_count(device), max(C, 1)), triton.cdiv(count, 4 * BLOCK), 1024))
    chunk = triton.cdiv(triton.cdiv(count, splits), BLOCK) * BLOCK
    return chunk, triton.cdiv(count, chunk)


def batch_norm_act_forward(x, weight, bias, mean, var, eps: float, activation: str, negative_slope: float, *,
                           launch=start):
    """(y, mean, var): y in x's layout; mean, var the batch's (mean, biased variance; fp32, fp64 for fp64 x) when
    none are given, else the given ones. ``launch``: see kernels/_launch.py."""
    who = "batch_norm_act (triton)"
    mt = _math_dtype(x.dtype)
    weight, bias, mean, var = _check(who, x, activation, negative_slope,
                                     {"weight": (weight, x.dtype), "bias": (bias, x.dtype), "mean": (mean, mt),
                                      "var": (var, mt)})
    if (mean is None) != (var is None):
        raise ValueError(f"{who}: give both mean and var, or neither")
    cl, x = _layout(x)
    N, C, H, W = x.shape
    P = H * W
    y = torch.empty_like(x)
    train = mean is None
    if train:
        mean = torch.full((C,), float("nan"), dtype=mt, device=x.device)  # no values: NaN, as ref's mean
        var = torch.full((C,), float("nan"), dtype=mt, device=x.device)
    if N * P == 0 or C == 0:
        return y, mean, var
    chunk, splits = _plan(N, C, P, x.device)
    part = torch.empty((C, splits, 2), dtype=mt, device=x.device)
    consts = dict(CL=cl, ACC=_acc(x.dtype), INT64=x.numel() + BLOCK > _INT32_MAX, BLOCK=BLOCK)
    if train:
        launch(Launch(_stats_kernel, (C, splits), (x, part, N, C, P, chunk, splits), consts))
    launch(Launch(_fwd_kernel, (C, splits),
                  (x, y, weight if weight is not None else x, bias if bias is not None else x, part, mean, var, N, C,
                   P, chunk, splits, float(eps), float(negative_slope) if activation == "leaky_relu" else 0.0),
                  dict(consts, TRAIN=train, HAS_W=weight is not None, HAS_B=bias is not None,
                       LEAKY=activation == "leaky_relu", CAST_F32=INTERPRET, SPLITS_P2=triton.next_power_of_2(splits))))
    return y, mean, var


def batch_norm_act_backward(grad_y, saved, saved_is_output: bool, weight, bias, mean, var, eps: float,
                            training: bool, activation: str, negative_slope: float, output_mask, *, launch=start):
    """(grad_x, grad_weight, grad_bias) from the one saved tensor: x, or (leaky_relu, saved_is_output) y; an
    entry not asked for is empty. grad_x has saved's layout."""
    who = "batch_norm_act (triton)"
    mt = _math_dtype(saved.dtype)
    weight, bias, mean, var = _check(who, saved, activation, negative_slope,
                                     {"weight": (weight, saved.dtype), "bias": (bias, saved.dtype), "mean": (mean, mt),
                                      "var": (var, mt)})
    if len(output_mask) != 3:
        raise ValueError(f"{who}: output_mask must have 3 entries, got {len(output_mask)}")
    if saved_is_output and activation != "leaky_relu":
        raise ValueError(f"{who}: only leaky_relu's output can be inverted; relu's backward takes the input")
    if grad_y.shape != saved.shape or grad_y.dtype != saved.dtype:
        raise ValueError(f"{who}: grad_y must have the saved tensor's shape and dtype, got {tuple(grad_y.shape)} "
                         f"{grad_y.dtype}")
    cl, saved = _layout(saved)
    grad_y = grad_y.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    N, C, H, W = saved.shape
    P = H * W
    need = [bool(m) for m in output_mask]
    gx = torch.empty_like(saved) if need[0] else saved.new_empty(0)
    gw = torch.zeros(C, dtype=saved.dtype, device=saved.device) if need[1] else saved.new_empty(0)
    gb = torch.zeros(C, dtype=saved.dtype, device=saved.device) if need[2] else saved.new_empty(0)
    if N * P == 0 or C == 0 or not any(need):
        return gx, gw, gb
    chunk, splits = _plan(N, C, P, saved.device)
    part = torch.empty((C, splits, 2), dtype=mt, device=saved.device)
    leaky = activation == "leaky_relu"
    slope = float(negative_slope) if leaky else 0.0
    islope = 1.0 / slope if leaky else 0.0
    w, b = weight if weight is not None else saved, bias if bias is not None else saved
    consts = dict(FROM_Y=bool(saved_is_output), LEAKY=leaky, HAS_W=weight is not None, HAS_B=bias is not None, CL=cl,
                  ACC=_acc(saved.dtype), INT64=saved.numel() + BLOCK > _INT32_MAX, BLOCK=BLOCK)
    launch(Launch(_bwd_reduce_kernel, (C, splits),
                  (grad_y, saved, w, b, mean, var, part, N, C, P, chunk, splits, float(eps), slope, islope), consts))
    launch(Launch(_bwd_dx_kernel, (C, splits),
                  (grad_y, saved, gx if need[0] else saved, w, b, mean, var, part, gw if need[1] else saved,
                   gb if need[2] else saved, N, C, P, chunk, splits, float(eps), slope, islope),
                  dict(consts, TRAIN=bool(training), NEED_X=need[0], NEED_W=need[1], NEED_B=need[2], CAST_F32=INTERPRET,
                       SPLITS_P2=triton.next_power_of_2(splits))))
    return gx, gw, gb
