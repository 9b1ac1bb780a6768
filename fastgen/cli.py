"""Command line: ``python -m fastgen train | sample | demo | backends``.

``train`` trains a PixelCNN, Gated PixelCNN, PixelCNN++ or VAE on a dataset
(see fastgen.train); under torchrun it trains data-parallel.
``sample`` draws images from a trained checkpoint (cached or naive sampling
for the pixel models, the prior for a VAE) and writes them as a PNG or JPEG grid.
``demo`` trains a small Gated PixelCNN on binarized MNIST on the CPU, reports
the test NLL in nats, writes a grid of samples, times cached sampling against
naive sampling, and times training steps of fastgen's model against the same
network in plain PyTorch with identical weights.
``backends`` prints what is built and usable, and why anything is not.
"""
import argparse
import json
import math
import os
import signal
import sys
import time
from typing import List, Optional

import torch

# ---- train ---------------------------------------------------------------------------------------------------------


def add_train_parser(sub):
    from fastgen.data import DATASETS
    from fastgen.train import DEFAULTS, MODELS, PP_DEFAULTS, VAE_DEFAULTS
    p = sub.add_parser(
        "train", help="train a PixelCNN / Gated PixelCNN / PixelCNN++ / VAE (data-parallel under torchrun)",
        description="Train a PixelCNN, Gated PixelCNN, PixelCNN++ (pixelcnnpp) or VAE. Writes OUT/checkpoint.pt, "
                    "metrics.jsonl, summary.json and samples.png (a VAE also reconstructions.png and "
                    "interpolation.png). Data-parallel when "
                    "launched by torchrun (torchrun --nproc_per_node N -m fastgen train ...). With --resume, "
                    "options left out are taken from the checkpoint. Ctrl-C (SIGINT) or SIGTERM saves a "
                    "checkpoint at the current step; --resume continues it.")
    p.add_argument("model", choices=list(MODELS))
    p.add_argument("--data", choices=list(DATASETS), help="dataset (required unless --resume)")
    p.add_argument("--root", help="data location: the cifar-10-batches-py folder (cifar10); an .npz, IDX file or "
                                  "folder, or a folder of PNGs (files); optional for fashion-mnist")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="total optimizer steps")
    length.add_argument("--epochs", type=float, help="total epochs (default 1)")
    p.add_argument("--batch", type=int, help=f"images per step and process (default {DEFAULTS['batch']}; "
                                             f"vae {VAE_DEFAULTS['batch']})")
    p.add_argument("--lr", type=float, help=f"Adam peak learning rate, linear warm-up then cosine decay "
                                            f"(default {DEFAULTS['lr']:g})")
    p.add_argument("--channels", "--filters", dest="channels", type=int,
                   help=f"feature maps (default {DEFAULTS['channels']}; pixelcnnpp: nr_filters, default "
                        f"{PP_DEFAULTS['channels']}; vae: of the first convolution, the second has twice as many, "
                        f"default {VAE_DEFAULTS['channels']})")
    p.add_argument("--layers", "--blocks", "--nr-resnet", dest="depth", type=int,
                   help=f"gated layers (gated-pixelcnn, default 8), residual blocks (pixelcnn, default 7) or gated "
                        f"ResNet blocks per scale (pixelcnnpp's nr_resnet, default {PP_DEFAULTS['depth']}; "
                        f"the paper's is 5)")
    p.add_argument("--kernel-size", type=int, help=f"kernel of the masked / gated layers after the first "
                                                   f"(default {DEFAULTS['kernel_size']})")
    p.add_argument("--conditional", action="store_true", default=None,
                   help="class-conditional on the dataset's labels (pixel models)")
    p.add_argument("--nr-mix", type=int,
                   help=f"pixelcnnpp: logistic mixture components (default {PP_DEFAULTS['nr_mix']}; the paper's is 10)")
    p.add_argument("--dropout", type=float,
                   help=f"pixelcnnpp: dropout in the gated ResNet blocks (default {PP_DEFAULTS['dropout']:g}; the "
                        f"paper's is 0.5)")
    p.add_argument("--decoder", choices=("bernoulli", "gaussian"),
                   help="vae: p(x|z); bernoulli for binary data (binarized-mnist), gaussian: a discretized Gaussian "
                        "over the pixel levels (a true discrete likelihood); default: bernoulli for 2-level data, "
                        "else gaussian")
    p.add_argument("--latent", type=int, help=f"vae: latent dimensions (default {VAE_DEFAULTS['latent']})")
    p.add_argument("--iw-samples", type=int,
                   help=f"vae: importance samples per image of the test IW NLL at the end "
                        f"(default {VAE_DEFAULTS['iw_samples']}; 0: skip it)")
    p.add_argument("--iw-images", type=int,
                   help=f"vae: take the IW NLL on the first N test images (default {VAE_DEFAULTS['iw_images']}; "
                        f"the whole split if it is smaller)")
    p.add_argument("--seed", type=int,
                   help=f"seed of weights, data order, binarization and the VAE's latent draws "
                        f"(default {DEFAULTS['seed']})")
    p.add_argument("--out", default="train_out", help="output folder (default train_out/)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in OUT from OUT/checkpoint.pt")
    again.add_argument("--force", action="store_true",
                       help="replace the run already in OUT (its checkpoint, metrics, summary and images are "
                            "deleted); without it such a folder is refused")
    p.add_argument("--eval-every", type=int, help="evaluate on the test split every N steps (default: at the end)")
    p.add_argument("--ckpt-every", type=int, help=f"checkpoint every N steps, and at the end "
                                                  f"(default {DEFAULTS['ckpt_every']}; 0: at the end only)")
    p.add_argument("--eval-batches", type=int, help="evaluate on this many test batches (default: the whole split)")
    p.add_argument("--samples", type=int, help=f"images in OUT/samples.png at the end "
                                               f"(default {DEFAULTS['samples']}; 0: none, and a vae writes no PNGs)")
    p.add_argument("--backend", help="force one fastgen backend (see: python -m fastgen backends); default: dispatch")
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


