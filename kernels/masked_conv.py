"""Triton kernels for the masked (causal) 2-D convolution of PixelCNN.

Every kernel is an implicit GEMM over the *visible* taps only: no weight * mask
product, no im2col buffer, and the masked taps cost nothing.

Tap enumeration. In raster order the visible taps of a kh x kw kernel are
exactly the first ``ch*kw + cw`` taps (all rows above the centre, then the
centre row left of the centre), followed by the centre. So one static count
``N_PLAIN`` (a constexpr) enumerates them: tap t is (t // kw, t % kw). The
centre joins that range when it is fully visible (mask B, one data channel),
is dropped when fully hidden (mask A, one data channel), and otherwise
(``data_channels > 1``) is a separate step whose weight tile is masked by the
colour rule: out group g sees in group h iff h < g (A) or h <= g (B).

Kernels
* forward:     tile M = B*Ho*Wo x N = Co, K = (plain taps x Ci blocks) then the
               centre's Ci blocks up to the last group this Co block can see;
               bias fused.
* grad-input:  tile M = B*H*W x N = Ci, K = (plain taps x Co blocks) then the
               centre's Co blocks from the first group that sees this Ci block.
* grad-weight: one program per (visible tap, Co block x Ci block, M split);
               grad_w[:, :, i, j] = grad_out^T @ x_shifted, reduced over M.
               Big reductions are split over programs into an fp32 buffer
               [split, Co, Ci, kh, kw] summed afterwards (deterministic, unlike
               atomics). Masked taps and masked centre pairs stay exactly zero.

All accumulation is fp32; outputs come back in the input dtype. Strides are
passed to the kernels, so NCHW, channels_last and sliced inputs need no copy.
Under TRITON_INTERPRET=1 tile operands are cast to fp32 before tl.dot (bf16
tl.dot is wrong in the interpreter) and fixed block sizes replace autotuning
(which the interpreter cannot run).
"""
import torch
import triton
import triton.language as tl

from ._launch import INTERPRET, Launch, start

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT32_MAX = 2 ** 31 - 1


# ---- device code ------------------------------------------------------------------------------------------

