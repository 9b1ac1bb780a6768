"""The GAN family: ``dcgan`` (unconditional) and ``cgan`` (class-conditional on the dataset's labels): DCGAN's
generator and discriminator (fastgen.models.dcgan), the losses of fastgen.gan, Adam for each (``--lr``, default
2e-4, betas 0.5 and 0.999, DCGAN's).

A training step is one discriminator update on the step's real batch and a fresh generated one; every
``--d-steps`` k-th step the generator is updated too, on the same generated batch (k discriminator steps, each
on its own minibatch, per generator step). In the generator's update D's parameters are frozen: it gives only
the input gradient, and no weight gradient of D is computed. Noise is drawn from the step's seed, so a resumed run repeats it.
``--ema``: an exponential moving average of G's weights (what samples.png and ``sample`` draw from).
Evaluation: mean D(x) on test images and D(G(z)) on as many generated ones, and the oscillation: the spread of
D(x) - D(G(z)) over the last OSCILLATION_WINDOW training log lines. Images: samples.png, a grid from fixed noise
(one class per column for cgan). A GAN has no likelihood: best.pt and --patience wait for the judge's score
(fastgen.metrics, to come)"""
import copy
import dataclasses
import os
import statistics
import time
from typing import Optional

import torch

from fastgen.gan import G_LOSS_KINDS, discriminator_loss, generator_loss
from fastgen.models.dcgan import CONDITIONINGS, DCGANDiscriminator, DCGANGenerator
from fastgen.train.common import TrainError, check_at_least, grid_labels
from fastgen.train.family import Family

DEFAULTS = {"batch": 64, "lr": 2e-4, "channels": 64, "z_dim": 100, "g_loss": "non_saturating", "d_steps": 1,
            "pack": 1, "ema": 0.0, "conditioning": "projection"}
BETAS = (0.5, 0.999)
FIXED_NOISE_SEED = 1234  # samples.png: the same z at every evaluation of a run
OSCILLATION_WINDOW = 20  # training log lines the oscillation measure spans


@dataclasses.dataclass
class GANOptions:
    z_dim: Optional[int] = None
    g_loss: Optional[str] = None  # fastgen.gan.G_LOSS_KINDS
    d_steps: Optional[int] = None  # discriminator steps per generator step
    pack: Optional[int] = None  # PacGAN: images the discriminator judges at once
    ema: Optional[float] = None  # decay of the EMA of G's weights; 0: none
    conditioning: Optional[str] = None  # cgan's discriminator: 'projection' or 'concat'


def to_unit(images, levels):
    """uint8 images on 0..levels-1 -> float in [-1, 1] (G's range)."""
    return images.float() * (2.0 / (levels - 1)) - 1.0


class _DLoss(torch.nn.Module):
    """D's loss as one module call (so DDP sees one forward for D's two passes)."""

    def __init__(self, d):
        super().__init__()
        self.d = d

    def forward(self, real, fake, labels):
        real_logits, fake_logits = self.d(real, labels), self.d(fake, labels)
        return discriminator_loss(real_logits, fake_logits), real_logits.detach(), fake_logits.detach()


