"""The VAE family: ``vae``. Decoder from the data unless ``--decoder`` says (Bernoulli for 2-level data, the
discretized Gaussian over the levels otherwise); loss = the negative ELBO (one latent draw per image, seeded
by (seed, step, rank)); evaluation: test ELBO (seeded draws) and, at the end, the importance-weighted NLL with
``--iw-samples`` draws on the first ``--iw-images`` test images; images: samples.png, reconstructions.png
(rows of test images above their reconstructions), interpolation.png (one row per pair of test images: the
decoded line between their posterior means)."""
import dataclasses
import math
import os
import time
from typing import Dict, Optional

import torch

from fastgen.models import VAE
from fastgen.train.common import TrainError, check_at_least, derived_seed, describe_nll
from fastgen.train.family import LikelihoodFamily, eval_totals

IMAGES = ("samples.png", "reconstructions.png", "interpolation.png")
# larger batches than the pixel models: its steps are cheap
DEFAULTS = {"batch": 128, "channels": 32, "latent": 32, "iw_samples": 100, "iw_images": 1000}


@dataclasses.dataclass
class VAEOptions:
    decoder: Optional[str] = None  # 'bernoulli' or 'gaussian'; None: from the data's levels
    latent: Optional[int] = None  # latent dimensions
    iw_samples: Optional[int] = None  # importance samples of the final IW NLL (0: none)
    iw_images: Optional[int] = None  # the IW NLL is taken on the first iw_images test images


def evaluate_elbo(model: torch.nn.Module, data, batch: int, *, device: torch.device, amp: bool = False,
                  max_batches: Optional[int] = None, dist_=None, seed: int = 0,
                  progress: bool = False) -> Dict[str, float]:
    """{"elbo", "log_px", "kl" (mean nats per image), "images"} of a VAE on
    ``data`` (.images: the fixed binarization for binarized MNIST), one latent
    draw per image seeded by (seed, batch index), so the result does not depend
    on the number of processes; batches as in fastgen.train.evaluate."""
    def terms(images, lo, hi, b):
        return model.elbo_terms(images, seed=derived_seed("eval", seed, b))

    total = eval_totals(model, data, batch, 2, terms, device=device, amp=amp, max_batches=max_batches, dist_=dist_,
                        progress=progress, desc="eval (test ELBO)")
    log_px, kl = (total[:2] / total[2]).tolist()
    return {"elbo": log_px - kl, "log_px": log_px, "kl": kl, "images": int(total[2].item())}


