"""The gated ops (gated_activation, gated_conv2d) on every backend against
fastgen.ref.gated, outputs and gradients; the GatedMaskedConv2d layer, its
conditioning and the absence of a blind spot; errors."""
import pytest
import torch

import fastgen
from fastgen.functional import gated_activation, gated_conv2d
from fastgen.ops import gated as ops
from fastgen.ref import gated as ref

from conftest import require_backend

TRITON = pytest.param("triton", marks=pytest.mark.triton)


def device_for(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def work_dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64


def tol(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)


def grads_of(fn, inputs, seed=1):
    """fn(*inputs) and the gradients of every input that requires grad, for a fixed random grad_out."""
    y = fn(*inputs)
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(y)
    y.backward(g)
    return y.detach(), [None if t is None else t.grad for t in inputs]


def leaf(t, dtype, device, channels_last=False):
    if t is None:
        return None
    t = t.detach().to(dtype=dtype, device=device)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_()


# ---- gated_activation ----------------------------------------------------------------------------------------

ACT_CASES = [  # (x shape, data_channels, cond kind)
    ((2, 8, 5, 7), 1, None),
    ((2, 8, 5, 7), 1, "vector"),
    ((1, 12, 3, 33), 3, "map"),
    ((3, 6, 1, 1), 3, "vector"),
    ((4, 10), 1, "vector"),
    ((2, 6, 9), 3, "map"),
]


def make_cond(kind, x_shape):
    if kind is None:
        return None
    return torch.randn(x_shape[:2] if kind == "vector" else x_shape, dtype=torch.float64)


@pytest.mark.parametrize("backend", ["ref", "cpp", TRITON])
@pytest.mark.parametrize("case", ACT_CASES, ids=lambda c: f"{c[0]}-dc{c[1]}-{c[2]}")
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_gated_activation_matches_ref(backend, case, layout):
    require_backend(ops.ACT, backend)
    shape, dc, kind = case
    if layout != "nchw" and len(shape) != 4:
        pytest.skip("layouts are 4-D")
    dtype, device = work_dtype(backend), device_for(backend)
    x = torch.randn(shape, dtype=torch.float64) * 2
    if layout == "sliced":  # a non-contiguous view: every other column of a wider tensor
        x = torch.randn(*shape[:3], 2 * shape[3], dtype=torch.float64)[..., ::2] * 2
    cond = make_cond(kind, shape)
    want, want_g = grads_of(lambda a, c: ref.gated_activation(a, c, dc), [leaf(x, torch.float64, "cpu"),
                                                                         leaf(cond, torch.float64, "cpu")])
    xs = leaf(x, dtype, device, layout == "channels_last")
    if layout == "sliced":  # the same values, as a strided view
        wide = torch.zeros(*shape[:3], 2 * shape[3], dtype=dtype, device=device)
        wide[..., ::2] = x
        xs = wide[..., ::2].requires_grad_()
    got, got_g = grads_of(lambda a, c: gated_activation(a, c, data_channels=dc, backend=backend),
                          [xs, leaf(cond, dtype, device)])
    torch.testing.assert_close(got.cpu().double(), want, **tol(dtype))
    for g, w in zip(got_g, want_g):
        if w is not None:
            torch.testing.assert_close(g.cpu().double(), w, **tol(dtype))
    if layout == "channels_last" and backend != "ref":
        assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", ["ref", "cpp"])
def test_gated_activation_gradcheck(backend):
    require_backend(ops.ACT, backend)
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    for cond in (None, torch.randn(2, 6, dtype=torch.float64, requires_grad=True),
                 torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)):
        assert torch.autograd.gradcheck(lambda a, c: gated_activation(a, c, data_channels=3, backend=backend),
                                        (x, cond))


def test_gated_activation_opcheck():
    require_backend(ops.ACT, "cpp")
    x, cond = torch.randn(2, 8, 3, 5), torch.randn(2, 8)
    torch.library.opcheck(ops.gated_activation_op, (x.requires_grad_(), cond, 1, "cpp"))
    torch.library.opcheck(torch.ops.fastgen.gated_activation_forward.default, (x.detach(), None, 2))


