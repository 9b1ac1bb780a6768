"""batch_norm_act and BatchNormAct2d on every backend against nn.BatchNorm2d + the activation (float64: outputs,
input / weight / bias gradients, running statistics and num_batches_tracked over several steps, training and
evaluation, odd shapes and layouts); gradcheck and opcheck; state_dict compatibility both ways and
from_modules; what the backward keeps (one activation-sized tensor); double backward; determinism; the
reduced-precision rule; errors. The op contract (tests/test_op_contract.py) covers empty batches and bad calls."""
import contextlib
import copy
import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

import fastgen
from fastgen import BatchNormAct2d
from fastgen.ops import batch_norm_act as ops

from conftest import require_backend

TRITON = pytest.param("triton", marks=pytest.mark.triton)
ACTS = ["relu", "leaky_relu"]
SLOPE = 0.2


def device_for(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def need(backend, dtype=torch.float64):
    device = device_for(backend)
    x = torch.zeros(2, 3, 2, 2, dtype=dtype, device=device)
    require_backend(ops.OP, backend, ops.make_call(x, None, None, None, None, True, 1e-5, "relu", SLOPE)[0])
    return device


def act_module(activation):
    return nn.ReLU() if activation == "relu" else nn.LeakyReLU(SLOPE)


def make_pair(c, activation, backend, dtype=torch.float64, device="cpu", seed=0, **kwargs):
    """(fastgen's layer, BatchNorm2d + the activation) with the same random weight and bias."""
    fused = BatchNormAct2d(c, activation, SLOPE, backend=backend, **kwargs).to(device, dtype)
    bn = nn.BatchNorm2d(c, **kwargs).to(device, dtype)
    if fused.affine:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            fused.weight.copy_(1 + 0.3 * torch.randn(c, generator=g, dtype=torch.float64))
            fused.bias.copy_(0.5 * torch.randn(c, generator=g, dtype=torch.float64))
    bn.load_state_dict(fused.state_dict())
    return fused, nn.Sequential(bn, act_module(activation))


def layout(t, kind):
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "strided":  # neither NCHW- nor channels_last-contiguous
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    return t


def step(module, x, gy):
    """(y, grad_x, grad_weight, grad_bias) of one forward + backward."""
    x = x.detach().requires_grad_()
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(gy)
    bn = getattr(module, "_orig_mod", module)  # torch.compile's wrapper
    bn = bn if isinstance(bn, BatchNormAct2d) else bn[0]
    return [y.detach(), x.grad] + ([bn.weight.grad, bn.bias.grad] if bn.affine else [])


def compare_steps(fused, pair, shape, kind, tol, device, dtype=torch.float64, steps=3):
    g = torch.Generator().manual_seed(1)
    for mode in ["train"] * steps + ["eval"]:
        fused.train(mode == "train"), pair.train(mode == "train")
        x = layout((torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.7).to(device, dtype), kind)
        gy = layout(torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype), kind)
        for name, a, b in zip(["y", "grad_x", "grad_weight", "grad_bias"], step(fused, x, gy), step(pair, x, gy)):
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{mode} {name}: {m}")
        bn = pair[0]
        if fused.track_running_stats:
            torch.testing.assert_close(fused.running_mean, bn.running_mean, **tol)
            torch.testing.assert_close(fused.running_var, bn.running_var, **tol)
            assert torch.equal(fused.num_batches_tracked, bn.num_batches_tracked)


SHAPES = [(1, 7, 3, 5), (2, 1, 3, 3), (3, 33, 5, 7)]  # N = 1 with H W > 1, C = 1, odd sizes


@pytest.mark.parametrize("backend", ["ref", "cpp"])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "strided"])
def test_matches_batchnorm2d_plus_activation(backend, activation, shape, kind):
    device = need(backend)
    fused, pair = make_pair(shape[1], activation, backend)
    compare_steps(fused, pair, shape, kind, dict(rtol=1e-10, atol=1e-10), device)


@pytest.mark.triton
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_triton_matches_batchnorm2d_plus_activation(activation, kind):
    device = need("triton")
    dtype = torch.float32 if device == "cuda" else torch.float64  # the interpreter runs float64 too
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    fused, pair = make_pair(5, activation, "triton", dtype, device)
    compare_steps(fused, pair, (3, 5, 5, 7), kind, tol, device, dtype, steps=2)


