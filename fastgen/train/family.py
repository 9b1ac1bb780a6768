"""The interface between the training loop and a model family, and the base of the families that train one
model on its negative log-likelihood (or a bound of it).

A family class says what the command line and a resumed run need to know before anything is built
(``Options``, ``defaults``, ``arguments``, ``fixed_on_resume``, ``images``, ``check_options``,
``channel_multiple``, ``load_model``); an instance is one run's models, optimizers and schedulers, named by
their checkpoint keys. The loop (loop.py) owns data order, DDP, checkpoints, progress bars, logging,
interrupts and the run folder, and asks the family, per run:

* ``build(train_data, ckpt)``: its modules and optimizers (the checkpoint's state when resuming); modules
  whose forward computes a training loss go through ``run.wrap`` (DDP);
* ``step(images, labels, seed) -> {name: scalar tensor}`` (the keys of ``train_scalars``): one whole
  training step, optimizers included; the loop averages the scalars between log lines;
* ``train_record(means)`` / ``final_train(means)``: the metrics line and the end-of-run line of them;
* ``evaluate(data, step=, final=)``: logs and prints its scores (``run.log``, ``run.say``) and returns the
  summary's entries; ``write_images(data)``: its PNGs in the run folder;
* ``state_dict()`` / ``load_state_dict(ckpt)``: its part of the checkpoint: every model, optimizer and
  scheduler under its name, and ``model_config`` (``{"name": registry name, ...}``: what rebuilds it).

A GAN family owns a generator and a discriminator, an optimizer each, alternates their updates in ``step``
and reports both losses, D(x) and D(G(z)) as its scalars; nothing in the loop changes for it.
"""
import dataclasses
import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from fastgen._progress import Progress
from fastgen.train.common import TrainError, describe_nll


