"""Command line: ``python -m fastgen demo | backends``.

``demo`` trains a small PixelCNN made of fastgen.MaskedConv2d layers on real
MNIST (256-way categorical per pixel), reports the loss in nats and bits/dim,
evaluates bits/dim on test images, and times training steps of the same
network against the common mask-buffer implementation with identical weights.
``backends`` prints what is built and usable, and why anything is not.
"""
import argparse
import copy
import functools
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

LEVELS = 256  # 8-bit pixels: a 256-way categorical per pixel


# ---- the demo's PixelCNN (the proper fastgen.models package comes later) ----------------------------------

def fastgen_layer(mask_type, in_channels, out_channels, kernel_size, padding, backend=None):
    from fastgen import MaskedConv2d
    return MaskedConv2d(mask_type, in_channels, out_channels, kernel_size, 1, padding, backend=backend)


def common_layer(mask_type, in_channels, out_channels, kernel_size, padding):
    from fastgen.testing import MaskBufferConv2d
    return MaskBufferConv2d(mask_type, in_channels, out_channels, kernel_size, 1, padding)


class PixelCNN(nn.Module):
    """PixelCNN for 1-channel images: 7x7 mask-A input layer, residual 3x3
    mask-B blocks (``h + conv(relu(h))``), a 1x1 mask-B head and 256-way
    logits per pixel laid out [B, 256, H, W]. ``layer`` builds each masked
    conv: fastgen's (default) or the common mask-buffer one."""

    def __init__(self, channels=64, blocks=5, levels=LEVELS, layer=fastgen_layer):
        super().__init__()
        self.levels = levels
        self.input = layer("A", 1, channels, 7, 3)
        self.blocks = nn.ModuleList(layer("B", channels, channels, 3, 1) for _ in range(blocks))
        self.hidden = layer("B", channels, channels, 1, 0)
        self.logits = layer("B", channels, levels, 1, 0)

    def forward(self, images):
        """``images``: uint8 (or integer-valued) [B, 1, H, W] in 0..levels-1 -> logits [B, levels, H, W]."""
        h = self.input(images.float() * (2.0 / (self.levels - 1)) - 1.0)
        for conv in self.blocks:
            h = h + conv(F.relu(h))
        return self.logits(F.relu(self.hidden(F.relu(h))))

    def loss(self, images):
        """Mean negative log-likelihood per pixel, in nats."""
        return F.cross_entropy(self(images), images[:, 0].long())


def bits(nats):
    return nats / math.log(2)


# ---- demo ---------------------------------------------------------------------------------------------------

def _chosen_backends(model, batch, hw=28):
    """{layer: backend fastgen's dispatch chose for it} for a [batch, C, hw, hw] input."""
    from fastgen import MaskedConv2d
    from fastgen.ops.masked_conv import OP, make_call
    chosen = {}
    for name, m in model.named_modules():
        if isinstance(m, MaskedConv2d):
            x = torch.empty(batch, m.in_channels, hw, hw, dtype=m.weight.dtype)
            call = make_call(x, m.weight, m.bias, m.mask_type, m.data_channels, m.padding, m.dilation)
            chosen[name] = OP.choose(call, "cpu", m.backend)
    return chosen


def _describe_backends(model, chosen):
    """'halfconv: input (7x7A 1->64), blocks.0-4 (3x3B 64->64), ...' grouped by layer shape."""
    groups = {}
    for name, m in model.named_modules():
        if name in chosen:
            k = f"{m.kernel_size[0]}x{m.kernel_size[1]}{m.mask_type} {m.in_channels}->{m.out_channels}"
            groups.setdefault((chosen[name], k), []).append(name)
    return "; ".join(f"{k}: {b} (x{len(names)})" if len(names) > 1 else f"{k}: {b}"
                     for (b, k), names in groups.items())


def _time_training(models, batches, steps, lr, chunk=4):
    """Median seconds per training step (forward, backward, Adam) of each model,
    interleaved in chunks so that both see the same machine noise."""
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
        dt = time.perf_counter() - t0
        if record:
            times[name].append(dt)
        first_loss.setdefault(name, loss.item())

    for name in models:  # warm-up, same batch: the losses must agree
        one(name, batches[0], False)
    i = 1
    while min(len(t) for t in times.values()) < steps:
        for name in models:
            for j in range(chunk):
                one(name, batches[(i + j) % len(batches)], True)
        i += chunk
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}, first_loss