@pytest.mark.parametrize("backend", ["cpp", TRITON])
def test_options_of_batchnorm2d(backend):
    """momentum=None (the cumulative average), affine=False, track_running_stats=False (the batch's statistics in
    evaluation too), as BatchNorm2d."""
    device = need(backend)
    for kwargs in (dict(momentum=None), dict(affine=False), dict(track_running_stats=False)):
        fused, pair = make_pair(3, "leaky_relu", backend, device=device, **kwargs)
        compare_steps(fused, pair, (2, 3, 3, 5), "contiguous", dict(rtol=1e-10, atol=1e-10), device, steps=2)


@pytest.mark.parametrize("backend", ["cpp", TRITON])
def test_a_zero_or_small_weight_saves_the_input(backend):
    """leaky_relu's output is inverted only where it is exact to do so (every weight != 0, |bias| <= 8 |weight|):
    a zero weight (a zero-initialised branch) or a dwarfed one saves the input, and the gradients stay exact."""
    device = need(backend)
    for weight in ([0.0, 1.0, -2.0], [1e-3, 1.0, 1.0]):
        fused, pair = make_pair(3, "leaky_relu", backend, device=device)
        with torch.no_grad():
            fused.weight.copy_(torch.tensor(weight))
            fused.bias.copy_(torch.tensor([0.5, -0.3, 0.1]))
        pair.load_state_dict({"0." + k: v for k, v in fused.state_dict().items()})
        assert not bool(ops.invertible_tensor(fused.weight, fused.bias, fused.weight))
        probe = copy.deepcopy(fused)  # the running statistics of fused stay as pair's
        kept, y = saved_activations(probe, torch.randn(4, 3, 3, 3, dtype=torch.float64, device=device))
        assert len(kept) == 1 and kept[0].data_ptr() != y.data_ptr()
        compare_steps(fused, pair, (4, 3, 3, 3), "contiguous", dict(rtol=1e-10, atol=1e-10), device, steps=1)


@pytest.mark.parametrize("backend", ["cpp", TRITON])
def test_the_kernels_verdict_is_the_rule(backend):
    """The forward kernels' fourth output (whether y may be saved) is fastgen.ops.batch_norm_act.invertible_tensor."""
    device = need(backend, torch.float32)
    x = torch.randn(2, 3, 2, 2, device=device)
    cases = [([1.0, -2.0, 0.5], [8.0, -16.0, 0.0]), ([1.0, 0.0, 1.0], [0.0, 0.0, 0.0]),
             ([1.0, 1.0, 1.0], [8.001, 0.0, 0.0]), ([1.0, float("nan"), 1.0], [0.0, 0.0, 0.0])]
    for w, b in cases:
        w, b = torch.tensor(w, device=device), torch.tensor(b, device=device)
        for weight, bias in ((w, b), (None, b), (w, None), (None, None)):
            got = ops._kernels(backend)[0](x, weight, bias, None, None, 1e-5, "leaky_relu", SLOPE)[3]
            assert got.dtype == torch.bool and bool(got) == bool(ops.invertible_tensor(weight, bias, x))


def test_negative_weights_are_inverted():
    fused, pair = make_pair(4, "leaky_relu", "cpp")
    with torch.no_grad():
        fused.weight.mul_(-1)
    pair.load_state_dict({"0." + k: v for k, v in fused.state_dict().items()})
    assert bool(ops.invertible_tensor(fused.weight, fused.bias, fused.weight))
    compare_steps(fused, pair, (3, 4, 5, 5), "contiguous", dict(rtol=1e-10, atol=1e-10), "cpu", steps=1)


# ---- gradcheck, opcheck, torch.compile --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["ref", "cpp"])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(backend, activation, training):
    need(backend)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.3 * torch.randn(3, generator=g, dtype=torch.float64)).requires_grad_()
    b = (0.3 * torch.randn(3, generator=g, dtype=torch.float64)).requires_grad_()
    stats = (None, None) if training else (torch.randn(3, generator=g, dtype=torch.float64),
                                           torch.rand(3, generator=g, dtype=torch.float64) + 0.5)

    def f(x, w, b):
        return fastgen.batch_norm_act(x, *stats, w, b, training, activation=activation, negative_slope=SLOPE,
                                      backend=backend)
    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("backend", ["cpp", TRITON])
