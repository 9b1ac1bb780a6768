"""The GAN judge: scores generated images in the feature space of a small classifier fastgen trains itself
(no downloaded Inception weights; it fits 28x28 digits and clothes).

``judge(dataset)`` returns a :class:`Judge` for 'mnist', 'fashion-mnist' or 'stacked-mnist' (``JUDGED``).
On first use it trains the dataset's classifier (classifier.py: ~1-2 minutes on 2 CPU cores, a message and a
progress bar on stderr), measures the test split's reference statistics and caches both in one file,
``judge-<dataset>-v<VERSION>.pt`` in ``$FASTGEN_CACHE`` (else ``$XDG_CACHE_HOME/fastgen``, else
``~/.cache/fastgen``), written atomically; later calls read it (and a process keeps its judges in memory).
A cache file that cannot be read, or was made by another version or training recipe, is retrained with a
message, never used.

Stacked MNIST has no classifier of its own: the MNIST classifier reads each of the three channels, the mode is
100 * d0 + 10 * d1 + d2 (d_c the digit read in channel c: VEEGAN's and PacGAN's mode count), and the features
of the Frechet distance are the three channels' features side by side (3 x 128 dims).

``Judge.score(images, labels=None)`` -> dict:
- fd: Frechet distance between Gaussians fitted to the samples' features and the test split's (float64);
  compare it with ``Judge.floor``, the FD between two disjoint random halves of the test split (5000 images
  each): samples as good as real data, 5000 of them, score about the floor (fewer samples score higher: the
  FD of a finite sample is biased upward, so compare at equal sample counts);
- coverage: how many modes get at least a tenth of their share of the samples, count_k >= 0.1 * N * p_data(k)
  (and at least one sample), of ``modes`` (10, or 1000 for stacked-mnist);
- kl: KL(p_samples || p_data) in nats between the histograms of the predicted modes, both smoothed by adding
  ``SMOOTHING`` (1e-6) to every bin's probability and renormalising, so a mode the data lacks but the samples
  have costs a large but finite amount. p_data is what the classifier predicts on the test split (so its own
  errors cancel): its predicted class histogram; for stacked-mnist the product of the three channels' digit
  histograms (the channels are independent permutations of the MNIST test split, so the product is the
  split's exact mode distribution where its 10000 images would give ~10 noisy counts per mode);
- confidence: the mean over samples of the largest mode probability (stacked-mnist: the product of the three
  digits' largest probabilities);
- label_accuracy (only with ``labels``): the share of samples whose predicted mode is their label (the class a
  conditional generator was asked for; for stacked-mnist the 0..999 mode);
- images: N.
"""
import copy
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from typing import Dict, Optional

import numpy as np
import torch

from fastgen._progress import Progress
from fastgen.data import load_dataset
from fastgen.data.dataset import ALIASES
from fastgen.metrics import classifier
from fastgen.metrics.classifier import JudgeNet, TrainConfig
from fastgen.metrics.frechet import feature_stats, frechet_distance, sqrt_psd

JUDGED = ("mnist", "fashion-mnist", "stacked-mnist")
VERSION = 1  # of the cache file's layout and of the recipe; bump it to retrain every cache
FORMAT = "fastgen-judge"
SMOOTHING = 1e-6  # added to every bin of both histograms of the KL
COVERAGE_SHARE = 0.1  # a mode is covered by at least this share of its expected count
FLOOR_SEED = 0  # of the random halves of the test split that measure the floor

SHAPES = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "stacked-mnist": (3, 28, 28)}
MODES = {"mnist": 10, "fashion-mnist": 10, "stacked-mnist": 1000}
RECIPES = {"mnist": TrainConfig(epochs=2), "fashion-mnist": TrainConfig(epochs=3)}
BASE = {"stacked-mnist": "mnist"}  # judges that read their images with another judge's classifier

_memory: Dict[tuple, "_Reference"] = {}
_lock = threading.RLock()


