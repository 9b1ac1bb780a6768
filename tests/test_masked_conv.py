"""masked_conv2d on every backend against fastgen.ref.masked_conv (outputs and
all gradients), causality, the fp16/bf16 rule, gradcheck/opcheck, torch.compile,
dispatch and the layer (bad input and empty batches: tests/test_op_contract.py)."""
import os
import warnings

import pytest
import torch

import fastgen
from fastgen.functional import masked_conv2d
from fastgen.ops.masked_conv import OP, make_call, same_padding
from fastgen.ref.masked_conv import causal_mask
from fastgen.ref.masked_conv import masked_conv2d as ref_masked_conv2d

from conftest import require_backend

CPU_BACKENDS = ["ref", "decomposed", "halfconv", "cpp"]
TRITON = pytest.param("triton", marks=pytest.mark.triton)
CUDA = pytest.param("cuda", marks=pytest.mark.gpu)
ALL_BACKENDS = CPU_BACKENDS + [CUDA, TRITON]


def device_for(backend):
    return "cuda" if backend in ("triton", "cuda") and torch.cuda.is_available() else "cpu"


def work_dtype(backend):
    # float64 where the backend takes it; Triton computes in fp32 at most
    return torch.float32 if backend == "triton" else torch.float64


def tol(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)


def ref_and_backend(backend, x, w, b, pad, dil, mask_type, dc):
    """Outputs and gradients (x, w, b) of the backend and of the float64 ref."""
    out = {}
    for name, dtype in (("ref", torch.float64), (backend, x.dtype)):
        xs, ws = x.detach().to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_()
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            xs = x.detach().to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
        bs = b.detach().to(dtype).requires_grad_() if b is not None else None
        if name == "ref":
            p = same_padding(w.shape[2:], (dil, dil) if isinstance(dil, int) else dil) if pad == "same" else pad
            y = ref_masked_conv2d(xs, ws, bs, mask_type, dc, _pair(p), _pair(dil))
        else:
            y = masked_conv2d(xs, ws, bs, pad, dil, mask_type=mask_type, data_channels=dc, backend=backend)
        g = torch.randn_like(y, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(y.dtype)
        y.backward(g)
        out[name] = (y.detach(), xs.grad, ws.grad, None if bs is None else bs.grad)
    return out["ref"], out[backend]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


# (mask, data_channels, kernel, dilation, padding, (B, Ci, Co, H, W))
CASES = [
    ("A", 1, 7, 1, "same", (2, 1, 4, 9, 8)),
    ("B", 1, 3, 1, "same", (1, 4, 5, 7, 7)),
    ("A", 3, 5, 1, "same", (2, 3, 6, 6, 5)),
    ("B", 3, 3, 1, "same", (2, 6, 9, 5, 7)),
    ("A", 1, 1, 1, 0, (2, 3, 2, 4, 3)),
    ("B", 3, 1, 1, 0, (1, 3, 6, 3, 4)),
    ("B", 1, (3, 5), 1, "same", (1, 3, 4, 6, 9)),
    ("A", 1, (1, 3), 1, "same", (2, 2, 3, 3, 5)),
    ("B", 1, 3, 2, "same", (2, 3, 4, 9, 7)),
    ("A", 3, 3, 2, (1, 3), (1, 3, 3, 7, 6)),
    ("B", 1, 5, 1, 0, (1, 2, 3, 7, 9)),
    ("A", 1, 3, 1, (2, 0), (1, 7, 1, 5, 5)),
]


def case_id(c):
    return f"{c[0]}-dc{c[1]}-k{c[2]}-d{c[3]}-p{c[4]}-{'x'.join(map(str, c[5]))}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_ref(backend, case, bias):
    mask_type, dc, k, dil, pad, (B, Ci, Co, H, W) = case
    dev, dtype = device_for(backend), work_dtype(backend)
    kh, kw = _pair(k)
    x = torch.randn(B, Ci, H, W, dtype=dtype, device=dev)
    w = torch.randn(Co, Ci, kh, kw, dtype=dtype, device=dev)
    b = torch.randn(Co, dtype=dtype, device=dev) if bias else None
    require_backend(OP, backend, make_call(x, w, b, mask_type, dc, pad, dil))
    r, o = ref_and_backend(backend, x, w, b, pad, dil, mask_type, dc)
    for name, rr, oo in zip(("output", "grad_x", "grad_w", "grad_b"), r, o):
        if rr is None:
            assert oo is None
            continue
        torch.testing.assert_close(oo.to(torch.float64).cpu(), rr.cpu(), **tol(dtype), msg=f"{backend} {name}")
    mask = causal_mask(Co, Ci, (kh, kw), mask_type, dc, dtype=torch.float64)
    assert torch.all(o[2].cpu()[mask == 0] == 0), "a masked tap received gradient"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
@pytest.mark.parametrize("mask_type, k", [("A", 3), ("B", 1)])  # 1x1: no padding, the cpp kernel reads x in place
def test_layouts(backend, layout, mask_type, k):
    dev, dtype = device_for(backend), work_dtype(backend)
    base = torch.randn(2, 6, 7, 13, dtype=dtype, device=dev)
    x = base.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else base[:, ::2, :, 1::2]
    w = torch.randn(5, x.shape[1], k, k, dtype=dtype, device=dev)
    b = torch.randn(5, dtype=dtype, device=dev)
    require_backend(OP, backend, make_call(x, w, b, mask_type, 1, "same", 1))
    r, o = ref_and_backend(backend, x, w, b, "same", 1, mask_type, 1)
    for rr, oo in zip(r, o):
        torch.testing.assert_close(oo.to(torch.float64).cpu(), rr.cpu(), **tol(dtype))


@pytest.mark.parametrize("threads", [1, 2])
def test_cpp_weight_gradient_over_many_chunks(threads):
    """The cpp weight gradient sums chunks of output rows in groups (csrc/cpu/masked_conv.cpp parallel_ordered):
    16 chunks of 73 rows in float64 with one tile (1 input channel, 16 output channels) make 2 groups (one
    thread) or 4 (two threads) of several chunks each; the groups' sum is the ref's."""
    x, w, b = torch.randn(40, 1, 28, 28, dtype=torch.float64), torch.randn(16, 1, 7, 7, dtype=torch.float64), None
    require_backend(OP, "cpp", make_call(x, w, b, "A", 1, "same", 1))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        r, o = ref_and_backend("cpp", x, w, b, "same", 1, "A", 1)
    finally:
        torch.set_num_threads(before)
    for name, rr, oo in zip(("output", "grad_x", "grad_w"), r, o):
        torch.testing.assert_close(oo, rr, **tol(torch.float64), msg=name)


@pytest.mark.parametrize("backend", ["ref", "decomposed", "halfconv", TRITON])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rule(backend, dtype):
    """Error in fp16/bf16 at most ~2x the error of ref run in the same dtype (both vs float64)."""
    dev = device_for(backend)
    x = torch.randn(2, 8, 6, 7, device=dev)
    w = torch.randn(8, 8, 5, 5, device=dev) / 10
    b = torch.randn(8, device=dev)
    require_backend(OP, backend, make_call(x.to(dtype), w.to(dtype), b.to(dtype), "B", 1, "same", 1))
    r64, low = ref_and_backend(backend, x.to(dtype), w.to(dtype), b.to(dtype), "same", 1, "B", 1)
    _, ref_low = ref_and_backend("ref", x.to(dtype), w.to(dtype), b.to(dtype), "same", 1, "B", 1)
    for name, exact, mine, theirs in zip(("output", "grad_x", "grad_w", "grad_b"), r64, low, ref_low):
        err = (mine.double().cpu() - exact.cpu()).abs().max().item()
        ref_err = (theirs.double().cpu() - exact.cpu()).abs().max().item()
        assert err <= 2 * ref_err + 1e-3 * exact.abs().max().item(), f"{name}: {err} vs ref's {ref_err}"


def causal_stack(dc, backend, dtype=torch.float64, device="cpu"):
    layers = [fastgen.MaskedConv2d(dc, 6 * dc, 5, padding=2, mask_type="A", data_channels=dc, backend=backend)]
    layers += [fastgen.MaskedConv2d(6 * dc, 6 * dc, 3, padding=1, mask_type="B", data_channels=dc, backend=backend)
               for _ in range(3)]
    layers += [fastgen.MaskedConv2d(6 * dc, dc, 1, mask_type="B", data_channels=dc, backend=backend)]
    return torch.nn.Sequential(*layers).to(device=device, dtype=dtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dc", [1, 3])
@pytest.mark.parametrize("depth", [1, 5])
def test_causality(backend, dc, depth):
    """Changing any later pixel, or a later colour channel of the same pixel,
    leaves the output at the current position unchanged (one layer, and a stack of 5)."""
    dev, dtype = device_for(backend), work_dtype(backend)
    net = causal_stack(dc, backend, dtype, dev)
    if depth == 1:
        net = net[:1]
    x = torch.randn(1, dc, 6, 7, dtype=dtype, device=dev)
    require_backend(OP, backend, make_call(x, net[0].weight, net[0].bias, "A", dc, (2, 2), 1))
    y = net(x)
    co = y.shape[1]
    for (py, px) in [(0, 0), (2, 3), (5, 6), (3, 0)]:
        later = torch.zeros(6, 7, dtype=torch.bool)
        later.view(-1)[py * 7 + px + 1:] = True
        for g in range(dc):  # output colour block g at (py, px)
            x2 = x.clone()
            x2[0, :, later] = torch.randn_like(x2[0, :, later])  # every later pixel, every channel
            x2[0, g:, py, px] = torch.randn(dc - g, dtype=dtype, device=dev)  # this pixel: channel g and later
            y2 = net(x2)
            blk = slice(g * co // dc, (g + 1) * co // dc)
            assert torch.equal(y[0, blk, py, px], y2[0, blk, py, px]), f"output block {g} at {(py, px)} saw the future"
        # and it does see the past: changing an earlier pixel changes it (where one exists)
        if (py, px) != (0, 0):
            x3 = x.clone()
            x3[0, :, ~later] = 0
            assert not torch.equal(net(x3)[0, :, py, px], y[0, :, py, px])


@pytest.mark.parametrize("backend", ["ref", "decomposed", "halfconv", "cpp", CUDA])
def test_gradcheck(backend):
    dev = device_for(backend)
    x = torch.randn(1, 3, 4, 5, dtype=torch.float64, device=dev, requires_grad=True)
    w = torch.randn(6, 3, 3, 3, dtype=torch.float64, device=dev, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, device=dev, requires_grad=True)
    require_backend(OP, backend, make_call(x, w, b, "A", 3, "same", 1))
    fn = lambda x, w, b: masked_conv2d(x, w, b, "same", mask_type="A", data_channels=3, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b)) if backend in ("ref", "decomposed", "halfconv") else True


@pytest.mark.parametrize("backend", ["cpp", CUDA, TRITON])
def test_opcheck(backend):
    """The registered ops pass opcheck without a warning (one about a missing autograd kernel is an error here).
    The C++ kernels are not differentiable on their own (fastgen::masked_conv2d owns the gradient): they are
    checked on inputs that take none, and backpropagating through one called directly is an error, never a
    silently missing gradient."""
    dev, dtype = device_for(backend), work_dtype(backend)
    x = torch.randn(2, 3, 5, 4, dtype=dtype, device=dev, requires_grad=True)
    w = torch.randn(6, 3, 3, 3, dtype=dtype, device=dev, requires_grad=True)
    b = torch.randn(6, dtype=dtype, device=dev, requires_grad=True)
    require_backend(OP, backend, make_call(x, w, b, "B", 3, "same", 1))
    args = (x, w, b, "B", 3, [1, 1], [1, 1], backend)
    g = torch.randn(2, 6, 5, 4, dtype=dtype, device=dev)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*an autograd kernel was not registered")
        torch.library.opcheck(torch.ops.fastgen.masked_conv2d, args)
        torch.library.opcheck(torch.ops.fastgen.masked_conv2d_grad, (g, x.detach(), w.detach(), "B", 3, [1, 1],
                                                                      [1, 1], backend, [True, True, True]))
        if backend in ("cpp", "cuda"):
            kernel_args = (x.detach(), w.detach(), b.detach(), "B", 3, [1, 1], [1, 1])
            torch.library.opcheck(torch.ops.fastgen.masked_conv2d_forward, kernel_args)
            torch.library.opcheck(torch.ops.fastgen.masked_conv2d_backward,
                                  (g, x.detach(), w.detach(), "B", 3, [1, 1], [1, 1], [True, True, False]))
    if backend in ("cpp", "cuda"):
        y = torch.ops.fastgen.masked_conv2d_forward(*args[:-1])
        with pytest.raises(RuntimeError, match="derivative for fastgen::masked_conv2d_forward is not implemented"):
            y.sum().backward()


@pytest.mark.parametrize("backend", ["ref", "halfconv", "cpp"])
@pytest.mark.filterwarnings("error:Dynamo detected a call to a `functools.lru_cache`")  # dispatch must not warn
def test_torch_compile(backend):
    layer = fastgen.MaskedConv2d(3, 6, 3, padding=1, mask_type="A", data_channels=3, backend=backend)
    x = torch.randn(2, 3, 6, 6)
    require_backend(OP, backend, make_call(x, layer.weight, layer.bias, "A", 3, "same", 1))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y, yc = layer(x), compiled(x)
    torch.testing.assert_close(yc, y)
    yc.sum().backward()
    g = layer.weight.grad.clone()
    layer.weight.grad = None
    layer(x).sum().backward()
    torch.testing.assert_close(g, layer.weight.grad)


def test_dispatch_rule(monkeypatch):
    x, w = torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3)
    call = make_call(x, w, None, "B", 1, "same", 1)
    monkeypatch.delenv("FASTGEN_BACKEND", raising=False)
    auto = OP.choose(call, "cpu")
    assert auto in OP.preference["cpu"] or auto == "ref"
    assert OP.choose(call, "cpu", backend="decomposed") == "decomposed"
    monkeypatch.setenv("FASTGEN_BACKEND", "ref")
    assert OP.choose(call, "cpu") == "ref"
    assert OP.choose(call, "cpu", backend="halfconv") == "halfconv"  # explicit argument beats the variable
    monkeypatch.setenv("FASTGEN_BACKEND", "nonsense")
    with pytest.raises(fastgen.BackendError, match="FASTGEN_BACKEND='nonsense' is no backend of any op"):
        masked_conv2d(x, w, None, "same")


def test_known_and_forced_backend(monkeypatch):
    """What a command checks up front (python -m fastgen train / sample / backends): FASTGEN_BACKEND must name
    a backend of some op (the error lists them all); unset or empty forces nothing."""
    from fastgen._dispatch import OPS, forced_backend, known_backends
    names = known_backends()
    assert names == sorted(names) and {"ref", "cpp", "triton", "halfconv", "composed"} <= set(names)
    assert all(b in names for op in OPS.values() for b in op.backends)
    for unset in (None, ""):
        if unset is None:
            monkeypatch.delenv("FASTGEN_BACKEND", raising=False)
        else:
            monkeypatch.setenv("FASTGEN_BACKEND", unset)
        assert forced_backend() is None
    monkeypatch.setenv("FASTGEN_BACKEND", "composed")  # gated_conv2d's only: the other ops ignore it
    assert forced_backend() == "composed"
    assert OP.choose(make_call(torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3), None, "B", 1, "same", 1), "cpu") \
        in OP.preference["cpu"]
    monkeypatch.setenv("FASTGEN_BACKEND", "nope")
    with pytest.raises(fastgen.BackendError, match="FASTGEN_BACKEND='nope' is no backend of any op; fastgen's "
                                                   "backends: " + ", ".join(names)):
        forced_backend()


