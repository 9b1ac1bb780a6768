"""Sampling: fastgen's cached sampler beside naive full-recompute sampling.

Same model (random init, fixed torch seed, eval mode), same seed, same
pre-drawn uniforms (fastgen.sampling.common.uniforms) for every contender:

* ``common``       naive sampling, the way it is commonly done: one full forward
                   pass of the network per pixel and colour channel
                   (fastgen.sampling.naive.naive_sample). It is timed over a fixed
                   prefix of pixel steps (``naive_sample(..., max_steps=K)``) and
                   **extrapolated** to the H*W*C steps of a whole image: every step
                   is the same full forward pass. Its pytest-benchmark stats (and
                   so ``--benchmark-json`` and the end-of-run table) hold the
                   extrapolated seconds per batch; extra_info says
                   ``extrapolated: true``, ``timed_steps``, ``total_steps`` and
                   ``prefix_median_s`` (what was measured).
* ``cached[cpp]``  ``sample(model, n, seed=..., backend='cpp')``: the C++
                   engine (CPU only), whole images;
* ``cached[cuda]`` the same with ``backend='cuda'``: the CUDA engine (GPU only), whole images;
* ``cached[ref]``  the same with ``backend='ref'``: the torch executor, whole images.

Groups: one per model and batch size (1, 16, 64, 256, the paper's sweep). On
the CPU a 28x28 binarized-MNIST PixelCNN and Gated PixelCNN, and a 28x28 PixelCNN++
(the CPU defaults of `train pixelcnnpp`: 32 filters, 2 blocks per scale, 5 mixture
components); cached = the schedule of fastgen/sampling/schedule.py for all of them; on a
GPU also 32x32x3 256-way categorical ones and a 32x32x3 PixelCNN++ (64 filters). extra_info: ``seconds_per_batch``,
``images_per_s`` and, for the cached contenders, ``speedup_vs_naive`` (naive's
extrapolated median over theirs; the table's "vs common" column), with
``target_vs_naive`` / ``meets_target`` for the device's default engine (cpp on
the CPU; on a GPU, ref until the CUDA engine has been measured and made the
default) where the issue sets a target (CPU: 100x at batch 16 on 28x28; GPU:
30x at batch 16 and 250x at batch 256).

Checks before timing (a wrong contender is reported as wrong, never timed):
* exactness of the cached path, once per model and engine: the teacher-forced
  logits ``cached_logits(model, images, backend=...)`` on a few blob images
  against the float64 model's ``model(model.feed(images))``, with the tolerance
  rule of the other benchmarks (harness.tolerance);
* the samples, per batch: the pixels of the first K steps of up to 16 batch
  elements (spread over the batch) against naive sampling with a float64 copy
  of the model on the same uniforms. A float32 run may draw the neighbouring
  value where the uniform lies within float32 reach of a decision boundary of
  the float64 run (4x the float32 forward pass's largest logit error, at least
  1e-5; after such a flip the image goes its own way): near ties are counted
  (extra_info ``near_tie_flips``), any other difference is WRONG. PixelCNN++:
  the mixture's draw has continuous decision boundaries (the rounding of each
  logistic draw to a level), so the samples checked are those of the same
  engine run on the float64 copy of the model, which must equal the float64
  naive run exactly; the float32 engine is checked by its teacher-forced
  parameters (above).

Memory (CPU real runs, largest batch): the peak RSS of a fresh subprocess
(harness.peak_rss) for one naive pixel step (one full forward pass) and
for one cached[cpp] run, above the RSS after a warm-up run.

Smoke run (CI): ``pytest benchmarks/ -q --benchmark-disable``: 8x8 models, batch 2,
every contender run once and checked (naive over half the image).
Real run: ``pytest benchmarks/bench_sampling.py --benchmark-only``.
"""
import copy
import functools
import time

import pytest
import torch

