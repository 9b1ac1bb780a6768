"""Training of fastgen's models: ``python -m fastgen train MODEL --data NAME ...``.

One function, :func:`train`, runs a whole training job from a :class:`TrainConfig`:
data (``fastgen.data.load_dataset``), the model family's modules and optimizers,
periodic evaluation on the test split, checkpoints with exact resume, metrics
(``metrics.jsonl``), a summary (``summary.json``) and PNG grids. The loop
(loop.py) is shared; each model family is one module that owns its options,
modules, optimizers, training step, evaluation, images and checkpoint state
(family.py says what the loop asks of it), and ``registry.FAMILIES`` maps the
model names to them:

* ``pixelcnn`` / ``gated-pixelcnn`` (pixel.py): likelihood from the data,
  loss = NLL, evaluation: test NLL, images: samples.png;
* ``pixelcnnpp`` (pixelcnnpp.py): the discretized logistic mixture (256-level
  data only), test NLL in bits/dim, samples.png;
* ``vae`` (vae.py): loss = the negative ELBO, evaluation: test ELBO and, at the
  end, the importance-weighted NLL; samples.png, reconstructions.png,
  interpolation.png.

Data parallel: launched by torchrun (RANK / WORLD_SIZE / LOCAL_RANK set), every
process trains on its shard of each epoch (DistributedSampler) with DDP-wrapped
modules; evaluation is summed over the ranks; only rank 0 prints and writes
files. ``--batch`` is per process.

Reproducibility: the models are initialised from ``seed``; epoch e's data order
comes from (seed, e), the dynamic binarization of step s from (seed, s, rank)
and a step's other draws from (seed, step, rank), never from a generator shared
with anything else. So a run repeats exactly on CPU, and a resumed run continues
the uninterrupted run's data stream, with or without DataLoader workers (same
world size).

Files in ``out``: checkpoint.pt (the family's state: models, optimizers,
schedulers and ``model_config``; step, RNG states, the run's arguments; rebuilt
by :func:`load_model`, read by :func:`read_checkpoint`, the one reader of
checkpoints), metrics.jsonl, summary.json, and the family's PNGs. A folder that
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
from fastgen.train.checkpoint import load_model, read_checkpoint
from fastgen.train.common import OutputError, TrainError, check_out, command_backend, grid_labels, weights_digest
from fastgen.train.loop import TrainConfig, train
from fastgen.train.pixel import evaluate
from fastgen.train.registry import FAMILIES
from fastgen.train.vae import evaluate_elbo, evaluate_iw

__all__ = ["FAMILIES", "OutputError", "TrainConfig", "TrainError", "check_out", "command_backend", "evaluate",
           "evaluate_elbo", "evaluate_iw", "grid_labels", "load_model", "read_checkpoint", "train", "weights_digest"]
