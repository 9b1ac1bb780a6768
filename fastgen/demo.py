"""``python -m fastgen demo``: a small Gated PixelCNN trained on binarized MNIST on the CPU, its test NLL and
samples, cached sampling timed against naive sampling, and training steps timed against the same network
written in plain PyTorch with identical weights; and what the demo needs for that: the plain-PyTorch Gated
PixelCNN (:func:`plain_gated_pixelcnn`, also the gated benchmarks' baseline) and :class:`OtherLoad` (how much
CPU other processes took while a timing ran)."""
import copy
import json
import math
import os
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.ref.gated import split_gate
from fastgen.ref.masked_conv import centre_channel_mask
from fastgen.ref.masked_conv import masked_conv2d as ref_masked_conv2d
from fastgen.sampling.api import engine_backend
from fastgen.train import TrainConfig, load_model, train
from fastgen.train.pixel import PixelOptions


class RefMaskedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose forward is fastgen's reference masked conv
    (``conv2d(x, weight * mask)``); the torch.compile contender compiles this."""

    def __init__(self, mask_type, *args, data_channels=1, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask_type, self.data_channels = mask_type, data_channels

    def forward(self, x):
        return ref_masked_conv2d(x, self.weight, self.bias, self.mask_type, self.data_channels, self.padding,
                                 self.dilation)



# ---- the plain-PyTorch Gated PixelCNN (the baseline of the gated benchmarks and the demo) -----------------

class PlainGatedMaskedConv2d(nn.Module):
    """The Gated PixelCNN layer as it is commonly written in PyTorch: padded
    convolutions cropped to the causal window, the mask-A pixel hidden by
    ``weight * mask``, ``chunk`` and ``tanh * sigmoid``. Same math and parameter
    names as fastgen.GatedMaskedConv2d (its state_dict loads; the mask is a buffer)."""

    def __init__(self, in_channels, channels, kernel_size=3, mask_type="B", data_channels=1, num_classes=None,
                 residual=None, last=False):
        super().__init__()
        k, half = kernel_size, kernel_size // 2 + 1
        self.channels, self.mask_type, self.data_channels = channels, mask_type, data_channels
        self.residual = mask_type == "B" and in_channels == channels if residual is None else residual
        self.v_conv = nn.Conv2d(in_channels, 2 * channels, (half, k), padding=(k // 2, k // 2))
        self.h_conv = nn.Conv2d(in_channels, 2 * channels, (1, half), padding=(0, k // 2))
        mask = torch.ones_like(self.h_conv.weight)
        mask[:, :, 0, -1] = centre_channel_mask(2 * channels, in_channels, mask_type, data_channels)
        self.register_buffer("h_mask", mask)
        self.link = nn.Conv2d(2 * channels, 2 * channels, 1, bias=False)
        self.last = last
        if not last:
            self.res = RefMaskedConv2d("B", channels, channels, 1, data_channels=data_channels)
        self.skip = RefMaskedConv2d("B", channels, channels, 1, data_channels=data_channels)
        if num_classes is not None:
            if not last:
                self.label_v = nn.Embedding(num_classes, 2 * channels)
            self.label_h = nn.Embedding(num_classes, 2 * channels)

    def gate(self, x):
        if self.data_channels == 1:
            f, g = x.chunk(2, dim=1)
        else:
            f, g = split_gate(x, self.data_channels)
        return torch.tanh(f) * torch.sigmoid(g)

    def forward(self, v, h=None, label=None):
        h = v if h is None else h
        height, width = v.shape[2:]
        v_pre = self.v_conv(v)[:, :, :height]
        h_pre = F.conv2d(h, self.h_conv.weight * self.h_mask, self.h_conv.bias, padding=self.h_conv.padding)
        h_pre = h_pre[:, :, :, :width]
        shifted = F.pad(v_pre, (0, 0, 1, 0))[:, :, :height]
        h_pre = h_pre + self.link(shifted)
        if label is not None:
            h_pre = h_pre + self.label_h(label)[:, :, None, None]
        gated = self.gate(h_pre)
        if self.last:
            return None, None, self.skip(gated)
        if label is not None:
            v_pre = v_pre + self.label_v(label)[:, :, None, None]
        h_out = self.res(gated)
        if self.residual:
            h_out = h_out + h
        return self.gate(v_pre), h_out, self.skip(gated)


def plain_gated_pixelcnn(model):
    """A copy of a fastgen.models.GatedPixelCNN written in plain PyTorch
    (:class:`PlainGatedMaskedConv2d`, mask-multiply 1x1 convolutions), with
    identical weights: the baseline of the gated benchmarks and the demo."""
    from fastgen.models import GatedPixelCNN
    plain = copy.deepcopy(model)
    dc = model.data_channels
    for i, layer in enumerate(model.layers):
        plain.layers[i] = PlainGatedMaskedConv2d(layer.in_channels, layer.channels, layer.kernel_size,
                                                 layer.mask_type, dc, layer.num_classes, layer.residual, layer.last)
    for i, m in enumerate(model.head):
        if isinstance(m, nn.Conv2d):
            plain.head[i] = RefMaskedConv2d("B", m.in_channels, m.out_channels, 1, data_channels=dc)
    plain = plain.to(next(model.parameters()))
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or not all(k.endswith("h_mask") for k in missing):
        raise RuntimeError(f"plain_gated_pixelcnn: state_dict mismatch: missing {missing}, unexpected {unexpected}")
    assert isinstance(plain, GatedPixelCNN)
    return plain


# ---- how much of the machine others used while we measured ----------------------------------------------

def _proc_stat_busy():
    """(busy, total) clock ticks of all CPUs since boot; busy counts steal time too."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def _self_ticks():
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, all threads


