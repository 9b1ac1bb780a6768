"""Training of fastgen's models: ``python -m fastgen train MODEL --data NAME ...``.

One function, :func:`train`, runs a whole training job from a :class:`TrainConfig`:
data (``fastgen.data.load_dataset``), model, Adam with linear warm-up and cosine
decay, periodic evaluation on the test split, checkpoints with exact resume,
metrics (``metrics.jsonl``), a summary (``summary.json``) and PNG grids. What
differs between models is one small hook per kind of model (:class:`PixelKind`,
:class:`PixelCNNppKind`, :class:`VAEKind`: its options and defaults, model
config, loss call, evaluation, images), the loop is shared:

* ``pixelcnn`` / ``gated-pixelcnn``: likelihood from the data (Bernoulli for
  2-level data, a categorical over the data's levels otherwise); loss = NLL;
  evaluation: test NLL; images: samples.png.
* ``pixelcnnpp``: PixelCNN++ with its discretized logistic mixture (256-level
  data only); loss = NLL through fastgen.discretized_mix_logistic_nll;
  evaluation: test NLL in bits/dim; images: samples.png (cached multi-scale
  sampling).
* ``vae``: decoder from the data unless ``--decoder`` says (Bernoulli for
  2-level data, the discretized Gaussian over the levels otherwise); loss = the
  negative ELBO (one latent draw per image, seeded by (seed, step, rank));
  evaluation: test ELBO (seeded draws) and, at the end, the importance-weighted
  NLL with ``--iw-samples`` draws on the first ``--iw-images`` test images;
  images: samples.png, reconstructions.png (rows of test images above their
  reconstructions), interpolation.png (one row per pair of test images: the
  decoded line between their posterior means).

Data parallel: launched by torchrun (RANK / WORLD_SIZE / LOCAL_RANK set), every
process trains on its shard of each epoch (DistributedSampler) with a
DDP-wrapped model; evaluation is summed over the ranks; only rank 0 prints and
writes files. ``--batch`` is per process.

Reproducibility: the model is initialised from ``seed``; epoch e's data order
comes from (seed, e) and the dynamic binarization of step s from (seed, s,
rank), never from a generator shared with anything else. So a run repeats
exactly on CPU, and a resumed run continues the uninterrupted run's data
stream, with or without DataLoader workers (same world size).

Files in ``out``: checkpoint.pt (model state_dict, model constructor config,
optimizer, scheduler, step, RNG states, the run's arguments; rebuilt by
:func:`load_model`, read by :func:`read_checkpoint`, the one reader of
checkpoints), metrics.jsonl, summary.json, and the PNGs above. A folder that
holds another run's files is refused unless ``force`` (its files are deleted)
or ``resume``; :func:`check_out` checks every output path before the work.

Interrupts: SIGINT (Ctrl-C) or SIGTERM during training is acted on at the next
step boundary (never mid-update; an evaluation within the loop is abandoned
and redone by the resumed run): the checkpoint of that step is saved, the run
ends with ``stopped_by`` = "SIGINT" / "SIGTERM" (the command line exits 130 /
143) and ``--resume`` continues it exactly. A second signal more than a second
later quits at once, keeping the last checkpoint (one within the second is
taken for a launcher's copy of the first: torchrun forwards it).
"""
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import shlex
import signal
import sys
import tempfile
import threading
import time
import warnings
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from fastgen._dispatch import BackendError, forced_backend, known_backends
from fastgen._progress import Progress
from fastgen._seed import check_seed
from fastgen.models import VAE, GatedPixelCNN, PixelCNN, PixelCNNpp

MODELS = {"pixelcnn": PixelCNN, "gated-pixelcnn": GatedPixelCNN, "pixelcnnpp": PixelCNNpp, "vae": VAE}
# what --layers/--blocks/--nr-resnet sets
DEPTH_ARG = {"pixelcnn": "blocks", "gated-pixelcnn": "layers", "pixelcnnpp": "nr_resnet"}
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


class TrainError(ValueError):
    """A training job that cannot run as asked (bad argument, mismatched checkpoint or data)."""


class OutputError(TrainError):
    """An output path that cannot be written (an existing file where a folder is needed, a path under a
    file, no write permission); raised before any work starts."""


@dataclasses.dataclass
class TrainConfig:
    """Options of one training run. ``None`` means "the default", or, when
    resuming, "the checkpoint's value" (see FIXED_ON_RESUME, INHERITED, DEFAULTS,
    PP_DEFAULTS and VAE_DEFAULTS)."""
    model: Optional[str] = None  # 'pixelcnn', 'gated-pixelcnn', 'pixelcnnpp' or 'vae'
    data: Optional[str] = None  # a name of fastgen.data.load_dataset
    root: Optional[str] = None
    steps: Optional[int] = None  # total optimizer steps; else epochs
    epochs: Optional[float] = None  # default 1 epoch when neither is given
    batch: Optional[int] = None  # per process
    lr: Optional[float] = None
    channels: Optional[int] = None
    depth: Optional[int] = None  # gated layers, residual blocks or pixelcnnpp's nr_resnet; None: the default
    kernel_size: Optional[int] = None
    conditional: Optional[bool] = None
    nr_mix: Optional[int] = None  # pixelcnnpp: logistic mixture components
    dropout: Optional[float] = None  # pixelcnnpp: dropout in the gated ResNet blocks
    decoder: Optional[str] = None  # vae: 'bernoulli' or 'gaussian'; None: from the data's levels
    latent: Optional[int] = None  # vae: latent dimensions
    iw_samples: Optional[int] = None  # vae: importance samples of the final IW NLL (0: none)
    iw_images: Optional[int] = None  # vae: the IW NLL is taken on the first iw_images test images
    seed: Optional[int] = None
    out: str = "train_out"
    resume: bool = False
    force: bool = False  # replace another run's files in out (they are deleted first)
    eval_every: Optional[int] = None  # 0: evaluate at the end only
    ckpt_every: Optional[int] = None  # 0: checkpoint at the end only
    eval_batches: Optional[int] = None  # None: the whole test split
    samples: Optional[int] = None
    backend: Optional[str] = None
    num_workers: Optional[int] = None
    device: Optional[str] = None  # None: cuda if available, else cpu
    amp: Optional[bool] = None  # None: on for CUDA, off for CPU
    max_minutes: Optional[float] = None
    stop_at: Optional[int] = None  # pause at this step (checkpoint only), to be resumed
    log_every: Optional[int] = None
    quiet: bool = False  # no progress bar (the summary lines are still printed)


COMMON_DEFAULTS = {"batch": 32, "lr": 1e-3, "seed": 0, "eval_every": 0, "ckpt_every": 1000, "samples": 64,
                   "num_workers": 0, "log_every": 10}
