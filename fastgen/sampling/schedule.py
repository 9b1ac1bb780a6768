"""Cached sampling of multi-scale networks (PixelCNN++): Ramachandran et al.'s
per-layer queues, generalised to any network of convolutions.

fastgen/sampling/program.py compiles single-scale networks into a pixel pass
and a row pass. A multi-scale network (strided and transposed convolutions,
shifted convolutions written as zero padding plus a crop) has no such fixed
rhythm: a coarse position becomes computable when the last fine pixel under
its receptive field has been drawn. This compiler finds that moment for every
position of every activation and runs each position then, exactly once.

For every activation (a *slot*) the compiler derives, by structure, its *ready
map*: for each position, the raster index of the last image pixel it depends on
(-1: none). The input's ready map is the raster index itself; a convolution's
output position is ready when the last of the input positions under its
non-zero taps is; a transposed convolution's when the input positions that
scatter into it are; position-wise operations take the latest of their
operands. Generation then runs *steps*: step t, before pixel t is drawn,
computes every position whose ready map is t - 1 (all of them at step 0 for -1),
instruction by instruction in program order, so every operand position is
computed before it is read. Each instruction's positions, sorted by step, are
its queue. The network is exact to sample this way if and only if its output at
pixel t is ready by t - 1; otherwise compilation fails naming the pixel.

Values are *views* of slots: zero padding (F.pad), crops (slicing along H and W)
and channel slices cost nothing; an operand reads zeros outside the view's own
extent and outside the slot. Each slot keeps a ring of its last ``ring``
positions in raster order (position (y, x) at (y W + x) mod ring), ``ring``
found by replaying the schedule: a value read only where it was just computed
keeps a position or two, one read by a convolution over the rows above about
a row.

The network's output at a pixel must not depend on any channel of that pixel:
the likelihood draws all of the pixel's channels at once, from the output there
(PixelCNN++'s discretized logistic mixture couples the colours itself; Bernoulli
and categorical logits draw each channel from its own logits, which is the
sub-pixel order's draw when no channel sees the pixel's others). A colour
network whose outputs see the pixel's earlier colours needs the colour-by-colour
order of program.py; here it is a CompileError, not a causality verdict.
"""
import collections
import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.nn import MaskedConv2d
from fastgen.ref.dmol import infer_nr_mix
from fastgen.sampling.common import not_causal, output_error
from fastgen.sampling import code as fmt
from fastgen.sampling.code import ACT, ADD, AFFINE, CONST, CONV, CONVT, COPY, FILL, GATE, MUL
from fastgen.sampling.program import CompileError, Pool, Val, _Compiler, trace

_SCHEDULE_OPS = ("convolutions of any kernel, stride, dilation and zero padding (fastgen.MaskedConv2d, nn.Conv2d), "
                 "transposed convolutions (nn.ConvTranspose2d), zero padding (F.pad) and crops along H and W, "
                 "the Gated PixelCNN's ops (GatedMaskedConv2d, vertical_conv2d, gated_conv2d, gated_activation), "
                 "position-wise operations (activations, additions and products, eval-mode BatchNorm2d and "
                 "BatchNormAct2d, dropout in eval mode, concatenation and chunks along channels)")


@dataclass
class Ref:
    """An operand: channels [c0, c0 + C) of a slot, seen through a view: the
    value at (y, x) is the slot's at (y - oy, x - ox) for slot rows [y0, y1)
    and columns [x0, x1) (the part inside both the slot and the view), else 0."""
    slot: int
    c0: int
    oy: int
    ox: int
    y0: int
    y1: int
    x0: int
    x1: int

    def encode(self):
        return [self.slot, self.c0, self.oy, self.ox, self.y0, self.y1, self.x0, self.x1]


@dataclass
class SVal(Val):
    """A traced tensor that depends on the image, as a view of a slot
    (kind 'spatial'): extent h x w, channels from c0, offset (oy, ox), and
    the window of slot rows [y0, y1) and columns [x0, x1) it shows (crops
    narrow it; padding never widens it: a crop padded back reads zeros)."""
    h: int = 0
    w: int = 0
    c0: int = 0
    oy: int = 0
    ox: int = 0
    y0: int = 0
    y1: int = 0
    x0: int = 0
    x1: int = 0


