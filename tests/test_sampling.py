"""Cached sampling (fastgen.sample): exactness against the full forward pass
(teacher forcing) and against naive sampling (same seed, float64), for
fastgen's models and for a foreign model built from fastgen layers; the
compiler's errors for operations that cannot be cached exactly; every engine."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastgen
from fastgen import BackendError, GatedMaskedConv2d, MaskedConv2d
from fastgen.functional import gated_activation
from fastgen.models import GatedPixelCNN, PixelCNN
from fastgen.sampling import CausalityError, CompileError, cached_logits, sample
from fastgen.sampling.api import METHODS

ENGINES = ["ref", "cpp"]

# (class, image_shape, likelihood, levels, num_classes, kwargs)
MODELS = {
    "pixelcnn-binary": (PixelCNN, (1, 7, 6), "bernoulli", 2, None, dict(channels=12, blocks=2)),
    "pixelcnn-rgb": (PixelCNN, (3, 5, 4), "categorical", 5, 3, dict(channels=12, blocks=1)),
    "gated-binary": (GatedPixelCNN, (1, 7, 6), "bernoulli", 2, None, dict(channels=16, layers=3)),
    "gated-categorical": (GatedPixelCNN, (1, 5, 6), "categorical", 4, None, dict(channels=10, layers=2,
                                                                                  kernel_size=5)),
    "gated-rgb-conditional": (GatedPixelCNN, (3, 5, 4), "categorical", 4, 3, dict(channels=12, layers=3)),
    "gated-one-layer": (GatedPixelCNN, (1, 4, 5), "bernoulli", 2, 2, dict(channels=8, layers=1)),
}


def make_model(name, dtype=torch.float32, seed=0):
    cls, shape, lik, levels, classes, kw = MODELS[name]
    torch.manual_seed(seed)
    m = cls(image_shape=shape, likelihood=lik, levels=levels, num_classes=classes, **kw).to(dtype)
    with torch.no_grad():  # larger weights than the init (and non-zero label embeddings) exercise every path
        for p in m.parameters():
            p.normal_(0, 0.4)
    return m.eval()


def random_images(model, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.levels, (n, *model.image_shape), generator=g)


def labels_for(model, n):
    return None if model.num_classes is None else torch.arange(n) % model.num_classes


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_teacher_forced_logits_equal_the_full_forward(name, engine, dtype):
    m = make_model(name, dtype)
    images = random_images(m, 3)
    label = labels_for(m, 3)
    full = m(m.feed(images), label)
    got = cached_logits(m, images, condition=label, backend=engine)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got, full, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", list(MODELS))
def test_cached_and_naive_give_the_same_images_in_float64(name):
    m = make_model(name, torch.float64)
    label = labels_for(m, 4)
    naive = m.sample(4, label, seed=11, method="naive")
    for engine in ENGINES:
        cached = m.sample(4, label, seed=11, backend=engine)
        assert torch.equal(cached, naive), engine
    assert naive.dtype == torch.long and naive.shape == (4, *m.image_shape)
    assert 0 <= naive.min() and naive.max() < m.levels


def test_seeds_temperature_and_determinism():
    m = make_model("gated-categorical", torch.float64)
    a = sample(m, 5, seed=3)
    assert torch.equal(a, sample(m, 5, seed=3))
    assert not torch.equal(a, sample(m, 5, seed=4))
    cold = sample(m, 5, seed=3, temperature=0.3)
    assert torch.equal(cold, sample(m, 5, seed=3, temperature=0.3, method="naive"))
    torch.manual_seed(0)
    b = sample(m, 5)  # no seed: drawn from torch's generator
    torch.manual_seed(0)
    assert torch.equal(b, sample(m, 5))


def test_generic_cpu_kernel_is_exact(monkeypatch):
    """The portable (non-AVX-512) build of the engine's micro-kernel."""
    monkeypatch.setenv("FASTGEN_CPU_KERNEL", "generic")
    m = make_model("gated-rgb-conditional", torch.float64)
    images, label = random_images(m, 5), labels_for(m, 5)
    torch.testing.assert_close(cached_logits(m, images, condition=label, backend="cpp"), m(m.feed(images), label),
                               atol=1e-10, rtol=1e-10)


def test_realistic_width_float32():
    """64 channels, 7x7 first layer, 12x12 images: every tile shape of the micro-kernel."""
    torch.manual_seed(0)
    m = GatedPixelCNN(image_shape=(1, 12, 12), channels=64, layers=3).eval()
    images = random_images(m, 6)
    full = m(m.feed(images))
    for engine in ENGINES:
        torch.testing.assert_close(cached_logits(m, images, backend=engine), full, atol=5e-5, rtol=1e-4)