@triton.jit
def _mma(a, b, acc, CAST_F32: tl.constexpr, PRECISION: tl.constexpr):
    """acc += a @ b in fp32."""
    if CAST_F32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _round_out(acc, out_dtype: tl.constexpr, CAST_F32: tl.constexpr):
    """acc (fp32) in the output dtype, rounded to nearest even."""
    if CAST_F32:
        if out_dtype == tl.bfloat16:
            # the interpreter's fp32 -> bf16 cast truncates: round the top 16 bits first (then it is exact)
            bits = acc.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            acc = bits.to(tl.float32, bitcast=True)
    return acc.to(out_dtype)


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, bias_ptr, y_ptr,
                M, Ci, H, W, Co, Ho, Wo,
                sxb, sxc, sxh, sxw,
                swo, swi, swh, sww,
                syb, syc, syh, syw,
                ph, pw, dh, dw, ci_per_g, co_per_g,
                KW: tl.constexpr, N_PLAIN: tl.constexpr, CENTRE_RULE: tl.constexpr, STRICT: tl.constexpr,
                HAS_BIAS: tl.constexpr, CAST_F32: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if INT64:
        offs_m = offs_m.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < Co
    ox = offs_m % Wo
    t = offs_m // Wo
    oy = t % Ho
    b = t // Ho
    x_rows = x_ptr + b * sxb
    w_cols = w_ptr + offs_n * swo

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # one flat K loop over (tap, Ci block) pipelines better than two nested loops when Ci is small
    n_cb = tl.cdiv(Ci, BLOCK_K)
    for k in range(0, N_PLAIN * n_cb):
        tap = k // n_cb
        ci = (k - tap * n_cb) * BLOCK_K + offs_k
        i = tap // KW
        j = tap - i * KW
        iy = oy - ph + i * dh
        ix = ox - pw + j * dw
        row_ok = m_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        ci_ok = ci < Ci
        a = tl.load(x_rows[:, None] + iy[:, None] * sxh + ix[:, None] * sxw + ci[None, :] * sxc,
                    mask=row_ok[:, None] & ci_ok[None, :], other=0.0)
        wt = tl.load(w_cols[None, :] + ci[:, None] * swi + i * swh + j * sww,
                     mask=ci_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(a, wt, acc, CAST_F32, PRECISION)

    if CENTRE_RULE:
        # the centre is raster tap N_PLAIN; its Ci range ends at the last group this Co block sees
        i = N_PLAIN // KW
        j = N_PLAIN - i * KW
        iy = oy - ph + i * dh
        ix = ox - pw + j * dw
        row_ok = m_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        g_out = offs_n // co_per_g
        g_last = (tl.minimum(pid_n * BLOCK_N + BLOCK_N, Co) - 1) // co_per_g
        ci_end = tl.minimum((g_last + 1 - STRICT) * ci_per_g, Ci)
        for c0 in range(0, ci_end, BLOCK_K):
            ci = c0 + offs_k
            ci_ok = ci < ci_end
            seen = (ci[:, None] // ci_per_g) < (g_out[None, :] + 1 - STRICT)
            a = tl.load(x_rows[:, None] + iy[:, None] * sxh + ix[:, None] * sxw + ci[None, :] * sxc,
                        mask=row_ok[:, None] & ci_ok[None, :], other=0.0)
            wt = tl.load(w_cols[None, :] + ci[:, None] * swi + i * swh + j * sww,
                         mask=ci_ok[:, None] & n_ok[None, :] & seen, other=0.0)
            acc = _mma(a, wt, acc, CAST_F32, PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + (b * syb + oy * syh + ox * syw)[:, None] + offs_n[None, :] * syc
    tl.store(y_ptrs, _round_out(acc, y_ptr.dtype.element_ty, CAST_F32), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _grad_x_kernel(go_ptr, w_ptr, gx_ptr,
                   M, Ci, H, W, Co, Ho, Wo,
                   sgb, sgc, sgh, sgw,
                   swo, swi, swh, sww,
                   sxb, sxc, sxh, sxw,
                   ph, pw, dh, dw, ci_per_g, co_per_g,
                   KW: tl.constexpr, N_PLAIN: tl.constexpr, CENTRE_RULE: tl.constexpr, STRICT: tl.constexpr,
                   CAST_F32: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # rows: input positions (b, y, x); columns: Ci; reduction: visible taps x Co
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if INT64:
        offs_m = offs_m.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < Ci
    xx = offs_m % W
    t = offs_m // W
    yy = t % H
    b = t // H
    g_rows = go_ptr + b * sgb
    w_cols = w_ptr + offs_n * swi

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n_cb = tl.cdiv(Co, BLOCK_K)
    for k in range(0, N_PLAIN * n_cb):
        tap = k // n_cb
        co = (k - tap * n_cb) * BLOCK_K + offs_k
        i = tap // KW
        j = tap - i * KW
        oy = yy + ph - i * dh
        ox = xx + pw - j * dw
        row_ok = m_ok & (oy >= 0) & (oy < Ho) & (ox >= 0) & (ox < Wo)
        co_ok = co < Co
        a = tl.load(g_rows[:, None] + oy[:, None] * sgh + ox[:, None] * sgw + co[None, :] * sgc,
                    mask=row_ok[:, None] & co_ok[None, :], other=0.0)
        wt = tl.load(w_cols[None, :] + co[:, None] * swo + i * swh + j * sww,
                     mask=co_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(a, wt, acc, CAST_F32, PRECISION)

    if CENTRE_RULE:
        # Co range starts at the first out group that sees the lowest in group of this Ci block
        i = N_PLAIN // KW
        j = N_PLAIN - i * KW
        oy = yy + ph - i * dh
        ox = xx + pw - j * dw
        row_ok = m_ok & (oy >= 0) & (oy < Ho) & (ox >= 0) & (ox < Wo)
        g_in = offs_n // ci_per_g
        co_start = ((pid_n * BLOCK_N) // ci_per_g + STRICT) * co_per_g
        for c0 in range(co_start, Co, BLOCK_K):
            co = c0 + offs_k
            co_ok = co < Co
            seen = g_in[None, :] < ((co[:, None] // co_per_g) + 1 - STRICT)
            a = tl.load(g_rows[:, None] + oy[:, None] * sgh + ox[:, None] * sgw + co[None, :] * sgc,
                        mask=row_ok[:, None] & co_ok[None, :], other=0.0)
            wt = tl.load(w_cols[None, :] + co[:, None] * swo + i * swh + j * sww,
                         mask=co_ok[:, None] & n_ok[None, :] & seen, other=0.0)
            acc = _mma(a, wt, acc, CAST_F32, PRECISION)

    gx_ptrs = gx_ptr + (b * sxb + yy * sxh + xx * sxw)[:, None] + offs_n[None, :] * sxc
    tl.store(gx_ptrs, _round_out(acc, gx_ptr.dtype.element_ty, CAST_F32), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _grad_w_kernel(go_ptr, x_ptr, gw_ptr,
                   M, Ci, H, W, Co, Ho, Wo,
                   sgb, sgc, sgh, sgw,
                   sxb, sxc, sxh, sxw,
                   ph, pw, dh, dw, ci_per_g, co_per_g, m_per_split,
                   KW: tl.constexpr, KHW: tl.constexpr, N_PLAIN: tl.constexpr, CENTRE_RULE: tl.constexpr,
                   STRICT: tl.constexpr, CAST_F32: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
                   BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_M: tl.constexpr):
    # program (tap, Co x Ci tile, split): tap is the raster index, the centre (if ruled) being N_PLAIN
    tap = tl.program_id(0)
    pid_t = tl.program_id(1)
    split = tl.program_id(2)
    n_ci_b = tl.cdiv(Ci, BLOCK_CI)
    pid_co = pid_t // n_ci_b
    pid_ci = pid_t - pid_co * n_ci_b
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    co_ok = offs_co < Co
    ci_ok = offs_ci < Ci
    i = tap // KW
    j = tap - i * KW

    m_lo = split * m_per_split
    m_hi = tl.minimum(m_lo + m_per_split, M)
    keep = co_ok[:, None] & ci_ok[None, :]
    if CENTRE_RULE:
        is_centre = tap == N_PLAIN
        seen = (offs_ci[None, :] // ci_per_g) < ((offs_co[:, None] // co_per_g) + 1 - STRICT)
        # seen OR not-the-centre, in int arithmetic: the interpreter rejects a mask made by
        # or-ing a block with a scalar
        keep = keep & ((seen.to(tl.int32) + (tap != N_PLAIN).to(tl.int32)) > 0)
        # a centre tile the colour rule hides entirely does no work
        g_out_last = (tl.minimum(pid_co * BLOCK_CO + BLOCK_CO, Co) - 1) // co_per_g
        g_in_first = (pid_ci * BLOCK_CI) // ci_per_g
        dead = is_centre & (g_in_first >= g_out_last + 1 - STRICT)
        m_hi = tl.where(dead, m_lo, m_hi)

    acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        if INT64:
            offs_m = offs_m.to(tl.int64)
        m_ok = offs_m < m_hi
        ox = offs_m % Wo
        t = offs_m // Wo
        oy = t % Ho
        b = t // Ho
        iy = oy - ph + i * dh
        ix = ox - pw + j * dw
        x_ok = m_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        g = tl.load(go_ptr + (b * sgb + oy * sgh + ox * sgw)[None, :] + offs_co[:, None] * sgc,
                    mask=co_ok[:, None] & m_ok[None, :], other=0.0)
        a = tl.load(x_ptr + (b * sxb + iy * sxh + ix * sxw)[:, None] + offs_ci[None, :] * sxc,
                    mask=x_ok[:, None] & ci_ok[None, :], other=0.0)
        acc = _mma(g, a, acc, CAST_F32, PRECISION)

    gw_ptrs = gw_ptr + split * (Co * Ci * KHW) + offs_co[:, None] * (Ci * KHW) + offs_ci[None, :] * KHW + tap
    tl.store(gw_ptrs, acc, mask=keep)


# ---- launch configuration ---------------------------------------------------------------------------------

def _gemm_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=nw, num_stages=ns)
            for bm, bn, nw, ns in ((128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3), (64, 32, 4, 4),
                                   (128, 32, 4, 4), (256, 64, 8, 3), (32, 32, 2, 4))]


def _grad_w_configs():
    # no (128, 4 warps, 3 stages): it spills in every dtype on sm_80 and in fp32 on sm_90 (the compile report)
    return [triton.Config({"BLOCK_M": bm}, num_warps=nw, num_stages=ns)
            for bm, nw, ns in ((32, 4, 3), (64, 4, 3), (64, 8, 4), (128, 8, 3))]


if INTERPRET:
    # the interpreter cannot autotune; the launchers pass fixed block sizes instead
    _fwd = _fwd_kernel
    _grad_x = _grad_x_kernel
    _grad_w = _grad_w_kernel
else:
    _fwd = triton.autotune(_gemm_configs(), key=["M", "Ci", "Co", "N_PLAIN"])(_fwd_kernel)
    _grad_x = triton.autotune(_gemm_configs(), key=["M", "Ci", "Co", "N_PLAIN"])(_grad_x_kernel)
    _grad_w = triton.autotune(_grad_w_configs(), key=["M", "Ci", "Co", "m_per_split"])(_grad_w_kernel)

# fixed tiles under the interpreter: large M tiles mean fewer (slow, Python-level) programs
_INTERP_GEMM = {"BLOCK_M": 64}  # BLOCK_N follows the channel count
_INTERP_GRAD_W = {"BLOCK_M": 64}


def _channel_block(c, cap=64):
    """A tile edge for a channel count: a power of two in [16, cap] (tl.dot needs >= 16)."""
    return max(16, min(cap, triton.next_power_of_2(max(int(c), 1))))


def _precision(dtype):
    # fp32 on a GPU: TF32 tensor cores only when torch is allowed them too (default: exact fp32)
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


# ---- argument checks --------------------------------------------------------------------------------------

def _pair(v, name):
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(i, int) and not isinstance(i, bool)
                                                             for i in v):
        return (int(v[0]), int(v[1]))
    raise ValueError(f"masked_conv2d (triton): {name} must be an int or two ints, got {v!r}")


def check_conv_tensors(who, x, weight):
    """The input/weight checks every convolution launcher needs (4-D, one dtype, one device; that the device is
    one Triton runs is start's check)."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise ValueError(f"{who}: input and weight must be tensors")
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"{who}: input and weight must be 4-D, got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"{who}: input and weight must share one of float16, bfloat16, float32, got "
                         f"{x.dtype} and {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"{who}: input on {x.device} but weight on {weight.device}")


class _Geometry:
    """Shapes, the visible-tap plan and the checks shared by forward and backward."""

    def __init__(self, x, weight, mask_type, data_channels, padding, dilation):
        who = "masked_conv2d (triton)"
        check_conv_tensors(who, x, weight)
        if mask_type not in ("A", "B"):
            raise ValueError(f"{who}: mask_type must be 'A' or 'B', got {mask_type!r}")
        self.B, self.Ci, self.H, self.W = x.shape
        self.Co, ci_w, self.kh, self.kw = weight.shape
        if ci_w != self.Ci:
            raise ValueError(f"{who}: input has {self.Ci} channels but weight expects {ci_w}")
        if self.kh % 2 == 0 or self.kw % 2 == 0:
            raise ValueError(f"{who}: kernel size must be odd, got {(self.kh, self.kw)}")
        if not isinstance(data_channels, int) or data_channels < 1:
            raise ValueError(f"{who}: data_channels must be a positive int, got {data_channels!r}")
        if self.Ci % data_channels or self.Co % data_channels:
            raise ValueError(f"{who}: channels ({self.Ci} in, {self.Co} out) must be divisible by "
                             f"data_channels ({data_channels})")
        (self.ph, self.pw), (self.dh, self.dw) = _pair(padding, "padding"), _pair(dilation, "dilation")
        if min(self.ph, self.pw) < 0 or min(self.dh, self.dw) < 1:
            raise ValueError(f"{who}: need padding >= 0 and dilation >= 1, got {padding} and {dilation}")
        self.Ho = self.H + 2 * self.ph - self.dh * (self.kh - 1)
        self.Wo = self.W + 2 * self.pw - self.dw * (self.kw - 1)
        if self.Ho < 1 or self.Wo < 1:
            raise ValueError(f"{who}: input {(self.H, self.W)} too small for kernel {(self.kh, self.kw)}, padding "
                             f"{(self.ph, self.pw)}, dilation {(self.dh, self.dw)}")
        self.ci_per_g = max(self.Ci // data_channels, 1)
        self.co_per_g = max(self.Co // data_channels, 1)
        ch, cw = self.kh // 2, self.kw // 2
        # raster taps before the centre are all visible; the centre joins them when fully visible
        self.n_plain = ch * self.kw + cw + (1 if mask_type == "B" and data_channels == 1 else 0)
        self.centre_rule = data_channels > 1
        self.strict = 1 if mask_type == "A" else 0
        self.n_taps = self.n_plain + int(self.centre_rule)
        self.dtype, self.device = x.dtype, x.device

    def consts(self):
        return dict(KW=self.kw, N_PLAIN=self.n_plain, CENTRE_RULE=self.centre_rule, STRICT=self.strict,
                    CAST_F32=INTERPRET, PRECISION=_precision(self.dtype))

    def dims(self):
        return (self.Ci, self.H, self.W, self.Co, self.Ho, self.Wo)

    def conv(self):
        return (self.ph, self.pw, self.dh, self.dw, self.ci_per_g, self.co_per_g)


def _needs_int64(*tensors):
    # element offsets past int32 (counting the strided extent, not just numel)
    for t in tensors:
        extent = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)
        if extent > _INT32_MAX or t.numel() > _INT32_MAX:
            return True
    return False


def _like_input(x, shape):
    """An output laid out like x (channels_last stays channels_last, as torch's conv does)."""
    fmt = torch.channels_last if (x.is_contiguous(memory_format=torch.channels_last)
                                  and not x.is_contiguous()) else torch.contiguous_format
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


# ---- public launchers -------------------------------------------------------------------------------------

def masked_conv2d_forward(x, weight, bias, mask_type: str, data_channels: int, padding, dilation, *,
                          launch=start) -> torch.Tensor:
    """y = conv2d(x, weight * mask) + bias, computing only the visible taps. ``launch``: see kernels/_launch.py."""
    g = _Geometry(x, weight, mask_type, data_channels, padding, dilation)
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (g.Co,) or bias.dtype != x.dtype \
                or bias.device != x.device:
            raise ValueError(f"masked_conv2d (triton): bias must be a ({g.Co},) {x.dtype} tensor on {x.device}")
    y = _like_input(x, (g.B, g.Co, g.Ho, g.Wo))
    M = g.B * g.Ho * g.Wo
    if y.numel() == 0:
        return y
    if g.Ci == 0:
        y.copy_((bias if bias is not None else y.new_zeros(g.Co)).view(1, -1, 1, 1).expand_as(y))
        return y
    block_k = _channel_block(g.Ci, 64 if INTERPRET else 32)
    consts = dict(g.consts(), HAS_BIAS=bias is not None, INT64=_needs_int64(x, y), BLOCK_K=block_k)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(g.Co, meta["BLOCK_N"]))

    args = (x, weight, bias if bias is not None else y, y, M, *g.dims(),
            *x.stride(), *weight.stride(), *y.stride(), *g.conv())
    launch(Launch(_fwd, grid, args, consts, dict(_INTERP_GEMM, BLOCK_N=_channel_block(g.Co))))
    return y


def _grad_input(grad_out, weight, x, g, launch):
    gx = _like_input(x, x.shape)
    M = g.B * g.H * g.W
    if gx.numel() == 0:
        return gx
    if g.Co == 0:
        return gx.zero_()
    block_k = _channel_block(g.Co, 64 if INTERPRET else 32)
    consts = dict(g.consts(), INT64=_needs_int64(grad_out, gx), BLOCK_K=block_k)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(g.Ci, meta["BLOCK_N"]))

    args = (grad_out, weight, gx, M, *g.dims(), *grad_out.stride(), *weight.stride(), *gx.stride(), *g.conv())
    launch(Launch(_grad_x, grid, args, consts, dict(_INTERP_GEMM, BLOCK_N=_channel_block(g.Ci))))
    return gx


def _sm_count(device):
    """Streaming multiprocessors of a CUDA device; 1 for any other (a plan on meta tensors, the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _grad_weight(grad_out, x, g, launch, split=None):
    """grad_weight in x's dtype; ``split`` (the number of M ranges reduced apart) is chosen if None."""
    shape = (g.Co, g.Ci, g.kh, g.kw)
    M = g.B * g.Ho * g.Wo
    if g.Co == 0 or g.Ci == 0 or M == 0 or g.n_taps == 0:
        return torch.zeros(shape, dtype=g.dtype, device=g.device)
    block_co, block_ci = _channel_block(g.Co), _channel_block(g.Ci)
    tiles = g.n_taps * triton.cdiv(g.Co, block_co) * triton.cdiv(g.Ci, block_ci)
    if split is None:
        if INTERPRET:
            split = 1  # programs run one after another: splitting only adds work
        else:
            # enough programs to fill the GPU (~4 per SM), each reducing >= 1024 rows, buffer <= 256 MiB
            sms = _sm_count(g.device)
            split = min(max(1, (4 * sms) // tiles), max(1, M // 1024),
                        max(1, (256 << 20) // (4 * g.Co * g.Ci * g.kh * g.kw)))
    split = max(1, min(int(split), M))
    m_per_split = triton.cdiv(M, split)
    if not INTERPRET:
        m_per_split = triton.cdiv(m_per_split, 128) * 128  # a multiple of every BLOCK_M: no ragged tiles
    split = triton.cdiv(M, m_per_split)
    # zeros: masked taps and masked centre pairs are never written
    buf = torch.zeros((split,) + shape, dtype=torch.float32, device=g.device)
    if buf.numel() > _INT32_MAX:
        raise ValueError("masked_conv2d (triton): weight gradient buffer too large for int32 offsets")
    consts = dict(g.consts(), KHW=g.kh * g.kw, INT64=_needs_int64(grad_out, x), BLOCK_CO=block_co,
                  BLOCK_CI=block_ci)

    def grid(meta):
        return (g.n_taps, tiles // g.n_taps, split)

    args = (grad_out, x, buf, M, *g.dims(), *grad_out.stride(), *x.stride(), *g.conv(), m_per_split)
    launch(Launch(_grad_w, grid, args, consts, _INTERP_GRAD_W))
    gw = buf[0] if split == 1 else buf.sum(0)
    return gw.to(g.dtype)


def masked_conv2d_backward(grad_out, x, weight, mask_type: str, data_channels: int, padding, dilation,
                           output_mask, *, launch=start) -> tuple:
    """(grad_x, grad_weight, grad_bias), each None where output_mask says it is not needed.
    grad_weight is exactly zero at masked taps and masked centre channel pairs."""
    g = _Geometry(x, weight, mask_type, data_channels, padding, dilation)
    if not isinstance(grad_out, torch.Tensor) or tuple(grad_out.shape) != (g.B, g.Co, g.Ho, g.Wo):
        raise ValueError(f"masked_conv2d (triton): grad_out must have shape {(g.B, g.Co, g.Ho, g.Wo)}, got "
                         f"{tuple(grad_out.shape) if isinstance(grad_out, torch.Tensor) else type(grad_out)}")
    if grad_out.device != x.device:
        raise ValueError(f"masked_conv2d (triton): grad_out on {grad_out.device} but input on {x.device}")
    if len(output_mask) != 3:
        raise ValueError(f"masked_conv2d (triton): output_mask must have 3 entries, got {output_mask!r}")
    if grad_out.dtype != x.dtype:
        grad_out = grad_out.to(x.dtype)  # tl.dot wants both operands in one dtype
    need_x, need_w, need_b = (bool(v) for v in output_mask)
    gx = _grad_input(grad_out, weight, x, g, launch) if need_x else None
    gw = _grad_weight(grad_out, x, g, launch) if need_w else None
    gb = grad_out.sum(dim=(0, 2, 3), dtype=torch.float32).to(x.dtype) if need_b else None
    return gx, gw, gb