class JudgeCacheError(OSError):
    """The judge's cache folder cannot be written; the message names it and ``$FASTGEN_CACHE``."""


@dataclasses.dataclass
class _Reference:
    """What a judge knows: its classifier (CPU copy; per-device copies made on demand) and the test split's
    statistics. ``trained``: made in this process rather than read from the cache file."""
    dataset: str
    net: JudgeNet
    mu: np.ndarray
    cov: np.ndarray
    hist: np.ndarray
    floor: float
    test_accuracy: float
    train_seconds: float
    stats_seconds: float
    path: str
    trained: bool
    sqrt_cov: np.ndarray = None
    nets: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.sqrt_cov = sqrt_psd(self.cov)

    def net_on(self, device: torch.device) -> JudgeNet:
        with _lock:
            if device not in self.nets:
                self.nets[device] = (self.net if device.type == "cpu" else copy.deepcopy(self.net)).to(
                    device, memory_format=torch.channels_last).eval()
            return self.nets[device]


class Judge:
    """A dataset's judge (see the module docstring). Attributes: dataset, modes, floor, test_accuracy,
    trained (this process trained it, or measured its statistics, instead of reading the cache file),
    cache_path, train_seconds (the classifier's training time when it was trained), device (None: each
    call runs where its images are)."""

    def __init__(self, ref: _Reference, device: Optional[torch.device] = None):
        self._ref = ref
        self.device = device
        self.dataset = ref.dataset
        self.modes = MODES[ref.dataset]
        self.shape = SHAPES[ref.dataset]

    floor = property(lambda self: self._ref.floor)
    test_accuracy = property(lambda self: self._ref.test_accuracy)
    trained = property(lambda self: self._ref.trained)
    cache_path = property(lambda self: self._ref.path)
    train_seconds = property(lambda self: self._ref.train_seconds)

    def __repr__(self):
        return (f"Judge({self.dataset!r}, modes={self.modes}, test_accuracy={self.test_accuracy:.4f}, "
                f"floor={self.floor:.4g})")

    def score(self, images, labels=None) -> dict:
        """Scores of ``images`` (uint8 [N >= 2, C, H, W] on 0..255, the dataset's shape, any device) and,
        with ``labels`` (int [N]: the classes they were drawn for), their label accuracy."""
        images = self._check_images(images)
        labels = self._check_labels(labels, len(images))
        device = self.device or images.device
        features, modes, confidence = _classify(self._ref, images, device)
        mu, cov = feature_stats(features)
        n = len(images)
        counts = np.bincount(modes.numpy(), minlength=self.modes).astype(np.float64)
        covered = (counts >= COVERAGE_SHARE * n * self._ref.hist) & (counts > 0)
        out = {"fd": frechet_distance(mu, cov, self._ref.mu, self._ref.cov, self._ref.sqrt_cov),
               "coverage": int(covered.sum()),
               "modes": self.modes,
               "kl": kl_divergence(counts / n, self._ref.hist),
               "confidence": float(confidence.mean()),
               "images": n}
        if labels is not None:
            out["label_accuracy"] = float((modes == labels).double().mean())
        return out

    def _check_images(self, images) -> torch.Tensor:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if not torch.is_tensor(images):
            raise TypeError(f"{self.dataset} judge: images must be a torch.Tensor (uint8 [N, C, H, W]), "
                            f"got {type(images).__name__}")
        if images.dtype != torch.uint8:
            raise TypeError(f"{self.dataset} judge: images must be uint8 on 0..255, got {images.dtype} "
                            f"(from floats on 0..1: (x * 255).round().clamp(0, 255).to(torch.uint8))")
        if images.ndim != 4:
            raise ValueError(f"{self.dataset} judge: images must be [N, C, H, W] (4 dims), got shape "
                             f"{tuple(images.shape)}")
        if tuple(images.shape[1:]) != self.shape:
            raise ValueError(f"{self.dataset} judge: images must be [N, {', '.join(map(str, self.shape))}] "
                             f"(C, H, W of {self.dataset}), got [N, {', '.join(map(str, images.shape[1:]))}]")
        if len(images) < 2:
            raise ValueError(f"{self.dataset} judge: at least 2 images are needed (a covariance), got "
                             f"{len(images)}")
        return images

    def _check_labels(self, labels, n) -> Optional[torch.Tensor]:
        if labels is None:
            return None
        labels = torch.as_tensor(labels)
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise TypeError(f"{self.dataset} judge: labels must be integers, got {labels.dtype}")
        labels = labels.to("cpu", torch.int64)
        if labels.ndim != 1 or len(labels) != n:
            raise ValueError(f"{self.dataset} judge: labels must be [N] = [{n}] (one per image), got shape "
                             f"{tuple(labels.shape)}")
        if labels.min() < 0 or labels.max() >= self.modes:
            raise ValueError(f"{self.dataset} judge: labels must lie in 0..{self.modes - 1}, got "
                             f"{labels.min().item()}..{labels.max().item()}")
        return labels


