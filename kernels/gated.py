"""Triton kernels for the gated ops of the Gated PixelCNN (spec: fastgen.ref.gated).

Channel layout. A pre-activation has 2C channels in ``data_channels`` blocks of
2*cg (cg = C / data_channels), each block = [f half, g half]. Gated output
channel c lives in block d = c // cg; its value is channel fi = c + d*cg and its
gate channel gi = fi + cg. Every kernel below works on a tile of *gated*
channels c and reads/writes the matching fi and gi columns, so no kernel ever
reshuffles channels in memory.

Gated activation (elementwise): one pass each way over a [positions x C] tile
of one sample (x viewed as [B, 2C, S], S the flattened spatial size).
* forward:  out = tanh(f + cond_f) * sigmoid(g + cond_g);
* backward: recomputes f, g and writes grad_x at fi and gi; a full-shape cond
            gets its own copy of that gradient from the same pass, a [B, 2C]
            cond gets per-(sample, tile) partial sums in an fp32 buffer
            [B, tiles, 2C] that torch sums afterwards (deterministic, no atomics).

Gated convolution: the conv of one stack is an implicit GEMM over its visible
taps, as in kernels/masked_conv.py, with the geometry of the stack:
* vertical   [2C, Cin, kv, kw]: all kv*kw taps in raster order, padding
             (kv-1 top, kw//2 left), output the size of the input;
* horizontal [2C, Cin, 1, kc]:  taps (y, x-kc+1 .. x-1) in order, then the
             centre (y, x) under the masked-conv rule (joined to the plain taps
             when fully visible, dropped when hidden, a colour-masked step when
             data_channels > 1); padding (0, kc-1 left).
* forward:   tile M = positions of one sample x N = gated channels. The tile
             keeps TWO accumulators, f and g, fed by the same input tile and the
             two weight column sets of the same colour block; bias and cond are
             added and the gate applied in registers. Only the C gated channels
             are stored: the 2C pre-activation never exists in memory.
* backward:  one kernel recomputes the pre-activation tile the same way, applies
             the gate derivative to grad_out and stores grad_pre (2C channels:
             grad-x and grad-w need it at neighbouring positions), with per-slot
             partial sums for grad_bias and a [B, 2C] grad_cond fused (fp32,
             fixed 32-row slots so every autotune config writes the same buffer
             entries). grad_x and grad_weight then run the masked-conv
             grad-input / grad-weight kernels of kernels/masked_conv.py on
             grad_pre with the stack's geometry (those kernels take padding and
             output size as arguments; only masked_conv's _Geometry assumes a
             k x k masked kernel, so _StackGeometry supplies the stack's plan).
             A full-shape cond's gradient is grad_pre itself.

All accumulation is fp32; outputs come back in the input dtype (grad_pre too:
it is a tl.dot operand beside x and the weight). tanh is (1-e)/(1+e) with
e = exp(-2|x|), i.e. 2*sigmoid(2x)-1 (libdevice.tanh fails in the interpreter),
and sigmoid takes exp(-|x|) too, so neither overflows. Strides are passed to the
kernels, so NCHW, channels_last and sliced inputs need no copy; channels_last in
gives channels_last out. Under TRITON_INTERPRET=1 tile operands are cast to fp32
before tl.dot, bf16 outputs are rounded by hand, and fixed block sizes replace
autotuning (see kernels/masked_conv.py).
"""
import math

import torch
import triton
import triton.language as tl

from ._launch import INTERPRET, Launch, start
from .masked_conv import (SUPPORTED_DTYPES, _Geometry, _channel_block, _grad_input, _grad_weight, _like_input, _mma,
                          _needs_int64, _round_out, check_conv_tensors)

STACKS = ("vertical", "horizontal")
_SLOT_M = 32  # rows per partial-sum slot of the conv backward; every BLOCK_M is a multiple of it


# ---- device code ------------------------------------------------------------------------------------------

@triton.jit
def _sigmoid(x):
    # exp of -|x| only: never overflows (tl.sigmoid's exp(-x) does for x < -88, harmless on a GPU
    # but a numpy warning per call in the interpreter)
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _tanh(x):
    # = 2*sigmoid(2x) - 1 (libdevice.tanh fails in the interpreter), with the same overflow-free exp
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _gate_grad(f, g, go):
    """(d/df, d/dg) of go * tanh(f) * sigmoid(g)."""
    t = _tanh(f)
    s = _sigmoid(g)
    return go * s * (1.0 - t * t), go * t * s * (1.0 - s)


