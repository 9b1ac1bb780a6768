"""Command line: ``python -m fastgen train | demo | backends``.

``train`` trains a PixelCNN or Gated PixelCNN on a dataset (see fastgen.train);
under torchrun it trains data-parallel.
``demo`` trains a small Gated PixelCNN on binarized MNIST on the CPU, reports
the test NLL in nats, writes a grid of samples, and times training steps of
fastgen's model against the same network in plain PyTorch with identical weights.
``backends`` prints what is built and usable, and why anything is not.
"""
import argparse
import json
import math
import os
import sys
import time

import torch

# ---- train ---------------------------------------------------------------------------------------------------------


def add_train_parser(sub):
    from fastgen.data import DATASETS
    from fastgen.train import DEFAULTS, MODELS
    p = sub.add_parser(
        "train", help="train a PixelCNN / Gated PixelCNN (data-parallel under torchrun)",
        description="Train a PixelCNN or Gated PixelCNN. Writes OUT/checkpoint.pt, metrics.jsonl, summary.json and "
                    "samples.png. Data-parallel when launched by torchrun "
                    "(`torchrun --nproc_per_node N -m fastgen train ...`). With --resume, options left out are "
                    "taken from the checkpoint.")
    p.add_argument("model", choices=list(MODELS))
    p.add_argument("--data", choices=list(DATASETS), help="dataset (required unless --resume)")
    p.add_argument("--root", help="data location: the cifar-10-batches-py folder (cifar10); an .npz, IDX file or "
                                  "folder, or a folder of PNGs (files); optional for fashion-mnist")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="total optimizer steps")
    length.add_argument("--epochs", type=float, help="total epochs (default 1)")
    p.add_argument("--batch", type=int, help=f"images per step and process (default {DEFAULTS['batch']})")
    p.add_argument("--lr", type=float, help=f"Adam peak learning rate, linear warm-up then cosine decay "
                                            f"(default {DEFAULTS['lr']:g})")
    p.add_argument("--channels", type=int, help=f"feature maps (default {DEFAULTS['channels']})")
    p.add_argument("--layers", "--blocks", dest="depth", type=int,
                   help="gated layers (gated-pixelcnn, default 8) or residual blocks (pixelcnn, default 7)")
    p.add_argument("--kernel-size", type=int, help=f"kernel of the masked / gated layers after the first "
                                                   f"(default {DEFAULTS['kernel_size']})")
    p.add_argument("--conditional", action="store_true", default=None,
                   help="class-conditional on the dataset's labels")
    p.add_argument("--seed", type=int,
                   help=f"seed of weights, data order and binarization (default {DEFAULTS['seed']})")
    p.add_argument("--out", default="train_out", help="output folder (default train_out/)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT from OUT/checkpoint.pt")
    p.add_argument("--eval-every", type=int, help="evaluate on the test split every N steps (default: at the end)")
    p.add_argument("--ckpt-every", type=int, help=f"checkpoint every N steps, and at the end "
                                                  f"(default {DEFAULTS['ckpt_every']}; 0: at the end only)")
    p.add_argument("--eval-batches", type=int, help="evaluate on this many test batches (default: the whole split)")
    p.add_argument("--samples", type=int, help=f"images in OUT/samples.png at the end "
                                               f"(default {DEFAULTS['samples']}; 0: none)")
    p.add_argument("--backend", help="force one fastgen backend (see `python -m fastgen backends`); default: dispatch")
    p.add_argument("--num-workers", type=int, help="DataLoader worker processes (default 0)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA, off for CPU)")
    p.add_argument("--max-minutes", type=float, help="end the run after this many minutes (evaluate, sample, save)")
    p.add_argument("--stop-at", type=int,
                   help="pause at this step: save a checkpoint and exit (continue with --resume)")
    p.add_argument("--log-every", type=int,
                   help=f"log the training loss every N steps (default {DEFAULTS['log_every']})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def train_command(args):
    from fastgen.train import TrainConfig, TrainError, train
    if args.data is None and not args.resume:
        raise TrainError("--data is required (unless --resume)")
    fields = {f: getattr(args, f) for f in TrainConfig.__dataclass_fields__ if hasattr(args, f)}
    train(TrainConfig(**fields))


# ---- demo ----------------------------------------------------------------------------------------------------------

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


def run_demo(steps=800, batch=32, channels=32, layers=5, lr=2e-3, test_images=10000, samples=36,
             compare_steps=12, out="demo_out", seed=0, backend=None, quiet=False):
    """Train a small Gated PixelCNN on binarized MNIST (CPU), evaluate on the
    first ``test_images`` images of the fixed test binarization, write
    samples, then time fastgen's model against the plain-PyTorch copy."""
    from fastgen.testing import OtherLoad, plain_gated_pixelcnn
    from fastgen.train import TrainConfig, load_model, train

    t0 = time.perf_counter()
    print(f"fastgen demo: a Gated PixelCNN on binarized MNIST, CPU, {torch.get_num_threads()} threads")
    cfg = TrainConfig(model="gated-pixelcnn", data="binarized-mnist", steps=steps, batch=batch, channels=channels,
                      depth=layers, lr=lr, seed=seed, out=out, eval_batches=math.ceil(test_images / batch),
                      samples=samples, backend=backend, device="cpu", amp=False, ckpt_every=0,
                      log_every=25, quiet=quiet)
    with OtherLoad() as load:
        summary = train(cfg)
    if load.fraction is not None and load.fraction > 0.05:
        print(f"note: other processes used {load.fraction:.0%} of the CPU meanwhile: the times above are not "
              f"this machine's")

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


# ---- backends ------------------------------------------------------------------------------------------------------

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


# ---- entry point ---------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastgen", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    demo = sub.add_parser("demo", help="train a small Gated PixelCNN on binarized MNIST (CPU, a few minutes)",
                          description=run_demo.__doc__)
    demo.add_argument("--steps", type=int, default=800, help="training steps (default 800)")
    demo.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    demo.add_argument("--channels", type=int, default=32, help="feature maps (default 32)")
    demo.add_argument("--layers", type=int, default=5, help="gated layers (default 5)")
    demo.add_argument("--lr", type=float, default=2e-3, help="Adam peak learning rate (default 2e-3)")
    demo.add_argument("--test-images", type=int, default=10000,
                      help="evaluate on the first N test images, rounded up to whole batches (default: all 10000)")
    demo.add_argument("--samples", type=int, default=36, help="images in the sample grid (default 36; 0: none)")
    demo.add_argument("--compare-steps", type=int, default=12,
                      help="timed training steps per implementation in the speed comparison (0: skip)")
    demo.add_argument("--out", default="demo_out", help="output folder (default demo_out/)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--backend", help="force one fastgen backend (see `python -m fastgen backends`)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    sub.add_parser("backends", help="what is built and usable, and why anything is not")
    args = parser.parse_args(argv)

    if args.command == "backends":
        print(format_backends())
        return 0
    from fastgen import BackendError
    from fastgen.data import DatasetMissingError
    from fastgen.train import TrainError
    try:
        if args.command == "train":
            train_command(args)
        else:
            if min(args.steps, args.batch, args.channels, args.layers, args.test_images) < 1:
                parser.error("--steps, --batch, --channels, --layers and --test-images must be >= 1")
            run_demo(steps=args.steps, batch=args.batch, channels=args.channels, layers=args.layers, lr=args.lr,
                     test_images=args.test_images, samples=args.samples, compare_steps=args.compare_steps,
                     out=args.out, seed=args.seed, backend=args.backend, quiet=args.quiet)
    except (TrainError, DatasetMissingError, BackendError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