from fastgen.models.pixelcnn import GatedPixelCNN, PixelCNN
from fastgen.models.pixelcnnpp import PixelCNNpp
from fastgen.sampling import cached_logits, sample
from fastgen.sampling.api import OP, _draw_shape
from fastgen.sampling.common import feed_table, uniforms
from fastgen.sampling.naive import naive_sample
from harness import (OtherLoad, extrapolate, record_peak_rss, record_timing, relative_error, start_record, sync,
                     tolerance)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEED = 0          # the sampling seed (uniforms), the same for every contender
MODEL_SEED = 0    # torch seed of the models' random init
NEAR_TIE = 1e-5   # least reach of a near tie (see near_tie)
CHECK_ELEMENTS = 16  # batch elements compared with the float64 naive run

# models: (kind, (C, H, W), channels, blocks / layers, likelihood, levels)
MNIST = [("pixelcnn", (1, 28, 28), 64, 7, "bernoulli", 2), ("gated", (1, 28, 28), 64, 8, "bernoulli", 2),
         ("pixelcnnpp", (1, 28, 28), 32, 2, "logistic-mixture", 256)]
PP_NR_MIX = 5  # PixelCNN++'s mixture components (train pixelcnnpp's CPU default)
CIFAR = [("pixelcnn", (3, 32, 32), 120, 7, "categorical", 256), ("gated", (3, 32, 32), 120, 12, "categorical", 256),
         ("pixelcnnpp", (3, 32, 32), 64, 2, "logistic-mixture", 256)]
# the torch executor of a multi-scale schedule runs framework ops per instruction and step (minutes per
# batch): timed up to these batch sizes
REF_MAX_BATCH = {"cpu": {"pixelcnnpp": 64}, "cuda": {"pixelcnnpp": 1}}
MODELS = {"cpu": MNIST, "cuda": MNIST + CIFAR}
BATCHES = [1, 16, 64, 256]
SMOKE_MODELS = [("pixelcnn", (1, 8, 8), 8, 2, "bernoulli", 2), ("gated", (1, 8, 8), 8, 2, "bernoulli", 2),
                ("pixelcnn", (3, 8, 8), 12, 2, "categorical", 256), ("gated", (3, 8, 8), 12, 2, "categorical", 256),
                ("pixelcnnpp", (1, 8, 8), 8, 1, "logistic-mixture", 256),
                ("pixelcnnpp", (3, 8, 8), 8, 1, "logistic-mixture", 256)]
SMOKE_BATCHES = [2]
# pixel steps of the naive prefix that is timed (then extrapolated), per batch size
NAIVE_STEPS = {"cpu": {1: 56, 16: 16, 64: 8, 256: 2}, "cuda": {1: 96, 16: 96, 64: 48, 256: 24}}
# the targets: cached at least this many times faster than naive, {(device, image HxW): {batch: x}}
TARGETS = {("cpu", 28): {16: 100}, ("cuda", 28): {16: 30, 256: 250}, ("cuda", 32): {16: 30, 256: 250}}
CONTENDERS = ["common", "cached[cpp]", "cached[cuda]", "cached[ref]"]


def model_id(spec):
    kind, (c, h, w), ch, depth, lik, levels = spec
    if kind == "pixelcnnpp":
        return f"PixelCNNpp {c}x{h}x{w} {ch}ch {depth}blocks mix{PP_NR_MIX}"
    name = "PixelCNN" if kind == "pixelcnn" else "GatedPixelCNN"
    depth_s = f"{depth}blocks" if kind == "pixelcnn" else f"{depth}layers"
    lik_s = "bernoulli" if lik == "bernoulli" else f"categorical{levels}"
    return f"{name} {c}x{h}x{w} {ch}ch {depth_s} {lik_s}"


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    smoke = bool(metafunc.config.getoption("benchmark_disable", False))
    cases, ids = [], []
    for spec in SMOKE_MODELS if smoke else MODELS[DEVICE]:
        for batch in SMOKE_BATCHES if smoke else BATCHES:
            # naive first: the cached contenders of the group get their speedup against it
            for contender in CONTENDERS:
                cases.append((spec, batch, contender))
                ids.append(f"{DEVICE}-{model_id(spec).replace(' ', '-')}-b{batch}-{contender}")
    metafunc.parametrize("case", cases, ids=ids)