# the pixel models' defaults (DEFAULTS) and the VAE's (larger batches: its steps are cheap)
DEFAULTS = {**COMMON_DEFAULTS, "channels": 64, "kernel_size": 3, "conditional": False}
VAE_DEFAULTS = {**COMMON_DEFAULTS, "batch": 128, "channels": 32, "latent": 32, "iw_samples": 100, "iw_images": 1000}
# PixelCNN++: a small network for CPUs (the paper's CIFAR-10 model is --channels 160 --nr-resnet 5 --nr-mix 10
# --dropout 0.5)
PP_DEFAULTS = {**COMMON_DEFAULTS, "channels": 32, "depth": 2, "conditional": False, "nr_mix": 5, "dropout": 0.1}
# options that define the run: a resumed run takes them from the checkpoint, and may not change them
FIXED_ON_RESUME = ("model", "data", "batch", "lr", "channels", "depth", "kernel_size", "conditional", "decoder",
                   "latent", "nr_mix", "dropout", "seed")
# options a resumed run takes from the checkpoint unless given again (not: device, backend, workers, stops)
INHERITED = FIXED_ON_RESUME + ("root", "amp", "eval_every", "ckpt_every", "eval_batches", "samples", "log_every",
                               "iw_samples", "iw_images")
# options of one kind of model only, with their command-line flags (for the error naming them)
MODEL_OPTIONS = {"depth": "--layers", "kernel_size": "--kernel-size", "conditional": "--conditional",
                 "decoder": "--decoder", "latent": "--latent", "iw_samples": "--iw-samples",
                 "iw_images": "--iw-images", "nr_mix": "--nr-mix", "dropout": "--dropout"}


# ---- models and checkpoints ------------------------------------------------------------------------------------

def build_model(config: Dict[str, Any], backend: Optional[str] = None) -> torch.nn.Module:
    """A model from its constructor config {"name": ..., "kwargs": {...}} (as stored in checkpoints)."""
    name = config["name"]
    if name not in MODELS:
        raise TrainError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    kwargs = dict(config["kwargs"])
    kwargs["image_shape"] = tuple(kwargs["image_shape"])
    return MODELS[name](**kwargs, backend=backend)


def model_config(name, data, channels, depth, kernel_size, conditional):
    """The constructor config of ``name`` for a loaded dataset: the likelihood
    and image shape come from the data."""
    binary = data.levels == 2
    kwargs = {"image_shape": list(data.shape), "channels": channels, "kernel_size": kernel_size,
              "likelihood": "bernoulli" if binary else "categorical", "levels": data.levels,
              "num_classes": data.num_classes if conditional else None}
    if depth is not None:
        kwargs[DEPTH_ARG[name]] = depth
    return {"name": name, "kwargs": kwargs}


# what every checkpoint of CHECKPOINT_FORMAT holds
CHECKPOINT_KEYS = ("model", "model_config", "optimizer", "scheduler", "step", "rng", "args")


def read_checkpoint(path: "os.PathLike[str] | str") -> Dict[str, Any]:
    """The checkpoint dict at ``path`` (a checkpoint file, or a run folder
    holding checkpoint.pt), tensors on the CPU: the one reader of checkpoints
    (train --resume, sample, load_model). A missing, truncated or foreign file,
    or one of a newer format, is a TrainError saying which. Only plain data is
    stored, so it loads with weights_only=True (no code runs)."""
    path = os.fspath(path)
    file = os.path.join(path, CHECKPOINT) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise TrainError(f"no checkpoint at {file} (a checkpoint file, or a run folder holding {CHECKPOINT}, "
                         f"is needed)")
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols are not the user's business
            warnings.simplefilter("ignore")
            ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- whatever torch.load raises (RuntimeError, EOFError, UnpicklingError,
        # KeyError, ...) means the file is not one it can read; the reason goes into the message
        reason = (str(e).splitlines() or [""])[0][:120]
        raise TrainError(f"{file} is not a fastgen training checkpoint: torch.load cannot read it (a truncated or "
                         f"damaged file, or not written by torch.save; {type(e).__name__}"
                         f"{': ' + reason if reason else ''})") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        what = f"a {type(ckpt).__name__}" + (f" with keys {sorted(map(str, ckpt))[:6]}" if isinstance(ckpt, dict)
                                             else "")
        raise TrainError(f"{file} is not a fastgen training checkpoint: it holds {what}, saved by other code "
                         f"(fastgen's checkpoints are written by `python -m fastgen train`)")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        newer = isinstance(ckpt["format"], int) and ckpt["format"] > CHECKPOINT_FORMAT
        import fastgen
        raise TrainError(f"{file} has checkpoint format {ckpt['format']!r}; fastgen {fastgen.__version__} reads "
                         f"format {CHECKPOINT_FORMAT}" + ("; it was written by a newer fastgen: upgrade fastgen"
                                                          if newer else ""))
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise TrainError(f"{file} is a damaged fastgen checkpoint: it lacks {', '.join(missing)}")
    return ckpt


def load_model(path: "os.PathLike[str] | str", *, device: "torch.device | str" = "cpu",
               backend: Optional[str] = None) -> torch.nn.Module:
    """The trained model of a checkpoint (a file, or a run folder holding
    checkpoint.pt), rebuilt from its stored constructor config, in eval mode.
    A checkpoint that cannot be read or rebuilt is a TrainError."""
    ckpt = read_checkpoint(path)
    try:
        model = build_model(ckpt["model_config"], backend=backend)
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a config or weights this fastgen cannot rebuild
        if isinstance(e, (TrainError, BackendError)):
            raise
        raise TrainError(f"{os.fspath(path)}: the checkpoint's model cannot be rebuilt ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:200]})") from None
    return model.to(device).eval()


def _rng_state(device):
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _atomic_save(obj, path):
    tmp = path + ".tmp"  # a crash while writing must not destroy the previous checkpoint
    torch.save(obj, tmp)
    os.replace(tmp, path)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of the model's parameters and buffers (to check that DDP replicas agree)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---- output paths and backends: checked before the work starts ------------------------------------------------

def check_out(path: "os.PathLike[str] | str", *, folder: bool, flag: str = "--out") -> None:
    """Raise OutputError unless ``path`` can be written: a folder (``folder``)
    that exists or can be created, or a file whose folder can be. Every
    command checks its outputs here before its work starts."""
    shown = os.fspath(path)
    path = os.path.abspath(shown)
    if os.path.exists(path):
        if folder and not os.path.isdir(path):
            raise OutputError(f"{flag} {shown} is an existing file; {flag} names a folder for the run's files")
        if not folder and os.path.isdir(path):
            raise OutputError(f"{flag} {shown} is a folder; {flag} names the image file to write")
        if not os.access(path, os.W_OK | (os.X_OK if folder else 0)):
            raise OutputError(f"{flag} {shown}: no permission to write it")
        if not folder:
            return
    base = path if folder else os.path.dirname(path)
    while not os.path.exists(base):  # the nearest folder that exists: the rest is created under it
        base = os.path.dirname(base)
    if not os.path.isdir(base):
        raise OutputError(f"{flag} {shown} lies under {base}, which is a file, not a folder")
    try:  # a real write: os.access is not the whole story (read-only mounts, ACLs)
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise OutputError(f"{flag} {shown}: cannot write in {base} ({e.strerror or e})") from None


def command_backend(flag: Optional[str], flag_name: str = "--backend") -> Tuple[Optional[str], Optional[str]]:
    """(name, where it came from) of the backend a command forces: ``flag``
    (``--backend``), else FASTGEN_BACKEND, else (None, None). Both are checked
    before any work: an unknown --backend is a TrainError, an unknown
    FASTGEN_BACKEND the dispatch's BackendError, each naming the known backends."""
    env = forced_backend()
    if flag is not None:
        if flag not in known_backends():
            raise TrainError(f"unknown backend {flag!r} ({flag_name}); fastgen's backends: "
                             f"{', '.join(known_backends())}")
        return flag, flag_name
    return (env, "FASTGEN_BACKEND") if env else (None, None)


# ---- distributed ------------------------------------------------------------------------------------------------

class Dist:
    """Rank, world size and device of this process; a process group when torchrun launched it."""

    def __init__(self, device_arg):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        cuda = torch.cuda.is_available()
        if device_arg is None:
            device_arg = "cuda" if cuda else "cpu"
        try:
            device = torch.device(device_arg)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise TrainError(f"--device must be cpu or cuda[:N], got {device_arg!r}")
        if device.type == "cuda":
            if not cuda:
                raise TrainError("--device cuda: no CUDA device is available (this torch "
                                 f"{'has no CUDA' if torch.version.cuda is None else 'sees no GPU'})")
            if device.index is None:
                device = torch.device("cuda", self.local_rank if self.launched else torch.cuda.current_device())
            torch.cuda.set_device(device)
        self.device = device
        self.group = False
        if self.launched:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.group = True

    @property
    def main(self):
        return self.rank == 0

    def sum(self, tensor):
        """Sum over the ranks, in place (a no-op in a single process)."""
        if self.group:
            dist.all_reduce(tensor)
        return tensor

    def max(self, tensor):
        """Maximum over the ranks, in place (a no-op in a single process)."""
        if self.group:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if not self.group:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.group:
            dist.barrier()

    def close(self):
        if self.group:
            dist.destroy_process_group()
            self.group = False


# ---- data ------------------------------------------------------------------------------------------------------

class _StepBatches(torch.utils.data.Dataset):
    """Whole batches keyed by (step, indices): the binarization draw of a
    dynamic split comes from a generator seeded by (seed, step, rank), so a
    batch is the same whichever process or worker makes it, and whenever."""

    def __init__(self, data, seed, rank):
        self.data, self.seed, self.rank = data, seed, rank

    def __getitem__(self, key):
        step, index = key
        gen = None
        if self.data.dynamic:
            gen = torch.Generator().manual_seed(((self.seed * 1_000_003 + step) * 4096 + self.rank) % 2 ** 63)
        return self.data.draw(index, gen), self.data.labels[index]

    def __len__(self):
        return len(self.data)


def _worker_init(_):
    # DataLoader workers leave SIGINT / SIGTERM to the main process: it saves at the step boundary and shuts
    # them down (a Ctrl-C reaches the whole process group; a dead worker would fail the next batch)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _epoch_batches(sampler, epoch, first_batch, batch, steps_per_epoch):
    """The keys (global step, index tensor) of one epoch's batches for this rank, from batch ``first_batch`` on."""
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler), dtype=torch.int64)
    return [(epoch * steps_per_epoch + b, order[b * batch:(b + 1) * batch])
            for b in range(first_batch, steps_per_epoch)]