@dataclass
class Fill:
    """A constant tensor the shape of an image-dependent one (torch.ones_like(x))."""
    value: float
    channels: int
    h: int
    w: int


@dataclass
class Slot:
    channels: int
    h: int
    w: int
    name: str
    ready: Optional[torch.Tensor] = None  # [h, w] int64: the ready map
    ring: int = 1                         # ring positions


@dataclass
class Instr:
    """One instruction over the positions of its output slot (see Schedule.encode)."""
    op: int
    out: int
    a: Optional[Ref] = None
    b: Optional[Ref] = None
    channels: int = 0                      # channels read from a (and b) / written
    weight: Optional[torch.Tensor] = None  # CONV, CONVT [T, Cin, Cout]
    bias: Optional[torch.Tensor] = None
    taps: Tuple[Tuple[int, int], ...] = ()  # CONV: input (y s + dy, x s + dx); CONVT: input ((y - dy) / s, ...)
    stride: Tuple[int, int] = (1, 1)
    act: str = "identity"
    param: float = 0.0                     # ACT: slope / alpha; ADD: alpha; FILL: the value
    scale: Optional[torch.Tensor] = None   # AFFINE [C]
    shift: Optional[torch.Tensor] = None
    const: Optional[torch.Tensor] = None   # CONST: [B, C] or a map [B, h, w, C]
    multiply: bool = False
    data_channels: int = 1                 # GATE
    out_off: int = 0                       # COPY, FILL: channels [out_off, out_off + channels) of out
    queue: Optional[torch.Tensor] = None   # positions y * w + x of out, by step
    start: Optional[torch.Tensor] = None   # [steps + 1]: step t's positions are queue[start[t]:start[t + 1]]