def evaluate_iw(model: torch.nn.Module, data, batch: int, k: int, n_images: Optional[int], *, device: torch.device,
                amp: bool = False, dist_=None, seed: int = 0, progress: bool = False) -> Dict[str, float]:
    """{"iw_nll", "neg_elbo" (mean nats per image), "images"}: a VAE's
    importance-weighted NLL estimate with ``k`` draws (VAE.iw_nll), and its
    -ELBO, on the first ``n_images`` images of ``data`` (all if fewer), draws
    seeded by (seed, batch index); batches spread over the ranks."""
    def bounds(images, lo, hi, b):
        return (model.iw_nll(images, k, seed=derived_seed("iw", seed, b)),
                -model.elbo(images, seed=derived_seed("eval", seed, b)))

    total = eval_totals(model, data, batch, 2, bounds, device=device, amp=amp, n_images=n_images, dist_=dist_,
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
    paths = [os.path.join(out, name) for name in IMAGES]
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


class VAEFamily(LikelihoodFamily):
    """The VAE: decoder from the data (or --decoder), loss = -ELBO, evaluation
    = test ELBO and, at the end, the IW NLL; images: samples, reconstructions,
    interpolation."""
    MODELS = {"vae": VAE}
    Options = VAEOptions
    defaults = DEFAULTS
    arguments = (
        (("--decoder",), dict(choices=("bernoulli", "gaussian"),
                              help="p(x|z); bernoulli for binary data (binarized-mnist), gaussian: a discretized "
                                   "Gaussian over the pixel levels (a true discrete likelihood); default: bernoulli "
                                   "for 2-level data, else gaussian")),
        (("--latent",), dict(type=int, help=f"latent dimensions (default {DEFAULTS['latent']})")),
        (("--iw-samples",), dict(type=int, help=f"importance samples per image of the test IW NLL at the end "
                                                f"(default {DEFAULTS['iw_samples']}; 0: skip it)")),
        (("--iw-images",), dict(type=int, help=f"take the IW NLL on the first N test images (default "
                                               f"{DEFAULTS['iw_images']}; the whole split if it is smaller)")))
    description = ("--channels: of the first convolution, the second has twice as many; --samples 0 writes no "
                   "PNGs")
    fixed_on_resume = ("decoder", "latent")
    images = IMAGES

    @classmethod
    def check_options(cls, opts):
        if opts.decoder is not None and opts.decoder not in ("bernoulli", "gaussian"):
            raise TrainError(f"decoder must be 'bernoulli' or 'gaussian', got {opts.decoder!r}")
        check_at_least(opts, ("latent", "iw_images"), 1)
        check_at_least(opts, ("iw_samples",), 0)

    def new_config(self, data):
        binary = data.levels == 2
        decoder = self.opts.decoder or ("bernoulli" if binary else "gaussian")
        if decoder == "bernoulli" and not binary:
            raise TrainError(f"--decoder bernoulli models binary images, but {self.cfg.data!r} has {data.levels} "
                             f"levels: use --data binarized-mnist (binary MNIST), or --decoder gaussian (the "
                             f"discretized Gaussian over the {data.levels} levels)")
        return {"name": "vae", "kwargs": {"image_shape": list(data.shape), "channels": self.cfg.channels,
                                          "latent": self.opts.latent, "decoder": decoder, "levels": data.levels}}

    def describe_model(self):
        model = self.model
        decoder = ("Bernoulli decoder" if model.decoder == "bernoulli"
                   else f"discretized Gaussian decoder over {model.levels} levels")
        return f"vae, latent={model.latent_features}, channels={self.cfg.channels}, {decoder}"

    def loss(self, model, images, labels, seed):
        return model.loss(images, seed=seed)

    def evaluate(self, data, *, step, final):
        cfg, opts, run, model = self.cfg, self.opts, self.run, self.model
        binary = model.likelihood == "bernoulli"
        t0 = time.perf_counter()
        r = evaluate_elbo(model, data, cfg.batch, device=run.device, amp=run.amp, max_batches=cfg.eval_batches,
                          dist_=run.dist, seed=cfg.seed, progress=not cfg.quiet)
        neg_elbo, n = -r["elbo"], r["images"]
        bpd = model.bits_per_dim(neg_elbo)
        run.log({"step": step, "kind": "eval", "test_elbo_nats": round(r["elbo"], 5),
                 "test_nats": round(neg_elbo, 5), "test_bits_per_dim": round(bpd, 6),
                 "test_kl_nats": round(r["kl"], 5), "images": n, "eval_s": round(time.perf_counter() - t0, 2)})
        run.say(f"step {step}: test ELBO {r['elbo']:.2f} nats/image (reconstruction {r['log_px']:.2f}, KL "
                f"{r['kl']:.2f}); -ELBO {describe_nll(neg_elbo, bpd, binary)} on {n} test images "
                f"({time.perf_counter() - t0:.0f} s)")
        result = {"test_nats": round(neg_elbo, 4), "test_bits_per_dim": round(bpd, 5), "test_images": n,
                  "test_elbo_nats": round(r["elbo"], 4), "test_kl_nats": round(r["kl"], 4)}
        if not final or not opts.iw_samples:
            return result
        t0 = time.perf_counter()
        iw = evaluate_iw(model, data, cfg.batch, opts.iw_samples, opts.iw_images, device=run.device, amp=run.amp,
                         dist_=run.dist, seed=cfg.seed, progress=not cfg.quiet)
        iw_bpd = model.bits_per_dim(iw["iw_nll"])
        seconds = time.perf_counter() - t0
        run.log({"step": step, "kind": "eval_iw", "test_iw_nll_nats": round(iw["iw_nll"], 5),
                 "test_iw_bits_per_dim": round(iw_bpd, 6), "test_neg_elbo_nats": round(iw["neg_elbo"], 5),
                 "iw_samples": opts.iw_samples, "images": iw["images"], "eval_s": round(seconds, 2)})
        run.say(f"step {step}: test IW NLL {describe_nll(iw['iw_nll'], iw_bpd, binary)} with k={opts.iw_samples} "
                f"importance samples on the first {iw['images']} test images (-ELBO on them {iw['neg_elbo']:.2f} "
                f"nats/image) ({seconds:.0f} s)")
        result.update(test_iw_nll_nats=round(iw["iw_nll"], 4), test_iw_bits_per_dim=round(iw_bpd, 5),
                      iw_samples=opts.iw_samples, iw_images=iw["images"],
                      test_neg_elbo_on_iw_images=round(iw["neg_elbo"], 4))
        return result

    def write_images(self, data):
        return vae_grids(self.model, data, self.cfg.out, n=self.cfg.samples, seed=self.cfg.seed)