def _load_data(cfg, expect_shape=None):
    from fastgen.data import load_dataset
    try:
        train = load_dataset(cfg.data, "train", root=cfg.root, expect_shape=expect_shape)
        test = load_dataset(cfg.data, "test", root=cfg.root, expect_shape=train.shape,
                            num_classes=train.num_classes)
    except TrainError:
        raise
    except ValueError as e:  # bad name, split, shape or labels: the loader's message says which
        raise TrainError(f"{e} (the checkpoint's model takes that shape)" if expect_shape and "shape" in str(e)
                         else str(e)) from None
    if test.levels != train.levels:
        raise TrainError(f"dataset {cfg.data!r}: train has {train.levels} levels, test {test.levels}")
    return train, test


# ---- evaluation and sampling -------------------------------------------------------------------------------------

def _eval_batches(n_images, batch, max_batches, dist_):
    """Indices of the evaluation batches this rank takes (every world-th one)."""
    rank, world = (dist_.rank, dist_.world) if dist_ is not None else (0, 1)
    n_batches = math.ceil(n_images / batch)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    return range(rank, n_batches, world)


@torch.no_grad()
def _eval_totals(model, data, batch, n_values, batch_values, *, device, amp=False, n_images=None, max_batches=None,
                 dist_=None, progress=False, desc="eval"):
    """float64 totals [n_values + 1] over the first ``n_images`` images of
    ``data`` (None: all) in batches of ``batch`` (at most ``max_batches``):
    ``batch_values(images, lo, hi, b)`` gives ``n_values`` per-image tensors of
    batch ``b`` (images lo..hi-1), each summed; the last entry counts the images.
    The model runs in eval mode (restored after), under bf16 autocast with
    ``amp``; under torchrun each rank takes every world-th batch and the totals
    are reduced. ``progress``: a bar of the batches (on rank 0 only)."""
    n_images = len(data) if n_images is None else min(n_images, len(data))
    total = torch.zeros(n_values + 1, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    batches = _eval_batches(n_images, batch, max_batches, dist_)
    bar = Progress(len(batches), desc, enabled=progress and (dist_ is None or dist_.main))
    try:
        for b in batches:
            lo, hi = b * batch, min((b + 1) * batch, n_images)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                values = batch_values(data.images[lo:hi].to(device), lo, hi, b)
            for i, v in enumerate(values):
                total[i] += v.double().sum()
            total[-1] += hi - lo
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    if dist_ is not None:
        dist_.sum(total)
    return total


def evaluate(model: torch.nn.Module, data, batch: int, *, device: torch.device, amp: bool = False,
             conditional: bool = False, max_batches: Optional[int] = None, dist_: Optional["Dist"] = None,
             progress: bool = False) -> Tuple[float, int]:
    """(mean NLL in nats per image, number of images) of ``model`` on ``data``
    (.images: the fixed binarization for binarized MNIST), over its first
    ``max_batches`` batches of ``batch`` images (None: all). Under torchrun
    each rank takes every world-th batch and the sums are reduced.
    ``progress``: a progress bar on stderr."""
    def nll(images, lo, hi, b):
        labels = data.labels[lo:hi].to(device) if conditional else None
        return (-model.log_prob(images, labels),)

    total = _eval_totals(model, data, batch, 1, nll, device=device, amp=amp, max_batches=max_batches, dist_=dist_,
                         progress=progress, desc="eval (test NLL)")
    return (total[0] / total[1]).item(), int(total[1].item())


def grid_labels(n: int, num_classes: Optional[int], device: "torch.device | str" = "cpu"
                ) -> Tuple[Optional[torch.Tensor], int]:
    """(labels, images per row) of a grid of ``n`` samples: the one layout of
    every sample grid (train's samples.png, ``sample``). A class-conditional
    model gets labels 0, 1, ..., K-1, 0, 1, ...: one class per column, K
    columns (fewer when n < K); otherwise no labels and a square grid."""
    if num_classes:
        return torch.arange(n, device=device) % num_classes, min(n, num_classes)
    return None, math.ceil(math.sqrt(n))


def sample_grid(model: torch.nn.Module, n: int, path: "os.PathLike[str] | str", *, seed: int = 0,
                progress: bool = False) -> torch.Tensor:
    """Draw ``n`` samples with model.sample and write them as an image grid
    laid out by :func:`grid_labels`; returns the samples."""
    from fastgen.data import save_grid
    labels, nrow = grid_labels(n, model.num_classes, next(model.parameters()).device)
    images = model.sample(n, labels, seed=seed, progress=progress)
    save_grid(images.cpu(), path, nrow=nrow, levels=model.levels)
    return images


def describe_nll(nats: float, bits_per_dim: float, binary: bool) -> str:
    """Binarized data: nats per image first (the literature's metric); else bits/dim first."""
    if binary:
        return f"{nats:.2f} nats/image ({bits_per_dim:.4f} bits/dim)"
    return f"{bits_per_dim:.4f} bits/dim ({nats:.1f} nats/image)"


def derived_seed(*parts: Any) -> int:
    """A seed in [0, 2**63) from ``parts`` (e.g. ("train", seed, step, rank)): the
    VAE's latent draws depend on where they happen, not on a shared generator."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def evaluate_elbo(model: torch.nn.Module, data, batch: int, *, device: torch.device, amp: bool = False,
                  max_batches: Optional[int] = None, dist_: Optional["Dist"] = None, seed: int = 0,
                  progress: bool = False) -> Dict[str, float]:
    """{"elbo", "log_px", "kl" (mean nats per image), "images"} of a VAE on
    ``data`` (.images: the fixed binarization for binarized MNIST), one latent
    draw per image seeded by (seed, batch index), so the result does not depend
    on the number of processes; batches as in :func:`evaluate`."""
    def terms(images, lo, hi, b):
        return model.elbo_terms(images, seed=derived_seed("eval", seed, b))

    total = _eval_totals(model, data, batch, 2, terms, device=device, amp=amp, max_batches=max_batches, dist_=dist_,
                         progress=progress, desc="eval (test ELBO)")
    log_px, kl = (total[:2] / total[2]).tolist()
    return {"elbo": log_px - kl, "log_px": log_px, "kl": kl, "images": int(total[2].item())}


def evaluate_iw(model: torch.nn.Module, data, batch: int, k: int, n_images: Optional[int], *, device: torch.device,
                amp: bool = False, dist_: Optional["Dist"] = None, seed: int = 0,
                progress: bool = False) -> Dict[str, float]:
    """{"iw_nll", "neg_elbo" (mean nats per image), "images"}: a VAE's
    importance-weighted NLL estimate with ``k`` draws (VAE.iw_nll), and its
    -ELBO, on the first ``n_images`` images of ``data`` (all if fewer), draws
    seeded by (seed, batch index); batches spread over the ranks."""
    def bounds(images, lo, hi, b):
        return (model.iw_nll(images, k, seed=derived_seed("iw", seed, b)),
                -model.elbo(images, seed=derived_seed("eval", seed, b)))

    total = _eval_totals(model, data, batch, 2, bounds, device=device, amp=amp, n_images=n_images, dist_=dist_,
                         progress=progress, desc=f"eval (IW NLL, k={k})")
    iw, neg_elbo = (total[:2] / total[2]).tolist()
    return {"iw_nll": iw, "neg_elbo": neg_elbo, "images": int(total[2].item())}


def _display(images, levels):
    """Integer images 0..levels-1 -> uint8 0..255 (as the VAE's display images)."""
    return (images.double() * (255 / (levels - 1))).round().to(torch.uint8)


def vae_grids(model: torch.nn.Module, data, out: "os.PathLike[str] | str", *, n: int = 64, seed: int = 0
              ) -> "list[str]":
    """Write a VAE's PNG grids into the folder ``out``: samples.png (``n``
    draws from the prior, decoded to their means), reconstructions.png (rows of
    up to 8 test images, each row above the row of their reconstructions; up to
    32 images) and interpolation.png (up to 8 rows: the decoded line between the
    posterior means of test images i and i + rows, 10 steps, ends included).
    Returns the paths written."""
    from fastgen.data import save_grid
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    paths = [os.path.join(out, name) for name in VAE_IMAGES]
    try:
        save_grid(model.sample(n, seed=seed).cpu(), paths[0], nrow=math.ceil(math.sqrt(n)), levels=256)

        cols = min(8, n, len(data))
        m = min(32, n, len(data)) // cols * cols
        originals = data.images[:m].to(device)
        recon = model.reconstruct(originals).cpu()
        rows = [t for r in range(0, m, cols) for t in (_display(originals[r:r + cols].cpu(), model.levels),
                                                         recon[r:r + cols])]
        save_grid(torch.cat(rows), paths[1], nrow=cols, levels=256)

        pairs = max(1, min(8, len(data) // 2))
        a, b = data.images[:pairs].to(device), data.images[pairs:2 * pairs].to(device)
        if len(b) < len(a):  # a test split of one image: interpolate it with itself
            b = a
        steps = 10
        line = model.interpolate(a, b, steps).cpu()
        save_grid(line.flatten(0, 1), paths[2], nrow=steps, levels=256)
    finally:
        model.train(was_training)
    return paths


# ---- the kinds of model: what the training loop asks of each -----------------------------------------------------

PIXEL_IMAGES = ("samples.png",)
VAE_IMAGES = ("samples.png", "reconstructions.png", "interpolation.png")

class PixelKind:
    """PixelCNN and Gated PixelCNN: likelihood from the data, loss = NLL,
    evaluation = test NLL, images = samples.png."""
    defaults = DEFAULTS
    options = ("depth", "kernel_size", "conditional")
    images = PIXEL_IMAGES

    def channel_multiple(self, cfg, data_channels):
        """--channels must be a multiple of this (the model's own rule), and why."""
        colours = f"the data's {data_channels} colour channel{'s' if data_channels > 1 else ''}"
        multiple = MODELS[cfg.model].channel_multiple(data_channels)
        return multiple, (colours if multiple == data_channels else f"{multiple // data_channels} x {colours}")

    def model_config(self, cfg, data):
        return model_config(cfg.model, data, cfg.channels, cfg.depth, cfg.kernel_size, cfg.conditional)

    def describe(self, cfg, model, config):
        depth_name = DEPTH_ARG[cfg.model]
        depth = config["kwargs"].get(depth_name, len(model.layers) if cfg.model == "gated-pixelcnn"
                                     else len(model.blocks))
        likelihood = "Bernoulli" if model.likelihood == "bernoulli" else f"{model.levels}-way categorical"
        classes = f", {model.num_classes} classes" if model.num_classes else ""
        return (f"{cfg.model}, {depth_name}={depth}, channels={cfg.channels}, kernel_size={cfg.kernel_size}, "
                f"{likelihood}{classes}")

    def loss(self, model, images, labels, seed):
        return model.loss(images, labels)

    def evaluate(self, model, data, cfg, *, step, device, amp, dist_, final, say, log):
        t0 = time.perf_counter()
        binary = model.likelihood == "bernoulli"
        nats, n = evaluate(model, data, cfg.batch, device=device, amp=amp, conditional=cfg.conditional,
                           max_batches=cfg.eval_batches, dist_=dist_, progress=not cfg.quiet)
        bpd = model.bits_per_dim(nats)
        log({"step": step, "kind": "eval", "test_nats": round(nats, 5), "test_bits_per_dim": round(bpd, 6),
             "images": n, "eval_s": round(time.perf_counter() - t0, 2)})
        say(f"step {step}: test {describe_nll(nats, bpd, binary)} on {n} test images "
            f"({time.perf_counter() - t0:.0f} s)")
        return {"test_nats": round(nats, 4), "test_bits_per_dim": round(bpd, 5), "test_images": n}

    def write_images(self, model, data, cfg, progress):
        path = os.path.join(cfg.out, "samples.png")
        sample_grid(model, cfg.samples, path, seed=cfg.seed, progress=progress)
        return [path]


class VAEKind:
    """The VAE: decoder from the data (or --decoder), loss = -ELBO, evaluation
    = test ELBO and, at the end, the IW NLL; images: samples, reconstructions,
    interpolation."""
    defaults = VAE_DEFAULTS
    options = ("decoder", "latent", "iw_samples", "iw_images")
    images = VAE_IMAGES

    def channel_multiple(self, cfg, data_channels):
        return 1, ""

    def model_config(self, cfg, data):
        binary = data.levels == 2
        decoder = cfg.decoder or ("bernoulli" if binary else "gaussian")
        if decoder == "bernoulli" and not binary:
            raise TrainError(f"--decoder bernoulli models binary images, but {cfg.data!r} has {data.levels} levels: "
                             f"use --data binarized-mnist (binary MNIST), or --decoder gaussian (the discretized "
                             f"Gaussian over the {data.levels} levels)")
        return {"name": "vae", "kwargs": {"image_shape": list(data.shape), "channels": cfg.channels,
                                          "latent": cfg.latent, "decoder": decoder, "levels": data.levels}}

    def describe(self, cfg, model, config):
        decoder = ("Bernoulli decoder" if model.decoder == "bernoulli"
                   else f"discretized Gaussian decoder over {model.levels} levels")
        return f"vae, latent={model.latent_features}, channels={cfg.channels}, {decoder}"

    def loss(self, model, images, labels, seed):
        return model.loss(images, seed=seed)

    def evaluate(self, model, data, cfg, *, step, device, amp, dist_, final, say, log):
        binary = model.likelihood == "bernoulli"
        t0 = time.perf_counter()
        r = evaluate_elbo(model, data, cfg.batch, device=device, amp=amp, max_batches=cfg.eval_batches,
                          dist_=dist_, seed=cfg.seed, progress=not cfg.quiet)
        neg_elbo, n = -r["elbo"], r["images"]
        bpd = model.bits_per_dim(neg_elbo)
        log({"step": step, "kind": "eval", "test_elbo_nats": round(r["elbo"], 5), "test_nats": round(neg_elbo, 5),
             "test_bits_per_dim": round(bpd, 6), "test_kl_nats": round(r["kl"], 5), "images": n,
             "eval_s": round(time.perf_counter() - t0, 2)})
        say(f"step {step}: test ELBO {r['elbo']:.2f} nats/image (reconstruction {r['log_px']:.2f}, KL {r['kl']:.2f}); "
            f"-ELBO {describe_nll(neg_elbo, bpd, binary)} on {n} test images ({time.perf_counter() - t0:.0f} s)")
        result = {"test_nats": round(neg_elbo, 4), "test_bits_per_dim": round(bpd, 5), "test_images": n,
                  "test_elbo_nats": round(r["elbo"], 4), "test_kl_nats": round(r["kl"], 4)}
        if not final or not cfg.iw_samples:
            return result
        t0 = time.perf_counter()
        iw = evaluate_iw(model, data, cfg.batch, cfg.iw_samples, cfg.iw_images, device=device, amp=amp,
                         dist_=dist_, seed=cfg.seed, progress=not cfg.quiet)
        iw_bpd = model.bits_per_dim(iw["iw_nll"])
        seconds = time.perf_counter() - t0
        log({"step": step, "kind": "eval_iw", "test_iw_nll_nats": round(iw["iw_nll"], 5),
             "test_iw_bits_per_dim": round(iw_bpd, 6), "test_neg_elbo_nats": round(iw["neg_elbo"], 5),
             "iw_samples": cfg.iw_samples, "images": iw["images"], "eval_s": round(seconds, 2)})
        say(f"step {step}: test IW NLL {describe_nll(iw['iw_nll'], iw_bpd, binary)} with k={cfg.iw_samples} "
            f"importance samples on the first {iw['images']} test images (-ELBO on them {iw['neg_elbo']:.2f} "
            f"nats/image) ({seconds:.0f} s)")
        result.update(test_iw_nll_nats=round(iw["iw_nll"], 4), test_iw_bits_per_dim=round(iw_bpd, 5),
                      iw_samples=cfg.iw_samples, iw_images=iw["images"],
                      test_neg_elbo_on_iw_images=round(iw["neg_elbo"], 4))
        return result

    def write_images(self, model, data, cfg, progress):
        return vae_grids(model, data, cfg.out, n=cfg.samples, seed=cfg.seed)


class PixelCNNppKind(PixelKind):
    """PixelCNN++: the discretized logistic mixture over 256 levels (no other
    data), loss = NLL; evaluation and samples.png as the other pixel models
    (its sampling is naive: one forward pass per pixel)."""
    defaults = PP_DEFAULTS
    options = ("depth", "conditional", "nr_mix", "dropout")

    def channel_multiple(self, cfg, data_channels):
        return 1, ""

    def model_config(self, cfg, data):
        if data.levels != 256:
            kind = "binary" if data.levels == 2 else f"{data.levels} levels"
            raise TrainError(f"pixelcnnpp models 256-level images (its discretized logistic mixture has 256 bins), "
                             f"but {cfg.data!r} has {data.levels} levels: for {kind} data train pixelcnn or "
                             f"gated-pixelcnn (a {'Bernoulli' if data.levels == 2 else 'categorical'} likelihood)"
                             + (", or use --data mnist (its 256 grey levels)" if data.levels == 2 else ""))
        kwargs = {"image_shape": list(data.shape), "nr_resnet": cfg.depth, "nr_filters": cfg.channels,
                  "nr_logistic_mix": cfg.nr_mix, "dropout": cfg.dropout,
                  "num_classes": data.num_classes if cfg.conditional else None}
        return {"name": cfg.model, "kwargs": kwargs}

    def describe(self, cfg, model, config):
        classes = f", {model.num_classes} classes" if model.num_classes else ""
        return (f"{cfg.model}, nr_resnet={model.nr_resnet}, filters={model.nr_filters}, "
                f"{model.nr_mix}-component discretized logistic mixture, dropout={cfg.dropout:g}{classes}")


KINDS = {"pixelcnn": PixelKind(), "gated-pixelcnn": PixelKind(), "pixelcnnpp": PixelCNNppKind(), "vae": VAEKind()}
# the files a run writes in its folder (another run's are refused, or deleted by --force)
RUN_FILES = tuple(dict.fromkeys((CHECKPOINT, CHECKPOINT + ".tmp", "metrics.jsonl", "summary.json")
                                + tuple(name for kind in KINDS.values() for name in kind.images)))


def fit_channels(channels: Optional[int], kind, cfg, data_channels: int) -> int:
    """--channels for the data: the default rounded up to the multiple the
    model needs for the data's colour channels (64 -> 66 for RGB PixelCNN);
    an explicit value that does not fit is an error naming --channels and the
    nearest valid values."""
    multiple, why = kind.channel_multiple(cfg, data_channels)
    if channels is None:
        return multiple * math.ceil(kind.defaults["channels"] / multiple)
    if channels % multiple:
        below = channels // multiple * multiple
        nearest = [str(v) for v in (below, below + multiple) if v >= multiple]
        raise TrainError(f"--channels {channels} does not fit {cfg.model} on {data_channels}-channel images: it must "
                         f"be a multiple of {multiple} ({why}); the nearest valid value"
                         f"{'s are' if len(nearest) > 1 else ' is'} {' or '.join(nearest)}")
    return channels


# ---- the training job ---------------------------------------------------------------------------------------------

def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 5% of the peak at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_steps(total: int) -> int:
    return max(1, min(500, total // 20))


class _Loss(torch.nn.Module):
    """The loss as a module, so that DDP wraps the call that computes it (its hooks see the forward)."""

    def __init__(self, model, kind):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, images, labels, seed):
        return self.kind.loss(self.model, images, labels, seed)


def _resolve(cfg, saved=None):
    """cfg with every None filled: from the checkpoint's arguments when resuming, else the
    defaults of the model's kind (DEFAULTS, PP_DEFAULTS, VAE_DEFAULTS)."""
    values = dataclasses.asdict(cfg)
    if saved is not None:
        for key in FIXED_ON_RESUME:
            given, stored = values[key], saved.get(key)
            if given is not None and given != stored:
                raise TrainError(f"--resume: the checkpoint was trained with {key}={stored!r}; got {key}={given!r} "
                                 f"(a resumed run keeps the options that define it)")
        for key in INHERITED:
            if values[key] is None:
                values[key] = saved.get(key)
        if cfg.steps is None and cfg.epochs is None:  # keep the checkpoint's length
            values["steps"], values["epochs"] = saved.get("steps"), saved.get("epochs")
    model = values["model"] if values["model"] is not None else (saved or {}).get("model")
    kind = KINDS.get(model, KINDS["pixelcnn"])  # an unknown model is _check's error
    for key, default in kind.defaults.items():
        if values[key] is None:
            values[key] = default
    return TrainConfig(**values)


def _check(cfg):
    if cfg.model not in MODELS:
        raise TrainError(f"unknown model {cfg.model!r}; known models: {', '.join(MODELS)}")
    if cfg.data is None:
        raise TrainError("no dataset given (--data)")
    own = KINDS[cfg.model].options
    for key, flag in MODEL_OPTIONS.items():
        if key not in own and getattr(cfg, key) not in (None, False):
            takers = sorted({name for name, kind in KINDS.items() if key in kind.options})
            raise TrainError(f"{flag} is not an option of {cfg.model} (it is for {', '.join(takers)})")
    command_backend(cfg.backend)
    try:
        check_seed(cfg.seed, "--seed")
    except ValueError as e:
        raise TrainError(str(e)) from None
    if cfg.resume and cfg.force:
        raise TrainError("give --resume (continue the run in --out) or --force (replace it), not both")
    if cfg.decoder is not None and cfg.decoder not in ("bernoulli", "gaussian"):
        raise TrainError(f"decoder must be 'bernoulli' or 'gaussian', got {cfg.decoder!r}")
    for key in ("batch", "channels", "kernel_size", "log_every"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise TrainError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    for key in ("steps", "depth", "eval_batches", "stop_at", "latent", "iw_images", "nr_mix"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise TrainError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    for key in ("eval_every", "ckpt_every", "samples", "num_workers", "iw_samples"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 0:
            raise TrainError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    if cfg.dropout is not None and not 0 <= cfg.dropout < 1:
        raise TrainError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.steps is not None and cfg.epochs is not None:
        raise TrainError("give --steps or --epochs, not both")
    if cfg.epochs is not None and not cfg.epochs > 0:
        raise TrainError(f"epochs must be > 0, got {cfg.epochs}")
    if not cfg.lr > 0:
        raise TrainError(f"lr must be > 0, got {cfg.lr}")
    if cfg.max_minutes is not None and not cfg.max_minutes > 0:
        raise TrainError(f"max_minutes must be > 0, got {cfg.max_minutes}")


def _machine(dist_):
    import fastgen
    info = {"fastgen": fastgen.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "device": str(dist_.device),
            "world_size": dist_.world}
    if dist_.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dist_.device)
    return info


def train(cfg: TrainConfig, *, out=None) -> Optional[Dict[str, Any]]:
    """Run one training job (see the module docstring). Returns the summary
    dict on rank 0 (None on other ranks); ``summary["stopped_by"]`` is
    "SIGINT" / "SIGTERM" for a run interrupted (and saved) at a step boundary.
    Raises TrainError (OutputError for an unwritable or occupied --out) for a
    job that cannot run as asked, fastgen.data.DatasetMissingError for missing
    data, fastgen.BackendError for a forced backend that cannot run."""
    dist_ = Dist(cfg.device)
    try:
        result = _train(cfg, dist_, out or sys.stdout)
        # a finished run's ranks leave together: a rank tearing gloo down while another still talks to it aborts
        dist_.barrier()
        return result
    finally:
        dist_.close()


PAUSES = ("stop-at", "SIGINT", "SIGTERM")  # the stops that end a run to be resumed (checkpoint only)


class _Interrupted(Exception):
    """A signal arrived during an evaluation that may be abandoned (see _Signals.abandoning)."""


class _Signals:
    """SIGINT / SIGTERM while training: remembered by the handler and acted on
    by the loop at the next step boundary, so a checkpoint never holds a
    half-applied update. Within ``abandoning()`` (an evaluation, which changes
    no training state) the handler raises _Interrupted instead. A second
    signal more than a second after the first quits at once
    (KeyboardInterrupt); the previous handlers come back on exit. Outside the
    main thread (where Python allows no handlers) nothing is installed."""

    def __init__(self, main):
        self.main, self.received, self.previous = main, None, {}
        self.first_s, self.abandon = 0.0, False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is not None:
            if time.monotonic() - self.first_s > 1.0:
                raise KeyboardInterrupt
            return
        self.received, self.first_s = name, time.monotonic()
        if self.main:  # os.write: print() is not safe inside a signal handler
            os.write(2, f"\n{name}: saving a checkpoint at the end of this step (again to quit at once, without "
                        f"saving)\n".encode())
        if self.abandon:
            raise _Interrupted

    @contextlib.contextmanager
    def abandoning(self, allowed=True):
        """A signal within this block raises _Interrupted (when ``allowed``: not under torchrun, where one
        rank leaving an evaluation would leave the others waiting in its all-reduce)."""
        self.abandon = allowed
        try:
            yield
        finally:
            self.abandon = False

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def pending(self, dist_):
        """The signal every rank acts on (any rank's), or None; one small all-reduce per step under torchrun."""
        if not dist_.group:
            return self.received
        codes = {"SIGINT": int(signal.SIGINT), "SIGTERM": int(signal.SIGTERM)}
        got = dist_.max(torch.tensor([codes.get(self.received, 0)], device=dist_.device)).item()
        return signal.Signals(int(got)).name if got else None


def _other_run(cfg):
    """The files of another run in --out (to be deleted: --force), or an
    OutputError unless --resume continues that run."""
    if cfg.resume:
        return []
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(cfg.out, name))]
    if found and not cfg.force:
        raise OutputError(f"--out {cfg.out} holds another run ({', '.join(found)}): continue it with --resume, "
                          f"replace it with --force (its files are deleted), or choose another --out")
    return found


def _train(cfg, dist_, out):
    t_start = time.perf_counter()
    device, main = dist_.device, dist_.main

    def say(msg):
        if main:
            print(msg, file=out, flush=True)

    ckpt_path = os.path.join(cfg.out, CHECKPOINT)
    check_out(cfg.out, folder=True)
    ckpt = read_checkpoint(ckpt_path) if cfg.resume else None
    given_channels = cfg.channels
    cfg = _resolve(cfg, ckpt["args"] if ckpt else None)
    _check(cfg)
    replaced = _other_run(cfg)
    kind = KINDS[cfg.model]
    amp = cfg.amp if cfg.amp is not None else device.type == "cuda"
    backend, backend_source = command_backend(cfg.backend)
    cfg = dataclasses.replace(cfg, amp=amp, device=str(device))  # record what ran

    shape = ckpt["model_config"]["kwargs"]["image_shape"] if ckpt else None
    train_data, test_data = _load_data(cfg, expect_shape=shape)
    steps_per_epoch = (len(train_data) // dist_.world) // cfg.batch
    if steps_per_epoch < 1:
        raise TrainError(f"batch {cfg.batch} x {dist_.world} process(es) is larger than the {len(train_data)} "
                         f"training images of {cfg.data!r}")
    total = cfg.steps if cfg.steps is not None else max(1, round((cfg.epochs or 1) * steps_per_epoch))
    if ckpt and total < ckpt["step"]:
        asked = f"--steps {cfg.steps}" if cfg.steps is not None else f"--epochs {cfg.epochs:g} ({total} steps)"
        raise TrainError(f"--resume: {asked} is below the checkpoint's step {ckpt['step']}; a resumed run trains "
                         f"on to a later step (or give neither to finish the checkpoint's run)")
    if not ckpt:
        cfg = dataclasses.replace(cfg, channels=fit_channels(given_channels, kind, cfg, train_data.shape[0]))

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in every run
    random.seed(cfg.seed)
    config = ckpt["model_config"] if ckpt else kind.model_config(cfg, train_data)
    try:
        model = build_model(config, backend=cfg.backend).to(device)
    except ValueError as e:  # a configuration the model refuses (its message says why)
        raise TrainError(str(e)) from None
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    warmup = warmup_steps(total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))

    step = 0
    if ckpt:  # every rank reads the checkpoint: --resume needs OUT on a folder all ranks see
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        step = ckpt["step"]
        rngs = ckpt["rng"]
        if len(rngs) != dist_.world:
            say(f"note: the checkpoint was written by {len(rngs)} process(es), this run has {dist_.world}: "
                f"the data order from here differs from an uninterrupted run")
        _set_rng_state(rngs[dist_.rank % len(rngs)], device)
    net = _Loss(model, kind)
    if dist_.group:
        # every parameter gets a gradient at every step (the last gated layer has no unused outputs)
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    dist_.barrier()  # every rank has looked at --out before rank 0 deletes or writes anything
    if main:
        for name in replaced:  # --force: nothing of the other run stays beside the new one
            os.remove(os.path.join(cfg.out, name))
        os.makedirs(cfg.out, exist_ok=True)
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    if main:
        _trim_metrics(metrics_path, step, total)

    signals = _Signals(main)  # installed around the training loop below

    def log(record):
        signals.abandon = False  # a logged evaluation is done: an interrupt from here waits for the step boundary
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    n_params = sum(p.numel() for p in model.parameters())
    binary = model.likelihood == "bernoulli"
    say(f"data: {cfg.data}, {len(train_data)} train / {len(test_data)} test images of "
        f"{'x'.join(map(str, train_data.shape))}, {train_data.levels} levels"
        f"{', dynamic binarization' if train_data.dynamic else ''}")
    say(f"model: {kind.describe(cfg, model, config)}; {n_params / 1e3:.1f}k parameters")
    say(f"device: {device}{f' x {dist_.world} processes' if dist_.world > 1 else ''}, "
        f"{torch.get_num_threads()} threads, amp {'bf16' if amp else 'off'}, "
        f"backend {f'{backend} (forced by {backend_source})' if backend else 'dispatch'}")
    say(f"{'resuming at' if step else 'training'} step {step} of {total} ({total / steps_per_epoch:.2f} epochs of "
        f"{steps_per_epoch} steps), batch {cfg.batch}{f' x {dist_.world}' if dist_.world > 1 else ''}, "
        f"Adam lr {cfg.lr:g} ({warmup} warm-up steps, cosine decay)")

    def save_checkpoint():
        rngs = dist_.gather(_rng_state(device))  # every rank's generators, for an exact resume
        windows = dist_.gather(window.tolist())  # and its losses not yet logged, for the same loss curve
        if main:
            _atomic_save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "model_config": config,
                          "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                          "train_s": before_s + train_s, "loss_window": windows, "eval_due": eval_due,
                          "rng": rngs, "args": dataclasses.asdict(cfg),
                          "data": {"name": cfg.data, "shape": list(train_data.shape), "levels": train_data.levels,
                                   "num_classes": train_data.num_classes}}, ckpt_path)

    def run_eval(final=False):
        return kind.evaluate(model, test_data, cfg, step=step, device=device, amp=amp, dist_=dist_, final=final,
                             say=say, log=log)

    sampler = torch.utils.data.DistributedSampler(train_data, num_replicas=dist_.world, rank=dist_.rank,
                                                  shuffle=True, seed=cfg.seed, drop_last=True)
    batches = _StepBatches(train_data, cfg.seed, dist_.rank)
    start_step, saved_step = step, (step if ckpt else None)
    window = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, steps since the last log
    if ckpt and len(ckpt.get("loss_window", ())) == dist_.world:
        window += torch.tensor(ckpt["loss_window"][dist_.rank], dtype=torch.float64, device=device)
    train_s, stop, last = 0.0, None, None
    before_s = ckpt.get("train_s", 0.0) if ckpt else 0.0  # training seconds of the runs before a resume
    deadline = t_start + cfg.max_minutes * 60 if cfg.max_minutes else None
    eval_due = bool(ckpt and ckpt.get("eval_due"))  # an evaluation an interrupt abandoned: done first
    model.train()
    with signals, Progress(total - start_step, "train", enabled=main and not cfg.quiet) as bar:
        if eval_due and step < total:
            run_eval()
        eval_due = False
        while step < total and stop is None:
            epoch, first = divmod(step, steps_per_epoch)
            keys = _epoch_batches(sampler, epoch, first, cfg.batch, steps_per_epoch)
            loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=keys,
                                                 num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                                                 generator=torch.Generator().manual_seed(cfg.seed),
                                                 worker_init_fn=_worker_init if cfg.num_workers else None)
            tick = time.perf_counter()  # training time counts data loading, not evaluation or checkpoints
            for images, labels in loader:
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True) if cfg.conditional else None
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    # the VAE's latent draw: seeded by where it happens, so ranks differ and a resume repeats it
                    loss = net(images, labels, derived_seed("train", cfg.seed, step, dist_.rank))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                window[0] += loss.detach().double()
                window[1] += 1
                if step % cfg.log_every == 0 or step == total:
                    dist_.sum(window)
                    nats = (window[0] / window[1]).item()
                    last = (nats, model.bits_per_dim(nats))
                    window.zero_()
                    log({"step": step, "kind": "train", "loss_nats": round(nats, 5),
                         "bits_per_dim": round(last[1], 6), "lr": opt.param_groups[0]["lr"],
                         "time_s": round(before_s + train_s + time.perf_counter() - tick, 2)})
                    bar.postfix = f"loss {nats:.2f} nats {last[1]:.4f} bits/dim"
                    if deadline is not None:  # rank 0's clock decides, so that every rank stops at the same step
                        late = torch.tensor([float(main and time.perf_counter() > deadline)], device=device)
                        if dist_.sum(late).item() > 0:
                            stop = "max-minutes"
                if cfg.stop_at is not None and cfg.stop_at <= step < total:
                    stop = "stop-at"
                stop = signals.pending(dist_) or stop  # the step is whole here: a signal stops the run now
                train_s += time.perf_counter() - tick
                bar.update(1)
                if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                    if stop is None:
                        try:
                            with signals.abandoning(not dist_.group):
                                run_eval()
                        except _Interrupted:  # nothing of it was logged
                            stop = signals.received
                    eval_due = stop in PAUSES  # skipped or abandoned by a pause: the resumed run's first work
                if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or stop is not None:
                    save_checkpoint()
                    saved_step = step
                tick = time.perf_counter()
                if stop is not None or step >= total:
                    break
        if saved_step != step:  # before the final evaluation and samples: an interrupt there loses no training
            save_checkpoint()
            saved_step = step

    steps_run = step - start_step
    paused = stop in PAUSES  # checkpoint only: no evaluation, no samples
    resume = f"python -m fastgen train {cfg.model} --resume --out {shlex.quote(cfg.out)}"
    if stop == "stop-at":
        say(f"paused at step {step} of {total}: checkpoint in {ckpt_path}; continue with --resume")
    elif stop == "max-minutes":
        say(f"stopped at step {step} of {total} after --max-minutes {cfg.max_minutes:g}")
    elif paused:
        say(f"interrupted by {stop} at step {step} of {total}: checkpoint saved in {ckpt_path}; continue with: "
            f"{resume}")
    if steps_run:
        say(f"trained {steps_run} steps in {train_s:.0f} s ({steps_run / train_s:.2f} steps/s, "
            f"{steps_run * cfg.batch * dist_.world / train_s:.0f} images/s)"
            + (f"; last train loss {describe_nll(*last, binary)}" if last else ""))

    result = {"test_nats": None, "test_bits_per_dim": None, "test_images": None}
    if not paused:
        result = run_eval(final=True)
    digests = dist_.gather(weights_digest(model))
    if main and len(set(digests)) > 1:
        say(f"warning: the {dist_.world} replicas' weights differ at the end")

    written = [ckpt_path, metrics_path]
    if main and cfg.samples and not paused:
        t0 = time.perf_counter()
        written += kind.write_images(model, test_data, cfg, progress=not cfg.quiet)
        result["sample_s"] = round(time.perf_counter() - t0, 1)
    if not main:
        return None
    summary = {
        "config": dataclasses.asdict(cfg), "model_config": config, "parameters": n_params,
        "machine": _machine(dist_),
        "data": {"name": cfg.data, "train_images": len(train_data), "test_images": len(test_data),
                 "shape": list(train_data.shape), "levels": train_data.levels},
        "step": step, "total_steps": total, "finished": step >= total, "stopped_by": stop,
        "steps_this_run": steps_run, "train_s": round(train_s, 2), "train_s_all_runs": round(before_s + train_s, 2),
        "steps_per_s": round(steps_run / train_s, 3) if train_s > 0 else None,
        "images_per_s": round(steps_run * cfg.batch * dist_.world / train_s, 1) if train_s > 0 else None,
        "final_train_nats": round(last[0], 4) if last else None,
        **result,
        "weights_sha256": digests,
        "total_s": round(time.perf_counter() - t_start, 2),
    }
    path = os.path.join(cfg.out, "summary.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    written.append(path)
    say(f"wrote {', '.join(written)} ({summary['total_s']:.0f} s in all)")
    return summary


def _trim_metrics(path, step, total):
    """Drop the metric lines a resumed run writes again: those past ``step``
    (written after the checkpoint it resumes from) and the final evaluation at
    ``total`` (redone by every run that reaches it; no evaluation within the
    loop happens at ``total``)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
                if record["step"] < step or (record["step"] == step and not (
                        step == total and record["kind"].startswith("eval"))):
                    keep.append(line)
            except (ValueError, KeyError, TypeError, AttributeError):  # a line cut short by a crash
                pass
    with open(path, "w") as f:
        f.writelines(keep)