def test_gated_activation_dispatch_takes_cpp_on_cpu():
    require_backend(ops.ACT, "cpp")
    call = ops.make_act_call(torch.randn(2, 4, 3, 3), None, 1)
    assert ops.ACT.choose(call, "cpu") == "cpp"
    half = ops.make_act_call(torch.randn(2, 4, 3, 3, dtype=torch.bfloat16), None, 1)
    assert ops.ACT.choose(half, "cpu") == "ref"  # cpp takes fp32/fp64 only: the next in line, never an error


# ---- gated_conv2d ----------------------------------------------------------------------------------------------

CONV_CASES = [  # (stack, mask, data_channels, kernel (kh, kw), B, Cin, C, H, W, bias, cond)
    ("horizontal", "A", 1, (1, 4), 2, 1, 4, 5, 7, True, "map"),
    ("horizontal", "B", 1, (1, 2), 1, 4, 4, 6, 5, False, "vector"),
    ("horizontal", "A", 3, (1, 4), 2, 3, 6, 5, 6, True, None),
    ("horizontal", "B", 3, (1, 2), 2, 6, 6, 4, 7, True, "map"),
    ("vertical", "B", 1, (2, 3), 2, 4, 4, 5, 7, True, "vector"),
    ("vertical", "B", 3, (4, 7), 1, 3, 6, 6, 5, False, "map"),
]


def conv_case_id(c):
    return f"{c[0][0]}{c[1]}-dc{c[2]}-{c[3][0]}x{c[3][1]}-{'b' if c[9] else 'nob'}-{c[10]}"


@pytest.mark.parametrize("backend", ["ref", "composed", TRITON])
@pytest.mark.parametrize("case", CONV_CASES, ids=conv_case_id)
def test_gated_conv2d_matches_ref(backend, case):
    require_backend(ops.CONV, backend)
    stack, mask, dc, (kh, kw), b, ci, c, h, w, has_bias, kind = case
    x = torch.randn(b, ci, h, w, dtype=torch.float64)
    wt = torch.randn(2 * c, ci, kh, kw, dtype=torch.float64) / (ci * kh * kw) ** 0.5
    bias = torch.randn(2 * c, dtype=torch.float64) if has_bias else None
    cond = make_cond(kind, (b, 2 * c, h, w))
    want, want_g = grads_of(lambda *a: ref.gated_conv2d(*a, stack, mask, dc),
                            [leaf(t, torch.float64, "cpu") for t in (x, wt, bias, cond)])
    dtype, device = work_dtype(backend), device_for(backend)
    for channels_last in (False, True):
        got, got_g = grads_of(lambda xx, ww, bb, cc: gated_conv2d(xx, ww, bb, cc, stack=stack, mask_type=mask,
                                                                  data_channels=dc, backend=backend),
                              [leaf(x, dtype, device, channels_last)] + [leaf(t, dtype, device) for t in (wt, bias, cond)])
        torch.testing.assert_close(got.cpu().double(), want, **tol(dtype))
        for name, g, wg in zip(("x", "weight", "bias", "cond"), got_g, want_g):
            if wg is not None:
                torch.testing.assert_close(g.cpu().double(), wg, **tol(dtype), msg=lambda m: f"grad {name}: {m}")


def test_gated_conv2d_ignores_the_future():
    """The horizontal stack's output at (y, x) must not move when (y, x+1..) or
    rows below change, nor (mask A) the pixel itself; the vertical stack's
    not when rows below change."""
    torch.manual_seed(3)
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    for stack, kernel, mask in (("horizontal", (1, 3), "A"), ("horizontal", (1, 3), "B"), ("vertical", (3, 5), "B")):
        w = torch.randn(8, 2, *kernel, dtype=torch.float64)
        out = gated_conv2d(x, w, stack=stack, mask_type=mask)
        y0, x0 = 2, 3
        (gx,) = torch.autograd.grad(out[0, :, y0, x0].sum(), x)
        seen = gx[0].abs().sum(0) != 0
        for yy in range(5):
            for xx in range(6):
                if stack == "vertical":
                    allowed = y0 - kernel[0] < yy <= y0 and abs(xx - x0) <= kernel[1] // 2
                else:
                    allowed = yy == y0 and (x0 - kernel[1] < xx < x0 or (xx == x0 and mask == "B"))
                assert bool(seen[yy, xx]) == allowed, (stack, mask, yy, xx)