def build_model(spec, device=DEVICE, dtype=torch.float32):
    kind, shape, channels, depth, likelihood, levels = spec
    torch.manual_seed(MODEL_SEED)
    if kind == "pixelcnn":
        model = PixelCNN(shape, channels=channels, blocks=depth, likelihood=likelihood, levels=levels)
    elif kind == "pixelcnnpp":
        model = PixelCNNpp(shape, nr_resnet=depth, nr_filters=channels, nr_logistic_mix=PP_NR_MIX, dropout=0.0)
    else:
        model = GatedPixelCNN(shape, channels=channels, layers=depth, likelihood=likelihood, levels=levels)
    return model.to(device=device, dtype=dtype).eval()


@functools.lru_cache(maxsize=None)
def models(spec):
    """The float32 model and its float64 copy (the reference)."""
    model = build_model(spec)
    return model, copy.deepcopy(model).double().eval()


def blob_images(n, shape, levels, seed=1):
    """Images that look more like data than uniform noise: smooth random blobs
    (upsampled low-resolution noise), thresholded (binary) or quantised."""
    c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, c, max(2, h // 4), max(2, w // 4), generator=g, dtype=torch.float64)
    z = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    z = z + 0.3 * torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    if levels == 2:
        return (z > 0.5).long()
    return (torch.sigmoid(1.5 * z) * (levels - 1)).round().long().clamp_(0, levels - 1)


@functools.lru_cache(maxsize=None)
def forward(spec):
    """Blob images, the float64 model's logits of them, and the float32 forward
    pass's error: (images, logits, relative error, largest absolute error)."""
    model, model64 = models(spec)
    images = blob_images(4, spec[1], spec[5]).to(DEVICE)
    with torch.no_grad():
        want = model64(model64.feed(images))
        got = model(model.feed(images))
    return images, want, relative_error(got, want), (got.double() - want).abs().max().item()


def near_tie(spec):
    """How close to a float64 decision boundary a uniform may lie for a float32 run
    to draw the neighbouring value: 4x the float32 forward pass's largest logit
    error (a probability or CDF moves by at most about that much), at least NEAR_TIE."""
    return max(NEAR_TIE, 4 * forward(spec)[3])


@functools.lru_cache(maxsize=None)
def logits_check(spec, backend):
    """Teacher-forced logits of the cached path against the float64 forward pass:
    (relative error, tolerance)."""
    model, _ = models(spec)
    images, want, ref_err, _ = forward(spec)
    got = cached_logits(model, images, backend=backend)
    return relative_error(got, want), tolerance(torch.float32, ref_err)


def prefix_mask(shape, steps):
    """[C, H, W] bool: the draws of the first ``steps`` pixel steps (raster order, then colour)."""
    c, h, w = shape
    order = torch.arange(h * w * c).view(h, w, c).permute(2, 0, 1)  # step index of (ch, y, x)
    return order < steps


def check_elements(batch):
    m = min(batch, CHECK_ELEMENTS)
    return torch.linspace(0, batch - 1, m).round().long().unique()


@functools.lru_cache(maxsize=2)
def reference(spec, batch, steps):
    """Naive sampling with the float64 model on the uniforms of the checked batch
    elements, for ``steps`` pixel steps: (images [m, C, H, W], margins [m, C, H, W]:
    how far each draw's uniform lay from the nearest decision boundary)."""
    _, shape, _, _, likelihood, levels = spec
    _, model64 = models(spec)
    idx = check_elements(batch)
    u = uniforms(batch, _draw_shape(likelihood, shape), SEED, DEVICE)[..., idx.to(DEVICE)]
    images = naive_sample(model64, u, likelihood=likelihood, levels=levels, shape=shape, max_steps=steps,
                          feed_table=feed_table(None, likelihood, levels, torch.float64, DEVICE))
    if likelihood == "logistic-mixture":  # compared exactly (module docstring): no margins
        return images.cpu(), None
    # the logits every prefix step saw: one forward pass on the finished prefix (the model is causal)
    with torch.no_grad():
        logits = model64(model64.feed(images)).cpu()
    u = u.cpu().permute(3, 2, 0, 1)  # [m, C, H, W]
    if likelihood == "bernoulli":
        margins = (u - torch.sigmoid(logits)).abs()
    else:
        m, c, h, w = images.shape
        cdf = torch.softmax(logits.view(m, c, levels, h, w), dim=2).cumsum(2)[:, :, :-1]
        margins = (cdf - u[:, :, None]).abs().amin(2)
    return images.cpu(), margins


def compare_samples(got, spec, batch, steps):
    """(number of checked images that differ from the float64 naive run at a draw
    that was not a near tie, number of near-tie flips). A near tie: the first
    differing draw of an image took a neighbouring value and its uniform lay
    within near_tie(spec) of a float64 decision boundary."""
    shape = spec[1]
    want, margins = reference(spec, batch, steps)
    got = got.cpu()[check_elements(batch)]
    mask = prefix_mask(shape, steps)
    c, h, w = shape
    order = torch.arange(h * w * c).view(h, w, c).permute(2, 0, 1)
    wrong = ties = 0
    for i in range(got.shape[0]):
        diff = (got[i] != want[i]) & mask
        if not diff.any():
            continue
        first = torch.where(diff, order, h * w * c).flatten().argmin()  # the first differing draw
        step = (got[i].flatten()[first] - want[i].flatten()[first]).abs().item()
        if margins is not None and step == 1 and margins[i].flatten()[first] < near_tie(spec):
            ties += 1
        else:
            wrong += 1
    return wrong, ties


def rss_step(spec):
    """peak_rss builder (harness.peak_rss): one naive prefix or one cached run."""
    model_spec = (spec["kind"], tuple(spec["image_shape"]), spec["channels"], spec["depth"], spec["likelihood"],
                  spec["levels"])
    model = build_model(model_spec, device="cpu")
    batch, shape, likelihood, levels = spec["shape"][0], model_spec[1], model_spec[4], model_spec[5]
    if spec["contender"] == "common":
        u = uniforms(batch, _draw_shape(likelihood, shape), SEED, "cpu")
        table = feed_table(None, likelihood, levels, torch.float32, "cpu")

        def step():
            naive_sample(model, u, likelihood=likelihood, levels=levels, shape=shape, feed_table=table,
                         max_steps=spec["naive_steps"])
    else:
        def step():
            sample(model, batch, seed=SEED, backend=spec["contender"][len("cached["):-1])
    return step, lambda: None


def _fail_or_xfail(record, bench_results, contender, status, msg):
    record["extra_info"]["status"] = status
    bench_results.append(record)
    if contender == "common":
        pytest.xfail(msg)
    pytest.fail(msg)


# a skipped or wrong contender is never timed: that is the point, not a forgotten fixture
@pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")
def test_sampling(benchmark, smoke, bench_results, case):
    spec, batch, contender = case
    _, shape, _, _, likelihood, levels = spec
    c, h, w = shape
    total = c * h * w
    group = f"{DEVICE} float32 {model_id(spec)} batch {batch} sample"
    record = start_record(benchmark, group, contender, dtype="float32", model=model_id(spec), batch=batch,
                          mode="sample")
    model, model64 = models(spec)
    mixture = likelihood == "logistic-mixture"

    if contender == "common":
        steps = total // 2 if smoke else min(NAIVE_STEPS[DEVICE][batch], total)
        if mixture:  # one forward pass draws a whole pixel: time whole pixels
            steps = -(-steps // c) * c
        u = uniforms(batch, _draw_shape(likelihood, shape), SEED, DEVICE)
        table = feed_table(None, likelihood, levels, torch.float32, DEVICE)
        benchmark.extra_info.update(
            backend=f"naive ({steps}/{total} steps, extrapolated)" if steps < total else "naive",
            extrapolated=steps < total, timed_steps=steps, total_steps=total)

        def run():
            out = naive_sample(model, u, likelihood=likelihood, levels=levels, shape=shape, feed_table=table,
                               max_steps=steps)
            sync()
            return out
    else:
        backend = contender[len("cached["):-1]
        why = OP.reason(backend)
        if backend == "cpp" and DEVICE != "cpu":
            why = "the C++ engine runs CPU models"
        if backend == "cuda" and DEVICE != "cuda":
            why = "the CUDA engine runs CUDA models"
        ref_max = REF_MAX_BATCH[DEVICE].get(spec[0], batch)
        if backend == "ref" and batch > ref_max:
            why = f"the torch executor is timed up to batch {ref_max} on this model (minutes per batch)"
        if why:
            pytest.skip(f"backend {backend}: {why}")
        steps = total
        benchmark.extra_info["backend"] = backend
        err, tol = logits_check(spec, backend)
        benchmark.extra_info["logits_rel_error"] = err
        if not err <= tol:
            _fail_or_xfail(record, bench_results, contender, "WRONG",
                           f"{contender} is WRONG on {model_id(spec)}: teacher-forced logits rel. error {err:.3g} "
                           f"> tol {tol:.3g}")

        def run():
            out = sample(model, batch, seed=SEED, backend=backend)
            sync()
            return out

    # the first run: warm-up and the check against the float64 naive run
    t0 = time.perf_counter()
    try:
        got = run()
    except Exception as e:  # noqa: BLE001
        if contender != "common":
            record["extra_info"]["status"] = "error"
            bench_results.append(record)
            raise
        _fail_or_xfail(record, bench_results, contender, "error",
                       f"{contender} cannot run this case: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    first_s = time.perf_counter() - t0
    check_steps = min(steps, total // 2 if smoke else NAIVE_STEPS[DEVICE][batch])
    if mixture:
        check_steps = -(-check_steps // c) * c
    unchecked = mixture and contender == "common"  # naive float32 sampling of a mixture: the reference's own code
    if mixture and contender != "common":  # the engine on the float64 model, exactly (module docstring)
        got = sample(model64, batch, seed=SEED, backend=backend)
    wrong, ties = (0, 0) if unchecked else compare_samples(got, spec, batch, check_steps)
    benchmark.extra_info.update(checked_images=0 if unchecked else len(check_elements(batch)),
                                checked_steps=check_steps, near_tie_flips=ties)
    if wrong:
        _fail_or_xfail(record, bench_results, contender, "WRONG",
                       f"{contender} is WRONG on {group}: {wrong} of {len(check_elements(batch))} checked images "
                       f"differ from the float64 naive run in the first {check_steps} steps (not at a near tie)")

    rounds = 3 if contender == "common" else max(3, min(10, int(3.0 / max(first_s, 1e-3))))
    with OtherLoad() as load:
        benchmark.pedantic(run, rounds=rounds, iterations=1)
    if benchmark.disabled or benchmark.stats is None:
        return
    if contender == "common" and steps < total:
        extrapolate(benchmark, steps, total)  # every step is the same full forward pass
    median = record_timing(benchmark, record, bench_results, load, run)
    info = benchmark.extra_info
    info["seconds_per_batch"] = median
    info["images_per_s"] = round(batch / median, 3)
    if contender != "common" and "speedup_vs_common" in info:
        info["speedup_vs_naive"] = info["speedup_vs_common"]
        target = TARGETS.get((DEVICE, h), {}).get(batch)
        if target and backend == OP.choose(None, DEVICE):  # the targets are the default engine's
            info["target_vs_naive"] = target
            info["meets_target"] = info["speedup_vs_naive"] >= target
    if DEVICE == "cpu" and not smoke and batch == max(BATCHES) and contender in ("common", "cached[cpp]"):
        kind, _, channels, depth, _, _ = spec
        record_peak_rss(info, contender, (batch,), "sample", steps=1, builder="bench_sampling:rss_step", kind=kind,
                        image_shape=list(shape), channels=channels, depth=depth, likelihood=likelihood,
                        levels=levels, naive_steps=1)
    bench_results.append(record)
