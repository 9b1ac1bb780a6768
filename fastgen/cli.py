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
import dataclasses
import math
import os
import signal
import sys
import time
from typing import List, Optional

import torch

# ---- train ---------------------------------------------------------------------------------------------------------


def add_train_parser(sub):
    """The train command: the loop's flags, then one group per model family (its ``arguments``; a flag two
    families take is listed in the first one's group). The parser's default ``family_flags`` maps each family
    option to its flag (for the error naming a flag another model takes)."""
    from fastgen.data import DATASETS
    from fastgen.train import FAMILIES
    from fastgen.train.loop import COMMON_DEFAULTS

    def per_model(key):  # "pixelcnn 64, ..., vae 32": the families' own defaults of a loop option
        return ", ".join(f"{name} {family.defaults[key]}" for name, family in FAMILIES.items()
                         if key in family.defaults)

    p = sub.add_parser(
        "train", help="train a PixelCNN / Gated PixelCNN / PixelCNN++ / VAE (data-parallel under torchrun)",
        description="Train a PixelCNN, Gated PixelCNN, PixelCNN++ (pixelcnnpp) or VAE. Writes OUT/checkpoint.pt, "
                    "metrics.jsonl, summary.json and samples.png (a VAE also reconstructions.png and "
                    "interpolation.png). Data-parallel when "
                    "launched by torchrun (torchrun --nproc_per_node N -m fastgen train ...). With --resume, "
                    "options left out are taken from the checkpoint. Ctrl-C (SIGINT) or SIGTERM saves a "
                    "checkpoint at the current step; --resume continues it.")
    p.add_argument("model", choices=list(FAMILIES))
    p.add_argument("--data", choices=list(DATASETS), help="dataset (required unless --resume)")
    p.add_argument("--root", help="data location: the cifar-10-batches-py folder (cifar10); an .npz, IDX file or "
                                  "folder, or a folder of PNGs (files); optional for fashion-mnist")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="total optimizer steps")
    length.add_argument("--epochs", type=float, help="total epochs (default 1)")
    p.add_argument("--batch", type=int, help=f"images per step and process (default {COMMON_DEFAULTS['batch']}; "
                                             f"{per_model('batch')})")
    p.add_argument("--lr", type=float, help=f"Adam peak learning rate, linear warm-up then cosine decay "
                                            f"(default {COMMON_DEFAULTS['lr']:g})")
    p.add_argument("--channels", "--filters", dest="channels", type=int,
                   help=f"the network's width, as each model's options below say (default {per_model('channels')})")
    p.add_argument("--seed", type=int,
                   help=f"seed of weights, data order, binarization and the VAE's latent draws "
                        f"(default {COMMON_DEFAULTS['seed']})")
    p.add_argument("--out", default="train_out", help="output folder (default train_out/)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in OUT from OUT/checkpoint.pt")
    again.add_argument("--force", action="store_true",
                       help="replace the run already in OUT (its checkpoint, metrics, summary and images are "
                            "deleted); without it such a folder is refused")
    p.add_argument("--eval-every", type=int, help="evaluate on the test split every N steps (default: at the end)")
    p.add_argument("--patience", type=int,
                   help="stop when the run's score (test nats; a GAN's judge's Frechet distance) has not improved "
                        "for this many evaluations (needs --eval-every); the best is kept in OUT/best.pt")
    p.add_argument("--ckpt-every", type=int, help=f"checkpoint every N steps, and at the end "
                                                  f"(default {COMMON_DEFAULTS['ckpt_every']}; 0: at the end only)")
    p.add_argument("--eval-batches", type=int, help="evaluate on this many test batches (default: the whole split)")
    p.add_argument("--samples", type=int, help=f"images in OUT/samples.png at the end "
                                               f"(default {COMMON_DEFAULTS['samples']}; 0: none)")
    p.add_argument("--backend", help="force one fastgen backend (see: python -m fastgen backends); default: dispatch")
    p.add_argument("--num-workers", type=int, help="DataLoader worker processes (default 0)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA, off for CPU)")
    p.add_argument("--max-minutes", type=float, help="end the run after this many minutes (evaluate, sample, save)")
    p.add_argument("--stop-at", type=int,
                   help="pause at this step: save a checkpoint and exit (continue with --resume)")
    p.add_argument("--log-every", type=int,
                   help=f"log the training loss every N steps (default {COMMON_DEFAULTS['log_every']})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    flags = {}
    for family in dict.fromkeys(FAMILIES.values()):
        names = [name for name, f in FAMILIES.items() if f is family]
        group = p.add_argument_group(f"{', '.join(names)} options", family.description)
        for option_flags, kwargs in family.arguments:
            if option_flags[0] not in flags.values():
                action = group.add_argument(*option_flags, **kwargs)
                flags[action.dest] = action.option_strings[0]
    p.set_defaults(family_flags=flags)
    return p


def exit_code(summary: Optional[dict]) -> int:
    """The command's exit status for a run's summary: 128 + the signal number
    for a run interrupted (and saved) by SIGINT / SIGTERM, else 0."""
    stopped = (summary or {}).get("stopped_by")
    return 128 + int(signal.Signals[stopped]) if stopped in ("SIGINT", "SIGTERM") else 0


def family_options(model: str, given: dict, flags: dict):
    """The Options of ``model``'s family from the family flags' values ``given`` ({dest: value}; None or False:
    not given). A value for another family's option is a TrainError naming its flag and the models taking it."""
    from fastgen.train import FAMILIES, TrainError

    def names(family):
        return {f.name for f in dataclasses.fields(family.Options)}

    own = names(FAMILIES[model])
    for key, value in given.items():
        if key not in own and value not in (None, False):
            takers = sorted(name for name, family in FAMILIES.items() if key in names(family))
            raise TrainError(f"{flags[key]} is not an option of {model} (it is for {', '.join(takers)})")
    return FAMILIES[model].Options(**{key: given[key] for key in own})


def train_command(args) -> int:
    from fastgen.train import TrainConfig, TrainError, train
    if args.data is None and not args.resume:
        raise TrainError("--data is required (unless --resume)")
    options = family_options(args.model, {key: getattr(args, key) for key in args.family_flags}, args.family_flags)
    fields = {f: getattr(args, f) for f in TrainConfig.__dataclass_fields__ if hasattr(args, f)}
    return exit_code(train(TrainConfig(**fields, options=options)))


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
    from fastgen.models import DCGANGenerator, VAE
    from fastgen.sampling.api import engine_backend
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

    vae, gan = isinstance(model, VAE), isinstance(model, DCGANGenerator)
    if (vae or gan) and args.method not in (None, "cached"):
        raise SampleError(f"--method {args.method} is for the pixel models: a {'VAE' if vae else 'GAN'} draws its "
                          f"images in one pass")
    method = args.method or "cached"
    t0 = time.perf_counter()
    if vae:  # z ~ N(0, temperature^2 I), decoded to display images (0..255)
        images = model.sample(args.n, seed=args.seed, temperature=args.temperature)
    elif gan:  # G(z) for z ~ N(0, temperature^2 I), as images on 0..255
        images = model.sample(args.n, labels, seed=args.seed, temperature=args.temperature)
    else:
        images = model.sample(args.n, labels, temperature=args.temperature, seed=args.seed, method=method,
                              backend=engine_backend(args.backend), progress=not args.quiet)
    images = images.cpu()  # waits for a GPU to finish: the time is the whole sampling
    seconds = time.perf_counter() - t0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_grid(images, args.out, nrow=args.nrow or nrow, levels=256 if vae or gan else model.levels)
    print(f"sampled {args.n} images ({'vae prior' if vae else 'generator' if gan else method}) in {seconds:.2f} s: "
          f"{args.n / seconds:.1f} images/s; wrote {args.out}")
    return 0


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
    from fastgen.demo import DEMO_DESCRIPTION
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
        from fastgen.demo import run_demo
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