def run_demo(steps=300, batch=32, seed=0, out="demo_out", channels=64, blocks=5, lr=2e-3, log_every=25,
             eval_batches=8, compare_steps=24, backend=None):
    import fastgen
    from fastgen.data import load_mnist
    from fastgen.testing import OtherLoad

    torch.manual_seed(seed)
    t_start = time.perf_counter()
    train_x, _ = load_mnist("train")
    test_x, _ = load_mnist("test")
    print(f"MNIST: {len(train_x)} train, {len(test_x)} test images, 28x28, 256 levels | torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    model = PixelCNN(channels, blocks, layer=functools.partial(fastgen_layer, backend=backend))
    chosen = _chosen_backends(model, batch)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"PixelCNN: 7x7 mask A -> {blocks} residual 3x3 mask B blocks -> 1x1 mask B head -> 256-way logits; "
          f"{channels} channels, {n_params / 1e3:.0f}k parameters")
    print(f"fastgen {'backend (forced)' if backend else 'dispatch chose'}: {_describe_backends(model, chosen)}")

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    curve, window = [], []
    print(f"training {steps} steps, batch {batch}, Adam lr {lr} (one-cycle)")
    t_train = time.perf_counter()
    with OtherLoad() as train_load:
        for step in range(1, steps + 1):
            images = train_x[torch.randint(len(train_x), (batch,), generator=gen)]
            opt.zero_grad(set_to_none=True)
            loss = model.loss(images)
            loss.backward()
            opt.step()
            sched.step()
            window.append(loss.item())
            if step % log_every == 0 or step == steps:
                nats = sum(window) / len(window)
                elapsed = time.perf_counter() - t_train
                curve.append({"step": step, "nats": round(nats, 4), "bits_per_dim": round(bits(nats), 4),
                              "elapsed_s": round(elapsed, 1)})
                print(f"  step {step:4d}  loss {nats:.4f} nats/dim  {bits(nats):.4f} bits/dim  "
                      f"({elapsed:.0f} s, {step / elapsed:.2f} steps/s)")
                window = []
    train_s = time.perf_counter() - t_train
    if train_load.fraction is not None and train_load.fraction > 0.05:
        print(f"  note: other processes used {train_load.fraction:.0%} of the CPU during training: "
              f"its speed above is not this machine's")

    model.eval()
    eval_batch = 64
    n_eval = min(eval_batches * eval_batch, len(test_x))
    with torch.no_grad():
        total = sum(F.cross_entropy(model(test_x[i:i + eval_batch]), test_x[i:i + eval_batch, 0].long(),
                                    reduction="sum").item() for i in range(0, n_eval, eval_batch))
    test_nats = total / (n_eval * 28 * 28)
    print(f"test: {bits(test_nats):.4f} bits/dim ({test_nats:.4f} nats/dim) on {n_eval} test images")
    model.train()

    speed = None
    if compare_steps > 0:
        # the same network with the common masked conv (weight.data *= mask, then the full conv), same weights
        timed = {"fastgen": copy.deepcopy(model), "common": PixelCNN(channels, blocks, layer=common_layer)}
        missing, unexpected = timed["common"].load_state_dict(model.state_dict(), strict=False)
        assert not unexpected and all(k.endswith(".mask") for k in missing), (missing, unexpected)
        batches = [train_x[torch.randint(len(train_x), (batch,), generator=gen)] for _ in range(8)]
        print(f"timing {compare_steps} training steps each (batch {batch}), fastgen vs common, identical weights ...")
        with OtherLoad() as load:
            med, first_loss = _time_training(timed, batches, compare_steps, lr)
        speed = {name: {"ms_per_step": round(s * 1e3, 1), "steps_per_s": round(1 / s, 2),
                        "images_per_s": round(batch / s, 1)} for name, s in med.items()}
        speed["speedup"] = round(med["common"] / med["fastgen"], 3)
        speed["first_step_loss_diff"] = abs(first_loss["fastgen"] - first_loss["common"])
        speed["other_load"] = None if load.fraction is None else round(load.fraction, 3)
        for name in ("fastgen", "common"):
            s = speed[name]
            label = "fastgen.MaskedConv2d" if name == "fastgen" else "common (weight.data *= mask; conv2d)"
            print(f"  {label:38s} {s['ms_per_step']:7.1f} ms/step  {s['steps_per_s']:6.2f} steps/s  "
                  f"{s['images_per_s']:7.1f} images/s")
        print(f"  speedup {speed['speedup']:.2f}x (median step); same weights, same batch: losses differ by "
              f"{speed['first_step_loss_diff']:.1e}")
        if load.fraction is not None and load.fraction > 0.05:
            print(f"  note: other processes used {load.fraction:.0%} of the CPU meanwhile; these timings are noisy")

    total_s = time.perf_counter() - t_start
    summary = {
        "config": {"steps": steps, "batch": batch, "seed": seed, "channels": channels, "blocks": blocks, "lr": lr,
                   "backend": backend or "dispatch", "parameters": n_params, "eval_images": n_eval},
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine(), "fastgen": fastgen.__version__},
        "backends": chosen,
        "curve": curve,
        "final_train_bits_per_dim": curve[-1]["bits_per_dim"] if curve else None,
        "test_bits_per_dim": round(bits(test_nats), 4),
        "train_s": round(train_s, 1),
        "train_steps_per_s": round(steps / train_s, 2) if train_s > 0 else None,
        "train_other_load": None if train_load.fraction is None else round(train_load.fraction, 3),
        "speed": speed,
        "total_s": round(total_s, 1),
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    torch.save(model.state_dict(), os.path.join(out, "pixelcnn.pt"))
    print(f"done in {total_s:.0f} s; wrote {os.path.join(out, 'summary.json')} and pixelcnn.pt")
    return summary