def test_custom_feed():
    m = make_model("gated-binary", torch.float64)

    def feed(v):
        return v.double() * 2 - 1  # {-1, +1} instead of {0, 1}

    a = sample(m, 3, seed=0, feed=feed, method="naive")
    for engine in ENGINES:
        assert torch.equal(a, sample(m, 3, seed=0, feed=feed, backend=engine))
    with pytest.raises(ValueError, match="feed must map"):
        sample(m, 3, feed=lambda v: v.sum())


def test_progress_bar(capsys):
    m = make_model("gated-binary")
    for engine in ENGINES:
        sample(m, 2, seed=0, backend=engine, progress=True)
        assert "sampling (cached" in capsys.readouterr().err


def test_training_mode_is_restored():
    m = make_model("pixelcnn-binary").train()
    sample(m, 1, seed=0)
    assert m.training


# ---- a foreign model: fastgen layers and position-wise operations ----------------------------------------------

class Foreign(nn.Module):
    """Another project's PixelCNN-style network: fastgen layers, nn.Sequential,
    concat_elu, chunk + gate, eval BatchNorm, 1x1 convs, a label embedding and a
    spatial conditioning map, in-place ReLU, a residual sum."""

    def __init__(self, classes=3, ch=8, cond_ch=2):
        super().__init__()
        self.inp = MaskedConv2d("A", 1, ch, 5, padding=2)
        self.emb = nn.Embedding(classes, ch)
        self.body = nn.Sequential(nn.BatchNorm2d(2 * ch), MaskedConv2d(2 * ch, 2 * ch, 3, padding=2, dilation=2),
                                  nn.LeakyReLU(0.2), nn.Dropout(0.5))
        self.gated = GatedMaskedConv2d(ch, ch, 3, "B", cond_channels=cond_ch)
        self.mix = nn.Conv2d(ch, ch, 1)
        self.out = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(ch, 1, 1))
        self.cond_ch = cond_ch

    def forward(self, x, cond):
        label, cmap = cond["label"], cond["map"]
        h = self.inp(x - 0.5) + self.emb(label)[:, :, None, None]
        h = F.elu(torch.cat([h, -h], dim=1))  # concat_elu
        a, b = self.body(h).chunk(2, dim=1)
        g = gated_activation(torch.cat([a, b], 1), data_channels=1) * 1.5 + torch.sigmoid(a[:, :4].sum(1,
                                                                                        keepdim=True) * 0 + a[:, :1])
        v, hh, skip = self.gated(g, cond=cmap)
        y = self.mix(hh) + skip + 0.1 * g
        return self.out(y)


def make_foreign(dtype=torch.float64):
    torch.manual_seed(2)
    m = Foreign().to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.4)
        bn = m.body[0]
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2)
    return m.eval()


def foreign_condition(n, dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    return {"label": torch.arange(n) % 3, "map": torch.randn(n, 2, 6, 7, generator=g, dtype=dtype)}


def test_foreign_model_is_rejected_where_it_sums_over_channels():
    """`a[:, :4].sum(1)` mixes channels of one position: position-wise, but not
    one of the operations the compiler knows; it must name it."""
    m = make_foreign()
    with pytest.raises(CompileError, match="sum"):
        sample(m, 2, shape=(1, 6, 7), condition=foreign_condition(2))


class ForeignOK(Foreign):
    def forward(self, x, cond):
        label, cmap = cond["label"], cond["map"]
        h = self.inp(x - 0.5) + self.emb(label)[:, :, None, None]
        h = F.elu(torch.cat([h, -h], dim=1))
        a, b = self.body(h).chunk(2, dim=1)
        g = gated_activation(torch.cat([a, b], 1), data_channels=1) * 1.5 + torch.sigmoid(a)
        v, hh, skip = self.gated(g, cond=cmap)
        y = self.mix(hh) + skip + 0.1 * g
        return self.out(y)


@pytest.mark.parametrize("engine", ENGINES)
def test_foreign_model_teacher_forcing_and_samples(engine):
    torch.manual_seed(2)
    m = ForeignOK().double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.4)
        m.body[0].running_mean.normal_(0, 0.5)
        m.body[0].running_var.uniform_(0.5, 2)
    m.eval()
    cond = foreign_condition(3)
    images = torch.randint(0, 2, (3, 1, 6, 7))
    full = m(images.double(), cond)
    got = cached_logits(m, images, likelihood="bernoulli", condition=cond, backend=engine)
    torch.testing.assert_close(got, full, atol=1e-10, rtol=1e-10)
    naive = sample(m, 3, shape=(1, 6, 7), condition=cond, seed=9, method="naive")
    assert torch.equal(sample(m, 3, shape=(1, 6, 7), condition=cond, seed=9, backend=engine), naive)