def exit_code(summary: Optional[dict]) -> int:
    """The command's exit status for a run's summary: 128 + the signal number
    for a run interrupted (and saved) by SIGINT / SIGTERM, else 0."""
    stopped = (summary or {}).get("stopped_by")
    return 128 + int(signal.Signals[stopped]) if stopped in ("SIGINT", "SIGTERM") else 0


def train_command(args) -> int:
    from fastgen.train import TrainConfig, TrainError, train
    if args.data is None and not args.resume:
        raise TrainError("--data is required (unless --resume)")
    fields = {f: getattr(args, f) for f in TrainConfig.__dataclass_fields__ if hasattr(args, f)}
    return exit_code(train(TrainConfig(**fields)))


# ---- sample --------------------------------------------------------------------------------------------------------

class SampleError(ValueError):
    """A sampling job that cannot run as asked (bad argument, missing checkpoint)."""


def add_sample_parser(sub):
    from fastgen.sampling.api import METHODS
    p = sub.add_parser(
        "sample", help="draw images from a trained checkpoint into a PNG or JPEG grid",
        description="Draw images from a checkpoint of 'python -m fastgen train' and write them as an image grid "
                    "(PNG or JPEG, by the name of --out). A class-conditional model gives every image --label, or "
                    "else labels cycling through its classes (one class per column, as in train's samples.png).")
    p.add_argument("checkpoint", help="a checkpoint file, or a run folder holding checkpoint.pt")
    p.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    p.add_argument("--out", default="samples.png", help="image file of the grid: .png, or .jpg / .jpeg for JPEG "
                                                        "(default samples.png)")
    p.add_argument("--method", choices=METHODS,
                   help="pixel models: cached: each activation computed once (the default); naive: the whole "
                        "network per pixel")
    p.add_argument("--label", type=int, help="class of every image (class-conditional models only)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the draws, an int in [0, 2**63) (default 0): same seed, same images")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="softmax temperature (a VAE: the prior's standard deviation), > 0 (default 1)")
    p.add_argument("--backend", help="force one fastgen backend on each op that has it: the model's layers and "
                                     "the cached engine (cpp or ref); default: dispatch")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--nrow", type=int, help="images per row of the grid (default: square, or one class per column)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _engine_backend(backend):
    """``backend`` if the cached engine has it, else None (dispatch): like the
    layers, a forced name applies to each op that has it."""
    from fastgen.sampling.api import OP
    return backend if backend in OP.backends else None


