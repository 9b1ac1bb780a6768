"""Compiling a network into the program that fastgen's cached samplers run.

Cached generation (Ramachandran et al. 2017, generalised) computes every
activation of the network once: at pixel (y, x), only the new position of each
layer, from the values of earlier positions kept in per-layer caches. The
network is traced with torch.fx and turned into a :class:`Program`: a list of
instructions over *slots* (one per activation that must be stored). Both
engines run the same program: the torch executor (fastgen/sampling/cached.py,
any device) and the C++ engine (csrc/cpu/sampling.cpp).

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
import inspect
import operator
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fastgen.nn import BatchNormAct2d, MaskedConv2d
from fastgen.ops.gated import gated_activation, gated_conv2d, vertical_conv2d
from fastgen.ops.masked_conv import same_padding
from fastgen.ref.gated import split_gate
from fastgen.ref.masked_conv import centre_channel_mask
from fastgen.sampling.code import ACT, ACTS, ADD, AFFINE, CONST, CONV, COPY, GATE, MUL
from fastgen.sampling.common import not_causal, output_error


class CompileError(ValueError):
    """The network cannot be sampled exactly with cached generation."""


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


class Pool:
    """The params and scalars lists of an encoded program (param(t) / scalar(v) append and return the index
    the code stores; param(None): -1), and the fields both encodings (Program, schedule.Schedule) write alike."""

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

    def taps(self, i):
        """A convolution's taps: [dy.., dx..]."""
        return [t[0] for t in i.taps] + [t[1] for t in i.taps]

    def position_wise(self, i):
        """The own fields of the position-wise ops both encodings write alike (ACT, AFFINE, CONST, GATE), or
        None for another op."""
        if i.op == ACT:
            return [ACTS.index(i.act), self.scalar(i.param)]
        if i.op == AFFINE:
            return [self.param(i.scale), self.param(i.shift)]
        if i.op == CONST:
            return [self.param(i.const), int(i.multiply), int(i.const.dim() == 4)]
        if i.op == GATE:
            return [i.data_channels]
        return None


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


# ---- tracing -------------------------------------------------------------------------------------------------------

class _Tracer(torch.fx.Tracer):
    """MaskedConv2d, BatchNormAct2d and the gated ops (GatedMaskedConv2d's public ops) are leaves: the
    compilers know their cached form."""

    def __init__(self):
        super().__init__(autowrap_functions=(gated_activation, gated_conv2d, vertical_conv2d))

    def is_leaf_module(self, m, qualname):
        return isinstance(m, (MaskedConv2d, BatchNormAct2d)) or super().is_leaf_module(m, qualname)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        """torch.fx's, with a parameter found by identity in one table instead of a scan of the root's
        named_parameters at every access (most of a Gated PixelCNN's trace time)."""
        if isinstance(attr_val, nn.Parameter):
            if getattr(self, "_names_of", (None,))[0] is not self.root:
                names = {}
                for n, p in self.root.named_parameters():  # the first name of a shared parameter, as fx takes
                    names.setdefault(id(p), n)
                self._names_of = (self.root, names)
            n = self._names_of[1].get(id(attr_val))
            if n is not None:
                if n not in parameter_proxy_cache:
                    parameter_proxy_cache[n] = self.create_proxy("get_attr", n, (), {})
                return parameter_proxy_cache[n]
        return super().getattr(attr, attr_val, parameter_proxy_cache)


class Traced:
    """A traced network: its fx graph and the module whose attributes and submodules the graph's targets name.
    Not a GraphModule: the compilers read the graph, they never run it (no generated code)."""

    def __init__(self, root, graph):
        self.root, self.graph = root, graph

    def get_submodule(self, target):
        return self.root.get_submodule(target)


def trace(model, has_condition):
    """The Traced graph of ``model(x)`` or ``model(x, condition)``; further
    arguments of forward take their defaults."""
    params = list(inspect.signature(model.forward).parameters.values())
    if not params:
        raise CompileError(f"{type(model).__name__}.forward takes no image argument")
    if isinstance(model, MaskedConv2d):  # a bare layer: traced as the leaf it is
        model = nn.Sequential(model)
    concrete = {}
    for i, p in enumerate(params[1:], 1):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or (i == 1 and has_condition):
            continue
        if p.default is inspect.Parameter.empty:
            raise CompileError(f"{type(model).__name__}.forward needs argument {p.name!r} beyond the image"
                               + ("" if has_condition else " (pass it as condition=)"))
        concrete[p.name] = p.default
    try:
        graph = _Tracer().trace(model, concrete_args=concrete)
    except CompileError:
        raise
    except Exception as e:  # data-dependent control flow and the like
        raise CompileError(f"cannot trace {type(model).__name__} with torch.fx for cached sampling ({e}); "
                           f"use method='naive'") from e
    graph.eliminate_dead_code(is_impure_node=lambda node: _in_place(node, model))  # shape queries, not x.mul_(2)
    return Traced(model, graph)


