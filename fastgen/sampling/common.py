"""What every sampler shares: the uniforms of the draws, the draw itself, and
how a sampled value is fed back to the network."""
import torch


def uniforms(n, shape, seed, device):
    """[H, W, C, n] float64 uniforms: one per draw, drawn up front from a CPU
    generator, so that every sampler (naive, cached, any engine) and every
    device sees the same numbers for the same seed."""
    c, h, w = shape
    g = torch.Generator()
    g.manual_seed(int(seed) if seed is not None else int(torch.randint(2 ** 62, (1,)).item()))
    return torch.rand(h, w, c, n, generator=g, dtype=torch.float64).to(device)


def draw(logits, likelihood, temperature, u):
    """One value per row of ``logits`` ([n] Bernoulli logits or [n, L]
    categorical), by inverse-CDF sampling with the uniforms ``u`` [n]."""
    if likelihood == "bernoulli":
        return (u < torch.sigmoid(logits.double() / temperature)).long()
    cdf = torch.softmax(logits.double() / temperature, dim=1).cumsum(1)
    return (cdf < u[:, None]).sum(1).clamp_(max=logits.shape[1] - 1)


def feed_table(feed, likelihood, levels, dtype, device):
    """The network input of each value 0..L-1 (L = 2 for Bernoulli) as a [L]
    table. ``feed`` maps a tensor of values to inputs, elementwise; default:
    binary as {0, 1}, L levels as value / (L - 1), a logistic mixture's as
    2 value / (L - 1) - 1."""
    count = 2 if likelihood == "bernoulli" else levels
    values = torch.arange(count)
    if feed is None:  # in the model's dtype, as model.feed computes it
        values = values.to(dtype)
        if likelihood == "logistic-mixture":  # 2v/(L-1) - 1, as PixelCNNpp.feed (fastgen.models.pixelcnnpp)
            table = (values * 2 - (levels - 1)) / (levels - 1)
        else:
            table = values if likelihood == "bernoulli" else values / (levels - 1)
    else:
        table = torch.as_tensor(feed(values))
        if table.shape != values.shape or not table.dtype.is_floating_point:
            raise ValueError(f"feed must map a tensor of values elementwise to floating inputs: feed(arange({count})) "
                             f"gave {tuple(table.shape)} {table.dtype}")
    return table.to(device=device, dtype=dtype)


def draw_mixture(params, u, channels, nr_mix, temperature):
    """One pixel per row of ``params`` [n, K] (a discretized logistic mixture in
    fastgen.ref.dmol's layout): levels [n, C] (int64), from the uniforms ``u``
    [C + 1, n]: u[0] picks the component, u[1 + c] draws colour c."""
    from fastgen.ref.dmol import sample_discretized_mix_logistic
    x = sample_discretized_mix_logistic(params[:, :, None, None], channels, nr_mix, u[0][:, None, None],
                                        u[1:].T[:, :, None, None], temperature)
    return torch.round((x[:, :, 0, 0].double() + 1) * 127.5).long()  # the levels of 2v/255 - 1