@dataclass
class Schedule:
    batch: int
    shape: Tuple[int, int, int]
    dtype: torch.dtype
    device: torch.device
    likelihood: str = "logistic-mixture"
    levels: int = 256
    nr_mix: int = 0
    slots: list = field(default_factory=list)
    code: list = field(default_factory=list)
    input: int = 0
    output: Optional[Ref] = None
    out_channels: int = 0

    def encode(self):
        """(slots, code, params, scalars) for the C++ engine.

        slots: [C, H, W, ring] per slot. Code: instructions in the format of
        fastgen/sampling/code.py (its HEAD and OWN fields by name); queue and
        start are int64 params."""
        pool = Pool()
        code = []
        for i in self.code:
            head = {"out": i.out, "channels": i.channels, "a": i.a and i.a.encode(), "b": i.b and i.b.encode(),
                    "queue": pool.param(i.queue), "start": pool.param(i.start)}
            own, taps = pool.position_wise(i), ()
            if own is not None:
                own = dict(zip(fmt.OWN[fmt.OPS[i.op - 1]], own))
            elif i.op in (CONV, CONVT):
                own = {"weight": pool.param(i.weight), "bias": pool.param(i.bias), "sy": i.stride[0],
                       "sx": i.stride[1], "taps": len(i.taps)}
                taps = pool.taps(i)
            elif i.op == ADD:
                own = {"scalar": pool.scalar(i.param)}
            elif i.op == MUL:
                own = {}
            elif i.op == COPY:
                own = {"out_off": i.out_off}
            elif i.op == FILL:
                own = {"out_off": i.out_off, "scalar": pool.scalar(i.param)}
            code += fmt.instruction(i.op, head, own, taps)
        slots = [v for s in self.slots for v in (s.channels, s.h, s.w, s.ring)]
        return slots, code, pool.params, pool.scalars

    def config(self):
        """The engines' description of the run (fastgen/sampling/code.py, CONFIG)."""
        c, h, w = self.shape
        return fmt.config(channels=c, height=h, width=w, input=self.input, likelihood=self.likelihood,
                          levels=self.levels, nr_mix=self.nr_mix, out_channels=self.out_channels,
                          out=self.output.encode())


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class _ScheduleCompiler(_Compiler):
    """program.py's graph walk and operation dispatch, emitting views and
    scheduled instructions (the base class's primitives, overridden)."""
    SUPPORTED = _SCHEDULE_OPS
    ADD_IN_PLACE = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prog = Schedule(batch=self.batch, shape=self.shape, dtype=self.dtype, device=self.device)

    # -- values
    def val(self, slot, channels, h, w):
        """A whole new slot as a value."""
        return SVal(slot, "spatial", channels, h, w, 0, 0, 0, 0, h, 0, w)

    def view(self, a, **changes):
        """The value ``a`` seen differently (fields of SVal changed); the window
        narrows to the slot rows and columns inside the new extent (value row r
        is slot row r - oy), so crops (slices, negative padding) hide what they
        cut and padding never shows it again."""
        v = dataclasses.replace(a, **changes)
        return dataclasses.replace(v, y0=max(v.y0, -v.oy), y1=min(v.y1, v.h - v.oy), x0=max(v.x0, -v.ox),
                                   x1=min(v.x1, v.w - v.ox))

    def ref(self, a):
        return Ref(a.slot, a.c0, a.oy, a.ox, a.y0, a.y1, a.x0, a.x1)

    def extent(self, a):
        return a.h, a.w

    def new_slot(self, channels, h, w, name):
        self.prog.slots.append(Slot(channels, h, w, name))
        return len(self.prog.slots) - 1

    def emit_new(self, op, a, channels, name, h=None, w=None, **fields):
        """A new slot (a's extent unless given) written by one instruction reading a."""
        h, w = (a.h, a.w) if h is None else (h, w)
        slot = self.new_slot(channels, h, w, name)
        self.prog.code.append(Instr(op, slot, a=self.ref(a), channels=a.channels, **fields))
        return self.val(slot, channels, h, w)

    def no_inplace(self, inplace):
        if inplace:
            self.error("an in-place operation (the multi-scale sampler keeps every value: write it out of place)")

    # -- the image and the output
    def input_val(self):
        c, h, w = self.shape
        self.prog.input = self.new_slot(c, h, w, "input")
        self.prog.slots[self.prog.input].ready = torch.arange(h * w, dtype=torch.int64).view(h, w)
        return self.val(self.prog.input, c, h, w)

    def set_output(self, out):
        c, h, w = self.shape
        if not isinstance(out, SVal) or (out.h, out.w) != (h, w):
            self.error(f"the network's output must be [B, K, {h}, {w}] (the image's height and width)")
        why = output_error(out.channels, self.likelihood, self.levels, c)
        if why:  # the likelihood's settings, not the network: no method could sample it so
            raise ValueError(why)
        p = self.prog
        p.likelihood, p.levels = self.likelihood, self.levels
        p.nr_mix = infer_nr_mix(c, out.channels) if self.likelihood == "logistic-mixture" else 0
        p.output, p.out_channels = self.ref(out), out.channels

    # -- position-wise operations
    def unary(self, a, act, param=0.0, inplace=False):
        self.no_inplace(inplace)
        return self.emit_new(ACT, a, a.channels, act, act=act, param=param)

    def affine(self, a, scale=1.0, shift=0.0, inplace=False):
        self.no_inplace(inplace)
        c = a.channels
        scale = torch.full((c,), scale, dtype=self.dtype, device=self.device) if not torch.is_tensor(scale) else scale
        shift = torch.full((c,), shift, dtype=self.dtype, device=self.device) if not torch.is_tensor(shift) else shift
        return self.emit_new(AFFINE, a, c, "affine", scale=scale, shift=shift)

    def with_const(self, a, t, multiply, inplace=False):
        if isinstance(t, Fill):
            t = t.value
        layout, v = self.const_layout(t, a)
        if layout in ("scalar", "channel"):
            return self.affine(a, **({"scale": v} if multiply else {"shift": v}), inplace=inplace)
        self.no_inplace(inplace)
        return self.emit_new(CONST, a, a.channels, "const", const=v, multiply=multiply)

    def binary(self, a, b, op, alpha=1.0, inplace=False):
        self.no_inplace(inplace)
        if a.channels != b.channels or (a.h, a.w) != (b.h, b.w):
            self.error(f"operands [{a.channels}, {a.h}, {a.w}] and [{b.channels}, {b.h}, {b.w}] (broadcasting "
                       f"across channels or positions is not supported)")
        out = self.emit_new(op, a, a.channels, "add" if op == ADD else "mul", param=alpha)
        self.prog.code[-1].b = self.ref(b)
        return out

    def gate(self, a, data_channels, cond=None):
        if a.channels % (2 * data_channels):
            self.error(f"the gate needs channels divisible by 2 * data_channels, got {a.channels}")
        if cond is not None:
            a = self.with_const(a, cond[:, :, None, None] if cond.dim() == 2 else cond, multiply=False)
        return self.emit_new(GATE, a, a.channels // 2, "gate", data_channels=data_channels)

    def channel_slice(self, a, start, stop):
        return self.view(a, channels=stop - start, c0=a.c0 + start)

    def cat(self, vals):
        if not all(isinstance(v, (SVal, Fill)) for v in vals):
            self.error("concatenating an image-dependent tensor with a constant that is not a *_like fill")
        h, w = vals[0].h, vals[0].w
        if any((v.h, v.w) != (h, w) for v in vals):
            self.error("concatenating tensors of different heights or widths")
        slot = self.new_slot(sum(v.channels for v in vals), h, w, "cat")
        off = 0
        for v in vals:
            if isinstance(v, Fill):
                self.prog.code.append(Instr(FILL, slot, channels=v.channels, param=v.value, out_off=off))
            else:
                self.prog.code.append(Instr(COPY, slot, a=self.ref(v), channels=v.channels, out_off=off))
            off += v.channels
        return self.val(slot, off, h, w)

    # -- spatial operations
    def pad(self, a, pad, mode="constant", value=0.0):
        if mode != "constant" or (value or 0.0) != 0.0:
            self.error(f"F.pad with mode={mode!r}, value={value!r}: only zero padding keeps positions apart")
        pad = list(pad) + [0] * (4 - len(pad))
        if len(pad) > 4 and any(pad[4:]):
            self.error("F.pad of the channel or batch dimension")
        left, right, top, bottom = pad[:4]
        h, w = a.h + top + bottom, a.w + left + right
        if h < 1 or w < 1:
            self.error("F.pad cropping a tensor to nothing")
        return self.view(a, h=h, w=w, oy=a.oy + top, ox=a.ox + left)

    def getitem(self, a, index):
        if not isinstance(a, SVal) or not isinstance(index, tuple) or len(index) > 4 or index[0] != slice(None) \
                or not all(isinstance(i, slice) for i in index):
            return super().getitem(a, index)
        bounds = [(0, a.channels), (0, a.h), (0, a.w)]
        for d, sl in enumerate(index[1:]):
            start, stop, step = sl.indices((a.channels, a.h, a.w)[d])
            if step != 1 or stop <= start:
                self.error(f"indexing {index!r}: only slices with step 1 (channel slices, crops along H and W)")
            bounds[d] = (start, stop)
        (c0, c1), (ya, yb), (xa, xb) = bounds
        return self.view(a, channels=c1 - c0, h=yb - ya, w=xb - xa, c0=a.c0 + c0, oy=a.oy - ya, ox=a.ox - xa)

    def conv(self, a, weight, bias, taps, name):
        """A same-size convolution (MaskedConv2d, a 1x1), weight [T, Cout, Cin]
        for taps (dy, dx) around the output position."""
        return self.conv_taps(a, weight, bias, list(taps), (1, 1), a.h, a.w, CONV, name)

    def conv_taps(self, a, weight, bias, taps, stride, h, w, op, name):
        if weight.shape[2] != a.channels:
            self.error(f"a convolution taking {weight.shape[2]} channels applied to {a.channels}")
        nonzero = weight.detach().reshape(len(taps), -1).ne(0).any(1)
        keep = nonzero.nonzero().flatten().tolist()  # only the taps that can contribute
        kept = weight if len(keep) == len(taps) else weight[keep]
        w_ = self.tensor(kept).transpose(1, 2).contiguous() if keep else \
            weight.new_zeros(0, a.channels, weight.shape[1]).to(self.dtype)
        out = self.emit_new(op, a, weight.shape[1], name, h, w, weight=w_,
                            bias=None if bias is None else self.tensor(bias),
                            taps=tuple(taps[t] for t in keep), stride=tuple(stride))
        return out

    def conv2d(self, a, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        if groups != 1:
            self.error(f"a grouped convolution (groups={groups})")
        weight = weight.detach()
        kh, kw = weight.shape[2:]
        (sy, sx), (dh, dw) = _pair(stride), _pair(dilation)
        if padding == "valid":
            padding = 0
        if padding == "same":
            if (sy, sx) != (1, 1):
                self.error("padding='same' with a stride")
            ph, pw = dh * (kh - 1) // 2, dw * (kw - 1) // 2
            if dh * (kh - 1) % 2 or dw * (kw - 1) % 2:
                self.error("padding='same' with an even kernel (asymmetric padding)")
        else:
            ph, pw = _pair(padding)
        h, w = (a.h + 2 * ph - dh * (kh - 1) - 1) // sy + 1, (a.w + 2 * pw - dw * (kw - 1) - 1) // sx + 1
        if h < 1 or w < 1:
            self.error(f"a convolution whose output is empty ({a.h}x{a.w} input, kernel {kh}x{kw})")
        taps = [(i * dh - ph, j * dw - pw) for i in range(kh) for j in range(kw)]
        return self.conv_taps(a, weight.permute(2, 3, 0, 1).reshape(kh * kw, *weight.shape[:2]), bias, taps,
                              (sy, sx), h, w, CONV, "conv")

    def conv_transpose2d(self, a, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                         dilation=1):
        if groups != 1 or _pair(dilation) != (1, 1):
            self.error("a transposed convolution with groups or dilation")
        weight = weight.detach()  # [Cin, Cout, kh, kw]
        kh, kw = weight.shape[2:]
        (sy, sx), (ph, pw), (oh, ow) = _pair(stride), _pair(padding), _pair(output_padding)
        h, w = (a.h - 1) * sy - 2 * ph + kh + oh, (a.w - 1) * sx - 2 * pw + kw + ow
        # output (y, x) = input (i, j) * stride - padding + (ki, kj): input i = (y - (ki - ph)) / sy
        taps = [(i - ph, j - pw) for i in range(kh) for j in range(kw)]
        wt = weight.permute(2, 3, 1, 0).reshape(kh * kw, weight.shape[1], weight.shape[0])  # [T, Cout, Cin]
        return self.conv_taps(a, wt, bias, taps, (sy, sx), h, w, CONVT, "conv_transpose")

    # -- dispatch additions
    def module(self, m, args, kwargs):
        a = args[0] if args else None
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and not isinstance(m, MaskedConv2d):
            if not isinstance(a, SVal) or len(args) + len(kwargs) != 1:
                self.error(f"{type(m).__name__} with arguments other than one image-dependent tensor")
            if m.padding_mode != "zeros":
                self.error(f"{type(m).__name__} with padding_mode={m.padding_mode!r} (only zero padding is causal)")
            if isinstance(m, nn.ConvTranspose2d):
                return self.conv_transpose2d(a, m.weight, m.bias, m.stride, m.padding, m.output_padding, m.groups,
                                             m.dilation)
            return self.conv2d(a, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
        return super().module(m, args, kwargs)

    def function(self, f, args, kwargs):
        if f is F.pad:
            return self.pad(*args, **kwargs)
        if f in (F.conv2d, torch.conv2d):
            return self.conv2d(*args, **kwargs)
        if f in (F.conv_transpose2d, torch.conv_transpose2d):
            return self.conv_transpose2d(*args, **kwargs)
        if f in (torch.ones_like, torch.zeros_like, torch.full_like):
            a = args[0]
            value = {torch.ones_like: 1.0, torch.zeros_like: 0.0}.get(f)
            value = float(args[1] if len(args) > 1 else kwargs["fill_value"]) if value is None else value
            return Fill(value, a.channels, a.h, a.w)
        if f in (operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                 torch.div):
            args = tuple(a.value if isinstance(a, Fill) else a for a in args)
        return super().function(f, args, kwargs)

    # -- the schedule
    def structure(self):
        """Everything finish() reads: the image's shape, the slots' extents, each
        instruction's op, slots, operand views, taps and stride, the output."""
        p = self.prog
        def ref(r):
            return None if r is None else tuple(r.encode())
        return (self.shape, p.input, ref(p.output), tuple((s.h, s.w) for s in p.slots),
                tuple((i.op, i.out, ref(i.a), ref(i.b), i.taps, i.stride) for i in p.code))

    def finish(self):
        """Ready maps, the causality check, queues and ring sizes; the same
        structure (a network sampled again, whatever its weights and constants)
        takes them from _FINISHED."""
        key = self.structure()
        done = _FINISHED.get(key)
        if done is None:
            self.analyse()
            done = ([(s.ready, s.ring) for s in self.prog.slots], [(i.queue, i.start) for i in self.prog.code])
            _FINISHED[key] = done
            while len(_FINISHED) > _FINISHED_MAX:
                _FINISHED.popitem(last=False)
        else:
            _FINISHED.move_to_end(key)
        for s, (ready, ring) in zip(self.prog.slots, done[0]):
            s.ready, s.ring = ready, ring
        for i, (queue, start) in zip(self.prog.code, done[1]):
            i.queue, i.start = queue, start

    def analyse(self):
        prog = self.prog
        c, h, w = self.shape
        n = h * w
        for i in prog.code:
            ready = self.ready(i)
            slot = prog.slots[i.out]
            slot.ready = ready if slot.ready is None else torch.maximum(slot.ready, ready)
        out = self.read_map(prog.output, h, w)
        late = out >= torch.arange(n).view(h, w)
        if late.any():
            y, x = (int(v) for v in late.nonzero()[0])
            t = int(out[y, x])
            if t == y * w + x and c > 1 and prog.likelihood != "logistic-mixture":
                # it may see the pixel's earlier colours only: causal colour by colour, not at once
                self.error(f"the output at pixel {(y, x)} depends on that pixel's colours (the multi-scale "
                           f"compiler draws a pixel's channels at once)")
            raise not_causal((y, x), (t // w, t % w))
        for i in prog.code:
            ready = prog.slots[i.out].ready.flatten()
            steps = (ready + 1).clamp(min=0)
            order = torch.argsort(steps, stable=True)
            steps = steps[order]
            keep = steps < n  # positions ready only after the last pixel are never needed
            i.queue = order[keep].to(torch.int64)
            i.start = torch.searchsorted(steps[keep], torch.arange(n + 1, dtype=torch.int64))
        self.ring_positions()

    def read_map(self, ref, h, w, ys=None, xs=None):
        """The ready map of an operand over output positions: [h, w] (or at the
        positions ys, xs), -1 outside the view or the slot."""
        ready = self.prog.slots[ref.slot].ready
        if ys is None:
            ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        sy, sx = ys - ref.oy, xs - ref.ox
        ok = (sy >= ref.y0) & (sy < ref.y1) & (sx >= ref.x0) & (sx < ref.x1)
        v = ready[sy.clamp(0, ready.shape[0] - 1), sx.clamp(0, ready.shape[1] - 1)]
        return torch.where(ok, v, torch.full_like(v, -1))

    def tap_positions(self, i, h, w):
        """For each tap of a CONV / CONVT: (ys, xs, valid) of the input position each output position reads."""
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        sy, sx = i.stride
        for dy, dx in i.taps:
            if i.op == CONV:
                yield ys * sy + dy, xs * sx + dx, torch.ones(h, w, dtype=torch.bool)
            else:
                ry, rx = ys - dy, xs - dx
                yield ry.div(sy, rounding_mode="floor"), rx.div(sx, rounding_mode="floor"), \
                    (ry % sy == 0) & (rx % sx == 0)

    def ready(self, i):
        s = self.prog.slots[i.out]
        out = torch.full((s.h, s.w), -1, dtype=torch.int64)
        if i.op in (CONV, CONVT):
            for ys, xs, valid in self.tap_positions(i, s.h, s.w):
                r = self.read_map(i.a, s.h, s.w, ys, xs)
                out = torch.maximum(out, torch.where(valid, r, torch.full_like(r, -1)))
            return out
        for ref in (i.a, i.b):
            if ref is not None:
                out = torch.maximum(out, self.read_map(ref, s.h, s.w))
        return out

    def ring_positions(self):
        """Each slot's ring: 1 + the most positions (raster order) between the
        newest position it holds and the oldest one still read or written, over
        the whole schedule (positions run at step ready + 1; the draw reads the
        output at step t). Counting writes keeps a late write to an old position
        from landing on a live one."""
        prog = self.prog
        c, h, w = self.shape
        n = h * w

        def steps_of(slot):
            return (prog.slots[slot].ready.flatten() + 1).clamp(min=0)

        def newest_position(slot):
            """[n + 1]: the newest position (y W + x) of the slot computed by the end of step t."""
            s = prog.slots[slot]
            first = torch.full((n + 1,), -1, dtype=torch.int64)
            first.scatter_reduce_(0, steps_of(slot).clamp(max=n), torch.arange(s.h * s.w), "amax")
            return first.cummax(0).values

        newest = [newest_position(k) for k in range(len(prog.slots))]
        need = [1] * len(prog.slots)

        def uses(slot, steps, positions):
            ok = steps < n
            if ok.any():
                lag = newest[slot][steps[ok]] - positions[ok] + 1
                need[slot] = max(need[slot], int(lag.max()))

        def reads(ref, steps, ys, xs, valid=None):
            sy, sx = ys - ref.oy, xs - ref.ox
            ok = (sy >= ref.y0) & (sy < ref.y1) & (sx >= ref.x0) & (sx < ref.x1)
            if valid is not None:
                ok &= valid
            uses(ref.slot, steps[ok], sy[ok] * prog.slots[ref.slot].w + sx[ok])

        for i in prog.code:
            s = prog.slots[i.out]
            steps = steps_of(i.out).view(s.h, s.w)
            uses(i.out, steps.flatten(), torch.arange(s.h * s.w))  # its own writes
            if i.op in (CONV, CONVT):
                for ys, xs, valid in self.tap_positions(i, s.h, s.w):
                    reads(i.a, steps, ys, xs, valid)
            else:
                ys, xs = torch.meshgrid(torch.arange(s.h), torch.arange(s.w), indexing="ij")
                for ref in (i.a, i.b):
                    if ref is not None:
                        reads(ref, steps, ys, xs)
        t = torch.arange(n)
        reads(prog.output, t, t // w, t % w)  # the draw of pixel t reads the output at step t
        for k, s in enumerate(prog.slots):
            s.ring = max(1, min(s.h * s.w, need[k]))


# finish()'s results by structure, the most recent few (they are read-only once made)
_FINISHED = collections.OrderedDict()
_FINISHED_MAX = 8


def compile_schedule(model, *, shape, batch, condition=None, likelihood="logistic-mixture", levels=256):
    """The Schedule of ``model`` (output: mixture parameters [B, K, H, W], or
    Bernoulli / categorical logits as fastgen.sample reads them) for ``batch``
    images of ``shape`` (C, H, W); CompileError names any operation or pixel
    that breaks exact cached sampling."""
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    gm = trace(model, condition is not None)
    comp = _ScheduleCompiler(gm, shape, batch, dtype, device, condition, condition is not None, likelihood, levels)
    with torch.no_grad():
        return comp.run()