class GANFamily(Family):
    """DCGAN and the conditional DCGAN (see the module docstring)."""
    Options = GANOptions
    defaults = DEFAULTS
    arguments = (
        (("--z-dim",), dict(type=int, help=f"noise dimensions (default {DEFAULTS['z_dim']})")),
        (("--g-loss",), dict(choices=G_LOSS_KINDS, help="the generator's objective: non_saturating (default, "
                                                        "-E[log D(G(z))]) or minimax (E[log(1 - D(G(z)))])")),
        (("--d-steps",), dict(type=int, help="discriminator steps per generator step (default 1)")),
        (("--pack",), dict(type=int, help="PacGAN: the discriminator judges this many images at once (default "
                                          "1; the batch must divide by it)")),
        (("--ema",), dict(type=float, help="decay of an exponential moving average of G's weights, e.g. 0.999 "
                                           "(default 0: none)")),
        (("--conditioning",), dict(choices=CONDITIONINGS, help="cgan's discriminator head (default projection)")),
    )
    description = ("--channels: the base width of G and D (DCGAN's 64); --lr: Adam's for both (betas 0.5, "
                   "0.999)")
    fixed_on_resume = ("z_dim", "pack", "ema", "conditioning", "g_loss", "d_steps")
    images = ("samples.png",)
    train_scalars = ("d_loss", "g_loss", "d_real", "d_fake")
    unevaluated = {"test_d_real": None, "test_d_fake": None, "oscillation": None}
    no_score = "a GAN has no likelihood; its score, the judge's Frechet distance, is not in this version"
    curves = (("losses", ("d_loss", "g_loss")),
              ("D(x) and D(G(z))", ("d_real", "d_fake", "test_d_real", "test_d_fake")),
              ("oscillation: spread of D(x) - D(G(z))", ("oscillation",)))

    @classmethod
    def check_options(cls, opts):
        check_at_least(opts, ("z_dim", "d_steps", "pack"), 1)
        if opts.ema is not None and not 0 <= opts.ema < 1:
            raise TrainError(f"--ema must be in [0, 1), got {opts.ema}")

    @classmethod
    def build_generator(cls, config):
        return DCGANGenerator(**config["generator"])

    @classmethod
    def load_model(cls, ckpt, backend=None):
        g = cls.build_generator(ckpt["model_config"])
        g.load_state_dict(ckpt.get("generator_ema") or ckpt["generator"])
        return g

    def build(self, train_data, ckpt):
        cfg, opts, run = self.cfg, self.opts, self.run
        conditional = cfg.model == "cgan"
        if conditional and not train_data.num_classes:
            raise TrainError(f"cgan needs a labelled dataset; {cfg.data} has no labels")
        if cfg.batch % opts.pack:
            raise TrainError(f"--batch {cfg.batch} must divide by --pack {opts.pack}")
        self.levels = train_data.levels
        classes = train_data.num_classes if conditional else None
        shape = list(train_data.shape)
        self.model_config = ckpt["model_config"] if ckpt else {
            "name": cfg.model,
            "generator": {"z_dim": opts.z_dim, "image_shape": shape, "num_classes": classes, "width": cfg.channels},
            "discriminator": {"image_shape": shape, "num_classes": classes, "width": cfg.channels,
                              "conditioning": opts.conditioning, "pack": opts.pack}}
        mc = self.model_config
        try:
            self.g = self.build_generator(mc).to(run.device)
            self.d = DCGANDiscriminator(**mc["discriminator"]).to(run.device)
        except ValueError as e:  # an image size or option the architecture refuses (its message says why)
            raise TrainError(str(e)) from None
        self.conditional = conditional
        # fused: one kernel for the whole update instead of a loop of kernels over the tensors
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=cfg.lr, betas=BETAS, fused=True)
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=cfg.lr, betas=BETAS, fused=True)
        self.models = {"generator": self.g, "discriminator": self.d}
        self.optimizers = {"g_optimizer": self.opt_g, "d_optimizer": self.opt_d}
        self.ema = None
        if opts.ema:
            self.ema = copy.deepcopy(self.g).requires_grad_(False)
            self.models["generator_ema"] = self.ema
        self.gaps = []  # D(x) - D(G(z)) of the last log lines: the oscillation measure's window (checkpointed)
        if ckpt:
            self.load_state_dict(ckpt)
        self.d_loss = run.wrap(_DLoss(self.d))
        self.d.requires_grad_(False)  # frozen but in D's own step: G's step computes D's input gradient only
        self.g_net = run.wrap(self.g)  # G's forward in the steps that update it (DDP reduces its gradients)
        self.d_updates = ckpt["step"] if ckpt else 0
        self.last_g_loss = None  # reported on the steps that do not update G (--d-steps > 1)

    def state_dict(self):
        return {**super().state_dict(), "d_gaps": self.gaps}

    def load_state_dict(self, ckpt):
        super().load_state_dict(ckpt)
        self.gaps = list(ckpt.get("d_gaps", self.gaps))

    def describe(self):
        mc, opts = self.model_config, self.opts
        cond = f", {mc['generator']['num_classes']} classes ({opts.conditioning} D)" if self.conditional else ""
        pack = f", pack {opts.pack}" if opts.pack > 1 else ""
        return (f"{self.cfg.model}, z {opts.z_dim}, width {self.cfg.channels}{cond}{pack}",
                f"Adam lr {self.cfg.lr:g} betas {BETAS} for G and D, {opts.g_loss} G loss, {opts.d_steps} D "
                f"step(s) per G step{f', EMA {opts.ema:g}' if self.ema is not None else ''}")

    def _noise(self, n, seed):
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(n, self.opts.z_dim, generator=gen).to(self.run.device)

    def step(self, images, labels, seed):
        run, opts = self.run, self.opts
        real = to_unit(images, self.levels)
        y = labels if self.conditional else None
        z = self._noise(len(real), seed)
        update_g = (self.d_updates + 1) % opts.d_steps == 0
        # one generated batch for both updates (as DCGAN trains): D's step takes it detached; G's graph is kept
        # only in the steps that update G
        with torch.set_grad_enabled(update_g), run.autocast():
            fake = (self.g_net if update_g else self.g)(z, y)
        self.d.requires_grad_(True)
        with run.autocast():
            d_loss, real_logits, fake_logits = self.d_loss(real, fake.detach().to(real.dtype), y)
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        self.d.requires_grad_(False)
        self.d_updates += 1
        if update_g:  # through the updated D, frozen: only D's input gradient is computed
            with run.autocast():
                g_loss = generator_loss(self.d(fake, y), opts.g_loss)
            self.opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            self.opt_g.step()
            self.last_g_loss = g_loss.detach()
            if self.ema is not None:
                with torch.no_grad():
                    for e, p in zip(self.ema.parameters(), self.g.parameters()):
                        e.lerp_(p, 1 - opts.ema)
                    for e, b in zip(self.ema.buffers(), self.g.buffers()):
                        e.copy_(b)
        elif self.last_g_loss is None:  # no G step yet: G's loss as D's step saw it (no extra pass through D)
            self.last_g_loss = generator_loss(fake_logits, opts.g_loss)
        return {"d_loss": d_loss.detach(), "g_loss": self.last_g_loss,
                "d_real": torch.sigmoid(real_logits.float()).mean(),
                "d_fake": torch.sigmoid(fake_logits.float()).mean()}

    def train_record(self, means):
        record = {k: round(v, 5) for k, v in means.items()}
        self.gaps.append(means["d_real"] - means["d_fake"])
        del self.gaps[:-OSCILLATION_WINDOW]
        return record, (f"D {means['d_loss']:.3f} G {means['g_loss']:.3f} D(x) {means['d_real']:.2f} "
                        f"D(G(z)) {means['d_fake']:.2f}")

    def final_train(self, means):
        if means is None:
            return {"final_d_loss": None, "final_g_loss": None}, None
        return ({"final_d_loss": round(means["d_loss"], 4), "final_g_loss": round(means["g_loss"], 4)},
                f"D loss {means['d_loss']:.3f}, G loss {means['g_loss']:.3f}")

    def _sampler(self):
        return self.ema if self.ema is not None else self.g

    @torch.no_grad()
    def evaluate(self, data, *, step, final):
        cfg, run = self.cfg, self.run
        t0 = time.perf_counter()
        n = min(len(data), cfg.batch * (cfg.eval_batches or 16))
        g, was = self._sampler(), (self.g.training, self.d.training)
        g.eval()
        self.d.eval()
        real_sum = fake_sum = 0.0
        for lo in range(0, n, cfg.batch):
            hi = min(lo + cfg.batch, n)
            hi -= (hi - lo) % self.opts.pack
            if hi <= lo:
                continue
            y = data.labels[lo:hi].to(run.device) if self.conditional else None
            real = to_unit(data.images[lo:hi].to(run.device), self.levels)
            fake = g(self._noise(hi - lo, FIXED_NOISE_SEED + lo), y)
            real_sum += torch.sigmoid(self.d(real, y).float()).sum().item() * self.opts.pack
            fake_sum += torch.sigmoid(self.d(fake, y).float()).sum().item() * self.opts.pack
        self.g.train(was[0])
        self.d.train(was[1])
        d_real, d_fake = real_sum / max(n, 1), fake_sum / max(n, 1)
        oscillation = round(statistics.pstdev(self.gaps), 5) if len(self.gaps) >= 2 else None
        run.log({"step": step, "kind": "eval", "test_d_real": round(d_real, 5), "test_d_fake": round(d_fake, 5),
                 "images": n, "oscillation": oscillation,
                 "eval_s": round(time.perf_counter() - t0, 2)})
        run.say(f"step {step}: D(x) {d_real:.3f} on {n} test images, D(G(z)) {d_fake:.3f}"
                f"{f', oscillation {oscillation:.3f}' if oscillation is not None else ''} "
                f"({time.perf_counter() - t0:.0f} s)")
        return {"test_d_real": round(d_real, 4), "test_d_fake": round(d_fake, 4), "oscillation": oscillation}

    def write_images(self, data):
        from fastgen.data import save_grid
        path = os.path.join(self.cfg.out, "samples.png")
        g = self._sampler()
        labels, nrow = grid_labels(self.cfg.samples, g.num_classes, self.run.device)
        was = g.training
        g.eval()
        images = g.sample(self.cfg.samples, labels, seed=FIXED_NOISE_SEED)
        g.train(was)
        save_grid(images.cpu(), path, nrow=nrow)
        return [path]

