"""The pixel models' family: ``pixelcnn`` and ``gated-pixelcnn``. Likelihood from the data (Bernoulli for
2-level data, a categorical over the data's levels otherwise); loss = NLL; evaluation: test NLL; images:
samples.png."""
import dataclasses
import os
import time
from typing import Optional, Tuple

import torch

from fastgen.models import GatedPixelCNN, PixelCNN
from fastgen.train.common import check_at_least, describe_nll, grid_labels
from fastgen.train.family import LikelihoodFamily, eval_totals

# arguments the PixelCNN++ family takes too (family.Family.arguments: one object for both)
DEPTH = (("--layers", "--blocks", "--nr-resnet"),
         dict(dest="depth", type=int, help="network depth: gated layers (gated-pixelcnn, default 8) or residual "
                                           "blocks (pixelcnn, default 7); pixelcnnpp: see its options"))
CONDITIONAL = (("--conditional",), dict(action="store_true", default=None,
                                        help="class-conditional on the dataset's labels"))


DEFAULTS = {"channels": 64, "kernel_size": 3, "conditional": False}


@dataclasses.dataclass
class PixelOptions:
    depth: Optional[int] = None  # gated layers or residual blocks; None: the model's default
    kernel_size: Optional[int] = None
    conditional: Optional[bool] = None


def evaluate(model: torch.nn.Module, data, batch: int, *, device: torch.device, amp: bool = False,
             conditional: bool = False, max_batches: Optional[int] = None, dist_=None,
             progress: bool = False) -> Tuple[float, int]:
    """(mean NLL in nats per image, number of images) of ``model`` on ``data``
    (.images: the fixed binarization for binarized MNIST), over its first
    ``max_batches`` batches of ``batch`` images (None: all). Under torchrun
    each rank takes every world-th batch and the sums are reduced.
    ``progress``: a progress bar on stderr."""
    def nll(images, lo, hi, b):
        labels = data.labels[lo:hi].to(device) if conditional else None
        return (-model.log_prob(images, labels),)

    total = eval_totals(model, data, batch, 1, nll, device=device, amp=amp, max_batches=max_batches, dist_=dist_,
                        progress=progress, desc="eval (test NLL)")
    return (total[0] / total[1]).item(), int(total[1].item())


def sample_grid(model: torch.nn.Module, n: int, path: "os.PathLike[str] | str", *, seed: int = 0,
                progress: bool = False) -> torch.Tensor:
    """Draw ``n`` samples with model.sample and write them as an image grid
    laid out by :func:`grid_labels`; returns the samples."""
    from fastgen.data import save_grid
    labels, nrow = grid_labels(n, model.num_classes, next(model.parameters()).device)
    images = model.sample(n, labels, seed=seed, progress=progress)
    save_grid(images.cpu(), path, nrow=nrow, levels=model.levels)
    return images


class PixelFamily(LikelihoodFamily):
    """PixelCNN and Gated PixelCNN: likelihood from the data, loss = NLL,
    evaluation = test NLL, images = samples.png."""
    MODELS = {"pixelcnn": PixelCNN, "gated-pixelcnn": GatedPixelCNN}
    DEPTH_ARG = {"pixelcnn": "blocks", "gated-pixelcnn": "layers"}  # the constructor argument of --layers
    Options = PixelOptions
    defaults = DEFAULTS
    arguments = (DEPTH,
                 (("--kernel-size",), dict(type=int, help=f"kernel of the masked / gated layers after the first "
                                                          f"(default {DEFAULTS['kernel_size']})")),
                 CONDITIONAL)
    description = "--channels: feature maps of every layer"
    fixed_on_resume = ("depth", "kernel_size", "conditional")
    images = ("samples.png",)

    @classmethod
    def check_options(cls, opts):
        check_at_least(opts, ("kernel_size", "depth"), 1)

    @classmethod
    def channel_multiple(cls, name, data_channels):
        colours = f"the data's {data_channels} colour channel{'s' if data_channels > 1 else ''}"
        multiple = cls.MODELS[name].channel_multiple(data_channels)
        return multiple, (colours if multiple == data_channels else f"{multiple // data_channels} x {colours}")

    def new_config(self, data):
        kwargs = {"image_shape": list(data.shape), "channels": self.cfg.channels,
                  "kernel_size": self.opts.kernel_size,
                  "likelihood": "bernoulli" if data.levels == 2 else "categorical", "levels": data.levels,
                  "num_classes": data.num_classes if self.opts.conditional else None}
        if self.opts.depth is not None:
            kwargs[self.DEPTH_ARG[self.cfg.model]] = self.opts.depth
        return {"name": self.cfg.model, "kwargs": kwargs}

    def describe_model(self):
        name, model = self.cfg.model, self.model
        depth_name = self.DEPTH_ARG[name]
        depth = self.model_config["kwargs"].get(depth_name, len(model.layers) if name == "gated-pixelcnn"
                                                else len(model.blocks))
        likelihood = "Bernoulli" if model.likelihood == "bernoulli" else f"{model.levels}-way categorical"
        classes = f", {model.num_classes} classes" if model.num_classes else ""
        return (f"{name}, {depth_name}={depth}, channels={self.cfg.channels}, "
                f"kernel_size={self.opts.kernel_size}, {likelihood}{classes}")

    def loss(self, model, images, labels, seed):
        return model.loss(images, labels if self.opts.conditional else None)

    def evaluate(self, data, *, step, final):
        cfg, run, model = self.cfg, self.run, self.model
        t0 = time.perf_counter()
        binary = model.likelihood == "bernoulli"
        nats, n = evaluate(model, data, cfg.batch, device=run.device, amp=run.amp, conditional=self.opts.conditional,
                           max_batches=cfg.eval_batches, dist_=run.dist, progress=not cfg.quiet)
        bpd = model.bits_per_dim(nats)
        run.log({"step": step, "kind": "eval", "test_nats": round(nats, 5), "test_bits_per_dim": round(bpd, 6),
                 "images": n, "eval_s": round(time.perf_counter() - t0, 2)})
        run.say(f"step {step}: test {describe_nll(nats, bpd, binary)} on {n} test images "
                f"({time.perf_counter() - t0:.0f} s)")
        return {"test_nats": round(nats, 4), "test_bits_per_dim": round(bpd, 5), "test_images": n}

    def write_images(self, data):
        path = os.path.join(self.cfg.out, "samples.png")
        sample_grid(self.model, self.cfg.samples, path, seed=self.cfg.seed, progress=not self.cfg.quiet)
        return [path]
