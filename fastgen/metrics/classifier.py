"""The judges' classifier: a small CNN on 28x28 grey images, and its deterministic training.

conv3x3(1->32)-BN-ReLU-pool, conv3x3(32->64)-BN-ReLU-pool, conv3x3(64->128)-BN-ReLU-pool (28 -> 14 -> 7 -> 3),
a linear layer to ``FEATURES`` dims + ReLU (the feature space of the Frechet distance), a linear layer to the
classes. About 0.25 M parameters; on 2 CPU cores an epoch of MNIST's 50000 training images takes ~30-40 s.

Training (``train_classifier``): Adam under a one-cycle learning rate, light augmentation (every image
shifted by a random -2..2 pixels in each direction, zeros shifted in), a fixed seed for the initial weights,
the data order and the shifts (all drawn from private generators: the caller's random state is untouched).
The same seed gives the same weights on one machine and thread count; CPU convolutions may round
differently under another thread count, which moves the scores by far less than they resolve."""
import dataclasses
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

FEATURES = 128
SHIFT = 2  # pixels of the random shifts


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How a judge's classifier is trained; part of its cache fingerprint (change one: caches retrain)."""
    epochs: int
    batch: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    shift: int = SHIFT
    seed: int = 0


class JudgeNet(nn.Module):
    """The classifier. ``forward(x)`` takes float images [N, 1, 28, 28] on 0..1 and returns
    (features [N, FEATURES], logits [N, classes])."""

    def __init__(self, classes: int = 10):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                    nn.MaxPool2d(2)]

        self.body = nn.Sequential(*block(1, 32), *block(32, 64), *block(64, 128), nn.Flatten(),
                                  nn.Linear(128 * 3 * 3, FEATURES), nn.ReLU(inplace=True))
        self.head = nn.Linear(FEATURES, classes)

    def forward(self, x):
        features = self.body(x)
        return features, self.head(features)


def as_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, 1, 28, 28] on 0..255 -> the network's float input (channels_last: faster on CPU)."""
    return images.float().div_(255).contiguous(memory_format=torch.channels_last)


def shift_images(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` [N, C, H, W] moved by its own random (dy, dx) in -shift..shift, zeros shifted in."""
    if shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (shift,) * 4)
    dy, dx = (torch.randint(0, 2 * shift + 1, (2, n), generator=gen)).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def train_classifier(images: torch.Tensor, labels: torch.Tensor, classes: int, config: TrainConfig,
                     device: torch.device, on_step: Optional[Callable[[float], None]] = None) -> JudgeNet:
    """A JudgeNet trained on uint8 ``images`` [N, 1, 28, 28] and ``labels`` [N] (returned in eval mode on
    ``device``). ``on_step(loss)`` is called after every step (the progress bar)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = JudgeNet(classes)
    net = net.to(device, memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(config.seed + 1)
    steps_per_epoch = len(images) // config.batch
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=config.epochs * steps_per_epoch)
    labels = labels.to(device)
    net.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(images), generator=gen)
        for s in range(steps_per_epoch):
            idx = order[s * config.batch:(s + 1) * config.batch]
            x = shift_images(images[idx].to(device), config.shift, gen)
            loss = F.cross_entropy(net(as_input(x))[1], labels[idx.to(device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if on_step is not None:
                on_step(loss.item())
    return net.eval()


def steps(n_images: int, config: TrainConfig) -> int:
    """How many optimizer steps ``train_classifier`` takes on ``n_images`` images."""
    return config.epochs * (n_images // config.batch)


@torch.no_grad()
def run_classifier(net: JudgeNet, images: torch.Tensor, device: torch.device, batch: int = 1000):
    """(features float64 [N, FEATURES], softmax probabilities float64 [N, classes]) of uint8 grey images
    [N, 1, 28, 28], in batches, in eval mode, on ``device``; results on the CPU."""
    was_training = net.training
    net.eval()
    feats, probs = [], []
    try:
        for lo in range(0, len(images), batch):
            f, logits = net(as_input(images[lo:lo + batch].to(device, non_blocking=True)))
            feats.append(f.double().cpu())
            probs.append(torch.softmax(logits.double(), 1).cpu())
    finally:
        net.train(was_training)
    return torch.cat(feats), torch.cat(probs)


def timed(fn, *args, **kwargs):
    """(fn's result, seconds it took)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
