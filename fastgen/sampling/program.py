"""Compiling a network into the program that fastgen's cached samplers run.

Cached generation (Ramachandran et al. 2017, generalised) computes every
activation of the network once: at pixel (y, x), only the new position of each
layer, from the values of earlier positions kept in per-layer caches. The
network is traced and read by fastgen/sampling/tracing.py, and this module's
primitives turn it into a :class:`Program`: a list of instructions over *slots*
(one per activation that must be stored). Both engines run the same program:
the torch executor (fastgen/sampling/cached.py, any device) and the C++ engine
(csrc/cpu/sampling.cpp).

Dispatch (fastgen.sampling.causality.check) uses it for grey Bernoulli and
categorical networks it can read, where it is still faster than the schedule
(fastgen/sampling/schedule.py: its row pass runs a Gated PixelCNN's vertical
stack a row at a time; benchmarks/RESULTS.md); the schedule takes everything
else, colour images included.

Every value has a *kind*:
* ``pixel``: its value at (y, x) depends only on pixels before (y, x) in raster
  order (and on the colour channels of (y, x) that the colour ordering
  allows): computed in the *pixel pass*, once per pixel and colour channel;
* ``row``: its value at row y depends on rows <= y, including pixels to the
  right in row y (the vertical stack of the Gated PixelCNN): computed in the
  *row pass*, once per row, after the row has been generated;
* constants (labels, conditioning maps, parameters): evaluated once, before.
A value read at a row above (the Gated PixelCNN's down-shifted link) is a pixel
value again. The network's output must be a pixel value, or it would see the
future, and every operation must be one whose cached form is exact: masked
convolutions, the gated layer, 1x1 convolutions and position-wise operations.
Anything else is a :class:`CompileError` that names the operation.

Slots are rings of the last ``rows`` rows, [B, rows, W + 2 * pad, C]: ``pad``
zero columns on each side, so that taps never need a column check; taps above
row 0 are skipped.

Colour images (C channels): when every pixel-pass slot splits into C colour
blocks and every instruction keeps them (the masked convolutions' centre taps
let block c see blocks <= c only, position-wise operations and the gate map
block c to block c), the pixel pass for colour channel c computes block c of
each activation, once (``Program.blocks = C``). Otherwise (a plain 1x1
convolution mixing the blocks, a concatenation) it recomputes every activation
of the position from the input as it stands (channels < c drawn, the rest
zero), which is exact for any spatially causal network.
"""
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
from torch import nn

from fastgen.nn import MaskedConv2d
from fastgen.ref.gated import split_gate
from fastgen.sampling.code import ACT, ADD, AFFINE, CONST, CONV, COPY, GATE, MUL
from fastgen.sampling.common import not_causal, output_error
from fastgen.sampling.schedule import Pool
from fastgen.sampling.tracing import CompileError, Compiler, Val, trace


@dataclass
class Slot:
    channels: int
    kind: str        # 'pixel' or 'row'
    name: str
    rows: int = 1    # ring rows: 1 + the highest row above any reader looks at


@dataclass
class Instr:
    """One instruction; fields by op (see Program.encode for the C++ layout)."""
    op: int
    out: int
    a: int
    b: int = -1                 # ADD, MUL: second operand slot
    weight: Optional[torch.Tensor] = None   # CONV [T, Cin, Cout]
    bias: Optional[torch.Tensor] = None     # CONV [Cout]
    taps: Tuple[Tuple[int, int], ...] = ()  # CONV (dy, dx) per tap
    act: str = "identity"       # ACT
    param: float = 0.0          # ACT: slope / alpha; ADD: alpha (out = a + alpha * b)
    scale: Optional[torch.Tensor] = None    # AFFINE [C]
    shift: Optional[torch.Tensor] = None    # AFFINE [C]
    const: Optional[torch.Tensor] = None    # CONST: [B, C] or a map [B, H, W, C]
    multiply: bool = False      # CONST: out = a * const (else a + const)
    data_channels: int = 1      # GATE
    out_off: int = 0            # COPY: out[:, out_off:out_off+count] = a[:, in_off:in_off+count]
    in_off: int = 0
    count: int = 0