class OtherLoad:
    """``with OtherLoad() as m: ...`` then ``m.fraction``: the share of the
    machine's CPU time that other processes (and the hypervisor, as steal)
    used meanwhile; 0 on a quiet machine. None where /proc is missing.
    Timings taken while it is above a few percent are not to be trusted."""

    fraction = None

    def __enter__(self):
        try:
            self._start = (_proc_stat_busy(), _self_ticks())
        except (OSError, ValueError, IndexError):
            self._start = None
        return self

    def __exit__(self, *exc):
        if self._start is None:
            return False
        try:
            (busy1, total1), me1 = _proc_stat_busy(), _self_ticks()
        except (OSError, ValueError, IndexError):
            return False
        (busy0, total0), me0 = self._start
        if total1 > total0:
            self.fraction = max(0.0, ((busy1 - busy0) - (me1 - me0)) / (total1 - total0))
        return False


# ---- the demo ------------------------------------------------------------------------------------------

def _time_training(models, batches, steps, lr, chunk=4):
    """Median seconds per training step (forward, backward, Adam) of each model,
    interleaved in chunks so that both see the same machine noise; and each
    model's loss on the first (shared) batch."""
    opts = {name: torch.optim.Adam(m.parameters(), lr=lr) for name, m in models.items()}
    times = {name: [] for name in models}
    first_loss = {}

    def one(name, images, record):
        m, opt = models[name], opts[name]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = m.loss(images)
        loss.backward()
        opt.step()
        if record:
            times[name].append(time.perf_counter() - t0)
        first_loss.setdefault(name, loss.item())

    for name in models:  # warm-up on the same batch: the losses must agree
        one(name, batches[0], False)
    i = 1
    while min(len(t) for t in times.values()) < steps:
        for name in models:
            for j in range(chunk):
                one(name, batches[(i + j) % len(batches)], True)
        i += chunk
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}, first_loss


NAIVE_ROWS = 2  # the demo times naive sampling over this many image rows and extrapolates (it is that slow)


def _time_sampling(model, n, seed, backend=None):
    """Seconds of cached sampling of ``n`` whole images, and of naive sampling
    of the same images over the first NAIVE_ROWS rows' pixel steps, from the
    same uniforms (fastgen.sample's); and how many values of the naive prefix
    differ from the cached images (none should: same seed, same pixels)."""
    from fastgen.sampling.common import feed_table, uniforms
    from fastgen.sampling.naive import naive_sample
    c, h, w = model.image_shape
    total = c * h * w
    prefix = min(total, NAIVE_ROWS * w * c)
    param = next(model.parameters())
    t0 = time.perf_counter()
    cached = model.sample(n, seed=seed, method="cached", backend=engine_backend(backend))
    cached_s = time.perf_counter() - t0

    u = uniforms(n, (c, h, w), seed, param.device)
    table = feed_table(None, model.likelihood, model.levels, param.dtype, param.device)
    t0 = time.perf_counter()
    naive = naive_sample(model.eval(), u, likelihood=model.likelihood, levels=model.levels, shape=(c, h, w),
                         feed_table=table, max_steps=prefix)
    naive_prefix_s = time.perf_counter() - t0
    # the steps run in (row, column, colour) order: the first `prefix` of them, as a [C, H, W] mask
    done = (torch.arange(total).view(h, w, c) < prefix).permute(2, 0, 1)
    mismatches = int((naive[:, done] != cached[:, done]).sum())
    return {"images": n, "cached_s": round(cached_s, 3), "cached_images_per_s": round(n / cached_s, 1),
            "naive_prefix_s": round(naive_prefix_s, 3), "naive_steps_timed": prefix, "pixel_steps": total,
            "naive_s_extrapolated": round(naive_prefix_s * total / prefix, 3),
            "speedup": round(naive_prefix_s * total / prefix / cached_s, 1),
            "prefix_mismatches": mismatches}