def assert_teacher_forcing_binary(cls):
    """A float64 network of 4x5 binary images: cached logits == forward, both engines."""
    torch.manual_seed(0)
    m = cls().double()
    images = torch.randint(0, 2, (2, 1, 4, 5))
    for engine in ENGINES:
        torch.testing.assert_close(cached_logits(m, images, likelihood="bernoulli", backend=engine),
                                   m(images.double()), atol=1e-12, rtol=1e-12)


class Net(nn.Module):
    """A one-layer network with one extra operation ``op`` before the head."""

    def __init__(self, op):
        super().__init__()
        self.conv = MaskedConv2d("A", 1, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 1, 1)
        self.op = op

    def forward(self, x):
        return self.head(self.op(self, self.conv(x)))


@pytest.mark.parametrize("op, named", [
    (lambda self, h: F.max_pool2d(h, 3, 1, 1), "max_pool2d"),
    (lambda self, h: F.avg_pool2d(h, 3, 1, 1), "avg_pool2d"),
    (lambda self, h: torch.softmax(h.flatten(2) @ h.flatten(2).transpose(1, 2), -1)[:, :, :, None] * h, "flatten"),
    (lambda self, h: F.conv2d(h, torch.ones(4, 4, 3, 3), padding=1), "conv2d"),
    (lambda self, h: h.roll(1, 2), "roll"),
    (lambda self, h: F.group_norm(h, 2), "group_norm"),
])
def test_operations_that_see_the_future_are_refused_by_every_method(op, named):
    """Each of these sees later pixels. The cached compiler cannot read them, so the numerical probe
    (fastgen.sampling.causality) decides, for both methods: not causal."""
    for method in METHODS:
        with pytest.raises(CausalityError, match=r"not causal: its output at pixel \(\d, \d\) depends on"):
            sample(Net(op), 1, shape=(1, 4, 4), method=method)


@pytest.mark.parametrize("op, named", [
    (lambda self, h: torch.clamp(h, -0.5, 0.5), "clamp"),
    (lambda self, h: torch.where(h > 0, h, 0.1 * h), "gt"),
    (lambda self, h: h.flatten(2).cumsum(-1).view_as(h), "flatten"),  # a sum over earlier positions
    (lambda self, h: F.max_pool2d(F.pad(h, (2, 0, 2, 0)), 3, 1), "pad"),  # a window above and to the left
])
def test_causal_operations_the_compiler_cannot_read_sample_naively(op, named):
    with pytest.raises(CompileError, match=named):
        sample(Net(op), 1, shape=(1, 4, 4))
    assert sample(Net(op).double(), 2, shape=(1, 4, 4), method="naive", seed=3).shape == (2, 1, 4, 4)