def test_opcheck(backend):
    """The kernel ops pass opcheck (on inputs that take no gradient: fastgen's autograd.Function owns it)."""
    device = need(backend, torch.float32)
    fwd, bwd = ops._kernels(backend)
    x = torch.randn(2, 3, 4, 5, device=device)
    w, b = torch.rand(3, device=device) + 0.5, torch.randn(3, device=device)
    mean, var = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    gy = torch.randn(2, 3, 4, 5, device=device)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*an autograd kernel was not registered")
        for cl in (False, True):
            xs = x.contiguous(memory_format=torch.channels_last) if cl else x
            torch.library.opcheck(fwd, (xs, w, b, None, None, 1e-5, "leaky_relu", SLOPE))
            torch.library.opcheck(fwd, (xs, None, None, mean, var, 1e-5, "relu", SLOPE))
            y = fwd(xs, w, b, mean, var, 1e-5, "leaky_relu", SLOPE)[0]
            torch.library.opcheck(bwd, (gy, y, True, w, b, mean, var, 1e-5, True, "leaky_relu", SLOPE,
                                        [True, True, True]))
            torch.library.opcheck(bwd, (gy, xs, False, w, b, mean, var, 1e-5, False, "relu", SLOPE,
                                        [True, False, True]))
    if backend == "cpp":
        xg = x.clone().requires_grad_()
        with pytest.raises(RuntimeError, match="derivative for fastgen::batch_norm_act_forward is not implemented"):
            fwd(xg, w, b, None, None, 1e-5, "relu", SLOPE)[0].sum().backward()


@pytest.mark.filterwarnings("error:Dynamo detected a call to a `functools.lru_cache`")  # dispatch must not warn
def test_torch_compile():
    need("cpp")
    fused, _ = make_pair(5, "leaky_relu", "cpp", torch.float32)
    twin, _ = make_pair(5, "leaky_relu", "cpp", torch.float32)
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 5, 4, 4)
    gy = torch.randn(3, 5, 4, 4)
    for _ in range(2):
        for a, b in zip(step(compiled, x, gy), step(fused, x, gy)):
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(twin.running_var, fused.running_var)
    assert torch.equal(twin.num_batches_tracked, fused.num_batches_tracked)


# ---- the state_dict, from_modules -------------------------------------------------------------------------------

def test_state_dict_loads_from_batchnorm2d_and_back():
    bn = nn.BatchNorm2d(6)
    bn(torch.randn(4, 6, 3, 3) * 2 + 1)  # running statistics and the counter away from their defaults
    fused = BatchNormAct2d(6, "leaky_relu")
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in bn.state_dict().items()}
    fused.load_state_dict(bn.state_dict())
    for k, v in bn.state_dict().items():
        assert torch.equal(fused.state_dict()[k], v), k
    fused.eval(), bn.eval()
    x = torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(fused(x), nn.functional.leaky_relu(bn(x), SLOPE))
    back = nn.BatchNorm2d(6)
    back.load_state_dict(fused.state_dict())
    assert torch.equal(back.running_var, bn.running_var) and back.num_batches_tracked == 1
    # a model's checkpoint: BatchNorm2d + activation in a Sequential, the fused layer under the BatchNorm's name
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU())
    fused_model = nn.Sequential(nn.Conv2d(1, 6, 3), BatchNormAct2d(6))
    fused_model.load_state_dict(model.state_dict())


def test_old_checkpoints_without_num_batches_tracked_load():
    sd = nn.BatchNorm2d(4).state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    fused = BatchNormAct2d(4)
    fused.num_batches_tracked.fill_(5)
    fused.load_state_dict(sd)
    assert fused.num_batches_tracked == 0


@pytest.mark.parametrize("kwargs", [dict(affine=False), dict(track_running_stats=False)])
def test_state_dict_keys_follow_the_options(kwargs):
    assert list(BatchNormAct2d(3, **kwargs).state_dict()) == list(nn.BatchNorm2d(3, **kwargs).state_dict())