@dataclasses.dataclass
class Run:
    """What a family may use of the loop: the run's resolved options (``cfg.options``: the family's own),
    the processes (``dist``), bf16 autocast, the total steps, and the output (``say``: a line on rank 0's
    stdout; ``log``: a metrics.jsonl record)."""
    cfg: Any
    dist: Any
    amp: bool
    total: int
    say: Callable[[str], None]
    log: Callable[[Dict[str, Any]], None]

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` under DDP when torchrun launched the run (its hooks see the forward that computes a
        loss: every parameter must get a gradient at every step), else ``module``."""
        if not self.dist.group:
            return module
        device = self.device
        return torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)


class Family:
    """A model family as the training loop sees it (see the module docstring)."""
    Options: type  # a dataclass of the family's options, every field None by default ("the default", or
    # when resuming "the checkpoint's value")
    defaults: Dict[str, Any] = {}  # values of the options, and of the loop's batch / lr / channels, left None
    arguments: Tuple[Tuple[Tuple[str, ...], Dict[str, Any]], ...] = ()  # (flags, argparse kwargs) per option;
    # an argument two families take is one object both list
    description = ""  # the help group's text: what the family trains, and its meaning of the shared flags
    fixed_on_resume: Tuple[str, ...] = ()  # options that define the run (the others a resumed run inherits)
    images: Tuple[str, ...] = ()  # the files write_images writes in the run folder
    train_scalars: Tuple[str, ...] = ()  # the keys of step()'s dict, in the checkpoint's loss-window order
    unevaluated: Dict[str, Any] = {}  # the summary's evaluation entries of a run that ends without one
    state_keys: Tuple[str, ...] = ()  # the checkpoint entries of its models, optimizers and schedulers
    best_key: Optional[str] = None  # the entry of evaluate()'s result that best.pt and --patience go by (lower is
    # better); None: the run has none (then ``no_score`` says why)
    no_score = ""
    curves: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()  # curves.png: (panel title, metrics.jsonl fields) per panel

    def __init__(self, run: Run):
        self.run, self.cfg, self.opts = run, run.cfg, run.cfg.options
        self.models: Dict[str, torch.nn.Module] = {}
        self.optimizers: Dict[str, torch.optim.Optimizer] = {}
        self.schedulers: Dict[str, Any] = {}
        self.model_config: Optional[Dict[str, Any]] = None

    # ---- before a run: options and the data they fit --------------------------------------------------------

    @classmethod
    def check_options(cls, opts) -> None:
        """Raise TrainError for an option value the family cannot take."""

    @classmethod
    def channel_multiple(cls, name: str, data_channels: int) -> Tuple[int, str]:
        """--channels must be a multiple of this for ``name`` on images of ``data_channels`` colours, and why."""
        return 1, ""

    @classmethod
    def load_model(cls, ckpt: Dict[str, Any], backend: Optional[str] = None) -> torch.nn.Module:
        """The model a checkpoint's users sample (``fastgen.train.load_model``), with its weights."""
        raise NotImplementedError

    # ---- one run --------------------------------------------------------------------------------------------

    def build(self, train_data, ckpt: Optional[Dict[str, Any]]) -> None:
        raise NotImplementedError

    def describe(self) -> Tuple[str, str]:
        """(the models, the optimization) in words, for the run's opening lines."""
        raise NotImplementedError

    def step(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def train_record(self, means: Dict[str, float]) -> Tuple[Dict[str, Any], str]:
        """(metrics.jsonl fields, progress-bar text) of the training scalars' means since the last log."""
        raise NotImplementedError

    def final_train(self, means: Optional[Dict[str, float]]) -> Tuple[Dict[str, Any], Optional[str]]:
        """(summary fields, words) of the last logged means (None: nothing was logged)."""
        raise NotImplementedError

    def evaluate(self, data, *, step: int, final: bool) -> Dict[str, Any]:
        raise NotImplementedError

    def write_images(self, data) -> List[str]:
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        state = {name: obj.state_dict() for group in (self.models, self.optimizers, self.schedulers)
                 for name, obj in group.items()}
        state["model_config"] = self.model_config
        return state

    def load_state_dict(self, ckpt: Dict[str, Any]) -> None:
        for group in (self.models, self.optimizers, self.schedulers):
            for name, obj in group.items():
                obj.load_state_dict(ckpt[name])


def fit_channels(channels: Optional[int], family: type, name: str, data_channels: int) -> int:
    """--channels for the data: the default rounded up to the multiple the
    model needs for the data's colour channels (64 -> 66 for RGB PixelCNN);
    an explicit value that does not fit is an error naming --channels and the
    nearest valid values."""
    multiple, why = family.channel_multiple(name, data_channels)
    if channels is None:
        return multiple * math.ceil(family.defaults["channels"] / multiple)
    if channels % multiple:
        below = channels // multiple * multiple
        nearest = [str(v) for v in (below, below + multiple) if v >= multiple]
        raise TrainError(f"--channels {channels} does not fit {name} on {data_channels}-channel images: it must "
                         f"be a multiple of {multiple} ({why}); the nearest valid value"
                         f"{'s are' if len(nearest) > 1 else ' is'} {' or '.join(nearest)}")
    return channels


# ---- one model, its likelihood, Adam with warm-up and cosine decay ------------------------------------------

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

    def __init__(self, model, loss):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, images, labels, seed):
        return self.loss(self.model, images, labels, seed)


class LikelihoodFamily(Family):
    """One model (``models["model"]``, built from ``model_config`` by ``MODELS[name]``) trained on its loss in
    nats per image (an NLL or a negative ELBO) by Adam with linear warm-up and cosine decay (``optimizer``,
    ``scheduler``): the pixel models and the VAE. A subclass gives ``new_config``, ``loss``, ``describe_model``,
    ``evaluate`` and ``write_images``."""
    MODELS: Dict[str, type] = {}  # registry name -> model class
    train_scalars = ("loss_nats",)
    best_key = "test_nats"
    curves = (("nats per image", ("loss_nats", "test_nats")), ("learning rate", ("lr",)))
    unevaluated = {"test_nats": None, "test_bits_per_dim": None, "test_images": None}
    state_keys = ("model", "optimizer", "scheduler")

    @classmethod
    def build_model(cls, config: Dict[str, Any], backend: Optional[str] = None) -> torch.nn.Module:
        kwargs = dict(config["kwargs"])
        kwargs["image_shape"] = tuple(kwargs["image_shape"])
        return cls.MODELS[config["name"]](**kwargs, backend=backend)

    @classmethod
    def load_model(cls, ckpt, backend=None):
        model = cls.build_model(ckpt["model_config"], backend=backend)
        model.load_state_dict(ckpt["model"])
        return model

    def new_config(self, data) -> Dict[str, Any]:
        """The model's constructor config {"name", "kwargs"} for a loaded dataset."""
        raise NotImplementedError

    def loss(self, model, images, labels, seed) -> torch.Tensor:
        raise NotImplementedError

    def describe_model(self) -> str:
        raise NotImplementedError

    def build(self, train_data, ckpt):
        cfg, total = self.cfg, self.run.total
        self.model_config = ckpt["model_config"] if ckpt else self.new_config(train_data)
        try:
            self.model = self.build_model(self.model_config, backend=cfg.backend).to(self.run.device)
        except ValueError as e:  # a configuration the model refuses (its message says why)
            raise TrainError(str(e)) from None
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.warmup = warmup = warmup_steps(total)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, total, warmup))
        # named as in every checkpoint since format 1 (state_keys)
        self.models, self.optimizers, self.schedulers = {"model": self.model}, {"optimizer": self.opt}, \
            {"scheduler": self.sched}
        if ckpt:  # every rank reads the checkpoint: --resume needs OUT on a folder all ranks see
            self.load_state_dict(ckpt)
        self.net = self.run.wrap(_Loss(self.model, self.loss))

    def describe(self):
        return self.describe_model(), f"Adam lr {self.cfg.lr:g} ({self.warmup} warm-up steps, cosine decay)"

    def step(self, images, labels, seed):
        with self.run.autocast():
            loss = self.net(images, labels, seed)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return {"loss_nats": loss.detach()}

    def train_record(self, means):
        nats = means["loss_nats"]
        bpd = self.model.bits_per_dim(nats)
        return ({"loss_nats": round(nats, 5), "bits_per_dim": round(bpd, 6), "lr": self.opt.param_groups[0]["lr"]},
                f"loss {nats:.2f} nats {bpd:.4f} bits/dim")

    def final_train(self, means):
        if means is None:
            return {"final_train_nats": None}, None
        nats = means["loss_nats"]
        binary = self.model.likelihood == "bernoulli"
        return ({"final_train_nats": round(nats, 4)},
                f"loss {describe_nll(nats, self.model.bits_per_dim(nats), binary)}")


# ---- evaluation over the test split, shared by the likelihood families -----------------------------------------

def _eval_batches(n_images, batch, max_batches, dist_):
    """Indices of the evaluation batches this rank takes (every world-th one)."""
    rank, world = (dist_.rank, dist_.world) if dist_ is not None else (0, 1)
    n_batches = math.ceil(n_images / batch)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    return range(rank, n_batches, world)


@torch.no_grad()
def eval_totals(model, data, batch, n_values, batch_values, *, device, amp=False, n_images=None, max_batches=None,
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