def judge(dataset: str, *, cache_dir=None, device=None, progress: bool = True) -> Judge:
    """The :class:`Judge` of ``dataset`` (one of ``JUDGED``), trained on first use and cached (see the module
    docstring). ``cache_dir``: the cache folder (default ``$FASTGEN_CACHE``, ``$XDG_CACHE_HOME/fastgen``,
    ``~/.cache/fastgen``); ``device``: where the classifier runs (and trains on first use; None: where
    each call's images are, training on the CPU); ``progress``: the training progress bar.
    Errors: ValueError for an unknown dataset; fastgen.data.DatasetMissingError when its data is needed and
    missing; JudgeCacheError when the cache folder cannot be written."""
    name = _dataset_name(dataset)
    device = torch.device(device) if device is not None else None
    ref = _reference(name, _cache_folder(cache_dir), device, progress)
    return Judge(ref, device)


def clear_memory() -> None:
    """Forget the judges this process holds (their cache files stay): the next judge() reads the files."""
    with _lock:
        _memory.clear()


def cache_folder(cache_dir=None) -> str:
    """The folder the judges are cached in (see ``judge``)."""
    return _cache_folder(cache_dir)[0]


def kl_divergence(p, q) -> float:
    """KL(p || q) in nats of two histograms (probabilities), each smoothed by ``SMOOTHING`` per bin."""
    p = (np.asarray(p, np.float64) + SMOOTHING) / (1 + SMOOTHING * len(p))
    q = (np.asarray(q, np.float64) + SMOOTHING) / (1 + SMOOTHING * len(q))
    return float(max((p * np.log(p / q)).sum(), 0.0))


# ---- building and caching ----------------------------------------------------------------------------------

def _dataset_name(dataset) -> str:
    key = str(dataset).lower().replace("_", "-")
    key = ALIASES.get(key, key)
    if key not in JUDGED:
        raise ValueError(f"no judge for dataset {dataset!r}; judged datasets: {', '.join(JUDGED)}")
    return key


def _cache_folder(cache_dir):
    """(folder, where it came from) of the cache."""
    if cache_dir is not None:
        return os.path.abspath(os.fspath(cache_dir)), "cache_dir="
    if os.environ.get("FASTGEN_CACHE"):
        return os.path.abspath(os.environ["FASTGEN_CACHE"]), "$FASTGEN_CACHE"
    if os.environ.get("XDG_CACHE_HOME"):
        return os.path.join(os.path.abspath(os.environ["XDG_CACHE_HOME"]), "fastgen"), "$XDG_CACHE_HOME/fastgen"
    return os.path.join(os.path.expanduser("~"), ".cache", "fastgen"), "~/.cache/fastgen"


def cache_file(name: str, folder: str) -> str:
    return os.path.join(folder, f"judge-{name}-v{VERSION}.pt")