DEMO_DESCRIPTION = ("Train a small Gated PixelCNN on binarized MNIST on the CPU, evaluate it on the first "
                    "--test-images images of the fixed test binarization, write a grid of samples, time cached "
                    "sampling of --sample-batch images against naive sampling (extrapolated from the first rows), "
                    "then time training steps of fastgen's model against the same network in plain PyTorch.")


def run_demo(steps: int = 800, batch: int = 32, channels: int = 32, layers: int = 5, lr: float = 2e-3,
             test_images: int = 10000, samples: int = 36, compare_steps: int = 12, out: str = "demo_out",
             seed: int = 0, backend: Optional[str] = None, quiet: bool = False, sample_batch: int = 16,
             force: bool = False) -> dict:
    """The demo (see DEMO_DESCRIPTION); the arguments are the demo command's
    options. Returns the training summary with the demo's timings added."""
    t0 = time.perf_counter()
    print(f"fastgen demo: a Gated PixelCNN on binarized MNIST, CPU, {torch.get_num_threads()} threads")
    cfg = TrainConfig(model="gated-pixelcnn", data="binarized-mnist", steps=steps, batch=batch, channels=channels,
                      lr=lr, seed=seed, out=out, eval_batches=math.ceil(test_images / batch),
                      samples=samples, backend=backend, device="cpu", amp=False, ckpt_every=0,
                      log_every=25, quiet=quiet, force=force, options=PixelOptions(depth=layers))
    with OtherLoad() as load:
        summary = train(cfg)
    if summary["stopped_by"]:  # interrupted: the checkpoint is saved, the timings are skipped
        return summary
    if load.fraction is not None and load.fraction > 0.05:
        print(f"note: other processes used {load.fraction:.0%} of the CPU meanwhile: the times above are not "
              f"this machine's")

    sampling = None
    if sample_batch > 0:
        model = load_model(out, backend=backend)
        with OtherLoad() as load:
            sampling = _time_sampling(model, sample_batch, seed, backend)
        sampling["other_load"] = None if load.fraction is None else round(load.fraction, 3)
        print(f"sampling {sample_batch} images: cached {sampling['cached_s']:.2f} s "
              f"({sampling['cached_images_per_s']:.0f} images/s), naive ~{sampling['naive_s_extrapolated']:.0f} s "
              f"(extrapolated from {sampling['naive_steps_timed']} of {sampling['pixel_steps']} pixel steps) "
              f"-> {sampling['speedup']:.0f}x")
        if sampling["prefix_mismatches"]:
            print(f"warning: naive and cached sampling differ on {sampling['prefix_mismatches']} of the "
                  f"{sample_batch * sampling['naive_steps_timed']} values both drew (same seed: they should agree)")
        if load.fraction is not None and load.fraction > 0.05:
            print(f"note: other processes used {load.fraction:.0%} of the CPU during the timing: it is noisy")
    summary["demo_sampling"] = sampling

    speed = None
    if compare_steps > 0:
        from fastgen.data import load_dataset
        model = load_model(out, backend=backend).train()
        timed = {"fastgen": model, "plain": plain_gated_pixelcnn(model).train()}
        data = load_dataset("binarized-mnist", "train")
        gen = torch.Generator().manual_seed(seed)
        batches = [data.draw(torch.randint(len(data), (batch,), generator=gen), gen) for _ in range(8)]
        with OtherLoad() as load:
            med, first = _time_training(timed, batches, compare_steps, lr)
        speed = {name: {"ms_per_step": round(s * 1e3, 1), "images_per_s": round(batch / s, 1)}
                 for name, s in med.items()}
        speed.update(speedup=round(med["plain"] / med["fastgen"], 3),
                     first_step_loss_diff=abs(first["fastgen"] - first["plain"]),
                     steps_timed=compare_steps,
                     other_load=None if load.fraction is None else round(load.fraction, 3))
        print(f"training step, batch {batch}, median of {compare_steps}: fastgen {med['fastgen'] * 1e3:.0f} ms, "
              f"plain PyTorch {med['plain'] * 1e3:.0f} ms -> {speed['speedup']:.2f}x "
              f"(identical weights; losses differ by {speed['first_step_loss_diff']:.1e})")
        if load.fraction is not None and load.fraction > 0.05:
            print(f"note: other processes used {load.fraction:.0%} of the CPU during the timing: it is noisy")
    summary["demo_speed"] = speed
    summary["demo_total_s"] = round(time.perf_counter() - t0, 1)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"demo done in {summary['demo_total_s']:.0f} s: test NLL {summary['test_nats']:.2f} nats/image on "
          f"{summary['test_images']} test images (fixed binarization); samples in {os.path.join(out, 'samples.png')}")
    return summary
