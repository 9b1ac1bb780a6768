"""Naive pixel-by-pixel sampling: one full forward pass of the network per
pixel and colour channel (H*W*C passes). The reference every faster sampler
must reproduce: it reads the same pre-drawn uniforms (fastgen.sampling.common)."""
import torch

from fastgen._progress import Progress
from fastgen.ref.dmol import infer_nr_mix
from fastgen.sampling.common import draw, draw_mixture, output_error


@torch.no_grad()
def naive_sample(model, u, *, likelihood, levels, shape, condition=None, temperature=1.0, feed_table, progress=False,
                 max_steps=None):
    """Images [n, C, H, W] (int64) from ``model``, whose output is Bernoulli
    logits [n, C, H, W], categorical logits [n, C*levels, H, W] (channel c's
    logits in block c) or a discretized logistic mixture's parameters [n, K, H,
    W] (fastgen.ref.dmol's layout; one pass per pixel draws all its channels).
    ``u`` [H, W, C, n] (a mixture: [H, W, C + 1, n]): the uniforms of the draws;
    ``condition``: the model's second argument when given; ``feed_table``: the
    network input of each value (see common.feed_table); ``max_steps``: stop
    after that many pixel steps (benchmarks time a prefix and extrapolate)."""
    c, h, w = shape
    n = u.shape[-1]
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    images = torch.zeros(n, c, h, w, dtype=torch.long, device=device)
    x = torch.zeros(n, c, h, w, dtype=dtype, device=device)
    bar = Progress(h * w * c, "sampling (naive)", enabled=progress)
    steps = h * w * c if max_steps is None else max_steps
    nr_mix = None  # a mixture's components: from the first pass's K
    try:
        for y in range(h):
            for col in range(w):
                if likelihood == "logistic-mixture":  # the pixel's colours at once, from one pass
                    if bar.n >= steps:
                        return images
                    params = model(x) if condition is None else model(x, condition)
                    if nr_mix is None:
                        why = output_error(params.shape[1], likelihood, levels, c)
                        if why:
                            raise ValueError(why)
                        nr_mix = infer_nr_mix(c, params.shape[1])
                    v = draw_mixture(params[:, :, y, col], u[y, col], c, nr_mix, temperature)
                    images[:, :, y, col] = v
                    x[:, :, y, col] = feed_table[v]
                    bar.update(c)
                    continue
                for ch in range(c):
                    if bar.n >= steps:
                        return images
                    logits = model(x) if condition is None else model(x, condition)
                    if likelihood == "bernoulli":
                        block = logits[:, ch, y, col]
                    else:
                        block = logits[:, ch * levels:(ch + 1) * levels, y, col]
                    v = draw(block, likelihood, temperature, u[y, col, ch])
                    images[:, ch, y, col] = v
                    x[:, ch, y, col] = feed_table[v]
                    bar.update()
    finally:
        bar.close()
    return images
