"""Cached sampling (Ramachandran et al.'s per-layer queues, generalised to any
causal network of convolutions): the one compiler of every cached engine.

Cached generation computes every activation of the network once. A network of
one scale (PixelCNN, Gated PixelCNN) computes a position when the pixel before
it is drawn; a multi-scale one (strided and transposed convolutions, shifted
convolutions written as zero padding plus a crop: PixelCNN++) has no such
fixed rhythm: a coarse position becomes computable when the last fine pixel
under its receptive field has been drawn. This compiler finds that moment for
every position of every activation and runs each position then, exactly once.
fastgen/sampling/tracing.py reads the network; this module is its primitives
and the analysis.

For every activation (a *slot*) the compiler derives, by structure, its *ready
map*: for each position, the raster index of the last image pixel it depends on
(-1: none). The input's ready map is the raster index itself; a convolution's
output position is ready when the last of the input positions under its
non-zero taps is; a transposed convolution's when the input positions that
scatter into it are; position-wise operations take the latest of their
operands. Generation then runs *steps*: step t, before pixel t is drawn,
computes positions that are ready (by t - 1) and not yet computed, instruction
by instruction in program order, so every operand position is computed before
it is read; which step within that window a position takes is chosen
backwards from the draws (analyse: a row at once where it can, else as late as
it is read). Each instruction's positions, sorted by step, are its queue. The
network is exact to sample this way if and only if its output at pixel t is
ready by t - 1; otherwise compilation fails naming the pixel.

Values are *views* of slots: zero padding (F.pad), crops (slicing along H and W)
and channel slices cost nothing; an operand reads zeros outside the view's own
extent and outside the slot. Each slot keeps a ring of its last ``ring``
positions in raster order (position (y, x) at (y W + x) mod ring), ``ring``
found by replaying the schedule: a value read only where it was just computed
keeps a position or two, one read by a convolution over the rows above about
a row.

Steps are the draws, in the sampling order: one per pixel when the likelihood
draws all of a pixel's channels at once (PixelCNN++'s mixture couples the
colours itself), one per colour when a colour image is drawn colour by colour
(Bernoulli and categorical: the sub-pixel order R, G, B, ``pixel_steps`` = C).
In the colour order a slot's channels fall into *classes*, one ready map each
(a ready value is then a step, pixel C + colour): a convolution's output
channel reads, at each tap, the input channels its weight does not zero there
(the masks' centre rule gives colour block c the blocks <= c); position-wise
operations keep their operands' classes. Each instruction runs as one
instruction per run of output channels of one class (a *block*, ``lo`` to
``hi``), the colour blocks of a masked layer at their colour's step.
"""
import collections
import dataclasses
import gc
import hashlib
import operator
import weakref
from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastgen.nn import MaskedConv2d
from fastgen.ref.dmol import infer_nr_mix
from fastgen.sampling.common import not_causal, output_error
from fastgen.sampling import code as fmt
from fastgen.sampling.code import ACT, ACTS, ADD, AFFINE, CONST, CONV, CONVT, COPY, FILL, GATE, MUL
from fastgen.sampling.tracing import CompileError, Compiler, Val, trace

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
    """A traced tensor that depends on the image, as a view of a slot:
    extent h x w, channels from c0, offset (oy, ox), and
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
    ready: Optional[torch.Tensor] = None  # [h, w, K] int64: the ready map of each of K channel classes
    cls: Optional[torch.Tensor] = None    # [channels] int64: each channel's class
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
    lo: int = 0                            # the output channels computed: [lo, hi) of those written (a block)
    hi: Optional[int] = None
    queue: Optional[torch.Tensor] = None   # positions y * w + x of out, by step
    start: Optional[torch.Tensor] = None   # [steps + 1]: step t's positions are queue[start[t]:start[t + 1]]


class Pool:
    """The params and scalars lists of an encoded schedule (param(t) / scalar(v) append and return the index
    the code stores; param(None): -1)."""

    def __init__(self):
        self.params, self.scalars = [], []
        self.index = {}  # id of a tensor given -> (its index, it: alive, so the id is not reused)

    def param(self, t):
        """The index of ``t``, the same for the same tensor (the blocks of one instruction share its weights)."""
        if t is None:
            return -1
        if id(t) not in self.index:
            self.index[id(t)] = (len(self.params), t)
            self.params.append(t.contiguous())
        return self.index[id(t)][0]

    def scalar(self, v):
        self.scalars.append(float(v))
        return len(self.scalars) - 1


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
    pixel_steps: int = 1  # steps per pixel: C when the colours are drawn one by one (sub-pixel order), else 1
    input: int = 0
    output: Optional[Ref] = None
    out_channels: int = 0

    @property
    def steps(self):
        return self.shape[1] * self.shape[2] * self.pixel_steps

    def encode(self):
        """(slots, code, params, scalars) for the C++ engine.

        slots: [C, H, W, ring] per slot. Code: instructions in the format of
        fastgen/sampling/code.py (its HEAD and OWN fields by name); queue and
        start are int64 params."""
        pool = Pool()
        code = []
        for i in self.code:
            head = {"out": i.out, "channels": i.channels, "a": i.a and i.a.encode(), "b": i.b and i.b.encode(),
                    "queue": pool.param(i.queue), "start": pool.param(i.start), "lo": i.lo,
                    "hi": _width(i, self.slots) if i.hi is None else i.hi}
            taps = ()
            if i.op in (CONV, CONVT):
                own = {"weight": pool.param(i.weight), "bias": pool.param(i.bias), "sy": i.stride[0],
                       "sx": i.stride[1], "taps": len(i.taps)}
                taps = [t[0] for t in i.taps] + [t[1] for t in i.taps]
            elif i.op == ACT:
                own = {"act": ACTS.index(i.act), "scalar": pool.scalar(i.param)}
            elif i.op == AFFINE:
                own = {"scale": pool.param(i.scale), "shift": pool.param(i.shift)}
            elif i.op == CONST:
                own = {"const": pool.param(i.const), "multiply": int(i.multiply), "is_map": int(i.const.dim() == 4)}
            elif i.op == GATE:
                own = {"data_channels": i.data_channels}
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
                          levels=self.levels, nr_mix=self.nr_mix, pixel_steps=self.pixel_steps,
                          out_channels=self.out_channels,
                          out=self.output.encode())


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _width(i, slots):
    """The channels instruction ``i`` writes."""
    if i.op in (CONV, CONVT):
        return i.weight.shape[2]
    return i.channels // 2 if i.op == GATE else i.channels


class _ScheduleCompiler(Compiler):
    """The primitives of fastgen/sampling/tracing.py's graph walk: values as views of slots, instructions
    over positions; then the analysis (ready maps, blocks, queues, rings)."""
    SUPPORTED = _SCHEDULE_OPS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prog = Schedule(batch=self.batch, shape=self.shape, dtype=self.dtype, device=self.device)
        self.viewed = set()  # the slots that views were taken of (in_place)

    # -- values
    def val(self, slot, channels, h, w):
        """A whole new slot as a value."""
        return SVal(slot, channels, h, w, 0, 0, 0, 0, h, 0, w)

    def view(self, a, **changes):
        """The value ``a`` seen differently (fields of SVal changed); the window
        narrows to the slot rows and columns inside the new extent (value row r
        is slot row r - oy), so crops (slices, negative padding) hide what they
        cut and padding never shows it again."""
        self.viewed.add(a.slot)
        v = dataclasses.replace(a, **changes)
        return dataclasses.replace(v, y0=max(v.y0, -v.oy), y1=min(v.y1, v.h - v.oy), x0=max(v.x0, -v.ox),
                                   x1=min(v.x1, v.w - v.ox))

    def ref(self, a):
        return Ref(a.slot, a.c0, a.oy, a.ox, a.y0, a.y1, a.x0, a.x1)

    def extent(self, a):
        return a.h, a.w

    def new_slot(self, channels, h, w, name):
        self.prog.slots.append(Slot(channels, h, w, name))  # ready and cls: analyse()
        return len(self.prog.slots) - 1

    def emit_new(self, op, a, channels, name, h=None, w=None, **fields):
        """A new slot (a's extent unless given) written by one instruction reading a."""
        h, w = (a.h, a.w) if h is None else (h, w)
        slot = self.new_slot(channels, h, w, name)
        self.prog.code.append(Instr(op, slot, a=self.ref(a), channels=a.channels, **fields))
        return self.val(slot, channels, h, w)

    def in_place(self, a, v, inplace):
        """An operation's result ``v``; in place (x.relu_(), y += x), ``a`` becomes it: every name for the
        tensor (the same Val object) reads the new slot after, as in eager mode, and the instructions already
        emitted read the old one. A view (a slice, crop or padding, or a tensor that one was taken of) would
        keep the old values where eager mode sees the new: refused."""
        if not inplace:
            return v
        s = self.prog.slots[a.slot]
        if a.slot == self.prog.input:
            self.error("an in-place operation on the image input (the sampler writes the drawn pixels there)")
        if a.slot in self.viewed or (a.c0, a.channels, a.h, a.w, a.oy, a.ox) != (0, s.channels, s.h, s.w, 0, 0):
            self.error("an in-place operation on a view of a tensor (a slice, crop or padding, or a tensor one was "
                       "taken of): write it out of place")
        for f in dataclasses.fields(v):
            setattr(a, f.name, getattr(v, f.name))
        return a

    # -- the image and the output
    def input_val(self):
        """The image: at pixel p, channel c is drawn at step p (a pixel at once) or p C + c (colour by colour:
        Bernoulli and categorical colour images, the sub-pixel order), and is ready from the next step."""
        c, h, w = self.shape
        p = self.prog
        p.pixel_steps = c if self.likelihood != "logistic-mixture" else 1
        p.input = self.new_slot(c, h, w, "input")
        slot = p.slots[p.input]
        pixel = torch.arange(h * w, dtype=torch.int64).view(h, w, 1)
        if p.pixel_steps > 1:
            slot.ready, slot.cls = pixel * c + torch.arange(c), torch.arange(c)
        else:
            slot.ready, slot.cls = pixel, torch.zeros(c, dtype=torch.int64)
        return self.val(p.input, c, h, w)

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
        return self.in_place(a, self.emit_new(ACT, a, a.channels, act, act=act, param=param), inplace)

    def affine(self, a, scale=1.0, shift=0.0, inplace=False):
        c = a.channels
        scale = torch.full((c,), scale, dtype=self.dtype, device=self.device) if not torch.is_tensor(scale) else scale
        shift = torch.full((c,), shift, dtype=self.dtype, device=self.device) if not torch.is_tensor(shift) else shift
        return self.in_place(a, self.emit_new(AFFINE, a, c, "affine", scale=scale, shift=shift), inplace)

    def with_const(self, a, t, multiply, inplace=False):
        if isinstance(t, Fill):
            t = t.value
        layout, v = self.const_layout(t, a)
        if layout in ("scalar", "channel"):
            return self.affine(a, **({"scale": v} if multiply else {"shift": v}), inplace=inplace)
        return self.in_place(a, self.emit_new(CONST, a, a.channels, "const", const=v, multiply=multiply), inplace)

    def binary(self, a, b, op, alpha=1.0, inplace=False):
        if a.channels != b.channels or (a.h, a.w) != (b.h, b.w):
            self.error(f"operands [{a.channels}, {a.h}, {a.w}] and [{b.channels}, {b.h}, {b.w}] (broadcasting "
                       f"across channels or positions is not supported)")
        out = self.emit_new(op, a, a.channels, "add" if op == ADD else "mul", param=alpha)
        self.prog.code[-1].b = self.ref(b)
        return self.in_place(a, out, inplace)

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
        return self.conv_taps(a, weight, bias, list(taps), (1, 1), a.h, a.w, CONV, name, masked=True)

    def conv_taps(self, a, weight, bias, taps, stride, h, w, op, name, masked=False):
        """``masked``: the taps are a mask's (causal by construction), kept whatever their weights; any
        other convolution keeps only the taps whose weights are not all zero (a zeroed future tap makes a
        convolution causal)."""
        if weight.shape[2] != a.channels:
            self.error(f"a convolution taking {weight.shape[2]} channels applied to {a.channels}")
        if masked:
            keep = list(range(len(taps)))
        else:
            keep = weight.detach().reshape(len(taps), -1).ne(0).any(1).nonzero().flatten().tolist()
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
        """Everything finish() reads: the image's shape, the draw's order, the slots' extents, each
        instruction's op, slots, operand views, taps and stride (in the colour order, which of its weights
        are zero: they decide which colours a channel sees), the output."""
        p = self.prog

        def ref(r):
            return None if r is None else tuple(r.encode())

        def zeros(i):
            if p.pixel_steps == 1 or i.op not in (CONV, CONVT):
                return None
            return hashlib.blake2b(np.packbits(i.weight.ne(0).cpu().numpy()).tobytes(), digest_size=16).digest()
        return (self.shape, p.pixel_steps, p.input, ref(p.output), tuple((s.channels, s.h, s.w) for s in p.slots),
                tuple((i.op, i.out, ref(i.a), ref(i.b), i.channels, i.out_off, i.taps, i.stride, zeros(i))
                      for i in p.code))

    def finish(self):
        """Ready maps, the causality check, queues and ring sizes; the same
        structure (a network sampled again, whatever its weights and constants)
        takes them from _FINISHED. Each instruction becomes one per block of
        its output channels that share a ready map (the colour blocks of a
        colour network; one block otherwise)."""
        key = self.structure()
        done = _FINISHED.get(key)
        if done is None:
            done = self.analyse()
            _FINISHED[key] = done
            while len(_FINISHED) > _FINISHED_MAX:
                _FINISHED.popitem(last=False)
        else:
            _FINISHED.move_to_end(key)
        slots, blocks = done
        for s, (ready, cls, ring) in zip(self.prog.slots, slots):
            s.ready, s.cls, s.ring = ready, cls, ring
        self.prog.code = [dataclasses.replace(i, lo=lo, hi=hi, queue=queue, start=start)
                          for i, bl in zip(self.prog.code, blocks) for lo, hi, queue, start, _ in bl]

    def analyse(self):
        """((ready, cls, ring) of each slot, the blocks of each instruction: (lo, hi, queue, start, steps)).

        Forward, in program order: each instruction's ready maps and classes. Backward: each block's steps.
        A position may run at any step from ready + 1 to its *deadline*, the first step that reads it (the
        draws read the output); the steps of a slot row whose windows meet are one step, the row's earliest
        deadline (so a value read only from the next row on, a Gated PixelCNN's vertical stack, runs a row
        at a time), the others each at its deadline (so a position that depends on nothing is not computed
        long before it is read, which would widen its slot's ring); a position nothing reads never runs."""
        prog = self.prog
        n = prog.steps
        for s in prog.slots:
            if s.ready is None:  # no class yet (-1: a channel nothing has written)
                s.ready, s.cls = torch.zeros(s.h, s.w, 0, dtype=torch.int64), torch.full((s.channels,), -1)
        parts = []
        for i in prog.code:
            ready, cls = _merge(*self.ready(i))
            slot = prog.slots[i.out]
            off = i.out_off if i.op in (COPY, FILL) else 0
            parts.append((ready, cls, slot.ready.shape[2]))  # its classes' first index in the slot
            slot.cls[off:off + len(cls)] = cls + slot.ready.shape[2]
            slot.ready = torch.cat([slot.ready, ready], 2)
        self.check_output()
        deadline = [torch.full((s.h * s.w, s.ready.shape[2]), n, dtype=torch.int64) for s in prog.slots]
        self.draw_reads(deadline)
        blocks = [None] * len(prog.code)
        for k in reversed(range(len(prog.code))):
            i, (ready, cls, first) = prog.code[k], parts[k]
            s = prog.slots[i.out]
            bounds = [0, *((cls[1:] != cls[:-1]).nonzero().flatten() + 1).tolist(), len(cls)]
            bl = []
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                c = int(cls[lo])
                steps = self.choose((ready[:, :, c] + 1).clamp(min=0), deadline[i.out][:, first + c].view(s.h, s.w))
                order = torch.argsort(steps, stable=True)
                sorted_steps = steps[order]
                keep = sorted_steps < n  # positions nothing reads never run
                start = torch.searchsorted(sorted_steps[keep], torch.arange(n + 1, dtype=torch.int64))
                bl.append((lo, hi, order[keep].to(torch.int64), start, steps))
                self.reads(i, steps.view(s.h, s.w), deadline)
            blocks[k] = bl
        rings = self.ring_positions(blocks)
        return [(s.ready, s.cls, ring) for s, ring in zip(prog.slots, rings)], blocks

    def choose(self, earliest, deadline):
        """The steps [h w] of one block from its windows [earliest, deadline] (analyse); n: never."""
        n = self.prog.steps
        need = deadline < n
        if ((earliest > deadline) & need).any():  # a read before the value is complete: a compiler bug
            raise RuntimeError("fastgen: the schedule reads a value before it is computed")
        lo = torch.where(need, earliest, -1).amax(1, keepdim=True)
        hi = torch.where(need, deadline, n).amin(1, keepdim=True)
        row = torch.where(lo <= hi, hi, deadline)  # a row's windows meet: all of it at its first deadline
        return torch.where(need, row, n).flatten()

    def register(self, deadline, ref, channels, steps, ys, xs, valid=None):
        """Reads of operand ``ref`` at positions (ys, xs) of its view at ``steps``: each position's deadline
        in each slot class of the channels read is the earliest such step after it is ready (a read before
        it is ready goes through a zero weight, e.g. a colour block's centre tap: not a dependence)."""
        slot = self.prog.slots[ref.slot]
        sy, sx = ys - ref.oy, xs - ref.ox
        ok = (sy >= ref.y0) & (sy < ref.y1) & (sx >= ref.x0) & (sx < ref.x1) & (steps < self.prog.steps)
        if valid is not None:
            ok &= valid
        pos, at = (sy * slot.w + sx)[ok], steps[ok]
        for k in slot.cls[ref.c0:ref.c0 + channels].unique().tolist():
            late = at > slot.ready.view(-1, slot.ready.shape[2])[pos, k]
            deadline[ref.slot][:, k].scatter_reduce_(0, pos[late], at[late], "amin")

    def reads(self, i, steps, deadline):
        s = self.prog.slots[i.out]
        if i.op in (CONV, CONVT):
            for ys, xs, valid in self.tap_positions(i, s.h, s.w):
                self.register(deadline, i.a, i.channels, steps, ys, xs, valid)
            return
        ys, xs = torch.meshgrid(torch.arange(s.h), torch.arange(s.w), indexing="ij")
        for ref in (i.a, i.b):
            if ref is not None:
                self.register(deadline, ref, i.channels, steps, ys, xs)

    def draw_reads(self, deadline):
        """The draws' reads of the output: step t reads pixel t // g, the block of colour t % g (g > 1)."""
        prog = self.prog
        c, h, w = self.shape
        n, g, k = prog.steps, prog.pixel_steps, prog.out_channels
        t = torch.arange(n)
        pixel = t // g
        for colour in range(g):
            mine = t % g == colour
            ref = dataclasses.replace(prog.output, c0=prog.output.c0 + colour * (k // g))
            self.register(deadline, ref, k // g, t[mine], pixel[mine] // w, pixel[mine] % w)

    def check_output(self):
        """The output at pixel p drawn at step p (channel c's block at step p C + c, colour by colour) must be
        ready by the step before: else CausalityError naming the first such output, in sampling order."""
        prog = self.prog
        c, h, w = self.shape
        g, k = prog.pixel_steps, prog.out_channels
        out = self.read_map(prog.output, h, w)[:, :, self.classes(prog.output, k)]  # [h, w, K] per channel
        unit = (torch.arange(h * w).view(h, w, 1) * g + torch.arange(k) // (k // g)).view(h, w, k)
        late = (out >= unit).view(h * w, g, k // g)
        if late.any():
            first = int(late.any(2).flatten().nonzero()[0])  # pixel p colour q: p g + q
            p, q = divmod(first, g)
            t = int(out.view(h * w, g, k // g)[p, q].max())
            if g == 1:
                raise not_causal(divmod(p, w), divmod(t, w))
            raise not_causal(divmod(p, w), divmod(t // g, w), q, t % g, channels=c)

    def classes(self, ref, channels):
        """The slot classes of an operand's channels."""
        cls = self.prog.slots[ref.slot].cls[ref.c0:ref.c0 + channels]
        if (cls < 0).any():
            self.error("an operand reads channels of a concatenation that nothing wrote")
        return cls

    def read_map(self, ref, h, w, ys=None, xs=None):
        """The ready maps of an operand's slot classes over output positions:
        [h, w, K] (or at the positions ys, xs), -1 outside the view or the slot."""
        ready = self.prog.slots[ref.slot].ready
        if ys is None:
            ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        sy, sx = ys - ref.oy, xs - ref.ox
        ok = (sy >= ref.y0) & (sy < ref.y1) & (sx >= ref.x0) & (sx < ref.x1)
        v = ready[sy.clamp(0, ready.shape[0] - 1), sx.clamp(0, ready.shape[1] - 1)]
        return torch.where(ok[..., None], v, torch.full_like(v, -1))

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
        """The ready maps of instruction i's output: ([h, w, K] for K classes, [channels written] the class of
        each). A channel is ready when the last input it depends on is: a position-wise op's channel reads its
        operands' same channel (the gate: one tanh and one sigmoid channel); a convolution's output channel
        reads, at each tap, the input channels its weight there does not zero (by tap, all of them, when the
        input's channels are all of one class or a step is a whole pixel: structure() keys the weights' zeros
        only in the colour order)."""
        s = self.prog.slots[i.out]
        width = _width(i, self.prog.slots)
        none = torch.full((s.h, s.w, 1), -1, dtype=torch.int64)
        if i.op == FILL:
            return none, torch.zeros(width, dtype=torch.int64)
        ca = self.classes(i.a, i.channels)
        if i.op in (CONV, CONVT):
            used, inv = ca.unique(return_inverse=True)
            maps = [torch.where(valid[..., None], self.read_map(i.a, s.h, s.w, ys, xs)[..., used], -1)
                    for ys, xs, valid in self.tap_positions(i, s.h, s.w)]
            if not maps:
                return none, torch.zeros(width, dtype=torch.int64)
            taps = torch.stack(maps)  # [T, h, w, U]
            if len(used) == 1 or self.prog.pixel_steps == 1:  # by tap: one class
                return taps.amax(-1).amax(0)[..., None], torch.zeros(width, dtype=torch.int64)
            onehot = F.one_hot(inv, len(used)).to(torch.float32)  # [Cin, U]
            reads = (i.weight.ne(0).cpu().to(torch.float32).permute(2, 0, 1) @ onehot) > 0  # [Cout, T, U]
            sig, cls = reads.flatten(1).unique(dim=0, return_inverse=True)  # [S, T U]
            flat = taps.permute(1, 2, 0, 3).flatten(2)  # [h, w, T U]
            return torch.where(sig, flat[:, :, None], -1).amax(-1), cls
        ra = self.read_map(i.a, s.h, s.w)
        if i.op in (ADD, MUL, GATE):
            if i.op == GATE:  # output j of gate block q: tanh of input q 2m + j % m, sigmoid of that + m
                m = width // i.data_channels
                j = torch.arange(width)
                ia = j // m * 2 * m + j % m
                pairs, rb = torch.stack([ca[ia], ca[ia + m]], 1), ra
            else:
                pairs, rb = torch.stack([ca, self.classes(i.b, i.channels)], 1), self.read_map(i.b, s.h, s.w)
            pairs, cls = pairs.unique(dim=0, return_inverse=True)
            return torch.maximum(ra[..., pairs[:, 0]], rb[..., pairs[:, 1]]), cls
        used, cls = ca.unique(return_inverse=True)
        return ra[..., used], cls

    def ring_positions(self, blocks):
        """Each slot's ring: 1 + the most positions (raster order) between the
        newest position it holds and the oldest one still read or written, over
        the whole schedule (each block's chosen steps; the draw of step t
        reads the output at its pixel). Counting writes keeps a late write to
        an old position from landing on a live one."""
        prog = self.prog
        c, h, w = self.shape
        n, g = prog.steps, prog.pixel_steps

        first = [torch.full((s.h * s.w,), n, dtype=torch.int64) for s in prog.slots]  # each position's first write
        first[prog.input] = (prog.slots[prog.input].ready + 1).amin(2).flatten()  # the draws
        for i, bl in zip(prog.code, blocks):
            for *_, steps in bl:
                first[i.out] = torch.minimum(first[i.out], steps)

        def newest_position(slot):
            """[n + 1]: the newest position (y W + x) of the slot written by the end of step t."""
            newest = torch.full((n + 1,), -1, dtype=torch.int64)
            newest.scatter_reduce_(0, first[slot].clamp(max=n), torch.arange(len(first[slot])), "amax")
            return newest.cummax(0).values

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

        for i, bl in zip(prog.code, blocks):
            s = prog.slots[i.out]
            ys, xs = torch.meshgrid(torch.arange(s.h), torch.arange(s.w), indexing="ij")
            for *_, steps in bl:
                uses(i.out, steps, torch.arange(s.h * s.w))  # its own writes
                steps = steps.view(s.h, s.w)
                if i.op in (CONV, CONVT):
                    for tys, txs, valid in self.tap_positions(i, s.h, s.w):
                        reads(i.a, steps, tys, txs, valid)
                else:
                    for ref in (i.a, i.b):
                        if ref is not None:
                            reads(ref, steps, ys, xs)
        t = torch.arange(n)
        pixel = t // g
        reads(prog.output, t, pixel // w, pixel % w)  # the draw of step t reads the output at its pixel
        # a power of two (the C++ engine's ring index is then a mask), or every position
        return [min(s.h * s.w, 1 << (need[k] - 1).bit_length()) for k, s in enumerate(prog.slots)]


def _merge(ready, cls):
    """Classes with equal ready maps merged: (ready [h, w, K'], cls)."""
    if ready.shape[2] == 1:
        return ready, cls
    h, w, k = ready.shape
    maps, inv = ready.reshape(h * w, k).T.unique(dim=0, return_inverse=True)
    return maps.T.reshape(h, w, -1).contiguous(), inv[cls]


# finish()'s results by structure, the most recent few (they are read-only once made)
_FINISHED = collections.OrderedDict()
_FINISHED_MAX = 8


# compile_schedule's last result per model, reused while the model and the arguments are what it was read from
_COMPILED = weakref.WeakKeyDictionary()
_COMPILED_MAX_ELEMENTS = 1 << 24  # tensor elements of a model worth copying to compare against (64 MB in float32)


_ATOMS = frozenset({type(None), bool, int, float, str, tuple, torch.Size, torch.dtype, torch.device})


def _snap(v, tensors, depth=0):
    """A value a module holds, as compared at the next compile: atoms by value, containers copied (they change
    in place), tensors by value apart (appended to ``tensors``), anything else by identity through a weak
    reference (no cycle keeps the model alive; a dead one never equals a new object at its address)."""
    t = type(v)
    if t in _ATOMS:
        return v
    if isinstance(v, torch.Tensor):
        tensors.append(v)
        return torch.Tensor
    if depth < 3 and isinstance(v, dict):
        return t, {k: x if type(x) in _ATOMS else _snap(x, tensors, depth + 1) for k, x in v.items()}
    if depth < 3 and isinstance(v, (list, set, frozenset)):
        return t, [x if type(x) in _ATOMS else _snap(x, tensors, depth + 1) for x in v]
    try:
        return weakref.ref(v)
    except TypeError:
        return object()  # neither: never the same, so the model is compiled afresh


def _model_state(model, args):
    """(snapshot, tensors): what a compile read besides the code it ran, the arguments and each module (its
    class, forward, attributes, hooks and submodules), and the tensors they hold (parameters, buffers,
    constants, a condition), compared by value."""
    tensors = []
    snap = [_snap(args, tensors)]
    for m in model.modules():
        snap.append((weakref.ref(m), type(m), type(m).forward, _snap(vars(m), tensors)))
    return snap, tensors


def _unchanged(then, now, tensors):
    try:
        if then[0] != now:  # an object compared by ==: the same one, or an error (a tensor in a tuple)
            return False
    except Exception:
        return False
    return len(tensors) == len(then[1]) and all(
        a.dtype == b.dtype and a.device == b.device and a.shape == b.shape and torch.equal(a, b)
        for a, b in zip(tensors, then[1]))


def compile_schedule(model, *, shape, batch, condition=None, likelihood="logistic-mixture", levels=256):
    """The Schedule of ``model`` (output: mixture parameters [B, K, H, W], or
    Bernoulli / categorical logits as fastgen.sample reads them) for ``batch``
    images of ``shape`` (C, H, W); CompileError names any operation or pixel
    that breaks exact cached sampling.

    A model compiled before is not read again while nothing it was read from
    has changed: its modules (class, attributes, hooks, training mode), the
    values of every tensor they hold, and the arguments (Schedules are
    read-only). A global that forward reads is not among them: a setting
    that changes the network belongs in an attribute."""
    now, tensors = _model_state(model, (tuple(shape), batch, condition, likelihood, levels))
    last = _COMPILED.get(model)
    if last is not None and _unchanged(last, now, tensors):
        return last[2]
    prog = _compile(model, shape, batch, condition, likelihood, levels)
    if all(t.layout == torch.strided for t in tensors) and sum(t.numel() for t in tensors) <= _COMPILED_MAX_ELEMENTS:
        _COMPILED[model] = (now, [t.detach().clone() for t in tensors], prog)
    return prog


def _compile(model, shape, batch, condition, likelihood, levels):
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    collect = gc.isenabled()
    gc.disable()  # tracing makes many short-lived objects: the collector's passes were a fifth of a batch-1 call
    try:
        gm = trace(model, condition is not None)
        comp = _ScheduleCompiler(gm, shape, batch, dtype, device, condition, condition is not None, likelihood,
                                 levels)
        with torch.no_grad():
            return comp.run()
    finally:
        if collect:
            gc.enable()

