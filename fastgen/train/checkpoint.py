"""Checkpoints: the one reader (read_checkpoint, behind train --resume, sample and load_model), the writer's
atomic save, and the RNG states an exact resume restores."""
import os
import random
import warnings
from typing import Any, Dict, Optional

import torch

from fastgen._dispatch import BackendError
from fastgen.train.common import TrainError
from fastgen.train.registry import FAMILIES

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"  # the checkpoint of the best evaluation so far (Family.best_key), written beside it
CHECKPOINT_FORMAT = 1
# what every checkpoint of CHECKPOINT_FORMAT holds besides its family's state (Family.state_keys)
LOOP_KEYS = ("model_config", "step", "rng", "args")


def _family(ckpt):
    """The family class of a checkpoint (model_config's name), or None for a name this fastgen does not know."""
    config = ckpt.get("model_config")
    return FAMILIES.get(config.get("name")) if isinstance(config, dict) else None


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
    family = _family(ckpt)
    missing = [k for k in LOOP_KEYS + (family.state_keys if family else ()) if k not in ckpt]
    if missing:
        raise TrainError(f"{file} is a damaged fastgen checkpoint: it lacks {', '.join(missing)}")
    return ckpt


def load_model(path: "os.PathLike[str] | str", *, device: "torch.device | str" = "cpu",
               backend: Optional[str] = None) -> torch.nn.Module:
    """The trained model of a checkpoint (a file, or a run folder holding
    checkpoint.pt), rebuilt from its stored constructor config by its family,
    in eval mode. A checkpoint that cannot be read or rebuilt is a TrainError."""
    ckpt = read_checkpoint(path)
    family = _family(ckpt)
    if family is None:
        raise TrainError(f"{os.fspath(path)}: unknown model {ckpt['model_config'].get('name')!r}; known models: "
                         f"{', '.join(FAMILIES)}")
    try:
        model = family.load_model(ckpt, backend=backend)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a config or weights this fastgen cannot rebuild
        if isinstance(e, (TrainError, BackendError)):
            raise
        raise TrainError(f"{os.fspath(path)}: the checkpoint's model cannot be rebuilt ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:200]})") from None
    return model.to(device).eval()


def rng_state(device: torch.device) -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def atomic_save(obj: Any, path: str) -> None:
    tmp = path + ".tmp"  # a crash while writing must not destroy the previous checkpoint
    torch.save(obj, tmp)
    os.replace(tmp, path)