# ---- backends -----------------------------------------------------------------------------------------------

def format_backends(info=None):
    import fastgen
    from fastgen._dispatch import OPS
    info = info or fastgen.backends()
    lines = []

    def table(title, rows):
        width = max(len(r[0]) for r in rows)
        lines.append(title)
        for name, why in rows:
            lines.append(f"  {name.ljust(width)}  {'yes' if why is None else 'no: ' + why}")

    table("extension / runtime", list(info["extension"].items()))
    for op, status in info["ops"].items():
        pref = getattr(OPS.get(op), "preference", {})
        order = "; ".join(f"{dev}: {' > '.join(names)}" for dev, names in pref.items())
        table(f"op {op}  (dispatch order {order})" if order else f"op {op}", list(status.items()))
    env = os.environ.get("FASTGEN_BACKEND")
    lines.append(f"FASTGEN_BACKEND={env}" if env else "FASTGEN_BACKEND is not set (dispatch picks per call)")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastgen", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small PixelCNN on MNIST; compare speed with the common layer")
    demo.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    demo.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="demo_out", help="folder for summary.json and the weights (default demo_out/)")
    demo.add_argument("--channels", type=int, default=64)
    demo.add_argument("--blocks", type=int, default=5, help="residual 3x3 mask-B blocks (default 5)")
    demo.add_argument("--lr", type=float, default=2e-3)
    demo.add_argument("--compare-steps", type=int, default=24,
                      help="timed training steps per implementation in the speed comparison (0: skip)")
    demo.add_argument("--backend", default=None,
                      help="force one fastgen backend (see `python -m fastgen backends`); default: dispatch")
    sub.add_parser("backends", help="what is built and usable, and why anything is not")
    args = parser.parse_args(argv)

    if args.command == "backends":
        print(format_backends())
        return 0
    if args.steps < 1 or args.batch < 1:
        parser.error("--steps and --batch must be >= 1")
    from fastgen import BackendError
    from fastgen.data import DatasetMissingError
    try:
        run_demo(steps=args.steps, batch=args.batch, seed=args.seed, out=args.out, channels=args.channels,
                 blocks=args.blocks, lr=args.lr, compare_steps=args.compare_steps, backend=args.backend)
    except (DatasetMissingError, BackendError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