def test_gated_conv2d_has_no_cpp_backend_of_its_own():
    """The op contract (tests/test_op_contract.py) checks the bad inputs; this is dispatch: an explicit
    backend the op lacks is an error naming the ones it has."""
    with pytest.raises(fastgen.BackendError, match="no backend 'cpp'"):
        gated_conv2d(torch.randn(1, 2, 4, 4), torch.randn(8, 2, 1, 2), backend="cpp")


# ---- the layer -------------------------------------------------------------------------------------------------

def layer_pair(in_ch, ch, k, mask, dc, num_classes=None, cond_channels=None, backend=None, seed=0):
    """A layer forced onto backend ``ref`` and one on ``backend`` with the same weights (float64)."""
    torch.manual_seed(seed)
    a = fastgen.GatedMaskedConv2d(in_ch, ch, k, mask, dc, num_classes, cond_channels, backend="ref").double()
    with torch.no_grad():  # labels matter: the embeddings start at zero
        for p in a.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    b = fastgen.GatedMaskedConv2d(in_ch, ch, k, mask, dc, num_classes, cond_channels, backend=backend).double()
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("backend", [None, "ref", TRITON])
@pytest.mark.parametrize("dc, conditional", [(1, False), (1, True), (3, False), (3, True)])
def test_layer_matches_ref(backend, dc, conditional):
    if backend is not None:
        require_backend(ops.CONV, backend)
    a, b = layer_pair(dc, 6, 5, "A", dc, 4 if conditional else None, 2 if conditional else None, backend)
    a2, b2 = layer_pair(6, 6, 3, "B", dc, 4 if conditional else None, 2 if conditional else None, backend, seed=1)
    dtype, device = work_dtype(backend), device_for(backend)
    x = torch.randn(2, dc, 5, 6, dtype=torch.float64)
    label = torch.tensor([1, 3]) if conditional else None
    cmap = torch.randn(2, 2, 5, 6, dtype=torch.float64) if conditional else None
    results = []
    for (l1, l2), dt, dev in (((a, a2), torch.float64, "cpu"), ((b, b2), dtype, device)):
        l1, l2 = l1.to(dev, dt), l2.to(dev, dt)
        xs = x.to(dev, dt).clone().requires_grad_()
        lab = None if label is None else label.to(dev)
        cm = None if cmap is None else cmap.to(dev, dt)
        v, h, s1 = l1(xs, label=lab, cond=cm)
        v, h, s2 = l2(v, h, label=lab, cond=cm)
        out = torch.cat([v.flatten(), h.flatten(), (s1 + s2).flatten()])
        g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(out)
        out.backward(g)
        results.append((out.detach().cpu().double(), xs.grad.cpu().double(),
                        [p.grad.cpu().double() for p in list(l1.parameters()) + list(l2.parameters())]))
    (o1, gx1, gp1), (o2, gx2, gp2) = results
    t = tol(dtype)
    torch.testing.assert_close(o2, o1, **t)
    torch.testing.assert_close(gx2, gx1, **t)
    for p2, p1 in zip(gp2, gp1):
        torch.testing.assert_close(p2, p1, **t)


