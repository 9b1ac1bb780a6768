"""The GAN family: ``dcgan`` (unconditional) and ``cgan`` (class-conditional on the dataset's labels): DCGAN's
generator and discriminator (fastgen.models.dcgan), the losses of fastgen.gan, Adam for each (``--lr``, default
2e-4, betas 0.5 and 0.999, DCGAN's).

A training step is one discriminator update on the step's real batch and a fresh generated one; every
``--d-steps`` k-th step the generator is updated too, on the same generated batch (k discriminator steps, each
on its own minibatch, per generator step). In the generator's update D's parameters are frozen: it gives only
the input gradient, and no weight gradient of D is computed. Noise is drawn from the step's seed, so a resumed
run repeats it.
``--ema``: an exponential moving average of G's weights (what samples.png and ``sample`` draw from).
Evaluation: mean D(x) on test images and D(G(z)) on as many generated ones (G in eval mode, D with batch
statistics as in training, its running statistics left as they were); on a dataset fastgen can judge
(fastgen.metrics.JUDGED), ``--judge-images`` generated images scored by its classifier: the Frechet distance in
its feature space (best.pt and ``--patience`` go by it), the classes covered, the KL of their histogram to the
data's, the confidence and (cgan) the label accuracy. A collapse warning when the coverage falls below
(1 - COVERAGE_DROP) of the run's best or the KL rises past KL_COLLAPSE after having been below it; the
oscillation: the spread of D(x) - D(G(z)) over the last OSCILLATION_WINDOW training log lines. Images:
samples.png, a grid from fixed noise (one class per column for cgan)."""
import contextlib
import copy
import dataclasses
import math
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
            "pack": 1, "ema": 0.0, "conditioning": "projection", "judge_images": 1000}
BETAS = (0.5, 0.999)
FIXED_NOISE_SEED = 1234  # samples.png: the same z at every evaluation of a run
JUDGE_SEED = 4321  # the judge's images: the same z at every evaluation, so that the scores follow G alone
COVERAGE_DROP = 0.05  # a collapse: the classes covered fall below (1 - this) x the run's best coverage
KL_COLLAPSE = 0.5  # or the KL to the data's class histogram rises past this (nats; one class of ten lost ~0.1)
OSCILLATION_WINDOW = 20  # training log lines the oscillation measure spans


@dataclasses.dataclass
class GANOptions:
    z_dim: Optional[int] = None
    g_loss: Optional[str] = None  # fastgen.gan.G_LOSS_KINDS
    d_steps: Optional[int] = None  # discriminator steps per generator step
    pack: Optional[int] = None  # PacGAN: images the discriminator judges at once
    ema: Optional[float] = None  # decay of the EMA of G's weights; 0: none
    conditioning: Optional[str] = None  # cgan's discriminator: 'projection' or 'concat'
    judge_images: Optional[int] = None  # generated images the judge scores per evaluation; 0: no judge


def to_unit(images, levels):
    """uint8 images on 0..levels-1 -> float in [-1, 1] (G's range)."""
    return images.float() * (2.0 / (levels - 1)) - 1.0