def fingerprint(name: str) -> str:
    """What the cached judge of ``name`` was made by: the version, the network, the recipe and the floor's
    halves (a base judge's fingerprint for stacked-mnist). Another fingerprint in the file: retrain."""
    recipe = {"format": FORMAT, "version": VERSION, "dataset": name, "net": f"JudgeNet/{classifier.FEATURES}",
              "floor_seed": FLOOR_SEED}
    if name in BASE:
        recipe["base"] = fingerprint(BASE[name])
    else:
        recipe["train"] = dataclasses.asdict(RECIPES[name])
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _reference(name, folder_and_source, device, progress, retrain=False) -> _Reference:
    folder, source = folder_and_source
    path = cache_file(name, folder)
    with _lock:
        key = (name, path)
        if not retrain and key in _memory:
            return _memory[key]
        ref = None if retrain else _read(name, path)
        if ref is None:
            _check_writable(folder, source)
            ref = _build(name, folder_and_source, path, device, progress, retrain)
            _write(ref, folder, source)
        _memory[key] = ref
        return ref


def _read(name, path) -> Optional[_Reference]:
    """The cached reference at ``path``; None (with a message when a file is there) to retrain."""
    if not os.path.exists(path):
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        why = _foreign(blob, name)
        if why is None:
            net = JudgeNet(10)
            net.load_state_dict(blob["state_dict"])
            return _Reference(name, net.eval(), blob["mu"].numpy(), blob["cov"].numpy(), blob["hist"].numpy(),
                              float(blob["floor"]), float(blob["test_accuracy"]), float(blob["train_seconds"]),
                              float(blob["stats_seconds"]), path, trained=False)
    except Exception as e:  # any unreadable file (truncated, not a torch file, wrong tensors) is retrained
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"
    print(f"fastgen: the cached {name} judge {path} cannot be used ({why}); retraining it", file=sys.stderr)
    return None


def _foreign(blob, name) -> Optional[str]:
    """Why ``blob`` is not a usable judge of ``name`` (None: it is)."""
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        return "not a fastgen judge file"
    if blob.get("dataset") != name:
        return f"it is the judge of {blob.get('dataset')!r}"
    if blob.get("fingerprint") != fingerprint(name):
        return f"made by another version or recipe (version {blob.get('version')})"
    d = 3 * classifier.FEATURES if name in BASE else classifier.FEATURES
    shapes = {"mu": (d,), "cov": (d, d), "hist": (MODES[name],)}
    for k, shape in shapes.items():
        if not torch.is_tensor(blob.get(k)) or tuple(blob[k].shape) != shape or blob[k].dtype != torch.float64 \
                or not torch.isfinite(blob[k]).all():
            return f"its {k} is not a finite float64 tensor of shape {shape}"
    for k in ("floor", "test_accuracy", "train_seconds", "stats_seconds"):
        if not isinstance(blob.get(k), float) or not np.isfinite(blob[k]):
            return f"its {k} is not a finite number"
    return None