def test_from_modules_keeps_the_same_tensors():
    bn, act = nn.BatchNorm2d(5, momentum=0.3, eps=1e-3), nn.LeakyReLU(0.1, inplace=True)
    bn.eval()
    fused = BatchNormAct2d.from_modules(bn, act, backend="cpp")
    assert fused.weight is bn.weight and fused.bias is bn.bias
    assert fused.running_mean is bn.running_mean and fused.num_batches_tracked is bn.num_batches_tracked
    assert not fused.training and (fused.activation, fused.negative_slope) == ("leaky_relu", 0.1)
    assert (fused.eps, fused.momentum) == (1e-3, 0.3)
    fused.train()
    x = torch.randn(3, 5, 4, 4)
    y = fused(x)
    bn.num_batches_tracked.sub_(1)
    bn.running_mean.zero_(), bn.running_var.fill_(1)
    bn.train()
    torch.testing.assert_close(y, act(bn(x.clone())))
    assert BatchNormAct2d.from_modules(nn.BatchNorm2d(2), nn.ReLU()).activation == "relu"
    assert BatchNormAct2d.from_modules(nn.BatchNorm2d(2), nn.LeakyReLU(0.0)).activation == "relu"
    with pytest.raises(TypeError, match="bn must be an nn.BatchNorm2d"):
        BatchNormAct2d.from_modules(nn.BatchNorm1d(2), nn.ReLU())
    with pytest.raises(TypeError, match="act must be an nn.ReLU or nn.LeakyReLU, got GELU"):
        BatchNormAct2d.from_modules(nn.BatchNorm2d(2), nn.GELU())
    with pytest.raises(ValueError, match="negative slope"):
        BatchNormAct2d.from_modules(nn.BatchNorm2d(2), nn.LeakyReLU(-0.1))



@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("kwargs", [{}, dict(affine=False), dict(track_running_stats=False)])
def test_to_modules_is_the_pair_on_the_same_tensors(activation, kwargs):
    fused, _ = make_pair(5, activation, "cpp", **kwargs)
    fused.eval()
    pair = fused.to_modules()
    bn, act = pair
    assert type(bn) is nn.BatchNorm2d and not pair.training and not bn.training
    assert type(act) is (nn.ReLU if activation == "relu" else nn.LeakyReLU)
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert getattr(bn, name) is getattr(fused, name)
    assert (bn.eps, bn.momentum, bn.affine, bn.track_running_stats) == \
        (fused.eps, fused.momentum, fused.affine, fused.track_running_stats)
    x = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    for mode in (False, True):  # eval: the shared running statistics; training: the batch's
        fused.train(mode), pair.train(mode)
        torch.testing.assert_close(fused(x), pair(x.clone()))

def test_module_errors():
    with pytest.raises(ValueError, match="activation must be one of"):
        BatchNormAct2d(3, "gelu")
    with pytest.raises(ValueError, match="negative_slope must be > 0"):
        BatchNormAct2d(3, "leaky_relu", 0.0)
    with pytest.raises(ValueError, match="expected 4D input"):
        BatchNormAct2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        BatchNormAct2d(3)(torch.randn(1, 3, 1, 1))
    BatchNormAct2d(3).eval()(torch.randn(1, 3, 1, 1))  # evaluation takes one value per channel


def test_empty_batch_leaves_the_running_statistics_as_batchnorm2d():
    fused, bn = BatchNormAct2d(3, backend="cpp"), nn.BatchNorm2d(3)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    y = fused(x)
    assert y.shape == x.shape
    bn(x)
    for k, v in bn.state_dict().items():
        assert torch.equal(fused.state_dict()[k], v), k


# ---- what the backward keeps ------------------------------------------------------------------------------------

def saved_activations(module, x):
    """The tensors of x's size that autograd keeps for the backward of module(x), and module(x)."""
    kept = []

    def pack(t):
        kept.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x.detach().requires_grad_())
    return [t for t in kept if t.numel() == x.numel()], y


