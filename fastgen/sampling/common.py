"""What every sampler shares: the uniforms of the draws, the draw itself, how
a sampled value is fed back to the network, and the words of the two errors
every sampling path gives alike (a network that is not causal, an output of
the wrong size)."""
import torch

from fastgen._seed import generator


class CausalityError(ValueError):
    """The network is not causal: an output it samples from sees the value being drawn or a later one.
    No method can sample it (fastgen.sampling.causality)."""


def not_causal(pixel, dep, colour=None, dep_colour=None, channels=1):
    """The CausalityError for an output at ``pixel`` (y, x) (``colour`` c, for one drawn colour at a time) that
    depends on the input at ``dep`` (y, x) (``dep_colour``)."""
    def where(p, c):
        return f"pixel {tuple(p)}" + (f" colour {c}" if c is not None and channels > 1 else "")
    same = tuple(pixel) == tuple(dep) and (colour is None or dep_colour is None or colour == dep_colour)
    rel = "itself" if same else where(dep, dep_colour)
    order = "raster order" + (", colours in channel order within a pixel" if channels > 1 and colour is not None
                              else "")
    return CausalityError(
        f"the network is not causal: its output at {where(pixel, colour)} depends on {rel}, which is not before it "
        f"in the sampling order ({order}); sampling it would draw each value from a distribution that sees the "
        f"value itself or later ones. The output at a pixel may see only earlier pixels (and earlier colours): "
        f"use mask_type='A' in the first masked convolution and 'B' after it")


def output_error(channels, likelihood, levels, c):
    """Why an output of ``channels`` channels cannot be sampled as ``likelihood`` for C = ``c`` colour
    channels, with a hint at the likelihood it fits; None when it fits."""
    from fastgen.ref.dmol import infer_nr_mix
    if likelihood == "logistic-mixture":
        if infer_nr_mix(c, channels) is not None:
            return None
        want = f"{3 if c == 1 else 10} * nr_mix"
        return (f"the network's output has {channels} channels: a discretized logistic mixture of {c}-channel "
                f"images needs {want}")
    want = c * (levels if likelihood == "categorical" else 1)
    if channels == want:
        return None
    shape = f"[B, {c} * {levels}, H, W]" if likelihood == "categorical" else f"[B, {c}, H, W]"
    hint = ""
    if channels % c == 0 and channels // c >= 2 and likelihood == "bernoulli":
        hint = (f"; {channels} = {c} x {channels // c} looks like categorical logits: pass "
                f"likelihood='categorical', levels={channels // c}")
    elif channels % c == 0 and channels // c >= 2 and likelihood == "categorical":
        hint = f"; for {channels // c} levels pass levels={channels // c}"
    elif channels == c and likelihood == "categorical":
        hint = "; one channel per colour looks like Bernoulli logits: pass likelihood='bernoulli'"
    return (f"the network's output has {channels} channels; {likelihood} sampling of {c}-channel images reads "
            f"{shape}{hint}")


def uniforms(n, shape, seed, device):
    """[H, W, C, n] float64 uniforms: one per draw, drawn up front from a CPU
    generator, so that every sampler (naive, cached, any engine) and every
    device sees the same numbers for the same seed."""
    c, h, w = shape
    return torch.rand(h, w, c, n, generator=generator(seed, "fastgen.sample"), dtype=torch.float64).to(device)


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