def test_explicit_backend_that_cannot_run_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("triton can run here")
    x, w = torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3)
    with pytest.raises(fastgen.BackendError, match="TRITON_INTERPRET"):
        masked_conv2d(x, w, None, "same", backend="triton")
    with pytest.raises(fastgen.BackendError, match="float32 and float64"):
        masked_conv2d(x.half(), w.half(), None, "same", backend="cpp")


def test_backends_report():
    info = fastgen.backends()
    ops = info["ops"]["masked_conv2d"]
    assert set(ops) == {"ref", "decomposed", "halfconv", "cpp", "cuda", "triton"}
    assert ops["ref"] is None and ops["decomposed"] is None
    assert set(info["extension"]) == {"cpp", "cuda", "triton"}
    for why in list(ops.values()) + list(info["extension"].values()):
        assert why is None or isinstance(why, str) and why


def test_layer_construction_errors():
    with pytest.raises(ValueError, match="odd"):
        fastgen.MaskedConv2d(3, 3, 2)
    with pytest.raises(ValueError, match="stride 1"):
        fastgen.MaskedConv2d(3, 3, 3, stride=2)
    with pytest.raises(ValueError, match="padding_mode='zeros'"):
        fastgen.MaskedConv2d(3, 3, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="divisible"):
        fastgen.MaskedConv2d(3, 4, 3, data_channels=3)


