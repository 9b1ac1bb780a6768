"""fastgen.convert on a peer-sized PixelCNN: another project's model, trained and sampled before and after one call.

The model, as jzbontar/pixelcnn-pytorch builds it (1.43M parameters on CPU, random weights): a 7x7 mask-A
convolution 1 -> 64, then seven 7x7 mask-B convolutions 64 -> 64, each masked convolution followed by
BatchNorm2d and ReLU, then a 1x1 convolution 64 -> 256 (256-way logits per pixel); its masked convolution is
harness.MaskBufferConv2d (a mask buffer, ``weight.data *= mask``, the full convolution). Batch 16 of 28x28
(smoke run: 8 channels, 2 blocks, 8x8, batch 2).

Groups:

* training step (forward, 256-way cross-entropy, backward, Adam): ``common`` the peer's model as written,
  ``fastgen`` the same model after ``fastgen.convert`` (fastgen.MaskedConv2d, fastgen.BatchNormAct2d). Before
  timing, both contenders' first-step losses and weight gradients (at the taps the mask keeps) are checked in
  float64 against the peer's.
* sampling 16 images: ``common`` the peer's own loop, one full forward pass per pixel and a multinomial draw (timed
  over the first pixels and extrapolated to 28 x 28: every step is the same forward pass; extra_info says so),
  ``fastgen`` ``fastgen.sample`` of the converted model (cached). Before timing, the cached path's teacher-forced
  logits are checked against the float64 model's forward pass.
"""
import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastgen
from fastgen.sampling import cached_logits
from harness import (MaskBufferConv2d, OtherLoad, check_outcome, extrapolate, first_call, record_timing,
                     relative_error, start_record, sync, time_step)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASE = dict(channels=64, blocks=7, size=28, batch=16)
SMOKE_CASE = dict(channels=8, blocks=2, size=8, batch=2)
LEVELS = 256
PREFIX_STEPS = 8  # the peer's sampling loop: pixel steps timed, then extrapolated


def peer_pixelcnn(channels, blocks, **_):
    layers = [MaskBufferConv2d("A", 1, channels, 7, 1, 3, bias=False), nn.BatchNorm2d(channels), nn.ReLU(True)]
    for _ in range(blocks):
        layers += [MaskBufferConv2d("B", channels, channels, 7, 1, 3, bias=False), nn.BatchNorm2d(channels),
                   nn.ReLU(True)]
    return nn.Sequential(*layers, nn.Conv2d(channels, LEVELS, 1))


@functools.lru_cache(maxsize=2)
def _weights(channels, blocks):
    torch.manual_seed(0)
    return copy.deepcopy(peer_pixelcnn(channels, blocks).state_dict())


def build(contender, case, dtype=torch.float32, device=DEVICE):
    model = peer_pixelcnn(**case)
    model.load_state_dict(_weights(case["channels"], case["blocks"]))
    model = model.to(device, dtype)
    return fastgen.convert(model) if contender == "fastgen" else model


def images(case, device=DEVICE):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, LEVELS, (case["batch"], 1, case["size"], case["size"]), generator=g).to(device)


def train_step(model, x):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xin = x.to(next(model.parameters()).dtype) / (LEVELS - 1)

    def step():
        loss = F.cross_entropy(model(xin), x[:, 0].long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def outcome(model, x):
    """The first step's loss and the masked convolutions' weight gradients at the taps their mask keeps."""
    model.train()
    xin = x.to(next(model.parameters()).dtype) / (LEVELS - 1)
    loss = F.cross_entropy(model(xin), x[:, 0].long())
    loss.backward()
    out = {"loss": loss.detach()}
    for i, m in enumerate(model):
        if isinstance(m, (MaskBufferConv2d, fastgen.MaskedConv2d)):
            mask = m.mask if isinstance(m, MaskBufferConv2d) else m.mask()
            out[f"grad weight {i}"] = m.weight.grad * mask
    return out


def peer_sample(model, n, shape, steps, gen):
    """The peer's sampling loop: a full forward pass per pixel, a multinomial draw of its 256-way softmax."""
    c, h, w = shape
    x = torch.zeros(n, c, h, w, device=DEVICE)
    with torch.no_grad():
        for t in range(steps):
            i, j = divmod(t, w)
            probs = torch.softmax(model(x)[:, :, i, j], 1)
            x[:, 0, i, j] = torch.multinomial(probs, 1, generator=gen)[:, 0].float() / (LEVELS - 1)
    return x


def pytest_generate_tests(metafunc):
    if "contender" in metafunc.fixturenames:
        metafunc.parametrize("contender", ["common", "fastgen"])


@pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")
def test_convert_train_step(benchmark, smoke, bench_results, contender):
    case = SMOKE_CASE if smoke else CASE
    group = (f"{DEVICE} float32 peer PixelCNN {case['channels']}ch {case['blocks'] + 1} masked convs, batch "
             f"{case['batch']}, {case['size']}x{case['size']}: training step")
    record = start_record(benchmark, group, contender, dtype="float32", mode="train step", **case)
    x = images(case)
    want = outcome(build("common", case, torch.float64), x)
    ref32 = outcome(build("common", case), x)
    ref_err = {n: relative_error(ref32[n], want[n]) for n in want}
    got, _ = first_call(lambda: outcome(build(contender, case, torch.float64), x), record, bench_results, contender,
                        contender == "fastgen")
    check_outcome(got, want, {}, torch.float64, record, bench_results, contender, contender == "fastgen")
    model = build(contender, case)
    step = train_step(model, x)
    got32 = outcome(build(contender, case), x)
    check_outcome(got32, want, ref_err, torch.float32, record, bench_results, contender, contender == "fastgen")

    def timed():
        step()
        sync()
    if time_step(benchmark, record, bench_results, timed) is None:
        return
    bench_results.append(record)


@pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")
def test_convert_sampling(benchmark, smoke, bench_results, contender):
    case = SMOKE_CASE if smoke else CASE
    n, shape = case["batch"], (1, case["size"], case["size"])
    total = shape[1] * shape[2]
    steps = total if smoke else PREFIX_STEPS
    group = (f"{DEVICE} float32 peer PixelCNN {case['channels']}ch {case['blocks'] + 1} masked convs: sampling "
             f"{n} images {case['size']}x{case['size']}")
    record = start_record(benchmark, group, contender, dtype="float32", mode="sample", **case)
    model = build(contender, case).eval()
    if contender == "fastgen":  # the cached path, teacher-forced, against the float64 forward pass
        x = images(case)
        want = {"logits": build("fastgen", case, torch.float64).eval()(x.double() / (LEVELS - 1))}
        with torch.no_grad():
            ref_err = {"logits": relative_error(model(x.float() / (LEVELS - 1)).double(), want["logits"])}
        got = {"logits": cached_logits(model, x, likelihood="categorical", levels=LEVELS).double()}
        check_outcome(got, want, ref_err, torch.float32, record, bench_results, contender, True)

        def run():
            fastgen.sample(model, n, likelihood="categorical", levels=LEVELS, shape=shape, seed=0)
            sync()
    else:
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        record["extra_info"]["backend"] = f"peer loop ({steps}/{total} steps, extrapolated)" if steps < total \
            else "peer loop"

        def run():
            peer_sample(model, n, shape, steps, gen)
            sync()
    with OtherLoad() as load:
        benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    if benchmark.disabled or benchmark.stats is None:
        return
    if contender == "common" and steps < total:
        extrapolate(benchmark, steps, total)  # every step is the same full forward pass
    record_timing(benchmark, record, bench_results, load, run)
    bench_results.append(record)
