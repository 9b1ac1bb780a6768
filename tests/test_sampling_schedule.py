"""Cached multi-scale sampling (fastgen/sampling/schedule.py; the C++ engine
csrc/cpu/schedule.cpp and the torch executor): exact against the full forward
pass (teacher forcing) and against naive sampling (same seed, float64), for
PixelCNN++ (grey and RGB, class-conditional), for another network of strided,
transposed and masked convolutions, and for one of every other operation
(dilation, the gate, conditioning maps, BatchNorm, crops padded back); rings;
clear errors for non-causal networks and unsupported operations."""
import collections
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastgen
from fastgen.functional import gated_activation
from fastgen.models import PixelCNNpp
from fastgen.sampling import code as fmt
from fastgen.sampling.api import METHODS, OP, cached_logits
from fastgen.sampling import CausalityError
from fastgen.sampling.common import feed_table
from fastgen.sampling.tracing import CompileError
from fastgen.sampling.schedule import compile_schedule

from conftest import require_backend

ENGINES = ["cpp", "ref"]


def tiny(shape, num_classes=None, nr_resnet=1, filters=8, nr_mix=2, spread=0.1, dtype=torch.float64):
    """A small PixelCNN++ in eval mode, its weights moved off the init (the
    class biases start at zero) so that every input and label matters."""
    torch.manual_seed(0)
    m = PixelCNNpp(shape, nr_resnet=nr_resnet, nr_filters=filters, nr_logistic_mix=nr_mix, dropout=0.0,
                   num_classes=num_classes).to(dtype).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * spread)
    return m


def labels_for(m, n):
    return None if m.num_classes is None else torch.arange(n) % m.num_classes


class MultiScaleNet(nn.Module):
    """Not PixelCNN++: a mask-A convolution, a causal stride-2 convolution down
    (padding above and to the left, then the whole coarse map shifted one row
    down), a coarse 3x3 over the rows above, a transposed convolution up with
    output_padding, a channel concatenation, and a head of 3 * nr_mix
    parameters per pixel (one channel)."""

    def __init__(self, nr_mix=2, c=6, colours=1, out=None, data_channels=1):
        super().__init__()
        self.first = fastgen.MaskedConv2d(colours, c, 5, mask_type="A", padding=2, data_channels=data_channels)
        self.down = nn.Conv2d(c, c, 2, stride=2)
        self.coarse = nn.Conv2d(c, c, (2, 3))
        self.up = nn.ConvTranspose2d(c, c, 3, stride=2, padding=1, output_padding=1)
        self.head = nn.Conv2d(2 * c, out or 3 * nr_mix, 1)

    def forward(self, x):
        h = torch.relu(self.first(x))
        d = self.down(F.pad(h, (1, 0, 1, 0))[:, :, :-1, :-1])  # coarse (i, j) sees fine rows < 2i+1, cols < 2j+1
        d = F.pad(d, (0, 0, 1, 0))[:, :, :-1]  # ... then only coarse rows above: fine rows < 2i
        d = torch.tanh(self.coarse(F.pad(d, (1, 1, 1, 0))))
        u = F.pad(self.up(d), (0, 0, 2, 0))[:, :, :-2]  # a fine row reads coarse rows strictly above it
        return self.head(torch.cat([h, F.elu(u)], 1))