@pytest.mark.parametrize("activation", ACTS)
def test_the_backward_keeps_one_activation_sized_tensor(activation):
    need("cpp")
    fused, pair = make_pair(8, activation, "cpp", torch.float32)
    x = torch.randn(4, 8, 6, 6)
    ours, y = saved_activations(fused, x)
    theirs, _ = saved_activations(pair, x)
    assert len(ours) == 1 and len(theirs) == 2
    # leaky_relu: the output itself (which the next layer keeps anyway); relu: the input
    assert ours[0].data_ptr() == (y.data_ptr() if activation == "leaky_relu" else x.data_ptr())
    assert sum(t.numel() * t.element_size() for t in ours) * 2 == sum(t.numel() * t.element_size() for t in theirs)


def _bn_conv(backend, device, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    bn = BatchNormAct2d(6, "relu", backend=backend).to(device, dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn, nn.Conv2d(6, 4, 3, padding=1).to(device, dtype)


def _bn_conv_step(bn, conv, x, recompute):
    """(outputs, gradients of x and every parameter) of conv(bn(x)), and a weak reference to bn's output."""
    x = x.detach().requires_grad_()
    with fastgen.nn.recomputed_outputs() if recompute else contextlib.nullcontext():
        y = bn(x)
        out = conv(y)
    made = weakref.ref(y)
    del y
    gc.collect()
    alive = made() is not None  # with the recipe nothing but the caller held bn's output
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)).sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in (*bn.parameters(), *conv.parameters())]
    for p in (*bn.parameters(), *conv.parameters()):
        p.grad = None
    return out.detach(), grads, alive


@pytest.mark.parametrize("backend", ["cpp", TRITON])
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_relu_output_is_recomputed_for_the_next_layer(backend, kind, dtype):
    device = need(backend, dtype)
    bn, conv = _bn_conv(backend, device, dtype)
    x = layout(torch.randn(3, 6, 5, 7, dtype=dtype, device=device), kind)
    out, grads, alive = _bn_conv_step(bn, conv, x, recompute=False)
    assert alive  # the convolution keeps its own reference to bn's output
    out_r, grads_r, alive_r = _bn_conv_step(bn, conv, x, recompute=True)
    assert not alive_r  # the convolution keeps the recipe: the output is freed after the forward
    # the recomputed output is the forward's bit for bit: the same outputs and gradients, exactly
    assert torch.equal(out, out_r) and all(torch.equal(a, b) for a, b in zip(grads, grads_r))


def test_a_recipe_refuses_inputs_changed_in_place():
    need("cpp")
    bn, conv = _bn_conv("cpp", "cpu")
    with fastgen.nn.recomputed_outputs():
        out = conv(bn(torch.randn(2, 6, 4, 4, dtype=torch.float64)))
    with torch.no_grad():
        bn.weight.add_(1.0)  # as an optimizer step between the forward and the backward would
    with pytest.raises(RuntimeError, match="modified in place after the forward; its output, saved by the next"):
        out.sum().backward()


def test_an_output_changed_in_place_is_saved_as_it_is():
    need("cpp")
    bn, conv = _bn_conv("cpp", "cpu")
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    grads = []
    for recompute in (False, True):
        with fastgen.nn.recomputed_outputs() if recompute else contextlib.nullcontext():
            y = bn(x)
            y.mul_(2.0)  # no longer what the recipe would make: the convolution must keep y itself
            out = conv(y)
        out.square().sum().backward()
        grads.append([p.grad.clone() for p in (*bn.parameters(), *conv.parameters())])
        bn.zero_grad(set_to_none=True), conv.zero_grad(set_to_none=True)
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_double_backward_is_a_clear_error():
    need("cpp")
    fused = BatchNormAct2d(3, "leaky_relu", backend="cpp")
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="does not support double backward .gradient penalties.; use nn.BatchNorm2d"):
        torch.autograd.grad(fused(x).sum(), x, create_graph=True)
    fused.backend = "ref"  # the spec is plain autograd: a gradient penalty works there
    (g,) = torch.autograd.grad(fused(x).square().sum(), x, create_graph=True)
    g.sum().backward()