def _in_place(node, root):
    if node.op == "call_method":
        return node.target.endswith("_")
    if node.op == "call_function":
        return node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv) or \
            getattr(node.target, "__name__", "").endswith("_") or node.kwargs.get("inplace", False)
    if node.op == "call_module":
        return bool(getattr(root.get_submodule(node.target), "inplace", False))
    return node.op in ("placeholder", "output")


# ---- compiling ---------------------------------------------------------------------------------------------------

@dataclass
class Val:
    """A traced tensor that depends on the image: its slot and kind."""
    slot: int
    kind: str
    channels: int


_UNARY_FUNCTIONS = {
    F.relu: "relu", torch.relu: "relu", F.relu_: "relu", torch.relu_: "relu",
    F.leaky_relu: "leaky_relu", F.elu: "elu", torch.tanh: "tanh", F.tanh: "tanh",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.silu: "silu", F.gelu: "gelu", F.softplus: "softplus",
}
_UNARY_METHODS = {"relu": "relu", "relu_": "relu", "tanh": "tanh", "tanh_": "tanh", "sigmoid": "sigmoid",
                  "sigmoid_": "sigmoid"}
_IDENTITY_METHODS = ("contiguous", "clone", "detach")
_ACT_MODULES = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.ELU: "elu", nn.Tanh: "tanh",
                nn.Sigmoid: "sigmoid", nn.SiLU: "silu", nn.GELU: "gelu", nn.Softplus: "softplus"}
_ADD = (operator.add, operator.iadd, torch.add)
_SUB = (operator.sub, operator.isub, torch.sub)
_MUL = (operator.mul, operator.imul, torch.mul)
_DIV = (operator.truediv, operator.itruediv, torch.div)
_NEG = (operator.neg, torch.neg)
_CAT = (torch.cat, torch.concat, torch.concatenate)
_CAUSAL_OPS = ("fastgen.MaskedConv2d / GatedMaskedConv2d layers, 1x1 convolutions and position-wise operations "
               "(activations, additions and products, eval-mode BatchNorm2d and BatchNormAct2d, dropout in eval "
               "mode, concatenation and chunks along channels)")


def _describe(node):
    t = node.target
    name = getattr(t, "__name__", None) or str(t)
    if node.op == "call_method":
        name = f"Tensor.{t}"
    return f"`{name}` (graph node {node.name!r})"


