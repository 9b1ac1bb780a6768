"""The one training loop: options, resume, data order, DDP, checkpoints, progress, logging, interrupts and the
run folder; everything particular to a model family is asked of it (family.py)."""
import contextlib
import dataclasses
import json
import os
import platform
import random
import shlex
import signal
import sys
import threading
import time
from typing import Any, Dict, Optional

import torch

from fastgen._progress import Progress
from fastgen._seed import check_seed
from fastgen.train.checkpoint import (BEST, CHECKPOINT, CHECKPOINT_FORMAT, atomic_save, read_checkpoint, rng_state,
                                      set_rng_state)
from fastgen.train.common import (OutputError, TrainError, check_at_least, check_out, command_backend, derived_seed,
                                  weights_digest)
from fastgen.train.curves import CURVES, draw_curves
from fastgen.train.dist import Dist
from fastgen.train.family import Run, fit_channels
from fastgen.train.registry import FAMILIES


@dataclasses.dataclass
class TrainConfig:
    """Options of one training run. ``None`` means "the default", or, when
    resuming, "the checkpoint's value" (see FIXED_ON_RESUME, INHERITED,
    COMMON_DEFAULTS and each family's ``defaults`` and ``fixed_on_resume``)."""
    model: Optional[str] = None  # a name of FAMILIES
    data: Optional[str] = None  # a name of fastgen.data.load_dataset
    root: Optional[str] = None
    steps: Optional[int] = None  # total optimizer steps; else epochs
    epochs: Optional[float] = None  # default 1 epoch when neither is given
    batch: Optional[int] = None  # per process
    lr: Optional[float] = None
    channels: Optional[int] = None  # the network's width; its meaning is the family's
    seed: Optional[int] = None
    out: str = "train_out"
    resume: bool = False
    force: bool = False  # replace another run's files in out (they are deleted first)
    eval_every: Optional[int] = None  # 0: evaluate at the end only
    patience: Optional[int] = None  # stop after this many evaluations without a better score (None: never)
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
    options: Any = None  # the family's options (FAMILIES[model].Options); None: all left None

    def flat(self) -> Dict[str, Any]:
        """The options as one flat dict, the family's beside the loop's (a checkpoint's "args", a summary's
        "config")."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        return {**values, **(dataclasses.asdict(self.options) if self.options is not None else {})}


LOOP_OPTIONS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "options")
COMMON_DEFAULTS = {"batch": 32, "lr": 1e-3, "seed": 0, "eval_every": 0, "ckpt_every": 1000, "samples": 64,
                   "num_workers": 0, "log_every": 10}
# options that define the run: a resumed run takes them from the checkpoint, and may not change them
FIXED_ON_RESUME = ("model", "data", "batch", "lr", "channels", "seed")
# options a resumed run takes from the checkpoint unless given again (not: device, backend, workers, stops); a
# family's options are all inherited
INHERITED = FIXED_ON_RESUME + ("root", "amp", "eval_every", "patience", "ckpt_every", "eval_batches", "samples",
                               "log_every")
PAUSES = ("stop-at", "SIGINT", "SIGTERM")  # the stops that end a run to be resumed (checkpoint only)
# the files a run writes in its folder (another run's are refused, or deleted by --force)
RUN_FILES = tuple(dict.fromkeys((CHECKPOINT, CHECKPOINT + ".tmp", BEST, BEST + ".tmp", "metrics.jsonl", CURVES,
                                  "summary.json")
                                + tuple(name for family in FAMILIES.values() for name in family.images)))


def _resolve(cfg, saved=None):
    """cfg with every None filled: from the checkpoint's arguments when resuming, else the
    defaults (COMMON_DEFAULTS and the family's)."""
    model = cfg.model if cfg.model is not None else (saved or {}).get("model")
    if model not in FAMILIES:
        raise TrainError(f"unknown model {model!r}; known models: {', '.join(FAMILIES)}")
    family = FAMILIES[model]
    option_names = [f.name for f in dataclasses.fields(family.Options)]
    if cfg.options is not None and not isinstance(cfg.options, family.Options):
        raise TrainError(f"the options of {model} are a {family.Options.__name__}, got a "
                         f"{type(cfg.options).__name__}")
    values = {key: getattr(cfg, key) for key in LOOP_OPTIONS}
    values.update((key, getattr(cfg.options, key) if cfg.options is not None else None) for key in option_names)
    if saved is not None:
        for key in FIXED_ON_RESUME + family.fixed_on_resume:
            given, stored = values[key], saved.get(key)
            if given is not None and given != stored:
                raise TrainError(f"--resume: the checkpoint was trained with {key}={stored!r}; got {key}={given!r} "
                                 f"(a resumed run keeps the options that define it)")
        for key in INHERITED + tuple(option_names):
            if values[key] is None:
                values[key] = saved.get(key)
        if cfg.steps is None and cfg.epochs is None:  # keep the checkpoint's length
            values["steps"], values["epochs"] = saved.get("steps"), saved.get("epochs")
    for key, default in {**COMMON_DEFAULTS, **family.defaults}.items():
        if values[key] is None:
            values[key] = default
    return TrainConfig(**{key: values[key] for key in LOOP_OPTIONS},
                       options=family.Options(**{key: values[key] for key in option_names}))


def _check(cfg):
    if cfg.data is None:
        raise TrainError("no dataset given (--data)")
    command_backend(cfg.backend)
    try:
        check_seed(cfg.seed, "--seed")
    except ValueError as e:
        raise TrainError(str(e)) from None
    if cfg.resume and cfg.force:
        raise TrainError("give --resume (continue the run in --out) or --force (replace it), not both")
    check_at_least(cfg, ("batch", "channels", "log_every", "steps", "eval_batches", "stop_at", "patience"), 1)
    check_at_least(cfg, ("eval_every", "ckpt_every", "samples", "num_workers"), 0)
    FAMILIES[cfg.model].check_options(cfg.options)
    if cfg.steps is not None and cfg.epochs is not None:
        raise TrainError("give --steps or --epochs, not both")
    if cfg.epochs is not None and not cfg.epochs > 0:
        raise TrainError(f"epochs must be > 0, got {cfg.epochs}")
    if not cfg.lr > 0:
        raise TrainError(f"lr must be > 0, got {cfg.lr}")
    if cfg.max_minutes is not None and not cfg.max_minutes > 0:
        raise TrainError(f"max_minutes must be > 0, got {cfg.max_minutes}")
    if cfg.patience is not None and not cfg.eval_every:
        raise TrainError(f"--patience {cfg.patience} counts evaluations: give --eval-every N too")


# ---- data --------------------------------------------------------------------------------------------------------

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


# ---- the training job ---------------------------------------------------------------------------------------------

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
    """Run one training job (see the package docstring). Returns the summary
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
    amp = cfg.amp if cfg.amp is not None else device.type == "cuda"
    backend, backend_source = command_backend(cfg.backend)
    cfg = dataclasses.replace(cfg, amp=amp, device=str(device))  # record what ran

    train_data, test_data = _load_data(cfg, expect_shape=ckpt.get("data", {}).get("shape") if ckpt else None)
    steps_per_epoch = (len(train_data) // dist_.world) // cfg.batch
    if steps_per_epoch < 1:
        raise TrainError(f"batch {cfg.batch} x {dist_.world} process(es) is larger than the {len(train_data)} "
                         f"training images of {cfg.data!r}")
    total = cfg.steps if cfg.steps is not None else max(1, round((cfg.epochs or 1) * steps_per_epoch))
    if ckpt and total < ckpt["step"]:
        asked = f"--steps {cfg.steps}" if cfg.steps is not None else f"--epochs {cfg.epochs:g} ({total} steps)"
        raise TrainError(f"--resume: {asked} is below the checkpoint's step {ckpt['step']}; a resumed run trains "
                         f"on to a later step (or give neither to finish the checkpoint's run)")
    family_class = FAMILIES[cfg.model]
    if not ckpt:
        cfg = dataclasses.replace(cfg, channels=fit_channels(given_channels, family_class, cfg.model,
                                                             train_data.shape[0]))

    signals = _Signals(main)  # installed around the training loop below
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")

    def log(record):
        signals.abandon = False  # a logged evaluation is done: an interrupt from here waits for the step boundary
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in every run
    random.seed(cfg.seed)
    family = family_class(Run(cfg, dist_, amp, total, say, log))
    family.build(train_data, ckpt)
    if cfg.patience and not family.best_key:
        raise TrainError(f"--patience: {cfg.model} on {cfg.data} has no score to wait on ({family.no_score})")
    step = 0
    if ckpt:
        step = ckpt["step"]
        rngs = ckpt["rng"]
        if len(rngs) != dist_.world:
            say(f"note: the checkpoint was written by {len(rngs)} process(es), this run has {dist_.world}: "
                f"the data order from here differs from an uninterrupted run")
        set_rng_state(rngs[dist_.rank % len(rngs)], device)
    dist_.barrier()  # every rank has looked at --out before rank 0 deletes or writes anything
    if main:
        for name in replaced:  # --force: nothing of the other run stays beside the new one
            os.remove(os.path.join(cfg.out, name))
        os.makedirs(cfg.out, exist_ok=True)
        _trim_metrics(metrics_path, step, total)

    models = list(family.models.values())
    n_params = sum(p.numel() for m in models for p in m.parameters())
    about_models, about_optimization = family.describe()
    say(f"data: {cfg.data}, {len(train_data)} train / {len(test_data)} test images of "
        f"{'x'.join(map(str, train_data.shape))}, {train_data.levels} levels"
        f"{', dynamic binarization' if train_data.dynamic else ''}")
    say(f"model: {about_models}; {n_params / 1e3:.1f}k parameters")
    say(f"device: {device}{f' x {dist_.world} processes' if dist_.world > 1 else ''}, "
        f"{torch.get_num_threads()} threads, amp {'bf16' if amp else 'off'}, "
        f"backend {f'{backend} (forced by {backend_source})' if backend else 'dispatch'}")
    say(f"{'resuming at' if step else 'training'} step {step} of {total} ({total / steps_per_epoch:.2f} epochs of "
        f"{steps_per_epoch} steps), batch {cfg.batch}{f' x {dist_.world}' if dist_.world > 1 else ''}, "
        f"{about_optimization}")

    def save_checkpoint(path=ckpt_path):
        rngs = dist_.gather(rng_state(device))  # every rank's generators, for an exact resume
        windows = dist_.gather(window.tolist())  # and its scalars not yet logged, for the same curves
        if main:
            atomic_save({"format": CHECKPOINT_FORMAT, **family.state_dict(), "step": step,
                         "train_s": before_s + train_s, "loss_window": windows, "eval_due": eval_due,
                         "rng": rngs, "args": cfg.flat(), "best": best,
                         "data": {"name": cfg.data, "shape": list(train_data.shape), "levels": train_data.levels,
                                  "num_classes": train_data.num_classes}}, path)

    sampler = torch.utils.data.DistributedSampler(train_data, num_replicas=dist_.world, rank=dist_.rank,
                                                  shuffle=True, seed=cfg.seed, drop_last=True)
    batches = _StepBatches(train_data, cfg.seed, dist_.rank)
    start_step, saved_step = step, (step if ckpt else None)
    # sums of the step's scalars (family.train_scalars), then the steps since the last log
    window = torch.zeros(len(family.train_scalars) + 1, dtype=torch.float64, device=device)
    if ckpt and len(ckpt.get("loss_window", ())) == dist_.world:
        window += torch.tensor(ckpt["loss_window"][dist_.rank], dtype=torch.float64, device=device)
    train_s, stop, last = 0.0, None, None
    before_s = ckpt.get("train_s", 0.0) if ckpt else 0.0  # training seconds of the runs before a resume
    deadline = t_start + cfg.max_minutes * 60 if cfg.max_minutes else None
    eval_due = bool(ckpt and ckpt.get("eval_due"))  # an evaluation an interrupt abandoned: done first
    # the best evaluation so far by the family's score (lower is better): {key, value, step, evals_since}
    best = ckpt.get("best") if ckpt else None
    best_path, curves_path = os.path.join(cfg.out, BEST), os.path.join(cfg.out, CURVES)
    curves_error = None  # why curves.png cannot be drawn, once known

    def judged(result):
        """After an evaluation: keep best.pt when the score improved; "patience" when it has not for
        --patience evaluations. Rank 0's score decides for every rank (they save together)."""
        nonlocal best, curves_error
        value = dist_.gather(result.get(family.best_key) if family.best_key else None)[0]
        if main and curves_error is None:
            try:
                draw_curves(metrics_path, curves_path, family.curves)
            except ImportError as e:  # matplotlib missing (an install with --no-deps): the run goes on without
                curves_error = e
                say(f"note: no {CURVES} in this run: {e} (pip install matplotlib)")
        if value is None:
            return None
        if best is None or value < best["value"]:
            best = {"key": family.best_key, "value": value, "step": step, "evals_since": 0}
            if cfg.eval_every:  # else the one evaluation is the end's: checkpoint.pt is the best
                save_checkpoint(best_path)
            return None
        best["evals_since"] += 1
        return "patience" if cfg.patience and best["evals_since"] >= cfg.patience else None

    for m in models:
        m.train()
    with signals, Progress(total - start_step, "train", enabled=main and not cfg.quiet) as bar:
        if eval_due and step < total:
            dist_.broadcast_buffers(models)
            stop = judged(family.evaluate(test_data, step=step, final=False))
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
                labels = labels.to(device, non_blocking=True)
                # random draws of a step (the VAE's latents) are seeded by where they happen: ranks differ, and
                # a resume repeats them
                scalars = family.step(images, labels, derived_seed("train", cfg.seed, step, dist_.rank))
                step += 1
                window[:-1] += torch.stack([scalars[k].double() for k in family.train_scalars])
                window[-1] += 1
                if step % cfg.log_every == 0 or step == total:
                    dist_.sum(window)
                    last = dict(zip(family.train_scalars, (window[:-1] / window[-1]).tolist()))
                    window.zero_()
                    record, bar.postfix = family.train_record(last)
                    log({"step": step, "kind": "train", **record,
                         "time_s": round(before_s + train_s + time.perf_counter() - tick, 2)})
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
                        dist_.broadcast_buffers(models)
                        try:
                            with signals.abandoning(not dist_.group):
                                result = family.evaluate(test_data, step=step, final=False)
                        except _Interrupted:  # nothing of it was logged
                            stop = signals.received
                        else:
                            stop = judged(result)
                    eval_due = stop in PAUSES  # skipped or abandoned by a pause: the resumed run's first work
                if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or stop is not None:
                    save_checkpoint()
                    saved_step = step
                tick = time.perf_counter()
                if stop is not None or step >= total:
                    break
        if saved_step != step:  # before the final evaluation and images: an interrupt there loses no training
            save_checkpoint()
            saved_step = step

    dist_.broadcast_buffers(models)  # the replicas end as rank 0's model, which the checkpoint holds
    steps_run = step - start_step
    paused = stop in PAUSES  # checkpoint only: no evaluation, no images
    resume = f"python -m fastgen train {cfg.model} --resume --out {shlex.quote(cfg.out)}"
    if stop == "stop-at":
        say(f"paused at step {step} of {total}: checkpoint in {ckpt_path}; continue with --resume")
    elif stop == "max-minutes":
        say(f"stopped at step {step} of {total} after --max-minutes {cfg.max_minutes:g}")
    elif stop == "patience":
        say(f"stopped at step {step} of {total}: {best['key']} has not improved for {cfg.patience} evaluations "
            f"(best {best['value']:.4g} at step {best['step']}, kept in {best_path})")
    elif paused:
        say(f"interrupted by {stop} at step {step} of {total}: checkpoint saved in {ckpt_path}; continue with: "
            f"{resume}")
    final_train, about_train = family.final_train(last)
    if steps_run:
        say(f"trained {steps_run} steps in {train_s:.0f} s ({steps_run / train_s:.2f} steps/s, "
            f"{steps_run * cfg.batch * dist_.world / train_s:.0f} images/s)"
            + (f"; last train {about_train}" if about_train else ""))

    result = dict(family.unevaluated) if paused else family.evaluate(test_data, step=step, final=True)
    if not paused:
        judged(result)
    digests = dist_.gather(weights_digest(*models))
    if main and len(set(digests)) > 1:
        say(f"warning: the {dist_.world} replicas' weights differ at the end")

    written = [ckpt_path, metrics_path] + [p for p in (best_path, curves_path) if os.path.exists(p)]
    if main and cfg.samples and not paused:
        t0 = time.perf_counter()
        written += family.write_images(test_data)
        result["sample_s"] = round(time.perf_counter() - t0, 1)
    if not main:
        return None
    summary = {
        "config": cfg.flat(), "model_config": family.model_config, "parameters": n_params,
        "machine": _machine(dist_),
        "data": {"name": cfg.data, "train_images": len(train_data), "test_images": len(test_data),
                 "shape": list(train_data.shape), "levels": train_data.levels},
        "step": step, "total_steps": total, "finished": step >= total, "stopped_by": stop, "best": best,
        "steps_this_run": steps_run, "train_s": round(train_s, 2), "train_s_all_runs": round(before_s + train_s, 2),
        "steps_per_s": round(steps_run / train_s, 3) if train_s > 0 else None,
        "images_per_s": round(steps_run * cfg.batch * dist_.world / train_s, 1) if train_s > 0 else None,
        **final_train,
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


# ---- interrupts ---------------------------------------------------------------------------------------------------

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
