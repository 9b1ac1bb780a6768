"""A whole DCGAN training step (one D update and one G update) beside the way pytorch/examples' dcgan trains.

Contenders, the same networks from the same weights, one batch of real images and of noise:

* ``common``           pytorch/examples/dcgan's step (NCHW): sigmoid outputs and ``nn.BCELoss``, D's real and fake
                       losses backpropagated one after the other, then G's loss through D with D's weight
                       gradients computed (and thrown away), ``nn.BatchNorm2d`` + ReLU / LeakyReLU, Adam;
* ``compile(common)``  the same step with G and D under ``torch.compile`` (compile time excluded, reported apart);
* ``fastgen``          ``python -m fastgen train dcgan``'s step itself (fastgen.train.gan.GANFamily.step):
                       softplus losses on logits, D frozen in G's update (its input gradient only), fused Adam,
                       fastgen's DCGAN models as they are built for training (fastgen.BatchNormAct2d,
                       channels_last).

Each contender's losses over two steps (the second shows the first's updates) are checked in float64 against
the common step in float64, and its first step's in float32, before it is timed. Memory: a fresh subprocess's
peak RSS on the CPU (the measured steps above the RSS of the weights, Adam's state and the inputs: see
rss_step), peak allocated on a GPU.
"""
import copy
import types

import pytest
import torch
import torch.nn as nn

from fastgen.models.dcgan import as_torch_layers
from fastgen.nn import BatchNormAct2d
from fastgen.train.family import Run
from fastgen.train.gan import GANFamily, GANOptions, to_unit
from harness import (check_outcome, first_call, prepare_contender, record_peak_rss, relative_error, start_record, sync,
                     time_step)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (batch, channels, size, width): MNIST-sized and DCGAN's own 64x64 RGB
CASES = [(64, 1, 28, 64), (64, 3, 64, 64)]
SMOKE_CASES = [(4, 1, 28, 8)]
CONTENDERS = ["common", "compile(common)", "fastgen"]
Z_DIM, SEED = 100, 7


def make_family(case, device=DEVICE, dtype=torch.float32):
    batch, c, size, width = case
    opts = GANOptions(z_dim=Z_DIM, g_loss="non_saturating", d_steps=1, pack=1, ema=0.0, conditioning="projection")
    cfg = types.SimpleNamespace(model="dcgan", batch=batch, lr=2e-4, channels=width, data="bench", options=opts)
    dist = types.SimpleNamespace(device=torch.device(device), group=None)
    torch.manual_seed(0)
    family = GANFamily(Run(cfg, dist, False, 10, lambda msg: None, lambda record: None))
    family.build(types.SimpleNamespace(levels=256, num_classes=None, shape=(c, size, size)), None)
    family.g.to(dtype), family.d.to(dtype)  # (the optimizers hold the same parameters; the step follows them)
    return family