def test_kernel_refuses_to_invert_what_is_not_invertible():
    need("cpp")
    bwd = torch.ops.fastgen.batch_norm_act_backward
    y, gy = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    w, b, m, v = torch.tensor([1.0, 0.0, 2.0]), torch.zeros(3), torch.zeros(3), torch.ones(3)
    with pytest.raises(RuntimeError, match="weight != 0"):
        bwd(gy, y, True, w, b, m, v, 1e-5, True, "leaky_relu", SLOPE, [True, True, True])
    with pytest.raises(RuntimeError, match="only leaky_relu's output can be inverted"):
        bwd(gy, y, True, w.abs() + 1, b, m, v, 1e-5, True, "relu", SLOPE, [True, True, True])


# ---- determinism, paths, precision ------------------------------------------------------------------------------

def _fwd_bwd(x, activation, backend="cpp"):
    g = torch.Generator().manual_seed(5)
    w = (1 + 0.3 * torch.randn(x.shape[1], generator=g)).requires_grad_()
    b = (0.3 * torch.randn(x.shape[1], generator=g)).requires_grad_()
    xg = x.detach().requires_grad_()
    y = fastgen.batch_norm_act(xg, None, None, w, b, True, activation=activation, backend=backend)
    gy = torch.randn(y.shape, generator=g).to(y.dtype).contiguous(memory_format=torch.channels_last)
    return [y.detach()] + list(torch.autograd.grad(y, [xg, w, b], gy))


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ACTS)
def test_same_bits_every_call_any_thread_count_either_path(kind, activation, monkeypatch):
    """Fixed-order sums: the same bits on every call, with 1 or 2 threads, and on the AVX-512 and the portable
    path (the same operations on the same lanes)."""
    need("cpp")
    x = layout(torch.randn(16, 40, 20, 20) * 3 + 1, kind)  # several tasks per thread, several channels_last blocks
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = _fwd_bwd(x, activation)
        runs = [_fwd_bwd(x, activation)]
        torch.set_num_threads(1)
        runs.append(_fwd_bwd(x, activation))
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("FASTGEN_CPU_KERNEL", "generic")
    runs.append(_fwd_bwd(x, activation))
    for run in runs:
        for a, b in zip(first, run):
            assert torch.equal(a, b)


def _rel(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("backend", ["cpp", TRITON])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ACTS)
def test_reduced_precision_error_is_at_most_twice_refs(backend, dtype, activation):
    """fp16/bf16 (math in fp32): each output's error against float64 is at most ~2x the error of ref run in the
    same dtype (the recovery of xhat from a rounded y adds about one rounding of y)."""
    device = need(backend, dtype)
    g = torch.Generator().manual_seed(7)
    x64 = torch.randn(4, 6, 5, 5, generator=g, dtype=torch.float64) * 2 + 1
    w64 = 1 + 0.3 * torch.randn(6, generator=g, dtype=torch.float64)
    b64 = 0.3 * torch.randn(6, generator=g, dtype=torch.float64)
    gy64 = torch.randn(4, 6, 5, 5, generator=g, dtype=torch.float64)

    def run(bk, dt):
        x, w, b = [t.to(device, dt).requires_grad_() for t in (x64, w64, b64)]
        y = fastgen.batch_norm_act(x, None, None, w, b, True, activation=activation, backend=bk)
        assert y.dtype == dt
        return [y.detach()] + list(torch.autograd.grad(y, [x, w, b], gy64.to(device, dt)))

    want = run("ref", torch.float64)
    for got, same, exact in zip(run(backend, dtype), run("ref", dtype), want):
        assert got.dtype == dtype
        assert _rel(got, exact) <= max(2 * _rel(same, exact), 4e-3 if dtype == torch.bfloat16 else 5e-4)


@pytest.mark.gpu
def test_triton_on_the_gpu_bf16():
    """The GPU benchmark's dtype on a CUDA device: the rule above at a realistic channel count."""
    need("triton", torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(32, 256, 8, 8, generator=g) * 2).cuda()
    fused, pair = make_pair(256, "leaky_relu", "triton", torch.float64, "cuda")
    want = step(pair, x.double(), x.double().flip(0))
    fused.to(torch.bfloat16)
    got = step(fused, x.bfloat16(), x.bfloat16().flip(0))
    pair.to(torch.bfloat16)
    same = step(pair, x.bfloat16(), x.bfloat16().flip(0))
    for a, s, w in zip(got, same, want):
        assert _rel(a, w) <= max(2 * _rel(s, w), 1e-2)
