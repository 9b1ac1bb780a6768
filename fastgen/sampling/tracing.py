"""Reading a network for cached sampling: torch.fx traces it, and :class:`Compiler` walks the graph, turning
each node into the primitives of the schedule compiler (fastgen/sampling/schedule.py): convolutions as taps,
position-wise operations, channel slices and concatenations. fastgen's layers are read through their public
ops (MaskedConv2d's mask, GatedMaskedConv2d's vertical_conv2d, gated_conv2d and gated_activation,
BatchNormAct2d in eval mode); nodes that do not depend on the image are run once; anything else is a
:class:`CompileError` that names the operation, and the numerical probe decides (fastgen.sampling.causality).
"""
import dataclasses
import functools
import inspect
import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fastgen.nn import BatchNormAct2d, MaskedConv2d
from fastgen.ops.gated import gated_activation, gated_conv2d, vertical_conv2d
from fastgen.ops.masked_conv import same_padding
from fastgen.ref.masked_conv import causal_mask, centre_channel_mask
from fastgen.sampling.code import ADD, MUL


class CompileError(ValueError):
    """The network cannot be sampled exactly with cached generation."""


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
    """A traced tensor that depends on the image (the schedule's SVal: a view of a slot)."""
    slot: int
    channels: int


_UNARY_FUNCTIONS = {
    F.relu: "relu", torch.relu: "relu", F.relu_: "relu", torch.relu_: "relu",
    F.leaky_relu: "leaky_relu", F.elu: "elu", torch.tanh: "tanh", F.tanh: "tanh",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.silu: "silu", F.gelu: "gelu", F.softplus: "softplus",
}
_UNARY_METHODS = {"relu": "relu", "relu_": "relu", "tanh": "tanh", "tanh_": "tanh", "sigmoid": "sigmoid",
                  "sigmoid_": "sigmoid"}
_IDENTITY_METHODS = ("contiguous", "detach")  # views: in place on them changes the tensor
_ACT_MODULES = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.ELU: "elu", nn.Tanh: "tanh",
                nn.Sigmoid: "sigmoid", nn.SiLU: "silu", nn.GELU: "gelu", nn.Softplus: "softplus"}
_ADD = (operator.add, operator.iadd, torch.add)
_SUB = (operator.sub, operator.isub, torch.sub)
_MUL = (operator.mul, operator.imul, torch.mul)
_DIV = (operator.truediv, operator.itruediv, torch.div)
_NEG = (operator.neg, torch.neg)
_CAT = (torch.cat, torch.concat, torch.concatenate)
_SIGNATURES = {f: inspect.signature(f) for f in (gated_activation, gated_conv2d, vertical_conv2d)}
@functools.lru_cache(maxsize=64)
def _mask(out_channels, in_channels, kernel_size, mask_type, data_channels, device, dtype):
    return causal_mask(out_channels, in_channels, kernel_size, mask_type, data_channels, device, dtype)


def _layer_mask(m):
    """MaskedConv2d's mask (read only), the same tensor for layers of one shape (a layer's own mask()
    method when a subclass has one)."""
    if type(m).mask is not MaskedConv2d.mask:
        return m.mask()
    return _mask(m.out_channels, m.in_channels, tuple(m.kernel_size), m.mask_type, m.data_channels, m.weight.device,
                 m.weight.dtype)


def _describe(node):
    t = node.target
    name = getattr(t, "__name__", None) or str(t)
    if node.op == "call_method":
        name = f"Tensor.{t}"
    return f"`{name}` (graph node {node.name!r})"


class Compiler:
    """The graph walk: run() turns each node of the traced graph into the primitives a subclass implements
    (input_val, set_output, unary, affine, with_const, binary, conv, gate, channel_slice, cat, extent,
    finish: fastgen/sampling/schedule.py), then returns ``self.prog``. SUPPORTED names what it reads in
    the errors."""
    SUPPORTED = ""

    def __init__(self, gm, shape, batch, dtype, device, condition, has_condition, likelihood, levels):
        self.gm, self.shape, self.batch = gm, tuple(shape), batch
        self.likelihood, self.levels = likelihood, levels
        self.dtype, self.device = dtype, device
        self.condition, self.has_condition = condition, has_condition
        self.node = None

    # -- helpers
    def error(self, why):
        where = f" at {_describe(self.node)}" if self.node is not None else ""
        raise CompileError(f"cached sampling cannot run this network{where}: {why}")

    def tensor(self, t):
        return t.detach().to(device=self.device, dtype=self.dtype)

    # -- constants
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

    # -- fastgen's layers as primitives
    def masked_conv(self, m, a):
        if a.channels != m.in_channels:
            self.error(f"{m} takes {m.in_channels} channels, got {a.channels}")
        kh, kw = m.kernel_size
        dh, dw = m.dilation
        if tuple(m.padding) != same_padding((kh, kw), (dh, dw)):
            self.error(f"MaskedConv2d with padding {m.padding}: cached sampling needs the output the size of the "
                       f"input (padding {same_padding((kh, kw), (dh, dw))})")
        mask = _layer_mask(m)
        wm = (m.weight.detach() * mask).permute(2, 3, 0, 1).reshape(kh * kw, m.out_channels, m.in_channels)
        keep = mask.flatten(0, 1).any(0).flatten().nonzero().flatten()  # only the unmasked taps
        taps = [((int(t) // kw - kh // 2) * dh, (int(t) % kw - kw // 2) * dw) for t in keep]
        return self.conv(a, wm[keep], m.bias, taps, "masked_conv")

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
            bound = _SIGNATURES[f].bind(*args, **kwargs)
            bound.apply_defaults()
            if isinstance(bound.arguments["cond"], Val):
                self.error("gated_activation's cond depends on the image")
            return self.gate(bound.arguments["input"], bound.arguments["data_channels"], bound.arguments["cond"])
        if f is vertical_conv2d:
            g = _SIGNATURES[f].bind(*args, **kwargs)
            g.apply_defaults()
            g = g.arguments
            return self.stack_conv(g["input"], g["weight"], g["bias"], "vertical", "B", 1, g["shift"],
                                   "link" if g["shift"] else "v_pre")
        if f is gated_conv2d:
            g = _SIGNATURES[f].bind(*args, **kwargs)
            g.apply_defaults()
            g = g.arguments
            pre = self.stack_conv(g["input"], g["weight"], g["bias"], g["stack"], g["mask_type"], g["data_channels"],
                                  0, g["stack"][0] + "_pre")
            cond = g["cond"]
            if isinstance(cond, Val):  # the horizontal stack's link from the vertical one
                pre, cond = self.binary(pre, cond, ADD), None
            return self.gate(pre, g["data_channels"], cond)
        self.error(f"it is not position-wise or causal; cached sampling supports {self.SUPPORTED}. "
                   f"Use method='naive'")

    def method(self, name, args, kwargs):
        a = args[0]
        if name in _UNARY_METHODS:
            return self.activation(a, _UNARY_METHODS[name], {}, name.endswith("_"))
        if name in _IDENTITY_METHODS:
            return a
        if name == "clone":
            return dataclasses.replace(a)  # a new tensor: in place on it leaves the original alone
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


def _depends(args, kwargs):
    found = []
    torch.fx.node.map_aggregate((args, kwargs), lambda v: found.append(v) if isinstance(v, Val) else None)
    return bool(found)