def collapse_reasons(watch, scores):
    """Why the judge's ``scores`` of an evaluation look like a collapse (a list of sentences; [] when they do
    not): the modes covered fell below (1 - COVERAGE_DROP) of the run's best, or the KL rose past KL_COLLAPSE
    after having been below it. Then ``watch`` (the run's best coverage and least KL) takes these scores in."""
    reasons = []
    cov, kl, modes = scores["coverage"], scores["kl"], scores["modes"]
    if watch["best_coverage"] is not None and cov < (1 - COVERAGE_DROP) * watch["best_coverage"]:
        reasons.append(f"the samples cover {cov} of {modes} modes, down from {watch['best_coverage']}")
    if watch["min_kl"] is not None and kl > KL_COLLAPSE >= watch["min_kl"]:
        reasons.append(f"the KL of the samples' modes to the data's rose to {kl:.3f} nats, past {KL_COLLAPSE} "
                       f"(it was {watch['min_kl']:.3f})")
    watch["best_coverage"] = max(cov, watch["best_coverage"] or 0)
    watch["min_kl"] = kl if watch["min_kl"] is None else min(kl, watch["min_kl"])
    return reasons


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
        (("--judge-images",), dict(type=int, help=f"generated images fastgen's judge scores at every evaluation "
                                                  f"on mnist, fashion-mnist and stacked-mnist (default "
                                                  f"{DEFAULTS['judge_images']}; 0: no judge)")),
    )
    description = ("--channels: the base width of G and D (DCGAN's 64); --lr: Adam's for both (betas 0.5, "
                   "0.999)")
    fixed_on_resume = ("z_dim", "pack", "ema", "conditioning", "g_loss", "d_steps")
    images = ("samples.png",)
    train_scalars = ("d_loss", "g_loss", "d_real", "d_fake")
    unevaluated = {"test_d_real": None, "test_d_fake": None, "fd": None, "coverage": None, "kl": None,
                   "confidence": None, "label_accuracy": None, "oscillation": None}
    best_key = "fd"  # None (with no_score saying why) where the run has no judge
    curves = (("losses", ("d_loss", "g_loss")),
              ("D(x) and D(G(z))", ("d_real", "d_fake", "test_d_real", "test_d_fake")),
              ("Frechet distance (judge; floor: real vs real)", ("fd", "fd_floor")),
              ("modes covered", ("coverage",)),
              ("KL to the data's modes (nats)", ("kl",)),
              ("confidence, label accuracy", ("confidence", "label_accuracy")),
              ("oscillation: spread of D(x) - D(G(z))", ("oscillation",)))

    @classmethod
    def check_options(cls, opts):
        check_at_least(opts, ("z_dim", "d_steps", "pack"), 1)
        if opts.judge_images is not None and (opts.judge_images < 0 or opts.judge_images == 1):
            raise TrainError(f"--judge-images must be 0 (no judge) or at least 2 (a covariance), got "
                             f"{opts.judge_images}")
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
        # what the collapse warning remembers between evaluations (checkpointed): the best coverage, the least KL
        self.watch = {"best_coverage": None, "min_kl": None}
        self.last_scores = None  # the latest judge scores, for the progress line
        self._build_judge()
        if ckpt:
            self.load_state_dict(ckpt)
        self.d_net = run.wrap(self.d)  # D in its own step (DDP reduces its gradients)
        self.d.requires_grad_(False)  # frozen but in D's own step: G's step computes D's input gradient only
        self.g_net = run.wrap(self.g)  # G's forward in the steps that update it (DDP reduces its gradients)
        self.d_updates = ckpt["step"] if ckpt else 0
        self.last_g_loss = None  # reported on the steps that do not update G (--d-steps > 1)

    def _build_judge(self):
        from fastgen.metrics import JUDGED, judge
        cfg, opts, dist_ = self.cfg, self.opts, self.run.dist
        self.judge = None
        if not opts.judge_images or cfg.data not in JUDGED:
            self.best_key = None
            self.no_score = ("the judge is off (--judge-images 0)" if not opts.judge_images else
                             f"a GAN has no likelihood, and fastgen's judge scores {', '.join(JUDGED)}, not "
                             f"{cfg.data}")
            return
        # rank 0 alone judges (its scores decide best.pt and --patience for every rank, fastgen.train.loop): it
        # trains a classifier missing from the cache while the others wait
        if dist_.main:
            self.judge = judge(cfg.data, device=self.run.device, progress=not cfg.quiet)
        dist_.barrier()

    def state_dict(self):
        return {**super().state_dict(), "d_gaps": self.gaps, "gan_watch": dict(self.watch)}

    def load_state_dict(self, ckpt):
        super().load_state_dict(ckpt)
        self.gaps = list(ckpt.get("d_gaps", self.gaps))
        self.watch.update(ckpt.get("gan_watch", {}))

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
        dtype = next(self.d.parameters()).dtype  # float32 in training; float64 where a check needs it exact
        real = to_unit(images, self.levels).to(dtype)
        y = labels if self.conditional else None
        z = self._noise(len(real), seed).to(dtype)
        update_g = (self.d_updates + 1) % opts.d_steps == 0
        # one generated batch for both updates (as DCGAN trains): D's step takes it detached; G's graph is kept
        # only in the steps that update G
        with torch.set_grad_enabled(update_g), run.autocast():
            fake = (self.g_net if update_g else self.g)(z, y)
        self.d.requires_grad_(True)  # (no gradients are held here: each update frees its model's, below)
        # D's loss is its real term plus its generated term, each backpropagated at once: D's graph of one batch
        # is alive at a time, not two (under DDP the first accumulates without an all-reduce; the second reduces)
        with self.d_net.no_sync() if self.d_net is not self.d else contextlib.nullcontext():
            real_loss, real_logits = self._d_term(real, y, True)
        fake_loss, fake_logits = self._d_term(fake.detach().to(real.dtype), y, False)
        d_loss = real_loss + fake_loss
        self.opt_d.step()
        # each model's gradients live through its own update only: D's are not held through G's step, G's not
        # through D's next one
        self.opt_d.zero_grad(set_to_none=True)
        self.d.requires_grad_(False)
        self.d_updates += 1
        if update_g:  # through the updated D, frozen: only D's input gradient is computed
            with run.autocast():
                g_loss = generator_loss(self.d(fake, y), opts.g_loss)
            g_loss.backward()
            self.opt_g.step()
            self.opt_g.zero_grad(set_to_none=True)
            self.last_g_loss = g_loss.detach()
            if self.ema is not None:
                with torch.no_grad():
                    for e, p in zip(self.ema.parameters(), self.g.parameters()):
                        e.lerp_(p, 1 - opts.ema)
                    for e, b in zip(self.ema.buffers(), self.g.buffers()):
                        e.copy_(b)
        elif self.last_g_loss is None:  # no G step yet: G's loss as D's step saw it (no extra pass through D)
            self.last_g_loss = generator_loss(fake_logits, opts.g_loss)
        return {"d_loss": d_loss, "g_loss": self.last_g_loss,
                "d_real": torch.sigmoid(real_logits.float()).mean(),
                "d_fake": torch.sigmoid(fake_logits.float()).mean()}

    def _d_term(self, images, labels, real):
        """D's loss term on a real (``real``) or generated batch, backpropagated; (term, logits), detached."""
        with self.run.autocast():
            logits = self.d_net(images, labels)
            term = discriminator_loss(logits, None) if real else discriminator_loss(None, logits)
        term.backward()
        return term.detach(), logits.detach()

    def train_record(self, means):
        record = {k: round(v, 5) for k, v in means.items()}
        self.gaps.append(means["d_real"] - means["d_fake"])
        del self.gaps[:-OSCILLATION_WINDOW]
        s = self.last_scores
        judged = f" | FD {s['fd']:.2f} {s['coverage']}/{s['modes']} modes KL {s['kl']:.2f}" if s else ""
        return record, (f"D {means['d_loss']:.3f} G {means['g_loss']:.3f} D(x) {means['d_real']:.2f} "
                        f"D(G(z)) {means['d_fake']:.2f}{judged}")

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
        # D judges with batch statistics, as in training: its running statistics average real and generated
        # batches together and describe neither (in eval mode D(x) on test images swings between 0.03 and 0.7
        # from one evaluation to the next while training's stays near 0.85); its buffers are put back after
        d_buffers = [b.clone() for b in self.d.buffers()]
        self.d.train()
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
        for b, kept in zip(self.d.buffers(), d_buffers):
            b.copy_(kept)
        scores = self._judged(data, g) if self.judge is not None else {}  # rank 0's only (_build_judge)
        self.g.train(was[0])
        self.d.train(was[1])
        d_real, d_fake = real_sum / max(n, 1), fake_sum / max(n, 1)
        oscillation = round(statistics.pstdev(self.gaps), 5) if len(self.gaps) >= 2 else None
        collapse = collapse_reasons(self.watch, scores) if scores else []
        run.log({"step": step, "kind": "eval", "test_d_real": round(d_real, 5), "test_d_fake": round(d_fake, 5),
                 "images": n, **scores, "oscillation": oscillation, "collapse": collapse,
                 "eval_s": round(time.perf_counter() - t0, 2)})
        judged = ""
        if scores:
            judged = (f"; judge on {scores['images']} samples: FD {scores['fd']:.2f} (floor {scores['fd_floor']:.2f}),"
                      f" {scores['coverage']} of {scores['modes']} modes, KL {scores['kl']:.3f}, confidence "
                      f"{scores['confidence']:.3f}")
            if "label_accuracy" in scores:
                judged += f", label accuracy {scores['label_accuracy']:.3f}"
        run.say(f"step {step}: D(x) {d_real:.3f} on {n} test images, D(G(z)) {d_fake:.3f}{judged}"
                f"{f', oscillation {oscillation:.3f}' if oscillation is not None else ''} "
                f"({time.perf_counter() - t0:.0f} s)")
        for reason in collapse:
            run.say(f"warning: step {step}: mode collapse? {reason}")
        result = {"test_d_real": round(d_real, 4), "test_d_fake": round(d_fake, 4), "oscillation": oscillation}
        result.update((k, scores.get(k)) for k in ("fd", "coverage", "kl", "confidence", "label_accuracy"))
        return result

    def _judged(self, data, g):
        """The judge's scores of ``judge_images`` images from fixed noise (cgan: the test split's labels, in
        order and cycled), drawn batch by batch by ``g`` in eval mode."""
        n, batch = self.opts.judge_images, self.cfg.batch
        labels = data.labels.repeat(math.ceil(n / len(data)))[:n] if self.conditional else None
        images = []
        for lo in range(0, n, batch):
            y = labels[lo:lo + batch].to(self.run.device) if labels is not None else None
            images.append(g.sample(min(batch, n - lo), y, seed=JUDGE_SEED + lo).cpu())
        scores = self.judge.score(torch.cat(images), labels)
        scores = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in scores.items()}
        scores["fd_floor"] = round(self.judge.floor, 5)
        self.last_scores = scores
        return scores

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

