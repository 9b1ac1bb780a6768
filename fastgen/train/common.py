"""What the training loop, the model families and the sample command share: the errors, the one output-path
check, the one backend check of a command, seeds derived from where a draw happens, the one grid layout, the
wording of an NLL and the weights digest."""
import hashlib
import math
import os
import tempfile
from typing import Any, Optional, Tuple

import torch

from fastgen._dispatch import forced_backend, known_backends


class TrainError(ValueError):
    """A training job that cannot run as asked (bad argument, mismatched checkpoint or data)."""


class OutputError(TrainError):
    """An output path that cannot be written (an existing file where a folder is needed, a path under a
    file, no write permission); raised before any work starts."""


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


def check_at_least(values: Any, keys: Tuple[str, ...], low: int) -> None:
    """TrainError for the first of ``keys`` (attributes of ``values``) that is given and below ``low``."""
    for key in keys:
        value = getattr(values, key)
        if value is not None and value < low:
            raise TrainError(f"{key} must be >= {low}, got {value}")


def derived_seed(*parts: Any) -> int:
    """A seed in [0, 2**63) from ``parts`` (e.g. ("train", seed, step, rank)): the
    VAE's latent draws depend on where they happen, not on a shared generator."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def weights_digest(*models: torch.nn.Module) -> str:
    """sha256 of the models' parameters and buffers, model after model (to check that DDP replicas agree)."""
    h = hashlib.sha256()
    for model in models:
        for name, t in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def grid_labels(n: int, num_classes: Optional[int], device: "torch.device | str" = "cpu"
                ) -> Tuple[Optional[torch.Tensor], int]:
    """(labels, images per row) of a grid of ``n`` samples: the one layout of
    every sample grid (train's samples.png, ``sample``). A class-conditional
    model gets labels 0, 1, ..., K-1, 0, 1, ...: one class per column, K
    columns (fewer when n < K); otherwise no labels and a square grid."""
    if num_classes:
        return torch.arange(n, device=device) % num_classes, min(n, num_classes)
    return None, math.ceil(math.sqrt(n))


def describe_nll(nats: float, bits_per_dim: float, binary: bool) -> str:
    """Binarized data: nats per image first (the literature's metric); else bits/dim first."""
    if binary:
        return f"{nats:.2f} nats/image ({bits_per_dim:.4f} bits/dim)"
    return f"{bits_per_dim:.4f} bits/dim ({nats:.1f} nats/image)"
