"""The GAN objectives (Goodfellow et al. 2014), from the discriminator's logits.

With D(x) = sigmoid(l) for a logit l, log D = -softplus(-l) and log(1 - D) = -softplus(l): written so, every
loss is finite with a useful gradient at any logit (``BCELoss(sigmoid(l))`` rounds D to 0 or 1 past |l| ~ 17 in
float32 and returns inf or a zero gradient). Each is a mean over the batch.

* ``discriminator_loss(real_logits, fake_logits)`` = -E[log D(x)] - E[log(1 - D(G(z)))]: what D minimises
  (the minimax objective max_D E[log D(x)] + E[log(1 - D(G(z)))], negated); either may be None for its term
  alone (-E[log D(x)] or -E[log(1 - D(G(z)))]), so that a training step can backpropagate the real batch's
  term before D sees the generated batch (one batch's graph of D alive at a time, as pytorch/examples does);
* ``generator_loss(fake_logits, kind="non_saturating")`` = -E[log D(G(z))]: the generator objective whose
  gradient is strong where D rejects the samples, the usual choice;
* ``generator_loss(fake_logits, kind="minimax")`` = E[log(1 - D(G(z)))]: the saturating objective of the
  minimax game itself, flat where samples are bad (log(1 - D) barely moves while D(G(z)) is near 0).

Training alternates k discriminator steps (on fresh real and generated batches) with one generator step.
Logits of float16/bfloat16 give a float32 loss (fastgen.ref.precision's reduction rule); an empty batch, a
logit tensor that is not one value per image, or a non-floating tensor is a ValueError.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from fastgen.ref.precision import compute_dtype

G_LOSS_KINDS = ("non_saturating", "minimax")


def _logits(who, name, t):
    """``t`` as [N] in the math type, checked: one logit per image, N >= 1."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{who}: {name} must be a floating tensor of logits, got {got}")
    if t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() != 1:
        raise ValueError(f"{who}: {name} must hold one logit per image, [N] or [N, 1], got {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{who}: {name} is an empty batch: its mean is undefined")
    return t.to(compute_dtype(t.dtype))


def discriminator_loss(real_logits: Optional[torch.Tensor], fake_logits: Optional[torch.Tensor]) -> torch.Tensor:
    """-E[log D(x)] - E[log(1 - D(G(z)))] = mean softplus(-real) + mean softplus(fake); a term whose logits
    are None is left out (not both)."""
    if real_logits is None and fake_logits is None:
        raise ValueError("discriminator_loss: give real_logits, fake_logits or both (None leaves a term out)")
    terms = []
    if real_logits is not None:
        terms.append(F.softplus(-_logits("discriminator_loss", "real_logits", real_logits)).mean())
    if fake_logits is not None:
        terms.append(F.softplus(_logits("discriminator_loss", "fake_logits", fake_logits)).mean())
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def generator_loss(fake_logits: torch.Tensor, kind: str = "non_saturating") -> torch.Tensor:
    """``non_saturating``: -E[log D(G(z))] = mean softplus(-fake); ``minimax``: E[log(1 - D(G(z)))] =
    -mean softplus(fake)."""
    if kind not in G_LOSS_KINDS:
        raise ValueError(f"generator_loss: kind must be one of {G_LOSS_KINDS}, got {kind!r}")
    fake = _logits("generator_loss", "fake_logits", fake_logits)
    return F.softplus(-fake).mean() if kind == "non_saturating" else -F.softplus(fake).mean()