def receptive_field(y, x, n, first_k, k, height, width):
    """Pixels a Gated PixelCNN stack of n layers may see at (y, x), by geometry:
    the link brings the vertical stack's rectangle of the rows above; the
    horizontal stack the pixels to the left in the same row."""
    reach_v = first_k // 2 + (n - 1) * (k // 2)  # rows above / columns to each side, from the vertical stack
    rows = set()
    for yy in range(height):
        for xx in range(width):
            if y - 1 - reach_v <= yy <= y - 1 and abs(xx - x) <= reach_v:
                rows.add((yy, xx))
            if yy == y and x - reach_v <= xx < x:
                rows.add((yy, xx))
    return rows


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_blind_spot(n):
    """In a stack of n layers the horizontal output at (y, x) depends on every
    pixel before it within the receptive field, and on nothing at or after it
    (checked through the gradient, in float64)."""
    torch.manual_seed(n)
    layers = [fastgen.GatedMaskedConv2d(1, 4, 5, "A").double()]
    layers += [fastgen.GatedMaskedConv2d(4, 4, 3, "B").double() for _ in range(n - 1)]
    height, width = 9, 11
    x = torch.randn(1, 1, height, width, dtype=torch.float64, requires_grad=True)
    v, h = x, x
    for layer in layers:
        v, h, _ = layer(v, h)
    for (y0, x0) in ((4, 5), (8, 10), (0, 3), (6, 0)):
        (g,) = torch.autograd.grad(h[0, :, y0, x0].sum(), x, retain_graph=True)
        seen = {(int(a), int(b)) for a, b in (g[0, 0] != 0).nonzero()}
        assert seen == receptive_field(y0, x0, n, 5, 3, height, width), (y0, x0)


def test_colour_ordering_through_layers():
    """data_channels=3: output block c at a pixel sees colours < c of that pixel, never >= c."""
    torch.manual_seed(0)
    l1 = fastgen.GatedMaskedConv2d(3, 6, 3, "A", 3).double()
    l2 = fastgen.GatedMaskedConv2d(6, 6, 3, "B", 3).double()
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    v, h, _ = l1(x)
    _, h, _ = l2(v, h)
    for c in range(3):
        (g,) = torch.autograd.grad(h[0, 2 * c:2 * c + 2, 2, 2].sum(), x, retain_graph=True)
        seen = (g[0, :, 2, 2] != 0).tolist()
        assert seen == [i < c for i in range(3)], (c, seen)


def test_layer_errors():
    with pytest.raises(ValueError, match="odd positive"):
        fastgen.GatedMaskedConv2d(1, 4, 4)
    with pytest.raises(ValueError, match="residual connection needs mask B"):
        fastgen.GatedMaskedConv2d(4, 4, 3, "A", residual=True)
    with pytest.raises(ValueError, match="backend must be None or one of"):
        fastgen.GatedMaskedConv2d(1, 4, 3, backend="nope")
    layer = fastgen.GatedMaskedConv2d(1, 4, 3, "A", num_classes=3)
    with pytest.raises(ValueError, match="labels must be in 0..2"):
        layer(torch.randn(2, 1, 4, 4), label=torch.tensor([0, 3]))
    label = torch.tensor([0, 2])
    with pytest.raises(ValueError, match="no cond_channels"):
        layer(torch.randn(2, 1, 4, 4), label=label, cond=torch.randn(2, 1, 4, 4))
    with pytest.raises(ValueError, match="it is class-conditional"):  # fastgen.nn.conditioning: a label every call
        layer(torch.randn(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"v and h must both be \[B, 1, H, W\]"):
        layer(torch.randn(2, 2, 4, 4), label=label)


# ---- the Triton kernels: registered ops and half precision ------------------------------------------------------

@pytest.mark.triton
def test_triton_opcheck():
    require_backend(ops.CONV, "triton")
    dev = device_for("triton")
    x = torch.randn(2, 3, 4, 5, device=dev, requires_grad=True)
    w = torch.randn(12, 3, 1, 3, device=dev, requires_grad=True)
    b = torch.randn(12, device=dev, requires_grad=True)
    cond = torch.randn(2, 12, device=dev, requires_grad=True)
    torch.library.opcheck(ops.gated_conv2d_op, (x, w, b, cond, "horizontal", "A", 3))
    torch.library.opcheck(ops.gated_conv2d_op, (x, torch.randn(12, 3, 2, 3, device=dev), None,
                                                torch.randn(2, 12, 4, 5, device=dev), "vertical", "B", 1))
    torch.library.opcheck(ops.gated_activation_op, (torch.randn(2, 8, 3, 3, device=dev, requires_grad=True),
                                                    cond[:, :8].detach().requires_grad_(), 2, "triton"))


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stack, kernel", [("horizontal", (1, 4)), ("vertical", (2, 5))])
def test_triton_half_precision_rule(dtype, stack, kernel):
    """fp16/bf16: error at most 2x that of the ref run in the same dtype, both against float64."""
    require_backend(ops.CONV, "triton")
    from harness import relative_error
    dev = device_for("triton")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 6, 7, generator=gen).to(dtype)
    w = (torch.randn(16, 8, *kernel, generator=gen) / 4).to(dtype)
    cond = torch.randn(2, 16, generator=gen).to(dtype)
    g = torch.randn(2, 8, 6, 7, generator=gen).to(dtype)

    def run(fn, dt, device):
        ts = [t.to(device, dt).clone().requires_grad_() for t in (x, w, cond)]
        y = fn(*ts)
        y.backward(g.to(device, dt))
        return [y.detach().cpu().double()] + [t.grad.cpu().double() for t in ts]

    want = run(lambda a, b, c: ref.gated_conv2d(a, b, None, c, stack, "B", 1), torch.float64, "cpu")
    same = run(lambda a, b, c: ref.gated_conv2d(a, b, None, c, stack, "B", 1), dtype, "cpu")
    got = run(lambda a, b, c: gated_conv2d(a, b, None, c, stack=stack, backend="triton"), dtype, dev)
    floor = 2e-3 if dtype == torch.float16 else 1e-2
    for name, gt, sm, wt in zip(("out", "grad_x", "grad_w", "grad_cond"), got, same, want):
        assert relative_error(gt, wt) <= max(floor, 2 * relative_error(sm, wt)), (name, relative_error(gt, wt), relative_error(sm, wt))