def batch(case, device=DEVICE):
    n, c, size, _ = case
    images = torch.randint(0, 256, (n, c, size, size), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    return images.to(device)


def unfused(net):
    """``net`` with every fastgen.BatchNormAct2d replaced by nn.BatchNorm2d + its activation module on the same
    tensors (pytorch/examples' layers), in place."""
    for name, m in list(net.named_children()):
        if isinstance(m, BatchNormAct2d):
            setattr(net, name, m.to_modules())
        else:
            unfused(m)
    return net


def as_examples(net, dtype):
    """A copy of one of fastgen's DCGAN networks as pytorch/examples builds it: BatchNorm2d + activation
    modules, torch's (oneDNN's) convolutions where fastgen computes a layer as a matrix product, NCHW weights and
    maps."""
    net = as_torch_layers(unfused(copy.deepcopy(net).to(dtype)))
    net.channels_last = False
    return net.to(memory_format=torch.contiguous_format)


class CommonStep:
    """pytorch/examples' dcgan step on copies of the family's networks (as_examples) in examples' order of
    calls."""

    def __init__(self, family, dtype=torch.float32, compiled=False):
        # D as examples keeps it: always taking gradients (the family's D is frozen between its steps)
        self.g = as_examples(family.g, dtype)
        self.d = as_examples(family.d, dtype).requires_grad_(True)
        self.G = torch.compile(self.g) if compiled else self.g
        self.D = torch.compile(self.d) if compiled else self.d
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.bce, self.dtype, self.family = nn.BCELoss(), dtype, family
        self.nets = (self.g, self.d)

    def __call__(self, images, seed):
        real = to_unit(images, 256).to(self.dtype)
        z = self.family._noise(len(real), seed).to(self.dtype)
        ones, zeros = torch.ones(len(real), device=real.device, dtype=self.dtype), \
            torch.zeros(len(real), device=real.device, dtype=self.dtype)
        self.opt_d.zero_grad()
        err_real = self.bce(torch.sigmoid(self.D(real)), ones)
        err_real.backward()
        fake = self.G(z)
        err_fake = self.bce(torch.sigmoid(self.D(fake.detach())), zeros)
        err_fake.backward()
        self.opt_d.step()
        self.opt_g.zero_grad()
        err_g = self.bce(torch.sigmoid(self.D(fake)), ones)
        err_g.backward()
        self.opt_g.step()
        return (err_real + err_fake).detach(), err_g.detach()


def make_step(contender, case, device=DEVICE, dtype=torch.float32):
    """step(images, seed) -> (d_loss, g_loss) of one contender on a fresh family; ``step.nets``: its G and D."""
    family = make_family(case, device, dtype if contender == "fastgen" else torch.float32)
    if contender == "fastgen":
        def step(images, seed):
            scalars = family.step(images, None, seed)
            return scalars["d_loss"], scalars["g_loss"]
        step.nets = (family.g, family.d)
        return step
    return CommonStep(family, dtype=dtype, compiled=contender == "compile(common)")


def losses(step, images, steps=2):
    out = {}
    for s in range(steps):
        d_loss, g_loss = step(images, SEED + s)
        out[f"D loss {s + 1}"], out[f"G loss {s + 1}"] = d_loss.double().cpu(), g_loss.double().cpu()
    return out


def reference(case):
    """The common step's losses over two steps in float64, and the relative error of its first step's in float32
    (the float32 tolerance's scale)."""
    images = batch(case, "cpu")
    want = losses(CommonStep(make_family(case, "cpu"), dtype=torch.float64), images)
    got = losses(CommonStep(make_family(case, "cpu"), dtype=torch.float32), images, steps=1)
    return want, {n: relative_error(got[n], want[n]) for n in got}


def rss_step(spec):
    """(step, reset) for harness.peak_rss: one contender's whole training step. The base it is measured above:
    weights, Adam's state and the inputs, without gradients (reset drops them), the same for every contender;
    gradients a contender keeps between its steps count as its step's memory."""
    case = tuple(spec["shape"])
    step = make_step(spec["contender"], case, "cpu")
    images = batch(case, "cpu")

    def reset():
        for net in step.nets:
            for p in net.parameters():
                p.grad = None
    return (lambda: step(images, SEED)), reset


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    smoke = bool(metafunc.config.getoption("benchmark_disable", False))
    cases = [(shape, c) for shape in (SMOKE_CASES if smoke else CASES) for c in CONTENDERS]
    metafunc.parametrize("case", cases, ids=[f"{DEVICE}-b{s[0]}-{s[1]}x{s[2]}x{s[2]}-w{s[3]}-{c}" for s, c in cases])


@pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_gan_step(benchmark, smoke, bench_results, case):
    shape, contender = case
    n, c, size, width = shape
    group = f"{DEVICE} float32 DCGAN step batch {n} {c}x{size}x{size} width {width} (D + G update)"
    record = start_record(benchmark, group, contender, dtype="float32", shape=list(shape), mode="train step")
    prepare_contender(benchmark, contender)
    images = batch(shape)

    def first():
        got = losses(make_step(contender, shape), images, steps=1)
        sync()
        return got

    got, first_call_s = first_call(first, record, bench_results, contender, contender == "fastgen")
    want, ref_err = reference(shape)
    # exact in float64 over two steps (the second shows the first's updates); in float32 the first step only:
    # Adam's first update moves every weight by about lr * sign(gradient), so float32 rounding flips the
    # weights whose gradient is near 0: at 64x64 the common step itself, its networks in channels_last, has its
    # second G loss off by 1.2e-4 (3.4e-5 in NCHW), while every contender agrees to 1e-10 in float64
    exact = losses(make_step(contender, shape, dtype=torch.float64), images)
    check_outcome(exact, want, {}, torch.float64, record, bench_results, contender, contender == "fastgen")
    record["extra_info"]["max_rel_error_float64"] = record["extra_info"]["max_rel_error"]
    check_outcome(got, {n: want[n] for n in got}, ref_err, torch.float32, record, bench_results, contender,
                  contender == "fastgen")

    step = make_step(contender, shape)
    seeds = iter(range(SEED, SEED + 10 ** 6))
    step(images, next(seeds))  # warm-up (the compiled contender compiles here)

    def timed():
        step(images, next(seeds))
        sync()

    if time_step(benchmark, record, bench_results, timed,
                 first_call_s if contender == "compile(common)" else None) is None:
        return
    if DEVICE == "cpu" and not smoke:
        record_peak_rss(benchmark.extra_info, contender, shape, "train step", builder="bench_gan:rss_step")
    bench_results.append(record)