def test_modules_that_break_caching_are_named():
    class Spatial(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = MaskedConv2d("A", 1, 4, 3, padding=1)
            self.blur = nn.Conv2d(4, 1, 3, padding=1)

        def forward(self, x):
            return self.blur(self.conv(x))

    with pytest.raises(CausalityError, match=r"output at pixel \(0, 0\) depends on pixel \(1, 0\)"):
        sample(Spatial(), 1, shape=(1, 4, 4))

    class Norm(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = MaskedConv2d("A", 1, 1, 3, padding=1)
            self.norm = nn.InstanceNorm2d(1)

        def forward(self, x):
            return self.norm(self.conv(x))

    with pytest.raises(CausalityError, match="not causal"):  # normalised over every position
        sample(Norm(), 1, shape=(1, 4, 4))

    class Clip(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = MaskedConv2d("A", 1, 1, 3, padding=1)
            self.clip = nn.Hardtanh()

        def forward(self, x):
            return self.clip(self.conv(x))

    with pytest.raises(CompileError, match="Hardtanh"):
        sample(Clip(), 1, shape=(1, 4, 4))
    sample(Clip(), 1, shape=(1, 4, 4), method="naive")


def test_vertical_stack_reaching_the_output_is_an_error():
    class Leak(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = GatedMaskedConv2d(1, 2, 3, "A")
            self.head = nn.Conv2d(2, 1, 1)

        def forward(self, x):
            v, h, skip = self.layer(x)
            return self.head(v + skip)  # v at row y sees pixels to the right in row y

    for method in METHODS:
        with pytest.raises(CausalityError, match=r"output at pixel \(0, 0\) depends on pixel \(0, 1\)"):
            sample(Leak(), 1, shape=(1, 4, 4), method=method)


def test_bad_arguments():
    m = make_model("gated-binary")
    with pytest.raises(ValueError, match="method"):
        sample(m, 1, method="fast")
    with pytest.raises(ValueError, match="n must be"):
        sample(m, 0)
    with pytest.raises(ValueError, match="temperature"):
        sample(m, 1, temperature=0)
    with pytest.raises(ValueError, match="likelihood"):
        sample(m, 1, likelihood="gaussian")
    with pytest.raises(ValueError, match="shape"):
        sample(Net(lambda self, h: h), 1)
    for method in METHODS:
        with pytest.raises(ValueError, match="output has 1 channels"):
            sample(Net(lambda self, h: h), 1, shape=(1, 4, 4), likelihood="categorical", levels=4, method=method)
    with pytest.raises(ValueError, match="not class-conditional"):
        sample(m, 2, condition=torch.tensor([0, 1]))
    with pytest.raises(BackendError, match="float32 or float64"):
        sample(make_model("gated-binary").to(torch.bfloat16), 1, backend="cpp")
    with pytest.raises(BackendError, match="no backend"):
        sample(m, 1, backend="triton")


def test_bfloat16_model_runs_on_the_torch_engine():
    m = make_model("gated-binary").to(torch.bfloat16)
    images = sample(m, 2, seed=0)  # dispatch: the C++ engine cannot take bf16, the torch executor does
    assert images.shape == (2, 1, 7, 6)


def test_in_place_operations():
    """In place on an activation: later readers see the new value, as in eager
    mode; in place on the image input is an error."""
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = MaskedConv2d("A", 1, 4, 3, padding=1)
            self.head = MaskedConv2d("B", 4, 1, 1)

        def forward(self, x):
            h = self.conv(x)
            g = h.relu_()
            h.mul_(2)
            return self.head(h + g)

    assert_teacher_forcing_binary(InPlace)

    class OnACopy(InPlace):  # in place on a clone leaves the original alone
        def forward(self, x):
            h = self.conv(x)
            g = h.clone()
            g.relu_()
            g += 1
            return self.head(h * g)

    assert_teacher_forcing_binary(OnACopy)

    class OnInput(InPlace):
        def forward(self, x):
            x.mul_(2)
            return self.head(self.conv(x))

    with pytest.raises(CompileError, match="in-place operation on the image input"):
        sample(OnInput(), 1, shape=(1, 4, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(MODELS))
def test_cuda_engine_matches_the_reference(name):
    """The CUDA engine on a GPU: teacher forcing against the full forward pass,
    and the same images as the torch executor for a seed (float64)."""
    from fastgen.sampling.api import OP
    from conftest import require_backend
    require_backend(OP, "cuda")
    m = make_model(name, torch.float64).cuda()
    images, label = random_images(m, 3).cuda(), labels_for(m, 3)
    label = None if label is None else label.cuda()
    torch.testing.assert_close(cached_logits(m, images, condition=label, backend="cuda"), m(m.feed(images), label),
                               atol=1e-10, rtol=1e-10)
    assert torch.equal(m.sample(3, label, seed=5, backend="cuda"), m.sample(3, label, seed=5, backend="ref"))


def test_arithmetic_with_constants():
    """Every form of constant arithmetic the compiler maps to AFFINE / CONST."""
    class Arith(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = MaskedConv2d("A", 1, 4, 3, padding=1)
            self.head = MaskedConv2d("B", 4, 1, 1)
            self.register_buffer("gain", torch.linspace(0.5, 2, 4)[:, None, None])

        def forward(self, x):
            h = self.conv(1 - x)
            h = torch.sub(0.5, h, alpha=2) / 3 + torch.add(h, self.gain, alpha=0.5)
            h = -h * self.gain + h.neg().mul(2) - torch.tanh(h).div(self.gain)
            return self.head(F.leaky_relu(h, 0.1) + F.elu(h, 0.5) + F.silu(h) + F.gelu(h) + F.softplus(h))

    assert_teacher_forcing_binary(Arith)
