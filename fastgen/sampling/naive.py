"""Naive pixel-by-pixel sampling: one full forward pass of the network per
pixel and colour channel (H*W*C passes). The reference every faster sampler
must reproduce."""
import torch

from fastgen._progress import Progress


def default_feed(likelihood, levels):
    """How a sampled value is fed back: binary as {0, 1}, L levels as value / (L-1)."""
    if likelihood == "bernoulli":
        return lambda v: v.float()
    return lambda v: v.float() / (levels - 1)


def draw(logits, likelihood, temperature, generator):
    """One value per row of ``logits`` ([n] Bernoulli logits or [n, L] categorical),
    by inverse-CDF sampling from one uniform per row (deterministic for a generator)."""
    u = torch.rand(logits.shape[0], generator=generator, device=logits.device, dtype=torch.float64)
    if likelihood == "bernoulli":
        return (u < torch.sigmoid(logits.double() / temperature)).long()
    cdf = torch.softmax(logits.double() / temperature, dim=1).cumsum(1)
    return (cdf < u[:, None]).sum(1).clamp_(max=logits.shape[1] - 1)


@torch.no_grad()
def naive_sample(model, n, *, likelihood="bernoulli", levels=256, shape, condition=None, temperature=1.0, seed=None,
                 feed=None, progress=False):
    """n images [n, C, H, W] (int64 pixel values) from ``model``, whose output is
    Bernoulli logits [n, C, H, W] or categorical logits [n, C*levels, H, W]
    (channel c's logits in block c). ``condition`` is passed as the model's
    second argument when given. ``seed``: a fixed seed gives the same images on
    the same device."""
    if likelihood not in ("bernoulli", "categorical"):
        raise ValueError(f"likelihood must be 'bernoulli' or 'categorical', got {likelihood!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    c, h, w = shape
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed) if seed is not None else int(torch.randint(2 ** 62, (1,)).item()))
    feed = feed or default_feed(likelihood, levels)
    images = torch.zeros(n, c, h, w, dtype=torch.long, device=device)
    x = torch.zeros(n, c, h, w, dtype=dtype, device=device)
    bar = Progress(h * w * c, "sampling (naive)", enabled=progress)
    was_training = model.training
    model.eval()
    try:
        for y in range(h):
            for col in range(w):
                for ch in range(c):
                    logits = model(x) if condition is None else model(x, condition)
                    if likelihood == "bernoulli":
                        v = draw(logits[:, ch, y, col], likelihood, temperature, generator)
                    else:
                        v = draw(logits[:, ch * levels:(ch + 1) * levels, y, col], likelihood, temperature, generator)
                    images[:, ch, y, col] = v
                    x[:, ch, y, col] = feed(v).to(dtype)
                    bar.update()
    finally:
        model.train(was_training)
        bar.close()
    return images