@pytest.mark.parametrize("backend", ["cpp", TRITON])
def test_gated_activation_opcheck_conditioning_map_layouts(backend):
    """A conditioning map in another layout than x: the kernels see both in x's layout."""
    require_backend(ops.ACT, backend)
    dev = device_for(backend)
    x = torch.randn(2, 8, 3, 5, device=dev).contiguous(memory_format=torch.channels_last).requires_grad_()
    cond = torch.randn(2, 8, 3, 5, device=dev, requires_grad=True)
    y = gated_activation(x, cond, backend=backend)
    y.sum().backward()
    torch.testing.assert_close(cond.grad, x.grad)
    torch.library.opcheck(ops.gated_activation_op, (x, cond.detach().contiguous(memory_format=torch.channels_last)
                                                    .requires_grad_(), 1, backend))


# ---- the vertical stack's convolution -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["ref", "cpp"])
@pytest.mark.parametrize("kernel, shift", [((2, 3), 0), ((4, 7), 0), ((1, 1), 1), ((3, 5), 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_vertical_conv2d_matches_ref(backend, kernel, shift, channels_last):
    require_backend(ops.VERTICAL, backend)
    from fastgen.functional import vertical_conv2d
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64)
    w = torch.randn(8, 5, *kernel, dtype=torch.float64)
    b = torch.randn(8, dtype=torch.float64)
    kh, kw = kernel

    def spec(xx, ww, bb):  # row y reads rows y-shift-kh+1 .. y-shift: a shifted zero-padded conv
        rows = torch.nn.functional.pad(xx, (kw // 2, kw // 2, kh - 1 + shift, 0))[:, :, :xx.shape[2] + kh - 1]
        return torch.nn.functional.conv2d(rows, ww, bb)

    want, want_g = grads_of(spec, [leaf(t, torch.float64, "cpu") for t in (x, w, b)])
    got, got_g = grads_of(lambda xx, ww, bb: vertical_conv2d(xx, ww, bb, shift=shift, backend=backend),
                          [leaf(x, torch.float64, "cpu", channels_last), leaf(w, torch.float64, "cpu"),
                           leaf(b, torch.float64, "cpu")])
    torch.testing.assert_close(got, want)
    for g, wg in zip(got_g, want_g):
        torch.testing.assert_close(g, wg)
    if backend == "cpp":
        torch.library.opcheck(ops.masked_conv2d_op, (leaf(x, torch.float64, "cpu"), w, b, "V", 1,
                                                     [kh - 1 + shift, kw // 2], [1, 1], "cpp"))


def _vertical_spec(xx, ww, bb):  # the vertical stack's 2 x 3 kernel: rows y-1 and y, zero-padded
    return torch.nn.functional.conv2d(torch.nn.functional.pad(xx, (1, 1, 1, 0)), ww, bb)


@pytest.mark.parametrize("kernel", ["winograd", "direct"])
@pytest.mark.parametrize("shape", [(2, 16, 32, 5, 7), (1, 20, 40, 6, 3), (2, 17, 24, 9, 10), (3, 32, 16, 1, 1),
                                   (2, 64, 128, 8, 8)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_vertical_conv2d_winograd_matches_ref(monkeypatch, kernel, shape, channels_last):
    """The cpp kernel's Winograd F(2x2, 2x3) path (the vertical stack's 2 x 3 kernel with >= 16 channels in
    and out, AVX-512) and its direct kernel (FASTGEN_CPU_KERNEL=direct): odd and even sizes, channel counts
    that are not whole vectors, outputs and every gradient in float64; float32 within the error of oneDNN's
    own float32 convolution (times 4) against the float64 result."""
    require_backend(ops.VERTICAL, "cpp")
    from fastgen.functional import vertical_conv2d
    if kernel == "direct":
        monkeypatch.setenv("FASTGEN_CPU_KERNEL", "direct")
    b, ci, co, h, w = shape
    gen = torch.Generator().manual_seed(sum(shape))
    x, wt, bias = (torch.randn(*s, dtype=torch.float64, generator=gen) for s in ((b, ci, h, w), (co, ci, 2, 3), (co,)))
    want, want_g = grads_of(_vertical_spec, [leaf(t, torch.float64, "cpu") for t in (x, wt, bias)])
    got, got_g = grads_of(lambda xx, ww, bb: vertical_conv2d(xx, ww, bb, backend="cpp"),
                          [leaf(x, torch.float64, "cpu", channels_last), leaf(wt, torch.float64, "cpu"),
                           leaf(bias, torch.float64, "cpu")])
    torch.testing.assert_close(got, want)
    for g, wg in zip(got_g, want_g):
        torch.testing.assert_close(g, wg)
    if channels_last and h * w > 1:
        assert got.is_contiguous(memory_format=torch.channels_last)

    def err(fn):  # worst relative error of the output and gradients in float32
        out, grads = grads_of(fn, [leaf(x, torch.float32, "cpu", channels_last), leaf(wt, torch.float32, "cpu"),
                                   leaf(bias, torch.float32, "cpu")])
        return max(((a.double() - r).abs().max() / r.abs().max()).item() for a, r in zip([out] + grads,
                                                                                          [want] + want_g))
    mine = err(lambda xx, ww, bb: vertical_conv2d(xx, ww, bb, backend="cpp"))
    assert mine <= 4 * max(err(_vertical_spec), 1e-7), mine


def test_last_layer_has_only_a_skip_output():
    layer = fastgen.GatedMaskedConv2d(4, 4, 3, "B", num_classes=3, last=True)
    assert not hasattr(layer, "res") and not hasattr(layer, "label_v")
    v, h, skip = layer(torch.randn(2, 4, 5, 5), label=torch.tensor([0, 2]))
    assert v is None and h is None and skip.shape == (2, 4, 5, 5)
    skip.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())  # nothing unused (DDP needs no special mode)


def test_gated_pixelcnn_under_autocast():
    """bf16 autocast (what training on a GPU uses): mixed float32 weights and bf16 activations work."""
    from fastgen.models import GatedPixelCNN
    torch.manual_seed(0)
    m = GatedPixelCNN((1, 6, 6), channels=8, layers=3, likelihood="bernoulli", num_classes=2)
    x = (torch.rand(2, 1, 6, 6) < 0.5).to(torch.uint8)
    label = torch.tensor([0, 1])
    want = m.loss(x, label)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m.loss(x, label)
    got.backward()
    assert abs(got.item() - want.item()) < 0.05 * abs(want.item())
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())