@triton.jit
def _act_tile(x_ptr, cond_ptr, pid_m, pid_n, S, C, cg, sxb, sxc, sxs, scb, scc, scs,
              COND: tl.constexpr, INT64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """The tile of program (pid_m = sample x position tile, pid_n = gated-channel tile) that both gated
    activation kernels start from: its indices and f, g (+ cond) in fp32. COND: 0 none, 1 [B, 2C], 2 x's shape."""
    n_st = tl.cdiv(S, BLOCK_S)
    b = pid_m // n_st
    offs_s = (pid_m - b * n_st) * BLOCK_S + tl.arange(0, BLOCK_S)
    if INT64:
        b = b.to(tl.int64)
        offs_s = offs_s.to(tl.int64)
    offs_c = pid_n * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    ok = (offs_s < S)[:, None] & c_ok[None, :]
    fi = offs_c + (offs_c // cg) * cg
    gi = fi + cg
    xs = x_ptr + b * sxb + offs_s[:, None] * sxs
    f = tl.load(xs + fi[None, :] * sxc, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(xs + gi[None, :] * sxc, mask=ok, other=0.0).to(tl.float32)
    if COND == 1:
        f += tl.load(cond_ptr + b * scb + fi * scc, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        g += tl.load(cond_ptr + b * scb + gi * scc, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if COND == 2:
        cs = cond_ptr + b * scb + offs_s[:, None] * scs
        f += tl.load(cs + fi[None, :] * scc, mask=ok, other=0.0).to(tl.float32)
        g += tl.load(cs + gi[None, :] * scc, mask=ok, other=0.0).to(tl.float32)
    return b, offs_s, offs_c, c_ok, ok, fi, gi, f, g


@triton.jit
def _act_fwd_kernel(x_ptr, cond_ptr, y_ptr, S, C, cg,
                    sxb, sxc, sxs, scb, scc, scs, syb, syc, sys,
                    COND: tl.constexpr, CAST_F32: tl.constexpr, INT64: tl.constexpr,
                    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    # program = (sample, position tile) x gated-channel tile; COND: 0 none, 1 [B, 2C], 2 x's shape
    b, offs_s, offs_c, c_ok, ok, fi, gi, f, g = _act_tile(
        x_ptr, cond_ptr, tl.program_id(0), tl.program_id(1), S, C, cg, sxb, sxc, sxs, scb, scc, scs,
        COND, INT64, BLOCK_S, BLOCK_C)
    y = _tanh(f) * _sigmoid(g)
    tl.store(y_ptr + b * syb + offs_s[:, None] * sys + offs_c[None, :] * syc,
             _round_out(y, y_ptr.dtype.element_ty, CAST_F32), mask=ok)


@triton.jit
def _act_bwd_kernel(go_ptr, x_ptr, cond_ptr, gx_ptr, gc_ptr, sums_ptr, S, C, cg,
                    sgb, sgc, sgs, sxb, sxc, sxs, scb, scc, scs, sdb, sdc, sds, sqb, sqc, sqs,
                    COND: tl.constexpr, WRITE_X: tl.constexpr, WRITE_C: tl.constexpr, SUMS: tl.constexpr,
                    CAST_F32: tl.constexpr, INT64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    # grad_x -> gx (strides sd*), a full-shape cond's grad -> gc (strides sq*), [B, 2C] cond -> sums[b, tile, :]
    pid_m = tl.program_id(0)
    b, offs_s, offs_c, c_ok, ok, fi, gi, f, g = _act_tile(
        x_ptr, cond_ptr, pid_m, tl.program_id(1), S, C, cg, sxb, sxc, sxs, scb, scc, scs,
        COND, INT64, BLOCK_S, BLOCK_C)
    go = tl.load(go_ptr + b * sgb + offs_s[:, None] * sgs + offs_c[None, :] * sgc, mask=ok, other=0.0)
    df, dg = _gate_grad(f, g, go.to(tl.float32))
    if WRITE_X:
        ds = gx_ptr + b * sdb + offs_s[:, None] * sds
        tl.store(ds + fi[None, :] * sdc, _round_out(df, gx_ptr.dtype.element_ty, CAST_F32), mask=ok)
        tl.store(ds + gi[None, :] * sdc, _round_out(dg, gx_ptr.dtype.element_ty, CAST_F32), mask=ok)
    if WRITE_C:
        qs = gc_ptr + b * sqb + offs_s[:, None] * sqs
        tl.store(qs + fi[None, :] * sqc, _round_out(df, gc_ptr.dtype.element_ty, CAST_F32), mask=ok)
        tl.store(qs + gi[None, :] * sqc, _round_out(dg, gc_ptr.dtype.element_ty, CAST_F32), mask=ok)
    if SUMS:
        row = sums_ptr + pid_m.to(tl.int64) * (2 * C)  # pid_m = b * position tiles + tile
        tl.store(row + fi, tl.sum(tl.where(ok, df, 0.0), axis=0), mask=c_ok)
        tl.store(row + gi, tl.sum(tl.where(ok, dg, 0.0), axis=0), mask=c_ok)


@triton.jit
def _preact(x_base, w_ptr, bias_ptr, cond_base, oy, ox, m_ok, offs_n, n_ok, n_lo,
            Ci, H, W, C, sxc, sxh, sxw, swo, swi, swh, sww, scc, sch, scw, ph, pw, ci_per_g, cg,
            KW: tl.constexpr, N_PLAIN: tl.constexpr, CENTRE_RULE: tl.constexpr, STRICT: tl.constexpr,
            HAS_BIAS: tl.constexpr, COND: tl.constexpr, CAST_F32: tl.constexpr, PRECISION: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 (f, g) pre-activations [BLOCK_M, BLOCK_N] of gated channels offs_n (from n_lo) at the
    positions (oy, ox) of one sample: conv + bias + cond. x_base / cond_base point at the sample."""
    offs_k = tl.arange(0, BLOCK_K)
    d = offs_n // cg
    fi = offs_n + d * cg
    gi = fi + cg
    wf_cols = w_ptr + fi * swo
    wg_cols = w_ptr + gi * swo
    acc_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # one flat K loop over (tap, Ci block); the input tile is loaded once for both accumulators
    n_cb = tl.cdiv(Ci, BLOCK_K)
    for k in range(0, N_PLAIN * n_cb):
        tap = k // n_cb
        ci = (k - tap * n_cb) * BLOCK_K + offs_k
        i = tap // KW
        j = tap - i * KW
        iy = oy - ph + i
        ix = ox - pw + j
        row_ok = m_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        ci_ok = ci < Ci
        a = tl.load(x_base + iy[:, None] * sxh + ix[:, None] * sxw + ci[None, :] * sxc,
                    mask=row_ok[:, None] & ci_ok[None, :], other=0.0)
        w_ok = ci_ok[:, None] & n_ok[None, :]
        w_off = ci[:, None] * swi + i * swh + j * sww
        acc_f = _mma(a, tl.load(wf_cols[None, :] + w_off, mask=w_ok, other=0.0), acc_f, CAST_F32, PRECISION)
        acc_g = _mma(a, tl.load(wg_cols[None, :] + w_off, mask=w_ok, other=0.0), acc_g, CAST_F32, PRECISION)

    if CENTRE_RULE:
        # the centre is raster tap N_PLAIN; f and g of channel c share c's colour block d, so one
        # Ci range (up to the last block this tile sees) and one colour mask serve both
        i = N_PLAIN // KW
        j = N_PLAIN - i * KW
        iy = oy - ph + i
        ix = ox - pw + j
        row_ok = m_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        g_last = (tl.minimum(n_lo + BLOCK_N, C) - 1) // cg
        ci_end = tl.minimum((g_last + 1 - STRICT) * ci_per_g, Ci)
        for c0 in range(0, ci_end, BLOCK_K):
            ci = c0 + offs_k
            ci_ok = ci < ci_end
            seen = (ci[:, None] // ci_per_g) < (d[None, :] + 1 - STRICT)
            a = tl.load(x_base + iy[:, None] * sxh + ix[:, None] * sxw + ci[None, :] * sxc,
                        mask=row_ok[:, None] & ci_ok[None, :], other=0.0)
            w_ok = ci_ok[:, None] & n_ok[None, :] & seen
            w_off = ci[:, None] * swi + i * swh + j * sww
            acc_f = _mma(a, tl.load(wf_cols[None, :] + w_off, mask=w_ok, other=0.0), acc_f, CAST_F32, PRECISION)
            acc_g = _mma(a, tl.load(wg_cols[None, :] + w_off, mask=w_ok, other=0.0), acc_g, CAST_F32, PRECISION)

    if HAS_BIAS:
        acc_f += tl.load(bias_ptr + fi, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc_g += tl.load(bias_ptr + gi, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if COND == 1:
        acc_f += tl.load(cond_base + fi * scc, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc_g += tl.load(cond_base + gi * scc, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if COND == 2:
        c_rows = cond_base + (oy * sch + ox * scw)[:, None]
        ok = m_ok[:, None] & n_ok[None, :]
        acc_f += tl.load(c_rows + fi[None, :] * scc, mask=ok, other=0.0).to(tl.float32)
        acc_g += tl.load(c_rows + gi[None, :] * scc, mask=ok, other=0.0).to(tl.float32)
    return acc_f, acc_g


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, cond_ptr, y_ptr,
                     HW, Ci, H, W, C,
                     sxb, sxc, sxh, sxw, swo, swi, swh, sww, scb, scc, sch, scw, syb, syc, syh, syw,
                     ph, pw, ci_per_g, cg,
                     KW: tl.constexpr, N_PLAIN: tl.constexpr, CENTRE_RULE: tl.constexpr, STRICT: tl.constexpr,
                     HAS_BIAS: tl.constexpr, COND: tl.constexpr, CAST_F32: tl.constexpr,
                     PRECISION: tl.constexpr, INT64: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # rows: positions of one sample (a [B, 2C] cond is then one vector per tile); columns: gated channels
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_pt = tl.cdiv(HW, BLOCK_M)
    b = pid_m // n_pt
    offs_p = (pid_m - b * n_pt) * BLOCK_M + tl.arange(0, BLOCK_M)
    if INT64:
        b = b.to(tl.int64)
        offs_p = offs_p.to(tl.int64)
    m_ok = offs_p < HW
    ox = offs_p % W
    oy = offs_p // W
    n_lo = pid_n * BLOCK_N
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    n_ok = offs_n < C
    f, g = _preact(x_ptr + b * sxb, w_ptr, bias_ptr, cond_ptr + b * scb, oy, ox, m_ok, offs_n, n_ok, n_lo,
                   Ci, H, W, C, sxc, sxh, sxw, swo, swi, swh, sww, scc, sch, scw, ph, pw, ci_per_g, cg,
                   KW, N_PLAIN, CENTRE_RULE, STRICT, HAS_BIAS, COND, CAST_F32, PRECISION,
                   BLOCK_M, BLOCK_N, BLOCK_K)
    y = _tanh(f) * _sigmoid(g)
    y_ptrs = y_ptr + b * syb + (oy * syh + ox * syw)[:, None] + offs_n[None, :] * syc
    tl.store(y_ptrs, _round_out(y, y_ptr.dtype.element_ty, CAST_F32), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _conv_pre_grad_kernel(go_ptr, x_ptr, w_ptr, bias_ptr, cond_ptr, gp_ptr, sums_ptr,
                          HW, Ci, H, W, C, n_slots,
                          sgb, sgc, sgh, sgw, sxb, sxc, sxh, sxw, swo, swi, swh, sww, scb, scc, sch, scw,
                          spb, spc, sph, spw,
                          ph, pw, ci_per_g, cg,
                          KW: tl.constexpr, N_PLAIN: tl.constexpr, CENTRE_RULE: tl.constexpr,
                          STRICT: tl.constexpr, HAS_BIAS: tl.constexpr, COND: tl.constexpr,
                          WRITE_PRE: tl.constexpr, SUMS: tl.constexpr, SLOT_M: tl.constexpr,
                          CAST_F32: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # the forward's tile, recomputed; grad_pre -> gp (2C channels), column sums -> sums[b, slot, :]
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_pt = tl.cdiv(HW, BLOCK_M)
    b = pid_m // n_pt
    pt = pid_m - b * n_pt
    offs_p = pt * BLOCK_M + tl.arange(0, BLOCK_M)
    if INT64:
        b = b.to(tl.int64)
        offs_p = offs_p.to(tl.int64)
    m_ok = offs_p < HW
    ox = offs_p % W
    oy = offs_p // W
    n_lo = pid_n * BLOCK_N
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    n_ok = offs_n < C
    f, g = _preact(x_ptr + b * sxb, w_ptr, bias_ptr, cond_ptr + b * scb, oy, ox, m_ok, offs_n, n_ok, n_lo,
                   Ci, H, W, C, sxc, sxh, sxw, swo, swi, swh, sww, scc, sch, scw, ph, pw, ci_per_g, cg,
                   KW, N_PLAIN, CENTRE_RULE, STRICT, HAS_BIAS, COND, CAST_F32, PRECISION,
                   BLOCK_M, BLOCK_N, BLOCK_K)
    ok = m_ok[:, None] & n_ok[None, :]
    go = tl.load(go_ptr + b * sgb + (oy * sgh + ox * sgw)[:, None] + offs_n[None, :] * sgc, mask=ok, other=0.0)
    df, dg = _gate_grad(f, g, go.to(tl.float32))
    fi = offs_n + (offs_n // cg) * cg
    gi = fi + cg
    if WRITE_PRE:
        p_rows = gp_ptr + b * spb + (oy * sph + ox * spw)[:, None]
        tl.store(p_rows + fi[None, :] * spc, _round_out(df, gp_ptr.dtype.element_ty, CAST_F32), mask=ok)
        tl.store(p_rows + gi[None, :] * spc, _round_out(dg, gp_ptr.dtype.element_ty, CAST_F32), mask=ok)
    if SUMS:
        # fixed SLOT_M-row slots: whatever BLOCK_M autotuning picks, the same buffer entries are written
        N_SL: tl.constexpr = BLOCK_M // SLOT_M
        sf = tl.sum(tl.reshape(tl.where(ok, df, 0.0), (N_SL, SLOT_M, BLOCK_N)), axis=1)
        sg = tl.sum(tl.reshape(tl.where(ok, dg, 0.0), (N_SL, SLOT_M, BLOCK_N)), axis=1)
        slot = pt * N_SL + tl.arange(0, N_SL)
        s_rows = sums_ptr + (b * n_slots + slot)[:, None] * (2 * C)
        s_ok = (slot < n_slots)[:, None] & n_ok[None, :]
        tl.store(s_rows + fi[None, :], sf, mask=s_ok)
        tl.store(s_rows + gi[None, :], sg, mask=s_ok)


# ---- launch configuration ---------------------------------------------------------------------------------

def _conv_configs():
    # two accumulators per tile: smaller N tiles than masked_conv's list (BLOCK_N = gated channels); no
    # (128, 64) with 4 warps: its two 128x64 fp32 accumulators spill on sm_80 and sm_90 (the compile report)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=nw, num_stages=ns)
            for bm, bn, nw, ns in ((64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3),
                                   (32, 32, 2, 4))]


if INTERPRET:
    _conv_fwd = _conv_fwd_kernel
    _conv_pre_grad = _conv_pre_grad_kernel
else:
    _conv_fwd = triton.autotune(_conv_configs(), key=["HW", "Ci", "C", "N_PLAIN"])(_conv_fwd_kernel)
    _conv_pre_grad = triton.autotune(_conv_configs(), key=["HW", "Ci", "C", "N_PLAIN"])(_conv_pre_grad_kernel)

_INTERP_CONV = {"BLOCK_M": 64}  # BLOCK_N follows the channel count


def _act_blocks(S, C):
    """Elementwise tile [BLOCK_S, BLOCK_C] of about 4096 elements (fixed: the partial-sum buffer
    of the backward is sized by BLOCK_S, so it is not autotuned)."""
    bc = min(64, triton.next_power_of_2(max(C, 1)))
    bs = max(16, min(4096 // bc, triton.next_power_of_2(max(S, 1))))
    return bs, bc


# ---- argument checks --------------------------------------------------------------------------------------

def _check_tensor(who, name, t, device):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{who}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{who}: {name} must be float16, bfloat16 or float32, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{who}: {name} on {t.device} but input on {device}")


def _cond_mode(who, cond, x_shape):
    """0: no cond, 1: one [B, 2C] row per sample, 2: cond has the pre-activation's full shape."""
    if cond is None:
        return 0
    if tuple(cond.shape) == tuple(x_shape):
        return 2
    if tuple(cond.shape) == tuple(x_shape[:2]):
        return 1
    raise ValueError(f"{who}: cond must have shape {tuple(x_shape[:2])} or {tuple(x_shape)}, got "
                     f"{tuple(cond.shape)}")


def _check_output_mask(who, output_mask, n):
    if len(output_mask) != n:
        raise ValueError(f"{who}: output_mask must have {n} entries, got {output_mask!r}")
    return [bool(v) for v in output_mask]


def _check_grad_out(who, grad_out, shape, device):
    if not isinstance(grad_out, torch.Tensor) or tuple(grad_out.shape) != tuple(shape):
        got = tuple(grad_out.shape) if isinstance(grad_out, torch.Tensor) else type(grad_out).__name__
        raise ValueError(f"{who}: grad_out must have shape {tuple(shape)}, got {got}")
    if grad_out.device != device:
        raise ValueError(f"{who}: grad_out on {grad_out.device} but input on {device}")


def _like(t, shape):
    """An empty output in t's dtype, laid out like t where both are 4-D (channels_last stays
    channels_last), else contiguous."""
    if t.dim() == 4 and len(shape) == 4:
        return _like_input(t, shape)
    return torch.empty(shape, dtype=t.dtype, device=t.device)


# ---- gated activation -------------------------------------------------------------------------------------

class _ActShape:
    """Checks and sizes of a gated activation: x seen as [B, 2C, S], S the flattened positions."""

    def __init__(self, x, cond, data_channels):
        who = "gated_activation (triton)"
        _check_tensor(who, "input", x, x.device if isinstance(x, torch.Tensor) else None)
        if x.dim() < 2:
            raise ValueError(f"{who}: input must be [B, 2C, ...], got shape {tuple(x.shape)}")
        if not isinstance(data_channels, int) or data_channels < 1:
            raise ValueError(f"{who}: data_channels must be a positive int, got {data_channels!r}")
        self.B, c2 = x.shape[:2]
        if c2 % (2 * data_channels):
            raise ValueError(f"{who}: input has {c2} channels, not a multiple of 2 * data_channels "
                             f"({2 * data_channels})")
        if cond is not None:
            _check_tensor(who, "cond", cond, x.device)
        self.cond_mode = _cond_mode(who, cond, x.shape)
        self.C = c2 // 2
        self.cg = self.C // data_channels
        self.S = math.prod(x.shape[2:])
        self.out_shape = (self.B, self.C, *x.shape[2:])

    def view3(self, t, channels):
        """t as [B, channels, S] (a view for NCHW, channels_last and most slices; a copy otherwise)."""
        return t.reshape(self.B, channels, self.S)

    def cond3(self, cond):
        """(tensor, strides b, c, s) of cond for the kernels; anything valid when there is none."""
        if self.cond_mode == 1:
            return cond, (cond.stride(0), cond.stride(1), 0)
        if self.cond_mode == 2:
            c3 = self.view3(cond, 2 * self.C)
            return c3, c3.stride()
        return None, (0, 0, 0)

    def grid(self, bs, bc):
        return (self.B * triton.cdiv(self.S, bs), triton.cdiv(self.C, bc))


def gated_activation_forward(x, cond, data_channels: int, *, launch=start) -> torch.Tensor:
    """tanh(f + cond_f) * sigmoid(g + cond_g) per colour block: [B, 2C, ...] -> [B, C, ...]. ``launch``: see
    kernels/_launch.py."""
    a = _ActShape(x, cond, data_channels)
    y = _like(x, a.out_shape)
    if y.numel() == 0:
        return y
    x3, y3 = a.view3(x, 2 * a.C), y.view(a.B, a.C, a.S)
    c3, cst = a.cond3(cond)
    bs, bc = _act_blocks(a.S, a.C)
    launch(Launch(_act_fwd_kernel, a.grid(bs, bc),
                  (x3, c3 if c3 is not None else x3, y3, a.S, a.C, a.cg, *x3.stride(), *cst, *y3.stride()),
                  dict(COND=a.cond_mode, CAST_F32=INTERPRET,
                       INT64=_needs_int64(x3, y3, *([c3] if c3 is not None else [])), BLOCK_S=bs, BLOCK_C=bc)))
    return y


def gated_activation_backward(grad_out, x, cond, data_channels: int, output_mask, *, launch=start) -> tuple:
    """(grad_x, grad_cond); an entry output_mask does not ask for (or grad_cond without cond) is
    x.new_empty(0). grad_cond: grad_x summed over positions (fp32) for a [B, 2C] cond, a separate
    copy of grad_x for a full-shape cond."""
    who = "gated_activation (triton)"
    a = _ActShape(x, cond, data_channels)
    _check_grad_out(who, grad_out, a.out_shape, x.device)
    need_x, need_c = _check_output_mask(who, output_mask, 2)
    need_c = need_c and cond is not None
    empty = x.new_empty(0)
    gx = _like(x, x.shape) if need_x else None
    gc = _like(cond, cond.shape) if need_c and a.cond_mode == 2 else None
    if x.numel() == 0:
        if need_c and a.cond_mode == 1:
            gc = torch.zeros_like(cond)
        return (gx if need_x else empty), (gc if need_c else empty)
    if not (need_x or need_c):
        return empty, empty
    bs, bc = _act_blocks(a.S, a.C)
    n_st = triton.cdiv(a.S, bs)
    sums = (torch.empty((a.B, n_st, 2 * a.C), dtype=torch.float32, device=x.device)
            if need_c and a.cond_mode == 1 else None)
    x3 = a.view3(x, 2 * a.C)
    go3 = grad_out.reshape(a.B, a.C, a.S)
    c3, cst = a.cond3(cond)
    # outputs are dense (NCHW or channels_last): views, so the kernel writes land in gx / gc
    gx3 = gx.view(a.B, 2 * a.C, a.S) if gx is not None else x3
    gc3 = gc.view(a.B, 2 * a.C, a.S) if gc is not None else x3
    live = [t for t in (x3, go3, c3, gx3, gc3, sums) if t is not None]
    launch(Launch(_act_bwd_kernel, a.grid(bs, bc),
                  (go3, x3, c3 if c3 is not None else x3, gx3, gc3, sums if sums is not None else x3, a.S, a.C, a.cg,
                   *go3.stride(), *x3.stride(), *cst, *gx3.stride(), *gc3.stride()),
                  dict(COND=a.cond_mode, WRITE_X=need_x, WRITE_C=gc is not None, SUMS=sums is not None,
                       CAST_F32=INTERPRET, INT64=_needs_int64(*live), BLOCK_S=bs, BLOCK_C=bc)))
    if sums is not None:
        gc = sums.sum(1).to(cond.dtype)
    return (gx if need_x else empty), (gc if need_c else empty)


# ---- gated convolution ------------------------------------------------------------------------------------

class _StackGeometry(_Geometry):
    """The visible-tap plan of one stack, in the attributes masked_conv's launch helpers read
    (so _grad_input / _grad_weight run on it unchanged), plus the gate's channel split."""

    def __init__(self, x, weight, stack, mask_type, data_channels):
        who = "gated_conv2d (triton)"
        check_conv_tensors(who, x, weight)
        if stack not in STACKS:
            raise ValueError(f"{who}: stack must be 'vertical' or 'horizontal', got {stack!r}")
        if mask_type not in ("A", "B"):
            raise ValueError(f"{who}: mask_type must be 'A' or 'B', got {mask_type!r}")
        if not isinstance(data_channels, int) or data_channels < 1:
            raise ValueError(f"{who}: data_channels must be a positive int, got {data_channels!r}")
        self.B, self.Ci, self.H, self.W = x.shape
        self.Co, ci_w, self.kh, self.kw = weight.shape
        if ci_w != self.Ci:
            raise ValueError(f"{who}: input has {self.Ci} channels but weight expects {ci_w}")
        if self.Co % (2 * data_channels):
            raise ValueError(f"{who}: weight has {self.Co} output channels, not a multiple of 2 * data_channels "
                             f"({2 * data_channels})")
        if self.kh < 1 or self.kw < 1:
            raise ValueError(f"{who}: empty kernel {(self.kh, self.kw)}")
        self.C = self.Co // 2
        self.cg = self.C // data_channels
        self.dh = self.dw = 1
        self.Ho, self.Wo = self.H, self.W
        self.co_per_g = max(self.Co // data_channels, 1)
        self.ci_per_g = max(self.Ci // data_channels, 1)
        if stack == "vertical":
            if self.kw % 2 == 0:
                raise ValueError(f"{who}: the vertical stack needs an odd kernel width, got {self.kw}")
            # rows y-kv+1 .. y, columns x-kw//2 .. x+kw//2: every tap, raster order
            self.ph, self.pw = self.kh - 1, self.kw // 2
            self.n_plain, self.centre_rule, self.strict = self.kh * self.kw, False, 0
        else:
            if self.kh != 1:
                raise ValueError(f"{who}: the horizontal stack needs a [2C, Cin, 1, kc] weight, got "
                                 f"{tuple(weight.shape)}")
            if self.Ci % data_channels:
                raise ValueError(f"{who}: input channels ({self.Ci}) must be divisible by data_channels "
                                 f"({data_channels})")
            # taps x-kc+1 .. x-1, then the centre (the last tap) under the masked-conv rule
            self.ph, self.pw = 0, self.kw - 1
            self.n_plain = self.kw - 1 + (1 if mask_type == "B" and data_channels == 1 else 0)
            self.centre_rule = data_channels > 1
            self.strict = 1 if mask_type == "A" else 0
        self.n_taps = self.n_plain + int(self.centre_rule)
        self.dtype, self.device = x.dtype, x.device

    def check_extras(self, x, bias, cond):
        who = "gated_conv2d (triton)"
        if bias is not None:
            _check_tensor(who, "bias", bias, x.device)
            if tuple(bias.shape) != (self.Co,):
                raise ValueError(f"{who}: bias must have shape ({self.Co},), got {tuple(bias.shape)}")
        if cond is not None:
            _check_tensor(who, "cond", cond, x.device)
        return _cond_mode(who, cond, (self.B, self.Co, self.H, self.W))

    def conv_args(self):
        return (self.ph, self.pw, self.ci_per_g, self.cg)

    def grid(self):
        def grid(meta):
            return (self.B * triton.cdiv(self.H * self.W, meta["BLOCK_M"]), triton.cdiv(self.C, meta["BLOCK_N"]))
        return grid

    def launch_consts(self, bias, cond_mode, *tensors):
        block_k = _channel_block(self.Ci, 64 if INTERPRET else 32)
        return dict(self.consts(), HAS_BIAS=bias is not None, COND=cond_mode,
                    INT64=_needs_int64(*(t for t in tensors if t is not None)), BLOCK_K=block_k)


def _cond4(cond, cond_mode):
    """(tensor, strides b, c, h, w) of cond for the conv kernels."""
    if cond_mode == 1:
        return cond, (cond.stride(0), cond.stride(1), 0, 0)
    if cond_mode == 2:
        return cond, cond.stride()
    return None, (0, 0, 0, 0)


def _bias_cond_pre(g, x, bias, cond):
    """bias + cond as a [B, 2C, H, W] pre-activation: the whole conv when Ci == 0."""
    pre = torch.zeros((g.B, g.Co, g.H, g.W), dtype=torch.float32, device=x.device)
    if bias is not None:
        pre += bias.view(1, -1, 1, 1)
    if cond is not None:
        pre += cond if cond.dim() == 4 else cond.view(g.B, g.Co, 1, 1)
    return pre.to(x.dtype)


def gated_conv2d_forward(x, weight, bias, cond, stack: str, mask_type: str, data_channels: int, *,
                         launch=start) -> torch.Tensor:
    """gated_activation(stack_conv2d(x, weight, bias) + cond) in one pass: [B, Cin, H, W] -> [B, C, H, W].
    ``launch``: see kernels/_launch.py."""
    g = _StackGeometry(x, weight, stack, mask_type, data_channels)
    cond_mode = g.check_extras(x, bias, cond)
    y = _like_input(x, (g.B, g.C, g.H, g.W))
    if y.numel() == 0:
        return y
    if g.Ci == 0:
        return gated_activation_forward(_bias_cond_pre(g, x, bias, cond), None, data_channels, launch=launch)
    c, cst = _cond4(cond, cond_mode)
    consts = g.launch_consts(bias, cond_mode, x, y, c)
    args = (x, weight, bias if bias is not None else y, c if c is not None else y, y,
            g.H * g.W, g.Ci, g.H, g.W, g.C, *x.stride(), *weight.stride(), *cst, *y.stride(), *g.conv_args())
    launch(Launch(_conv_fwd, g.grid(), args, consts, dict(_INTERP_CONV, BLOCK_N=_channel_block(g.C))))
    return y


def gated_conv2d_backward(grad_out, x, weight, bias, cond, stack: str, mask_type: str, data_channels: int,
                          output_mask, *, launch=start) -> tuple:
    """(grad_x, grad_weight, grad_bias, grad_cond); an entry output_mask does not ask for (or the
    grad of a None bias / cond) is x.new_empty(0). grad_weight is exactly zero at taps the stack
    hides (masked centre channel pairs of the horizontal stack)."""
    who = "gated_conv2d (triton)"
    g = _StackGeometry(x, weight, stack, mask_type, data_channels)
    cond_mode = g.check_extras(x, bias, cond)
    _check_grad_out(who, grad_out, (g.B, g.C, g.H, g.W), x.device)
    need_x, need_w, need_b, need_c = _check_output_mask(who, output_mask, 4)
    need_b, need_c = need_b and bias is not None, need_c and cond is not None
    empty = x.new_empty(0)
    if not (need_x or need_w or need_b or need_c):
        return empty, empty, empty, empty
    if g.B * g.H * g.W == 0 or g.C == 0:
        return ((torch.zeros_like(x) if need_x else empty),
                (torch.zeros_like(weight) if need_w else empty),
                (torch.zeros_like(bias) if need_b else empty),
                (torch.zeros_like(cond) if need_c else empty))
    if g.Ci == 0:
        pre = _bias_cond_pre(g, x, bias, cond)
        gp = gated_activation_backward(grad_out, pre, None, data_channels, [True, False], launch=launch)[0].float()
        gc = (gp.sum((2, 3)) if cond_mode == 1 else gp).to(cond.dtype) if need_c else empty
        return ((torch.zeros_like(x) if need_x else empty), (torch.zeros_like(weight) if need_w else empty),
                (gp.sum((0, 2, 3)).to(bias.dtype) if need_b else empty), gc)

    # grad_pre is stored when a convolution gradient or a full-shape cond needs it; the column sums
    # are fused when the bias or a [B, 2C] cond needs them
    write_pre = need_x or need_w or (need_c and cond_mode == 2)
    sums_needed = need_b or (need_c and cond_mode == 1)
    gp = _like_input(x, (g.B, g.Co, g.H, g.W)) if write_pre else None
    n_slots = triton.cdiv(g.H * g.W, _SLOT_M)
    sums = torch.empty((g.B, n_slots, g.Co), dtype=torch.float32, device=x.device) if sums_needed else None
    c, cst = _cond4(cond, cond_mode)
    consts = dict(g.launch_consts(bias, cond_mode, x, grad_out, c, gp, sums), WRITE_PRE=write_pre,
                  SUMS=sums_needed, SLOT_M=_SLOT_M)
    dummy = gp if gp is not None else sums
    args = (grad_out, x, weight, bias if bias is not None else dummy, c if c is not None else dummy, dummy,
            sums if sums is not None else dummy, g.H * g.W, g.Ci, g.H, g.W, g.C, n_slots,
            *grad_out.stride(), *x.stride(), *weight.stride(), *cst,
            *(gp.stride() if gp is not None else (0, 0, 0, 0)), *g.conv_args())
    launch(Launch(_conv_pre_grad, g.grid(), args, consts, dict(_INTERP_CONV, BLOCK_N=_channel_block(g.C))))

    gx = gw = gb = gc = empty
    if need_x:
        gx = _grad_input(gp, weight, x, g, launch)
    if need_w:
        gw = _grad_weight(gp, x, g, launch)
    if need_b:
        gb = sums.sum((0, 1)).to(bias.dtype)
    if need_c:
        gc = sums.sum(1).to(cond.dtype) if cond_mode == 1 else gp.to(cond.dtype)
    return gx, gw, gb, gc