class _Compiler:
    SUPPORTED = _CAUSAL_OPS  # named in the errors
    ADD_IN_PLACE = True  # a fresh operand may take a sum in its own slot (the schedule keeps every value)

    def __init__(self, gm, shape, batch, dtype, device, condition, has_condition, likelihood, levels):
        self.gm, self.shape, self.batch = gm, tuple(shape), batch
        self.likelihood, self.levels = likelihood, levels
        self.dtype, self.device = dtype, device
        self.prog = Program(batch=batch, shape=self.shape, dtype=dtype, device=device)
        self.condition, self.has_condition = condition, has_condition
        self.node = None

    # -- helpers
    def error(self, why):
        where = f" at {_describe(self.node)}" if self.node is not None else ""
        raise CompileError(f"cached sampling cannot run this network{where}: {why}")

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

    def tensor(self, t):
        return t.detach().to(device=self.device, dtype=self.dtype)

    # -- constants
    def extent(self, a):
        """(H, W) of a value (one scale: the image's)."""
        return self.shape[1:]

    def const_layout(self, t, a):
        """A constant operand of a position-wise op with the value ``a``, [B, C, H, W]:
        ('scalar', float) | ('channel', [C]) | ('image', [B, C]) | ('map', [B, H, W, C])."""
        channels = a.channels
        if not isinstance(t, torch.Tensor):
            return "scalar", float(t)
        if t.numel() == 1:
            return "scalar", float(t.reshape(()).item())
        h, w = self.extent(a)
        if t.dim() > 4:
            self.error(f"a constant of shape {tuple(t.shape)} cannot broadcast against a [B, C, H, W] activation")
        t4 = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
        full = (self.batch, channels, h, w)
        if any(s not in (1, f) for s, f in zip(t4.shape, full)):
            self.error(f"a constant of shape {tuple(t.shape)} does not broadcast to the activation "
                       f"[{self.batch}, {channels}, {h}, {w}]")
        t4 = self.tensor(t4)
        if t4.shape[2] == 1 and t4.shape[3] == 1:
            if t4.shape[0] == 1:
                return "channel", t4.reshape(-1).expand(channels).contiguous()
            return "image", t4.reshape(t4.shape[0], t4.shape[1]).expand(self.batch, channels).contiguous()
        return "map", t4.expand(full).permute(0, 2, 3, 1).contiguous()

    # -- emitting
    def unary(self, a, act, param=0.0, inplace=False):
        out = self.out_slot(a, inplace, a.kind, a.channels, act)
        self.emit(a.kind, Instr(ACT, out, a.slot, act=act, param=param))
        return Val(out, a.kind, a.channels)

    def affine(self, a, scale=1.0, shift=0.0, inplace=False):
        c = a.channels
        scale = torch.full((c,), scale, dtype=self.dtype, device=self.device) if not torch.is_tensor(scale) else scale
        shift = torch.full((c,), shift, dtype=self.dtype, device=self.device) if not torch.is_tensor(shift) else shift
        out = self.out_slot(a, inplace, a.kind, c, "affine")
        self.emit(a.kind, Instr(AFFINE, out, a.slot, scale=scale, shift=shift))
        return Val(out, a.kind, c)

    def with_const(self, a, t, multiply, inplace=False):
        layout, v = self.const_layout(t, a)
        if layout in ("scalar", "channel"):
            if multiply:
                return self.affine(a, scale=v, inplace=inplace)
            return self.affine(a, shift=v, inplace=inplace)
        out = self.out_slot(a, inplace, a.kind, a.channels, "const")
        self.emit(a.kind, Instr(CONST, out, a.slot, const=v, multiply=multiply))
        return Val(out, a.kind, a.channels)

    def binary(self, a, b, op, alpha=1.0, inplace=False):
        if a.channels != b.channels:
            self.error(f"operands with {a.channels} and {b.channels} channels (broadcasting across channels is "
                       f"not supported)")
        kind = "row" if "row" in (a.kind, b.kind) else "pixel"
        out = self.out_slot(a, inplace, kind, a.channels, "add" if op == ADD else "mul")
        self.emit(kind, Instr(op, out, a.slot, b=b.slot, param=alpha))
        return Val(out, kind, a.channels)

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
        return Val(slot, kind, cout)

    def masked_conv(self, m, a):
        if a.channels != m.in_channels:
            self.error(f"{m} takes {m.in_channels} channels, got {a.channels}")
        kh, kw = m.kernel_size
        dh, dw = m.dilation
        if tuple(m.padding) != same_padding((kh, kw), (dh, dw)):
            self.error(f"MaskedConv2d with padding {m.padding}: cached sampling needs the output the size of the "
                       f"input (padding {same_padding((kh, kw), (dh, dw))})")
        mask = m.mask()
        wm = m.weight.detach() * mask
        taps, ws = [], []
        for i in range(kh):
            for j in range(kw):
                if mask[:, :, i, j].any():  # only the unmasked taps
                    taps.append(((i - kh // 2) * dh, (j - kw // 2) * dw))
                    ws.append(wm[:, :, i, j])
        weight = torch.stack(ws) if ws else wm.new_zeros(0, m.out_channels, m.in_channels)
        return self.conv(a, weight, m.bias, taps, "masked_conv")

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
        return Val(out, a.kind, a.channels // 2)

    def stack_conv(self, a, weight, bias, stack, mask_type, data_channels, shift, name):
        """A Gated PixelCNN stack's convolution (fastgen.ref.gated) as taps: 'vertical', every tap of a
        [Cout, Cin, kv, kw] kernel over rows y-shift-kv+1 .. y-shift; 'horizontal', the 1 x kc taps up to the
        pixel, its own under the masks' centre rule."""
        w = weight.detach()
        if a.channels != w.shape[1]:
            self.error(f"a {stack} stack convolution taking {w.shape[1]} channels applied to {a.channels}")
        if stack == "vertical":
            kv, kw = w.shape[2:]
            taps = [(i - (kv - 1) - shift, j - kw // 2) for i in range(kv) for j in range(kw)]
            return self.conv(a, w.permute(2, 3, 0, 1).reshape(kv * kw, *w.shape[:2]), bias, taps, name)
        kc = w.shape[3]
        centre = centre_channel_mask(w.shape[0], w.shape[1], mask_type, data_channels, w.device, w.dtype)
        taps, ws = [], []
        for j in range(kc):
            if j < kc - 1 or mask_type == "B" or data_channels > 1:  # mask A, one colour: no centre tap
                taps.append((0, j - (kc - 1)))
                ws.append(w[:, :, 0, j] * (centre if j == kc - 1 else 1))
        taps_w = torch.stack(ws) if ws else w.new_zeros(0, w.shape[0], w.shape[1])
        return self.conv(a, taps_w, bias, taps, name)

    def channel_slice(self, a, start, stop):
        out = self.new_slot(stop - start, a.kind, "slice")
        self.emit(a.kind, Instr(COPY, out, a.slot, out_off=0, in_off=start, count=stop - start))
        return Val(out, a.kind, stop - start)

    def cat(self, vals):
        if not all(isinstance(v, Val) for v in vals):
            self.error("concatenating an image-dependent tensor with a constant")
        kind = "row" if any(v.kind == "row" for v in vals) else "pixel"
        out = self.new_slot(sum(v.channels for v in vals), kind, "cat")
        off = 0
        for v in vals:
            self.emit(kind, Instr(COPY, out, v.slot, out_off=off, in_off=0, count=v.channels))
            off += v.channels
        return Val(out, kind, off)

    def chunks(self, a, sizes):
        bounds, start = [], 0
        for s in sizes:
            bounds.append((start, min(start + s, a.channels)))
            start += s
        return tuple(self.channel_slice(a, s, e) for s, e in bounds if e > s)

    def channel_dim(self, dim):
        if dim not in (1, -3):
            self.error(f"only channel (dim=1) concatenation / chunking keeps positions apart, got dim={dim}")

    # -- nodes
    def run(self):
        env = {}
        placeholders = 0
        for node in self.gm.graph.nodes:
            self.node = node
            if node.op == "placeholder":
                if placeholders == 0:
                    env[node] = self.input_val()
                elif placeholders == 1 and self.has_condition:
                    env[node] = self.condition
                else:
                    env[node] = node.args[0] if node.args else None  # a specialised default
                placeholders += 1
                continue
            if node.op == "output":
                out = env[node.args[0]] if isinstance(node.args[0], torch.fx.Node) else None
                if not isinstance(out, Val):
                    self.error("the network's output must be one tensor computed from the image")
                self.set_output(out)
                break
            args = torch.fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n])
            if node.op == "get_attr":
                obj = self.gm.root
                for part in node.target.split("."):
                    obj = getattr(obj, part)
                env[node] = obj
                continue
            if not _depends(args, kwargs):
                env[node] = self.evaluate(node, args, kwargs)
                continue
            env[node] = self.translate(node, args, kwargs)
        self.node = None
        self.finish()
        return self.prog

    def input_val(self):
        c = self.shape[0]
        self.prog.input = self.new_slot(c, "pixel", "input")
        return Val(self.prog.input, "pixel", c)

    def set_output(self, out):
        c = self.shape[0]
        if out.kind != "pixel":
            raise not_causal((0, 0), (0, 1), channels=c) if self.shape[2] > 1 else \
                not_causal((0, 0), (1, 0), channels=c)
        why = output_error(out.channels, self.likelihood, self.levels, c)
        if why:  # the likelihood's settings, not the network: no method could sample it so
            raise ValueError(why)
        self.prog.output = out.slot

    def evaluate(self, node, args, kwargs):
        """A node that does not depend on the image: run it once."""
        if node.op == "call_module":
            return self.gm.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        self.error("unexpected node")

    def translate(self, node, args, kwargs):
        if node.op == "call_module":
            return self.module(self.gm.get_submodule(node.target), args, kwargs)
        if node.op == "call_method":
            return self.method(node.target, args, kwargs)
        return self.function(node.target, args, kwargs)

    def module(self, m, args, kwargs):
        a = args[0] if args else None
        if not isinstance(a, Val) or len(args) + len(kwargs) != 1:
            self.error(f"{type(m).__name__} with arguments other than one image-dependent tensor")
        if isinstance(m, MaskedConv2d):
            return self.masked_conv(m, a)
        if isinstance(m, nn.Conv2d):
            return self.plain_conv(m, a)
        if type(m) in _ACT_MODULES:
            act = _ACT_MODULES[type(m)]
            return self.activation(a, act, m.__dict__, getattr(m, "inplace", False))
        if isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout1d)):
            if m.training and not isinstance(m, nn.Identity) and m.p > 0:
                self.error("dropout in training mode (the sampler puts the model in eval mode)")
            return a
        if isinstance(m, (nn.BatchNorm2d, BatchNormAct2d)):
            name = type(m).__name__
            if m.training or m.running_mean is None:
                self.error(f"{name} in training mode or without running statistics normalises over positions")
            scale = self.tensor(torch.rsqrt(m.running_var + m.eps))
            if m.weight is not None:
                scale = scale * self.tensor(m.weight)
            shift = -self.tensor(m.running_mean) * scale
            if m.bias is not None:
                shift = shift + self.tensor(m.bias)
            out = self.affine(a, scale, shift)
            if isinstance(m, BatchNormAct2d):  # eval mode: the affine map, then its activation
                out = self.activation(out, m.activation, {"negative_slope": m.negative_slope}
                                      if m.activation == "leaky_relu" else {})
            return out
        self.error(f"the module {type(m).__name__} is not one cached sampling can run exactly; it supports "
                   f"{self.SUPPORTED}. Use method='naive'")

    def activation(self, a, act, params, inplace=False):
        if act == "leaky_relu":
            return self.unary(a, act, params.get("negative_slope", 0.01), inplace)
        if act == "elu":
            return self.unary(a, act, params.get("alpha", 1.0), inplace)
        if act == "gelu" and params.get("approximate", "none") != "none":
            self.error("gelu with approximate='tanh' (only the exact gelu is supported)")
        if act == "softplus" and (params.get("beta", 1.0) != 1.0 or params.get("threshold", 20.0) != 20.0):
            self.error("softplus with beta or threshold other than the defaults")
        return self.unary(a, act, 0.0, inplace)

    def function(self, f, args, kwargs):
        if f in _UNARY_FUNCTIONS:
            act = _UNARY_FUNCTIONS[f]
            names = {F.leaky_relu: ("negative_slope",), F.elu: ("alpha",), F.softplus: ("beta", "threshold")}
            params = dict(zip(names.get(f, ()), args[1:]))
            params.update({k: v for k, v in kwargs.items() if k != "inplace"})
            inplace = f in (F.relu_, torch.relu_) or bool(kwargs.get("inplace", False))
            return self.activation(args[0], act, params, inplace)
        if f in (F.dropout, F.dropout2d):
            if kwargs.get("training", args[2] if len(args) > 2 else True) and \
                    kwargs.get("p", args[1] if len(args) > 1 else 0.5) > 0:
                self.error("dropout with training=True")
            return args[0]
        if f in _ADD + _SUB + _MUL + _DIV:
            return self.arith(f, args, kwargs, inplace=f in (operator.iadd, operator.isub, operator.imul,
                                                             operator.itruediv))
        if f in _NEG:
            return self.affine(args[0], scale=-1.0)
        if f in _CAT:
            self.channel_dim(kwargs.get("dim", args[1] if len(args) > 1 else 0))
            return self.cat(list(args[0]))
        if f in (torch.chunk, torch.split):
            return self.method("chunk" if f is torch.chunk else "split", args, kwargs)
        if f is operator.getitem:
            return self.getitem(*args)
        if f is getattr and args[1] in ("shape", "dtype", "device"):
            return self.fake(args[0]).__getattribute__(args[1])
        if f is gated_activation:
            bound = inspect.signature(gated_activation).bind(*args, **kwargs)
            bound.apply_defaults()
            if isinstance(bound.arguments["cond"], Val):
                self.error("gated_activation's cond depends on the image")
            return self.gate(bound.arguments["input"], bound.arguments["data_channels"], bound.arguments["cond"])
        if f is vertical_conv2d:
            g = inspect.signature(vertical_conv2d).bind(*args, **kwargs)
            g.apply_defaults()
            g = g.arguments
            return self.stack_conv(g["input"], g["weight"], g["bias"], "vertical", "B", 1, g["shift"],
                                   "link" if g["shift"] else "v_pre")
        if f is gated_conv2d:
            g = inspect.signature(gated_conv2d).bind(*args, **kwargs)
            g.apply_defaults()
            g = g.arguments
            pre = self.stack_conv(g["input"], g["weight"], g["bias"], g["stack"], g["mask_type"], g["data_channels"],
                                  0, g["stack"][0] + "_pre")
            cond = g["cond"]
            if isinstance(cond, Val):  # the horizontal stack's link from the vertical one
                pre, cond = self.binary(pre, cond, ADD, inplace=self.ADD_IN_PLACE), None
            return self.gate(pre, g["data_channels"], cond)
        self.error(f"it is not position-wise or causal; cached sampling supports {self.SUPPORTED}. "
                   f"Use method='naive'")

    def method(self, name, args, kwargs):
        a = args[0]
        if name in _UNARY_METHODS:
            return self.activation(a, _UNARY_METHODS[name], {}, name.endswith("_"))
        if name in _IDENTITY_METHODS:
            return a
        if name in ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"):
            f = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}[name.rstrip("_")]
            return self.arith(f, args, kwargs, inplace=name.endswith("_"))
        if name == "neg":
            return self.affine(a, scale=-1.0)
        if name in ("size", "dim"):
            return getattr(self.fake(a), name)(*args[1:], **kwargs)
        if name in ("chunk", "split"):
            if not isinstance(a, Val):
                self.error("chunk / split of a constant mixed with the image")
            self.channel_dim(kwargs.get("dim", args[2] if len(args) > 2 else 0))
            n = kwargs.get("chunks", kwargs.get("split_size_or_sections", kwargs.get("split_size", args[1])))
            if name == "chunk":
                size = -(-a.channels // n)
                return self.chunks(a, [size] * n)
            return self.chunks(a, list(n) if isinstance(n, (list, tuple)) else [n] * -(-a.channels // n))
        self.error(f"it is not position-wise or causal; cached sampling supports {self.SUPPORTED}. "
                   f"Use method='naive'")

    def fake(self, a):
        """A meta tensor with a Val's full shape (for shape queries)."""
        h, w = self.extent(a)
        return torch.empty(self.batch, a.channels, h, w, device="meta")

    def arith(self, f, args, kwargs, inplace):
        a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
        alpha = kwargs.get("alpha", 1.0)
        if alpha != 1.0 and f not in (torch.add, torch.sub):
            self.error("alpha= on an operation other than add / sub")
        if f in _SUB:
            alpha = -alpha
        if isinstance(a, Val) and isinstance(b, Val):
            if f in _DIV:
                self.error("division by an image-dependent tensor")
            return self.binary(a, b, MUL if f in _MUL else ADD, alpha, inplace)
        if not isinstance(a, Val):  # const (op) val
            if f in _DIV:
                self.error("division by an image-dependent tensor")
            if inplace:
                self.error("an in-place operation on a constant with an image-dependent operand")
            if f in _ADD + _SUB:  # c + alpha v (c - v: alpha = -1)
                return self.with_const(b if alpha == 1.0 else self.affine(b, scale=alpha), a, multiply=False)
            return self.with_const(b, a, multiply=True)
        if f in _DIV:
            b = 1.0 / b
        elif f in _ADD + _SUB and alpha != 1.0:
            b = b * alpha
        return self.with_const(a, b, multiply=f in _MUL + _DIV, inplace=inplace)

    def getitem(self, a, index):
        if isinstance(a, (tuple, list)):
            return a[index]
        if isinstance(a, Val):
            if isinstance(index, tuple) and len(index) >= 2 and index[0] == slice(None) and \
                    isinstance(index[1], slice) and all(i == slice(None) for i in index[2:]):
                start, stop, step = index[1].indices(a.channels)
                if step == 1 and stop > start:
                    return self.channel_slice(a, start, stop)
            self.error(f"indexing {index!r}: only channel slices x[:, a:b] keep positions apart")
        return a[index]

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


def _depends(args, kwargs):
    found = []
    torch.fx.node.map_aggregate((args, kwargs), lambda v: found.append(v) if isinstance(v, Val) else None)
    return bool(found)


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