def _check_writable(folder, source) -> None:
    """Fail before a minute of training when the cache cannot be written."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".judge-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise JudgeCacheError(f"fastgen: the judge cache folder {folder} (from {source}) is not writable "
                              f"({e.strerror or e}); set $FASTGEN_CACHE to a writable folder") from None


def _write(ref: _Reference, folder, source) -> None:
    blob = {"format": FORMAT, "version": VERSION, "dataset": ref.dataset, "fingerprint": fingerprint(ref.dataset),
            "torch": str(torch.__version__), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "state_dict": {k: v.detach().cpu().clone() for k, v in ref.net.state_dict().items()},
            "mu": torch.from_numpy(ref.mu), "cov": torch.from_numpy(ref.cov), "hist": torch.from_numpy(ref.hist),
            "floor": ref.floor, "test_accuracy": ref.test_accuracy, "train_seconds": ref.train_seconds,
            "stats_seconds": ref.stats_seconds}
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".judge-{ref.dataset}-", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(blob, f)
        os.replace(tmp, ref.path)  # atomic: a reader sees the old file or the whole new one
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        raise JudgeCacheError(f"fastgen: cannot write the judge cache file {ref.path} (folder from {source}): "
                              f"{e.strerror or e}; set $FASTGEN_CACHE to a writable folder") from None


def _build(name, folder_and_source, path, device, progress, retrain) -> _Reference:
    train_device = device or torch.device("cpu")
    if name in BASE:
        base = _reference(BASE[name], folder_and_source, device, progress, retrain)
        net, train_seconds = base.net, base.train_seconds
        print(f"fastgen: measuring the {name} judge's reference statistics with the {BASE[name]} classifier "
              f"(first use; cached in {path})", file=sys.stderr)
    else:
        train = load_dataset(name, "train")
        load_dataset(name, "test")  # a missing test split fails before the training, not after it
        print(f"fastgen: training the {name} judge's classifier (first use; cached in {path})", file=sys.stderr)
        recipe = RECIPES[name]
        bar = Progress(classifier.steps(len(train), recipe), f"{name} judge", enabled=progress)
        try:
            net, train_seconds = classifier.timed(
                classifier.train_classifier, train.images, train.labels, train.num_classes, recipe, train_device,
                on_step=lambda loss: bar.update(1, postfix=f"loss {loss:.3f}"))
        finally:
            bar.close()
        net = net.cpu()
    ref, stats_seconds = classifier.timed(_measure, name, net, path, train_seconds, train_device)
    ref.stats_seconds = stats_seconds
    print(f"fastgen: the {name} judge reads {100 * ref.test_accuracy:.2f}% of the test split right "
          f"(floor {ref.floor:.4g})", file=sys.stderr)
    return ref


def _measure(name, net, path, train_seconds, device) -> _Reference:
    """The test split's statistics under ``net``: feature mean and covariance, mode histogram, accuracy and the
    floor (FD of two disjoint random halves)."""
    test = load_dataset(name, "test")
    probe = _Reference(name, net, np.zeros(1), np.zeros((1, 1)), np.zeros(1), 0.0, 0.0, train_seconds, 0.0,
                       path, trained=True)
    features, modes, _ = _classify(probe, test.images, device)
    if name in BASE:  # the product of the channels' digit histograms (see the module docstring)
        digits = torch.stack([modes // 100, modes // 10 % 10, modes % 10], 1).flatten()
        h = np.bincount(digits.numpy(), minlength=10) / len(digits)
        hist = np.einsum("i,j,k->ijk", h, h, h).reshape(-1)
    else:
        hist = np.bincount(modes.numpy(), minlength=MODES[name]) / len(modes)
    halves = torch.randperm(len(test), generator=torch.Generator().manual_seed(FLOOR_SEED)).chunk(2)
    a, b = (feature_stats(features[h]) for h in halves)
    mu, cov = feature_stats(features)
    return _Reference(name, net, mu, cov, hist.astype(np.float64), frechet_distance(*a, *b),
                      float((modes == test.labels).double().mean()), train_seconds, 0.0, path, trained=True)


def _classify(ref: _Reference, images: torch.Tensor, device: torch.device):
    """(features float64 [N, D], predicted modes int64 [N], confidence float64 [N]) on the CPU."""
    net = ref.net_on(device)
    channels = images.shape[1]
    features, probs = classifier.run_classifier(net, images.reshape(-1, 1, *images.shape[2:]), device)
    features = features.reshape(len(images), -1)  # the channels' features side by side
    probs = probs.reshape(len(images), channels, -1)
    best, digits = probs.max(2)
    place = 10 ** torch.arange(channels - 1, -1, -1)  # channel 0 is the hundreds digit
    return features, (digits * place).sum(1), best.prod(1)