class EveryOp(nn.Module):
    """The schedule's other operations: a 2x3 convolution over the two rows
    above, the gate with a conditioning map, a dilated convolution, eval-mode
    BatchNorm, leaky ReLU, a product, a crop padded back with zeros, an add
    with alpha, tanh; all causal."""

    def __init__(self, c=4, nr_mix=2):
        super().__init__()
        self.first = nn.Conv2d(1, 2 * c, (2, 3))
        self.dilated = nn.Conv2d(c, c, 3, dilation=2)
        self.bn = nn.BatchNorm2d(c)
        self.head = nn.Conv2d(c, 3 * nr_mix, 1)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x, cond):
        h = self.first(F.pad(x, (1, 1, 2, 0))[:, :, :-1])  # output row y reads input rows y-2, y-1
        g = gated_activation(h, cond)  # a global name: torch.fx traces it as a leaf
        d = self.bn(self.dilated(F.pad(g, (2, 2, 4, 0))))  # rows y-4..y of g, which sees only rows above
        e = F.leaky_relu(d, 0.1) * torch.sigmoid(g)
        g = F.pad(g[:, :, :-1, 1:], (0, 1, 0, 1))  # cropped, then padded back on the same sides: zeros there
        g = F.pad(F.pad(g, (-1, 0, 0, 0)), (1, 0, 0, 0))  # the same with negative padding: column 0 zero
        return self.head(torch.tanh(torch.add(e, g, alpha=0.5)))


# ---- exactness ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("shape, classes", [((1, 8, 12), None), ((3, 8, 8), 3)])
def test_cached_equals_naive_in_float64(engine, shape, classes):
    require_backend(OP, engine)
    m = tiny(shape, classes)
    label = labels_for(m, 3)
    naive = m.sample(3, label, seed=5, method="naive")
    cached = m.sample(3, label, seed=5, backend=engine)
    assert torch.equal(cached, naive)
    assert cached.shape == (3, *shape) and cached.dtype == torch.int64
    assert cached.min() >= 0 and cached.max() <= 255 and len(cached.unique()) > 20
    # temperature scales the logistics and the mixture logits the same way in both
    cold = m.sample(3, label, seed=5, temperature=0.5, backend=engine)
    assert torch.equal(cold, m.sample(3, label, seed=5, temperature=0.5, method="naive"))
    assert not torch.equal(cold, cached)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_teacher_forced_parameters_equal_the_forward_pass(engine, dtype):
    require_backend(OP, engine)
    # float32 at the init (activations of order one); float64 with the weights spread
    m = tiny((3, 8, 12), num_classes=4, nr_resnet=2, spread=0.1 if dtype == torch.float64 else 0.0, dtype=dtype)
    images = torch.randint(0, 256, (3, 3, 8, 12))
    label = labels_for(m, 3)
    params = cached_logits(m, images, condition=label, backend=engine)
    full = m(m.feed(images), label)
    assert params.shape == full.shape == (3, 20, 8, 12) and params.dtype == dtype
    scale = full.abs().max().item()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(params, full, rtol=0, atol=tol * scale)