@dataclass
class Program:
    batch: int
    shape: Tuple[int, int, int]  # (C, H, W) of the image
    dtype: torch.dtype
    device: torch.device
    slots: list = field(default_factory=list)
    pixel: list = field(default_factory=list)   # the pixel pass, in order
    post: list = field(default_factory=list)    # after a pixel's last draw: the pixel pass's instructions whose
    #                                             value there depends on that pixel (see _Compiler.finish)
    row: list = field(default_factory=list)     # the row pass, in order
    input: int = 0                               # slot of the image as fed
    output: int = 0                              # slot of the logits
    pad: int = 0                                 # zero columns on each side of every slot
    blocks: int = 1                              # C: the pixel pass runs colour block by colour block

    def encode(self):
        """(slots, pixel code, post code, row code, params, scalars) for the C++ engine.

        slots: [C0, rows0, C1, rows1, ...]. Code: instructions, each
        [length, op, out, a, ...]: CONV [.., w, bias(-1), T, dy.., dx..],
        ACT [.., act, scalar], AFFINE [.., scale, shift], ADD [.., b, scalar],
        MUL [.., b], CONST [.., const, multiply, is_map], GATE [.., data_channels],
        COPY [.., out_off, in_off, count]; w, bias, scale, shift, const index
        params, scalar indexes scalars."""
        pool = Pool()

        def code(instrs):
            out = []
            for i in instrs:
                body = [i.op, i.out, i.a]
                own = pool.position_wise(i)
                if own is not None:
                    body += own
                elif i.op == CONV:
                    body += [pool.param(i.weight), pool.param(i.bias), len(i.taps)] + pool.taps(i)
                elif i.op == ADD:
                    body += [i.b, pool.scalar(i.param)]
                elif i.op == MUL:
                    body += [i.b]
                elif i.op == COPY:
                    body += [i.out_off, i.in_off, i.count]
                out += [len(body) + 1] + body
            return out

        slots = [v for s in self.slots for v in (s.channels, s.rows)]
        return slots, code(self.pixel), code(self.post), code(self.row), pool.params, pool.scalars


# ---- compiling ---------------------------------------------------------------------------------------------------

@dataclass
class PVal(Val):
    """A value of the program: its slot's kind (pixel or row)."""
    kind: str = "pixel"


_CAUSAL_OPS = ("fastgen.MaskedConv2d / GatedMaskedConv2d layers, 1x1 convolutions and position-wise operations "
               "(activations, additions and products, eval-mode BatchNorm2d and BatchNormAct2d, dropout in eval "
               "mode, concatenation and chunks along channels)")