def _sample_device(name):
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SampleError(f"--device must be cpu or cuda[:N], got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SampleError("--device cuda: no CUDA device is available")
    return device


def sample_command(args) -> int:
    from fastgen._seed import check_seed
    from fastgen.data import save_grid
    from fastgen.data.images import image_format
    from fastgen.models import VAE
    from fastgen.train import check_out, command_backend, grid_labels, load_model
    # every argument and the output path are checked before the (slower) model load and sampling
    if args.n < 1:
        raise SampleError(f"--n must be >= 1, got {args.n}")
    if not args.temperature > 0:
        raise SampleError(f"--temperature must be > 0, got {args.temperature}")
    if args.nrow is not None and args.nrow < 1:
        raise SampleError(f"--nrow must be >= 1, got {args.nrow}")
    try:
        check_seed(args.seed, "--seed")
    except ValueError as e:
        raise SampleError(str(e)) from None
    try:
        image_format(args.out)
    except ValueError as e:
        raise SampleError(f"--out {e}") from None
    command_backend(args.backend)
    check_out(args.out, folder=False)
    device = _sample_device(args.device)
    model = load_model(args.checkpoint, device=device, backend=args.backend)

    classes = model.num_classes
    if args.label is not None:
        if not classes:
            raise SampleError(f"--label {args.label}: the model in {args.checkpoint} is not class-conditional")
        if not 0 <= args.label < classes:
            raise SampleError(f"--label {args.label} is out of range: the model has {classes} classes "
                              f"(0..{classes - 1})")
        labels = torch.full((args.n,), args.label, dtype=torch.long, device=device)
        nrow = math.ceil(math.sqrt(args.n))
    else:
        labels, nrow = grid_labels(args.n, classes, device)

    vae = isinstance(model, VAE)
    if vae and args.method not in (None, "cached"):
        raise SampleError(f"--method {args.method} is for the pixel models: a VAE decodes prior draws in one pass")
    method = args.method or "cached"
    t0 = time.perf_counter()
    if vae:  # z ~ N(0, temperature^2 I), decoded to display images (0..255)
        images = model.sample(args.n, seed=args.seed, temperature=args.temperature)
    else:
        images = model.sample(args.n, labels, temperature=args.temperature, seed=args.seed, method=method,
                              backend=_engine_backend(args.backend), progress=not args.quiet)
    images = images.cpu()  # waits for a GPU to finish: the time is the whole sampling
    seconds = time.perf_counter() - t0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_grid(images, args.out, nrow=args.nrow or nrow, levels=256 if vae else model.levels)
    print(f"sampled {args.n} images ({'vae prior' if vae else method}) in {seconds:.2f} s: "
          f"{args.n / seconds:.1f} images/s; wrote {args.out}")
    return 0


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
    cached = model.sample(n, seed=seed, method="cached", backend=_engine_backend(backend))
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
    from fastgen.testing import OtherLoad, plain_gated_pixelcnn
    from fastgen.train import TrainConfig, load_model, train

    t0 = time.perf_counter()
    print(f"fastgen demo: a Gated PixelCNN on binarized MNIST, CPU, {torch.get_num_threads()} threads")
    cfg = TrainConfig(model="gated-pixelcnn", data="binarized-mnist", steps=steps, batch=batch, channels=channels,
                      depth=layers, lr=lr, seed=seed, out=out, eval_batches=math.ceil(test_images / batch),
                      samples=samples, backend=backend, device="cpu", amp=False, ckpt_every=0,
                      log_every=25, quiet=quiet, force=force)
    with OtherLoad() as load:
        summary = train(cfg)
    if exit_code(summary):  # interrupted: the checkpoint is saved, the timings are skipped
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


# ---- backends ------------------------------------------------------------------------------------------------------

def format_backends(info: Optional[dict] = None) -> str:
    """The ``backends`` command's report of ``fastgen.backends()``: one answer per backend and op on this machine."""
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
    lines.append(f"FASTGEN_BACKEND={env}: every op that has a backend of that name runs it" if env
                 else "FASTGEN_BACKEND is not set (dispatch picks per call)")
    return "\n".join(lines)


# ---- entry point ---------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    import fastgen
    parser = argparse.ArgumentParser(
        prog="python -m fastgen", description="fastgen's commands: train a model, sample a trained checkpoint, run "
                                              "the demo, or list the backends built here.")
    parser.add_argument("--version", action="version", version=f"fastgen {fastgen.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_sample_parser(sub)
    demo = sub.add_parser("demo", help="train a small Gated PixelCNN on binarized MNIST (CPU, a few minutes)",
                          description=DEMO_DESCRIPTION)
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
    demo.add_argument("--sample-batch", type=int, default=16,
                      help="images in the cached-vs-naive sampling comparison (default 16; 0: skip)")
    demo.add_argument("--out", default="demo_out", help="output folder (default demo_out/)")
    demo.add_argument("--force", action="store_true", help="replace the run already in OUT (else it is refused)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the training run, an int in [0, 2**63) "
                                                          "(default 0)")
    demo.add_argument("--backend", help="force one fastgen backend (see: python -m fastgen backends)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    sub.add_parser("backends", help="what is built and usable, and why anything is not")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m fastgen ARGV``; returns the exit status: 0, 2 for a job that
    cannot run as asked (the message on stderr), 130 / 143 for a training run
    interrupted by SIGINT / SIGTERM (its checkpoint saved)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from fastgen import BackendError
    from fastgen.data import DatasetMissingError
    from fastgen.sampling import CompileError
    from fastgen._dispatch import forced_backend
    from fastgen.train import TrainError
    try:
        if args.command == "backends":
            forced_backend()  # an unknown FASTGEN_BACKEND is the error, not a line of the report
            print(format_backends())
            return 0
        if args.command == "train":
            return train_command(args)
        if args.command == "sample":
            return sample_command(args)
        if min(args.steps, args.batch, args.channels, args.layers, args.test_images) < 1:
            parser.error("--steps, --batch, --channels, --layers and --test-images must be >= 1")
        if args.sample_batch < 0:
            parser.error("--sample-batch must be >= 0")
        return exit_code(run_demo(
            steps=args.steps, batch=args.batch, channels=args.channels, layers=args.layers, lr=args.lr,
            test_images=args.test_images, samples=args.samples, compare_steps=args.compare_steps, out=args.out,
            seed=args.seed, backend=args.backend, quiet=args.quiet, sample_batch=args.sample_batch,
            force=args.force))
    except (TrainError, SampleError, CompileError, DatasetMissingError, BackendError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside the training loop (which saves and returns): nothing half-written
        print(f"\ninterrupted ({args.command}); "
              + ("the last checkpoint saved in --out is kept" if args.command in ("train", "demo") else
                 "nothing was written"), file=sys.stderr)
        return 130