def test_layer_mask_type_given_twice():
    """The common form's first argument and mask_type= must agree (else which one was meant is a guess)."""
    with pytest.raises(TypeError, match=r"given twice and the two disagree: 'A' \(the first argument\) and "
                                        r"mask_type='B'"):
        fastgen.MaskedConv2d("A", 1, 8, 3, 1, 1, mask_type="B")
    assert fastgen.MaskedConv2d("A", 1, 8, 3, 1, 1, mask_type="A").mask_type == "A"  # agreeing: fine
    assert fastgen.MaskedConv2d("A", 1, 8, 3, 1, 1).mask_type == "A"
    assert fastgen.MaskedConv2d(1, 8, 3, 1, 1).mask_type == "B"  # the default
    with pytest.raises(ValueError, match="mask_type must be 'A' or 'B'"):
        fastgen.MaskedConv2d("C", 1, 8, 3)


def test_fastgen_backend_env_in_subprocess(tmp_path):
    """FASTGEN_BACKEND is read per call; an impossible choice is an error, not a silent fallback."""
    import subprocess
    import sys
    code = ("import torch, fastgen; from fastgen.ops.masked_conv import OP, make_call;"
            "x=torch.randn(1,2,4,4); w=torch.randn(2,2,3,3);"
            "print(OP.choose(make_call(x,w,None,'B',1,'same',1),'cpu'))")
    env = dict(os.environ, FASTGEN_BACKEND="decomposed")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "decomposed"