class _Compiler(Compiler):
    """The program's primitives of fastgen/sampling/tracing.py's graph walk."""
    SUPPORTED = _CAUSAL_OPS  # named in the errors
    ADD_IN_PLACE = True  # a fresh operand takes the gated layer's link in its own slot

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prog = Program(batch=self.batch, shape=self.shape, dtype=self.dtype, device=self.device)

    # -- helpers
    def new_slot(self, channels, kind, name):
        self.prog.slots.append(Slot(channels, kind, name))
        return len(self.prog.slots) - 1

    def out_slot(self, a, inplace, kind, channels, name):
        """A new slot, or for an in-place operation its operand's slot (later
        readers of the operand see the new value, as in eager mode)."""
        if not inplace:
            return self.new_slot(channels, kind, name)
        if a.slot == self.prog.input:
            self.error("an in-place operation on the image input (the sampler writes the drawn pixels there)")
        if a.kind != kind or a.channels != channels:
            self.error("an in-place operation whose result differs in kind or channels from its operand")
        return a.slot

    def emit(self, kind, instr):
        (self.prog.row if kind == "row" else self.prog.pixel).append(instr)

    def extent(self, a):
        """(H, W) of a value (one scale: the image's)."""
        return self.shape[1:]

    def unary(self, a, act, param=0.0, inplace=False):
        out = self.out_slot(a, inplace, a.kind, a.channels, act)
        self.emit(a.kind, Instr(ACT, out, a.slot, act=act, param=param))
        return PVal(out, a.channels, a.kind)

    def affine(self, a, scale=1.0, shift=0.0, inplace=False):
        c = a.channels
        scale = torch.full((c,), scale, dtype=self.dtype, device=self.device) if not torch.is_tensor(scale) else scale
        shift = torch.full((c,), shift, dtype=self.dtype, device=self.device) if not torch.is_tensor(shift) else shift
        out = self.out_slot(a, inplace, a.kind, c, "affine")
        self.emit(a.kind, Instr(AFFINE, out, a.slot, scale=scale, shift=shift))
        return PVal(out, c, a.kind)

    def with_const(self, a, t, multiply, inplace=False):
        layout, v = self.const_layout(t, a)
        if layout in ("scalar", "channel"):
            if multiply:
                return self.affine(a, scale=v, inplace=inplace)
            return self.affine(a, shift=v, inplace=inplace)
        out = self.out_slot(a, inplace, a.kind, a.channels, "const")
        self.emit(a.kind, Instr(CONST, out, a.slot, const=v, multiply=multiply))
        return PVal(out, a.channels, a.kind)

    def binary(self, a, b, op, alpha=1.0, inplace=False):
        if a.channels != b.channels:
            self.error(f"operands with {a.channels} and {b.channels} channels (broadcasting across channels is "
                       f"not supported)")
        kind = "row" if "row" in (a.kind, b.kind) else "pixel"
        out = self.out_slot(a, inplace, kind, a.channels, "add" if op == ADD else "mul")
        self.emit(kind, Instr(op, out, a.slot, b=b.slot, param=alpha))
        return PVal(out, a.channels, kind)

    def conv(self, a, weight, bias, taps, name):
        """sum over taps (dy, dx) of a(y+dy, x+dx) @ weight[t] + bias.
        weight [T, Cout, Cin] (the layout of nn.Conv2d's taps)."""
        if any(dy > 0 for dy, _ in taps):
            self.error("a convolution tap below the current row")
        sees_right = any(dy == 0 and dx > 0 for dy, dx in taps)
        kind = "row" if sees_right or (a.kind == "row" and any(dy == 0 for dy, _ in taps)) else "pixel"
        cout = weight.shape[1]
        w = self.tensor(weight).transpose(1, 2).contiguous()  # [T, Cin, Cout]
        b = None if bias is None else self.tensor(bias)
        slot = self.new_slot(cout, kind, name)
        self.emit(kind, Instr(CONV, slot, a.slot, weight=w, bias=b, taps=tuple(taps)))
        return PVal(slot, cout, kind)

    def plain_conv(self, m, a):
        if (m.kernel_size != (1, 1) or m.stride != (1, 1) or m.padding not in ((0, 0), "valid")
                or m.groups != 1):
            self.error(f"{m}: an ordinary convolution is causal only as a 1x1, stride 1, no padding, groups 1 "
                       f"convolution (use fastgen.MaskedConv2d for a masked one)")
        if a.channels != m.in_channels:
            self.error(f"{m} takes {m.in_channels} channels, got {a.channels}")
        return self.conv(a, m.weight.detach()[:, :, 0, 0][None], m.bias, [(0, 0)], "conv1x1")

    def gate(self, a, data_channels, cond=None):
        if a.channels % (2 * data_channels):
            self.error(f"the gate needs channels divisible by 2 * data_channels, got {a.channels}")
        if cond is not None:  # [B, 2C] (one bias per image) or a [B, 2C, H, W] map
            a = self.with_const(a, cond[:, :, None, None] if cond.dim() == 2 else cond, multiply=False)
        out = self.new_slot(a.channels // 2, a.kind, "gate")
        self.emit(a.kind, Instr(GATE, out, a.slot, data_channels=data_channels))
        return PVal(out, a.channels // 2, a.kind)

    def channel_slice(self, a, start, stop):
        out = self.new_slot(stop - start, a.kind, "slice")
        self.emit(a.kind, Instr(COPY, out, a.slot, out_off=0, in_off=start, count=stop - start))
        return PVal(out, stop - start, a.kind)

    def cat(self, vals):
        if not all(isinstance(v, Val) for v in vals):
            self.error("concatenating an image-dependent tensor with a constant")
        kind = "row" if any(v.kind == "row" for v in vals) else "pixel"
        out = self.new_slot(sum(v.channels for v in vals), kind, "cat")
        off = 0
        for v in vals:
            self.emit(kind, Instr(COPY, out, v.slot, out_off=off, in_off=0, count=v.channels))
            off += v.channels
        return PVal(out, off, kind)

    def input_val(self):
        c = self.shape[0]
        self.prog.input = self.new_slot(c, "pixel", "input")
        return PVal(self.prog.input, c, "pixel")

    def set_output(self, out):
        c = self.shape[0]
        if out.kind != "pixel":
            raise not_causal((0, 0), (0, 1), channels=c) if self.shape[2] > 1 else \
                not_causal((0, 0), (1, 0), channels=c)
        why = output_error(out.channels, self.likelihood, self.levels, c)
        if why:  # the likelihood's settings, not the network: no method could sample it so
            raise ValueError(why)
        self.prog.output = out.slot

    def module(self, m, args, kwargs):
        if isinstance(m, nn.Conv2d) and not isinstance(m, MaskedConv2d) and len(args) == 1 and not kwargs and \
                isinstance(args[0], Val):
            return self.plain_conv(m, args[0])
        return super().module(m, args, kwargs)

    def method(self, name, args, kwargs):
        if name == "clone":  # a copy would share its slot: in place on it would change the original
            self.error("Tensor.clone (the program keeps one slot per value)")
        return super().method(name, args, kwargs)

    def finish(self):
        """The causality check, the post list, ring sizes and the column padding.

        The pixel pass at (y, x) runs before the pixel's value is known (its
        input there is zero, or holds the colour channels drawn so far), so the
        slots whose value at (y, x) depends on the input at (y, x) (the input's
        position-wise transforms, mask-B layers on them) must be computed again
        once the pixel is complete, before later pixels read them: the post
        list, every writer of such a slot in program order (so in-place and
        accumulating instructions replay in full). The output must not depend
        on the colour it draws at (y, x) or a later one (set_output already
        refused a dependence on later pixels: a row value)."""
        dep = self.same_pixel_dependence()
        self.check_output_dependence(dep[self.prog.output])
        self.prog.post = [i for i in self.prog.pixel if dep[i.out].any()]
        self.prog.blocks = self.shape[0] if self.keeps_colour_blocks() else 1
        pad = 0
        for i in self.prog.pixel + self.prog.row:
            if i.op == CONV:
                for dy, dx in i.taps:
                    slot = self.prog.slots[i.a]
                    slot.rows = max(slot.rows, 1 - dy)
                    pad = max(pad, abs(dx))
        self.prog.pad = pad

    def same_pixel_dependence(self):
        """{slot: bool [channels, C]}: whether channel j of the slot at (y, x) depends on colour c of the input
        at (y, x), by structure (a convolution's centre tap counts where its weight is not zero). The same at
        every position: taps never leave a value's position except through (dy, dx) != (0, 0)."""
        slots, c = self.prog.slots, self.shape[0]
        dep = {k: torch.zeros(s.channels, c, dtype=torch.bool) for k, s in enumerate(slots)}
        dep[self.prog.input] = torch.eye(c, dtype=torch.bool)
        for i in self.prog.pixel:  # in program order: an instruction reads what earlier ones wrote
            a = dep[i.a]
            if i.op == CONV:
                if (0, 0) not in i.taps:
                    continue
                w0 = (i.weight[i.taps.index((0, 0))] != 0).cpu()  # [Cin, Cout]
                new = (w0.T.to(torch.float32) @ a.to(torch.float32)) > 0
            elif i.op in (ADD, MUL):
                new = a | dep[i.b]
            elif i.op == GATE:
                f, g = split_gate(torch.arange(a.shape[0])[None].float(), i.data_channels)
                new = a[f[0].long()] | a[g[0].long()]
            elif i.op == COPY:
                new = dep[i.out].clone()
                new[i.out_off:i.out_off + i.count] = a[i.in_off:i.in_off + i.count]
            else:  # ACT, AFFINE, CONST: channel by channel
                new = a
            dep[i.out] = dep[i.out] | new if i.out == i.a or i.op == COPY else new
        return dep

    def check_output_dependence(self, out_dep):
        """Refuse an output whose colour c at (y, x) depends on colour >= c there, naming the last colour it
        sees."""
        c = self.shape[0]
        per = out_dep.shape[0] // c  # the output channels of one colour
        for k in range(out_dep.shape[0]):
            colour = k // per
            seen = out_dep[k, colour:].nonzero()
            if len(seen):
                raise not_causal((0, 0), (0, 0), colour, colour + int(seen[-1]), channels=c)

    def keeps_colour_blocks(self):
        """Whether the pixel pass can run colour block by colour block (module docstring)."""
        c = self.shape[0]
        if c == 1:
            return False
        slots = self.prog.slots
        for i in self.prog.pixel:
            if slots[i.out].channels % c or i.op == COPY or (i.op == GATE and i.data_channels != c):
                return False
            if i.op == CONV and (0, 0) in i.taps and slots[i.a].kind == "pixel":
                w = i.weight[i.taps.index((0, 0))]  # [Cin, Cout]
                blk_in = torch.arange(w.shape[0], device=w.device) // (w.shape[0] // c)
                blk_out = torch.arange(w.shape[1], device=w.device) // (w.shape[1] // c)
                if w.shape[0] % c or (w[blk_in[:, None] > blk_out[None, :]] != 0).any():
                    return False
        return True


def compile_program(model, *, shape, batch, likelihood, levels, condition=None):
    """The cached-sampling Program of ``model`` for ``batch`` images of ``shape``
    (C, H, W); raises CompileError naming an operation it cannot run exactly."""
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    gm = trace(model, condition is not None)
    comp = _Compiler(gm, shape, batch, dtype, device, condition, condition is not None, likelihood, levels)
    with torch.no_grad():
        return comp.run()