@pytest.mark.parametrize("engine", ENGINES)
def test_another_multi_scale_network(engine):
    require_backend(OP, engine)
    torch.manual_seed(1)
    m = MultiScaleNet().double().eval()
    args = dict(likelihood="logistic-mixture", shape=(1, 8, 10))
    naive = fastgen.sample(m, 3, seed=4, method="naive", **args)
    assert torch.equal(fastgen.sample(m, 3, seed=4, backend=engine, **args), naive)
    images = torch.randint(0, 256, (2, 1, 8, 10))
    params = cached_logits(m, images, likelihood="logistic-mixture", backend=engine)
    torch.testing.assert_close(params, m(images.double() * 2 / 255 - 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("likelihood, levels, colours", [("bernoulli", 2, 1), ("categorical", 5, 1),
                                                         ("bernoulli", 2, 3), ("categorical", 4, 3)])
def test_a_multi_scale_network_of_logits(engine, likelihood, levels, colours):
    """Bernoulli and categorical logits from a multi-scale network (strided and transposed convolutions, crops)
    sample cached, exactly as naive sampling; with 3 colours that do not see each other at a pixel too."""
    require_backend(OP, engine)
    from fastgen.sampling import causality
    from fastgen.sampling.common import feed_table
    from fastgen.sampling.schedule import Schedule
    torch.manual_seed(3)
    per = 1 if likelihood == "bernoulli" else levels
    m = MultiScaleNet(colours=colours, out=colours * per).double().eval()
    shape = (colours, 8, 10)
    args = dict(likelihood=likelihood, levels=levels, shape=shape)
    table = feed_table(None, likelihood, levels, torch.float64, "cpu")
    prog, _ = causality.check(m, n=3, likelihood=likelihood, levels=levels, shape=shape, condition=None, table=table)
    assert isinstance(prog, Schedule)
    for temperature in (1.0, 0.7):
        naive = fastgen.sample(m, 3, seed=4, method="naive", temperature=temperature, **args)
        cached = fastgen.sample(m, 3, seed=4, backend=engine, temperature=temperature, **args)
        assert torch.equal(cached, naive)
    assert len(naive.unique()) == levels
    images = torch.randint(0, levels, (2, *shape))
    logits = cached_logits(m, images, likelihood=likelihood, levels=levels, backend=engine)
    torch.testing.assert_close(logits, m(table[images]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("classes", [None, 3])
def test_gated_pixelcnn_on_the_schedule(engine, classes):
    """fastgen's Gated PixelCNN, read through GatedMaskedConv2d's public ops (vertical_conv2d, gated_conv2d,
    gated_activation), compiles to a schedule that samples the images of naive sampling and of the program
    engine (float64, one seed, class-conditional too)."""
    require_backend(OP, engine)
    from fastgen.sampling.api import _draw_shape, _run
    from fastgen.sampling.common import feed_table, uniforms
    torch.manual_seed(5)
    m = fastgen.models.GatedPixelCNN((1, 8, 9), channels=8, layers=3, num_classes=classes).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # the label embeddings start at zero
    label = None if classes is None else torch.arange(3) % classes
    args = dict(shape=(1, 8, 9), likelihood="bernoulli", levels=2)
    prog = compile_schedule(m, batch=3, condition=label, **args)
    u = uniforms(3, _draw_shape("bernoulli", (1, 8, 9)), 7, "cpu")
    table = feed_table(None, "bernoulli", 2, torch.float64, "cpu")
    images, _ = _run(prog, table, 1.0, u, None, False, engine)
    assert torch.equal(images, m.sample(3, label, seed=7, method="naive"))
    assert torch.equal(images, m.sample(3, label, seed=7))  # the dispatched engine
    forced = torch.randint(0, 2, (3, 1, 8, 9))
    _, logits = _run(prog, table, 1.0, u, forced, False, engine)
    torch.testing.assert_close(logits, m(forced.double(), label), rtol=1e-12, atol=1e-12)


class ColourNet(MultiScaleNet):
    """MultiScaleNet over RGB in the colour order: mask A over 3 colour blocks, then a mask-B head, so the
    output's colour c at a pixel sees that pixel's colours < c."""

    def __init__(self, levels=None):
        super().__init__(colours=3, data_channels=3)
        self.head = fastgen.MaskedConv2d(6, 3 * (levels or 1), 1, mask_type="B", data_channels=3)

    def forward(self, x):
        h = torch.relu(self.first(x))
        d = F.pad(self.down(F.pad(h, (1, 0, 1, 0))[:, :, :-1, :-1]), (0, 0, 1, 0))[:, :, :-1]
        u = F.pad(self.up(torch.tanh(self.coarse(F.pad(d, (1, 1, 1, 0))))), (0, 0, 2, 0))[:, :, :-2]
        return self.head(h + F.elu(u))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("likelihood, levels", [("bernoulli", 2), ("categorical", 4)])
def test_colours_drawn_one_by_one(engine, likelihood, levels):
    """A multi-scale network whose colours see the pixel's earlier colours samples cached in the sub-pixel
    order: one step per colour, each layer computed colour block by colour block (the coarse layers, which see
    no colour of the pixel, in one block), the images of naive sampling and the forward pass's logits."""
    require_backend(OP, engine)
    torch.manual_seed(3)
    m = ColourNet(None if likelihood == "bernoulli" else levels).double().eval()
    args = dict(likelihood=likelihood, levels=levels, shape=(3, 8, 10))
    prog = compile_schedule(m, batch=2, **args)
    assert prog.pixel_steps == 3 and prog.steps == 3 * 80
    blocks = collections.Counter(prog.slots[i.out].name for i in prog.code)
    assert blocks == {"masked_conv": 3 + 3, "relu": 3, "add": 3,  # first, head and what joins them: by colour
                      "conv": 2, "tanh": 1, "conv_transpose": 1, "elu": 1}  # the coarse pass sees no colour
    naive = fastgen.sample(m, 2, seed=1, method="naive", **args)
    assert torch.equal(fastgen.sample(m, 2, seed=1, backend=engine, **args), naive)
    images = torch.randint(0, levels, (2, 3, 8, 10))
    table = feed_table(None, likelihood, levels, torch.float64, "cpu")
    torch.testing.assert_close(cached_logits(m, images, likelihood=likelihood, levels=levels, backend=engine),
                               m(table[images]), rtol=1e-12, atol=1e-12)


def test_colour_blocks_follow_the_weights():
    """The blocks come from the weights' zeros: a 1x1 convolution mixing the first layer's blocks keeps one
    block when that layer sees no colour of the pixel (causal: the images of naive sampling); when its
    blocks see the pixel's R and G, R's output sees them too: not causal, named by every method."""
    class Mixing(nn.Module):
        def __init__(self, data_channels):
            super().__init__()
            self.conv = fastgen.MaskedConv2d("A", 3, 6, 3, padding=1, data_channels=data_channels)
            self.mix = nn.Conv2d(6, 6, 1)
            self.head = fastgen.MaskedConv2d("B", 6, 12, 1, data_channels=3)

        def forward(self, x):
            return self.head(torch.relu(self.mix(self.conv(x))))

    torch.manual_seed(0)
    args = dict(shape=(3, 4, 3), likelihood="categorical", levels=4)
    mixing = Mixing(1).double()
    prog = compile_schedule(mixing, batch=1, **args)
    assert [i.hi - i.lo for i in prog.code if i.op == fmt.CONV] == [6, 6, 12]  # no colour of the pixel: one block
    naive = fastgen.sample(mixing, 3, seed=2, method="naive", **args)
    for engine in ENGINES:
        assert torch.equal(fastgen.sample(mixing, 3, seed=2, backend=engine, **args), naive)
    for method in METHODS:
        with pytest.raises(CausalityError, match=r"output at pixel \(0, 0\) colour 0 depends on pixel \(0, 0\) "
                                                 r"colour 1"):
            fastgen.sample(Mixing(3).double(), 3, seed=2, method=method, **args)


def test_steps_follow_the_deadlines():
    """Each position runs between the step after it is ready and the first step that reads it: a Gated
    PixelCNN's vertical stack, read only from the next row on, a whole row per step (the row pass), the
    horizontal stack one pixel per step with rings of a position or two; a grey image is one step per pixel,
    a colour image one per colour."""
    m = fastgen.models.GatedPixelCNN((1, 6, 7), channels=8, layers=3).double().eval()
    prog = compile_schedule(m, shape=(1, 6, 7), batch=2, likelihood="bernoulli", levels=2)
    assert prog.pixel_steps == 1 and prog.steps == 42
    for i in prog.code:
        name = prog.slots[i.out].name
        per_step = (i.start[1:] - i.start[:-1])[i.start[1:] > i.start[:-1]]
        if name == "v_pre":
            assert (per_step == 7).all()  # rows 0..4: row 5 feeds nothing below it
            assert len(i.queue) == 5 * 7
        if name in ("h_pre", "add"):
            assert (per_step == 1).all() and prog.slots[i.out].ring <= 2
    rgb = fastgen.models.PixelCNN((3, 6, 6), channels=12, blocks=1, likelihood="categorical", levels=4).double()
    assert compile_schedule(rgb.eval(), shape=(3, 6, 6), batch=1, likelihood="categorical", levels=4).steps == 108


@pytest.mark.parametrize("engine", ENGINES)
def test_every_operation(engine):
    require_backend(OP, engine)
    torch.manual_seed(2)
    m = EveryOp().double().eval()
    cond = torch.randn(3, 8, 6, 7, dtype=torch.float64)  # a conditioning map: a constant of every position
    args = dict(likelihood="logistic-mixture", shape=(1, 6, 7), condition=cond)
    naive = fastgen.sample(m, 3, seed=6, method="naive", **args)
    assert torch.equal(fastgen.sample(m, 3, seed=6, backend=engine, **args), naive)
    assert len(naive.unique()) > 20
    images = torch.randint(0, 256, (3, 1, 6, 7))
    params = cached_logits(m, images, likelihood="logistic-mixture", condition=cond, backend=engine)
    torch.testing.assert_close(params, m(images.double() * 2 / 255 - 1, cond), rtol=1e-12, atol=1e-12)


def test_generic_cpu_kernel_is_exact(monkeypatch):
    """The portable (non-AVX-512) build of the engine's micro-kernel."""
    require_backend(OP, "cpp")
    monkeypatch.setenv("FASTGEN_CPU_KERNEL", "generic")
    m = tiny((3, 8, 8), num_classes=3)
    label = labels_for(m, 3)
    assert torch.equal(m.sample(3, label, seed=2, backend="cpp"), m.sample(3, label, seed=2, method="naive"))


def test_progress_runs_row_by_row_to_the_same_images():
    m = tiny((1, 8, 8))
    assert torch.equal(m.sample(2, seed=1, progress=True), m.sample(2, seed=1))


@pytest.mark.gpu
@pytest.mark.parametrize("shape, classes", [((1, 8, 12), None), ((3, 8, 8), 3)])
def test_cuda_engine_matches_the_reference(shape, classes):
    """The CUDA engine on a GPU: teacher forcing against the full forward pass,
    and the same images as the torch executor for a seed (float64)."""
    require_backend(OP, "cuda")
    m = tiny(shape, classes).cuda()
    label = labels_for(m, 3)
    label = None if label is None else label.cuda()
    images = torch.randint(0, 256, (3, *shape)).cuda()
    full = m(m.feed(images), label)
    torch.testing.assert_close(cached_logits(m, images, condition=label, backend="cuda"), full, rtol=0,
                               atol=1e-12 * full.abs().max().item())
    cuda = m.sample(3, label, seed=5, backend="cuda")
    assert torch.equal(cuda, m.sample(3, label, seed=5, backend="ref"))
    assert torch.equal(cuda.cpu(), m.cpu().sample(3, None if label is None else label.cpu(), seed=5, backend="cpp"))


@pytest.mark.gpu
@pytest.mark.parametrize("likelihood, levels", [("bernoulli", 2), ("categorical", 5)])
def test_cuda_engine_draws_logits_as_the_cpu_engines(likelihood, levels):
    """The CUDA engine's Bernoulli and categorical draws on a GPU (float64): the images of the torch executor
    and the C++ engine for a seed, teacher-forced logits equal to the forward pass."""
    require_backend(OP, "cuda")
    torch.manual_seed(3)
    per = 1 if likelihood == "bernoulli" else levels
    m = MultiScaleNet(colours=3, out=3 * per).double().eval()
    args = dict(likelihood=likelihood, levels=levels, shape=(3, 8, 10))
    cpu = fastgen.sample(m, 3, seed=4, backend="cpp", **args)
    m = m.cuda()
    assert torch.equal(fastgen.sample(m, 3, seed=4, backend="cuda", **args).cpu(), cpu)
    images = torch.randint(0, levels, (2, 3, 8, 10)).cuda()
    full = m(images.double() / (levels - 1) if likelihood == "categorical" else images.double())
    torch.testing.assert_close(cached_logits(m, images, likelihood=likelihood, levels=levels, backend="cuda"), full,
                               rtol=1e-12, atol=1e-12)


# ---- the schedule ----------------------------------------------------------------------------------------------

def test_rings_hold_a_few_rows_at_most():
    m = tiny((3, 16, 16), nr_resnet=2)
    prog = compile_schedule(m, shape=(3, 16, 16), batch=1)
    scales = {(s.h, s.w) for s in prog.slots}
    assert {(16, 16), (8, 8), (4, 4)} <= scales  # three scales, and padded / cropped views cost no slots
    full = sum(s.h * s.w * s.channels for s in prog.slots)
    ring = sum(s.ring * s.channels for s in prog.slots)
    assert ring < full / 8
    # a value read only where it was just computed keeps a position or two; one read by a convolution over
    # the rows above, about a row; an up-pass value waiting for the down pass's short-cut, a few rows
    assert min(s.ring for s in prog.slots) <= 2
    assert max(s.ring for s in prog.slots if s.h == 16) <= 4 * 16
    # every position of every instruction is queued once, at the step after its last input pixel
    for i in prog.code:
        q = i.queue.sort().values
        assert torch.equal(q.unique(), q)
        assert i.start[-1] == len(i.queue)


def test_queues_follow_the_pixels():
    m = tiny((1, 8, 8))
    prog = compile_schedule(m, shape=(1, 8, 8), batch=1)
    out = prog.slots[prog.output.slot]
    assert out.ready.shape == (8, 8, 1)  # a mixture: one class of channels, the pixel's colours drawn at once
    # the output at pixel t is ready once pixel t - 1 is known, never later
    assert (out.ready.flatten() < torch.arange(64)).all()
    # the coarsest scale (2x2) waits for fine pixels: its last positions only after the first fine row
    coarse = [s for s in prog.slots if s.h == 2]
    assert coarse and all(s.ready.max() > 8 for s in coarse)


def test_the_analysis_is_reused_only_for_the_same_structure():
    from fastgen.sampling import schedule
    m = tiny((1, 8, 8))
    first = compile_schedule(m, shape=(1, 8, 8), batch=2)
    with torch.no_grad():  # new weights, same structure: the same queues, the new weights
        for p in m.parameters():
            p.mul_(1.5)
    again = compile_schedule(m, shape=(1, 8, 8), batch=2)
    assert all(a.queue is b.queue for a, b in zip(first.code, again.code))
    assert not torch.equal(first.code[2].weight, again.code[2].weight)  # u_in, the first convolution
    with torch.no_grad():  # a tap of the first convolution zeroed: another structure, analysed afresh
        m.u_in.weight[:, :, 0, 0] = 0
    other = compile_schedule(m, shape=(1, 8, 8), batch=2)
    assert len(other.code) == len(first.code) and len(other.code[2].taps) == len(first.code[2].taps) - 1
    assert len(schedule._FINISHED) <= schedule._FINISHED_MAX
    assert torch.equal(m.sample(2, seed=3), m.sample(2, seed=3, method="naive"))


class Scaled(nn.Module):
    """A 3x3 convolution made causal by its weights' zeros (the taps at and after the centre), times a factor
    forward reads from an attribute."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1).double()
        with torch.no_grad():
            self.conv.weight[:, :, 1, 1:] = 0
            self.conv.weight[:, :, 2] = 0
        self.scale = 1.0

    def forward(self, x):
        return self.conv(x) * self.scale


def test_a_compiled_model_is_reused_until_what_it_was_read_from_changes(monkeypatch):
    from fastgen.sampling import schedule
    compiles = []
    compile_once = schedule._compile
    monkeypatch.setattr(schedule, "_compile", lambda *a: compiles.append(a[2]) or compile_once(*a))
    m = Scaled()

    def sample(n=2, **kw):
        return fastgen.sample(m, n, likelihood="bernoulli", shape=(1, 5, 6), seed=4, **kw)

    def compiled_again(change=None, n=2):
        before = len(compiles)
        change and change()
        got = sample(n)
        assert torch.equal(got, sample(n, method="naive"))  # the naive path never compiles
        return len(compiles) - before

    assert compiled_again() == 1 and compiled_again() == 0
    assert compiled_again(n=3) == 1  # another batch
    with torch.no_grad():
        assert compiled_again(lambda: m.conv.weight.data.mul_(2)) == 1  # .data: no version counter moves
        assert compiled_again(lambda: m.conv.bias.add_(1)) == 1
    assert compiled_again(lambda: setattr(m, "scale", -3.0)) == 1  # an attribute forward reads
    assert compiled_again(lambda: setattr(m, "conv", Scaled().conv)) == 1  # a submodule replaced
    assert compiled_again(lambda: m.conv.register_forward_hook(lambda mod, i, o: o)) == 1
    assert compiled_again() == 0
    monkeypatch.setattr(Scaled, "forward", lambda self, x: self.conv(x) - self.scale)  # the class's code
    assert compiled_again() == 1
    with torch.no_grad():
        m.conv.weight.data[0, 0, 2, 2] = 0.5  # a tap on a later pixel: the network is not causal any more
    with pytest.raises(CausalityError):
        sample(n=3)
    key, held = weakref.ref(m), len(schedule._COMPILED)
    del m
    gc.collect()
    assert key() is None and len(schedule._COMPILED) == held - 1  # the reuse keeps no model alive


# ---- errors ----------------------------------------------------------------------------------------------------

class Net(nn.Module):
    def __init__(self, body, nr_mix=1):
        super().__init__()
        self.conv = nn.Conv2d(1, 3 * nr_mix, 3, padding=1)
        self.body = body

    def forward(self, x):
        return self.body(self, x)


def sample_net(body):
    return fastgen.sample(Net(body).double(), 1, likelihood="logistic-mixture", shape=(1, 4, 4))


def test_a_network_that_sees_the_future_names_the_pixel():
    for method in ("cached", "naive"):
        with pytest.raises(CausalityError, match=r"not causal: its output at pixel \(0, 0\) depends on pixel "
                                                 r"\(1, 1\)"):
            fastgen.sample(Net(lambda m, x: m.conv(x)).double(), 1, likelihood="logistic-mixture", shape=(1, 4, 4),
                           method=method)
    # the same convolution on the input shifted down and right by one: causal
    shifted = lambda m, x: m.conv(F.pad(x, (2, 0, 2, 0))[:, :, :-2, :-2])  # noqa: E731
    assert sample_net(shifted).shape == (1, 1, 4, 4)


def _causal(m, x):  # the 3x3 convolution on the input shifted down and right by one
    return m.conv(F.pad(x, (2, 0, 2, 0))[:, :, :-2, :-2])


def _add_to_crop(h):  # eager mode changes h through the view; the schedule would keep h's old values
    h[:, :, 1:].add_(1)
    return h


@pytest.mark.parametrize("body, match", [
    (lambda m, x: F.max_pool2d(_causal(m, x), 1), "max_pool2d"),
    (lambda m, x: _causal(m, F.pad(x, (1, 1, 1, 1), mode="replicate")[:, :, :-2, :-2]), "only zero padding"),
    (lambda m, x: _add_to_crop(_causal(m, x)), "in-place operation on a view"),
    (lambda m, x: _causal(m, x.mul_(2)), "in-place operation on the image input"),
    (lambda m, x: torch.cat([_causal(m, x)[:, :, ::2], _causal(m, x)[:, :, 1::2]], 2), "step 1"),
])
def test_unsupported_operations_are_named(body, match):
    with pytest.raises(CompileError, match=match):
        sample_net(body)


def test_output_and_settings_errors():
    wrong_k = lambda m, x: torch.cat([m.conv(x), m.conv(x)[:, :1]], 1)  # noqa: E731
    with pytest.raises(ValueError, match=r"4 channels: a discretized logistic mixture of 1-channel images needs "
                                         r"3 \* nr_mix"):
        sample_net(wrong_k)
    with pytest.raises(ValueError, match=r"4 channels: a discretized logistic mixture of 1-channel images needs "
                                         r"3 \* nr_mix"):
        fastgen.sample(Net(wrong_k), 1, likelihood="logistic-mixture", shape=(1, 4, 4), method="naive")
    with pytest.raises(ValueError, match="a discretized logistic mixture has 256 levels, got levels=16"):
        fastgen.sample(Net(lambda m, x: m.conv(x)), 1, likelihood="logistic-mixture", levels=16, shape=(1, 4, 4))


@pytest.mark.parametrize("corrupt", ["position", "start"])
def test_the_engine_checks_its_program(corrupt):
    require_backend(OP, "cpp")
    from fastgen.sampling.api import _run_engine
    from fastgen.sampling.common import feed_table, uniforms
    prog = compile_schedule(tiny((1, 4, 4)), shape=(1, 4, 4), batch=1)
    i = next(i for i in prog.code if len(i.queue) > 1)
    if corrupt == "position":  # a position outside the slot
        i.queue = i.queue.clone()
        i.queue[0] = 10 ** 6
    else:  # starts that decrease
        i.start = i.start.clone()
        i.start[1] = i.start[-1] + 1
    job = dict(prog=prog, u=uniforms(1, (2, 4, 4), 0, "cpu"), temperature=1.0, images=None, progress=False,
               feed=feed_table(None, "logistic-mixture", 256, torch.float64, "cpu"))
    with pytest.raises(RuntimeError, match="a queue outside its slot, or starts that do not increase from 0"):
        _run_engine(job)


def test_the_engines_format_header_is_code_py_s():
    """csrc/sampling_format.h (what the C++ and CUDA engines read) is what fastgen/sampling/code.py writes:
    regenerate it with `make format-header` after changing the format."""
    from pathlib import Path

    from fastgen.sampling import code
    header = Path(__file__).resolve().parents[1] / "csrc" / "sampling_format.h"
    assert header.read_text() == code.header(), "csrc/sampling_format.h is stale: run `make format-header`"


def test_encoded_instructions_follow_the_format_by_name():
    from fastgen.sampling import code
    prog = compile_schedule(tiny((3, 4, 4)), shape=(3, 4, 4), batch=1)
    _, words, _, _ = prog.encode()
    pos, seen = 0, set()
    for i in prog.code:  # each instruction's fields, read back by their names
        n = words[pos]
        fields = dict(zip(code.HEAD, words[pos + 1:pos + 1 + len(code.HEAD)]))
        name = code.OPS[fields["op"] - 1]
        own = dict(zip(code.OWN[name], words[pos + 1 + len(code.HEAD):]))
        assert (fields["op"], fields["out"], fields["channels"]) == (i.op, i.out, i.channels)
        assert fields["a_slot"] == (i.a.slot if i.a is not None else -1)
        assert fields["b_slot"] == (i.b.slot if i.b is not None else -1)
        taps = 2 * own["taps"] if name in ("CONV", "CONVT") else 0
        assert n == 1 + len(code.HEAD) + len(code.OWN[name]) + taps
        if name in ("CONV", "CONVT"):
            assert (own["sy"], own["sx"]) == i.stride and own["taps"] == len(i.taps)
        if name == "ACT":
            assert code.ACTS[own["act"]] == i.act
        seen.add(name)
        pos += n
    assert pos == len(words) and {"CONV", "CONVT", "ACT", "ADD"} <= seen
    with pytest.raises(ValueError, match="instruction ADD: fields"):
        code.instruction(code.ADD, {"out": 0, "channels": 1, "a": None, "b": None, "queue": 0, "start": 1}, {})