# ---- the drop-in layer -------------------------------------------------------------------------------------

class MaskBufferConv(torch.nn.Conv2d):
    """How other projects write it: a mask buffer, ``weight.data *= mask`` in forward."""

    def __init__(self, mask_type, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("mask", self.weight.data.clone().fill_(1))
        _, _, kh, kw = self.weight.shape
        self.mask[:, :, kh // 2, kw // 2 + (mask_type == "B"):] = 0
        self.mask[:, :, kh // 2 + 1:] = 0

    def forward(self, x):
        self.weight.data *= self.mask
        return super().forward(x)


def test_layer_is_a_drop_in_conv2d():
    layer = fastgen.MaskedConv2d(4, 8, 5, 1, 2, bias=False)  # nn.Conv2d's positional order
    assert isinstance(layer, torch.nn.Conv2d)
    assert layer.mask_type == "B" and layer.data_channels == 1 and layer.padding == (2, 2) and layer.bias is None
    assert set(layer.state_dict()) == {"weight"}
    common = fastgen.MaskedConv2d("A", 4, 8, 7, 1, 3)  # the common mask-first form
    assert common.mask_type == "A" and common.kernel_size == (7, 7)
    assert set(common.state_dict()) == {"weight", "bias"}
    assert "mask_type='A'" in repr(common)
    same = fastgen.MaskedConv2d(3, 6, 3, padding="same", data_channels=3)
    assert same(torch.randn(1, 3, 4, 5)).shape == (1, 6, 4, 5)


@pytest.mark.parametrize("mask_type", ["A", "B"])
def test_loads_a_mask_buffer_state_dict(mask_type):
    theirs = MaskBufferConv(mask_type, 4, 8, 5, 1, 2)
    x = torch.randn(2, 4, 6, 6)
    expected = theirs(x)
    ours = fastgen.MaskedConv2d(4, 8, 5, 1, 2, mask_type=mask_type)
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours(x), expected)
    wrong = fastgen.MaskedConv2d(4, 8, 5, 1, 2, mask_type="B" if mask_type == "A" else "A")
    with pytest.raises(RuntimeError, match="stored mask differs"):
        wrong.load_state_dict(theirs.state_dict())


def test_copy_pickle_to_half():
    import copy
    layer = fastgen.MaskedConv2d("A", 3, 6, 3, padding=1, data_channels=3)
    x = torch.randn(1, 3, 5, 5)
    y = layer(x)
    for other in (copy.deepcopy(layer), torch.load(_saved(layer), weights_only=False)):
        assert other.mask_type == "A" and other.data_channels == 3
        torch.testing.assert_close(other(x), y)
    half = copy.deepcopy(layer).to(torch.bfloat16)
    assert half.weight.dtype == torch.bfloat16
    torch.testing.assert_close(half(x.bfloat16()).float(), y, rtol=0.05, atol=0.05)
    assert copy.deepcopy(layer).double()(x.double()).dtype == torch.float64


def _saved(module):
    import io
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    return buf


def test_masked_weights_stay_plain_parameters_and_get_no_gradient():
    layer = fastgen.MaskedConv2d("A", 2, 4, 5, padding=2)
    assert type(layer.weight) is torch.nn.Parameter and [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    layer(torch.randn(2, 2, 6, 6)).pow(2).sum().backward()
    assert torch.all(layer.weight.grad[layer.mask() == 0] == 0)
    assert torch.all(layer.weight.grad[layer.mask() == 1] != 0)


def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = torch.nn.Sequential(fastgen.MaskedConv2d("A", 1, 4, 5, padding=2), torch.nn.ReLU(),
                              fastgen.MaskedConv2d(4, 1, 3, padding=1))
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    torch.manual_seed(1 + rank)  # each rank its own data
    ddp(torch.randn(2, 1, 6, 6)).pow(2).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in net.parameters()])
    torch.save(grads, f"{out}/grads{rank}.pt")
    dist.barrier()  # no rank tears down the group (rank 0 holds its store) while another still uses it
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes(tmp_path):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    g0, g1 = torch.load(tmp_path / "grads0.pt"), torch.load(tmp_path / "grads1.pt")
    torch.testing.assert_close(g0, g1)  # gradients all-reduced across the ranks
    assert g0.abs().sum() > 0
