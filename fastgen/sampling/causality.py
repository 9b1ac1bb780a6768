"""The causality check that guards every sampling path (every likelihood,
cached and naive, and teacher forcing).

Sampling draws value t from the network's output at t given the values drawn
before; a network whose output at t sees value t or a later one defines no
distribution to sample from, and sampling it returns plausible-looking images
that are wrong. :func:`check` refuses such a network with a
:class:`~fastgen.sampling.common.CausalityError` naming the first output and
the value it sees. It reads the network in one of two ways:

* by structure, when the cached compiler can read it (fastgen's layers,
  convolutions, position-wise operations): the compiler (schedule.py) derives
  what each output depends on (a ready map per position and class of channels)
  and refuses a network that is not causal. The compiled schedule is returned,
  so the cached path uses it;
* numerically, for a network the compiler cannot read (any other module or
  function; only method='naive' can sample it): one forward pass per drawn
  value t (a pixel for a mixture, a colour of a pixel otherwise), on an image
  whose values from t on are changed: the output at t must not move. That is
  as many image-forwards as there are values, 1/n of what naive sampling of n
  images costs, and exact for the function the network computes (up to a
  dependence hidden by the probe's inputs, e.g. behind a dead ReLU).
"""
import torch

from fastgen.sampling.common import CausalityError, not_causal, output_error
from fastgen.sampling.schedule import compile_schedule
from fastgen.sampling.tracing import CompileError

PROBE_SEED = 0x5EED  # the probe's inputs: fixed, so the check gives the same verdict every time
PROBE_BATCH = 64  # images per forward pass of the probe


def check(model, *, n, likelihood, levels, shape, condition, table):
    """(schedule, None) when the network compiles for cached sampling (its structure is causal), or (None, the
    CompileError) when it does not compile but the numerical probe finds it causal. Raises CausalityError."""
    args = dict(shape=shape, batch=n, likelihood=likelihood, levels=levels, condition=condition)
    try:
        return compile_schedule(model, **args), None
    except CompileError as e:
        probe(model, n=n, likelihood=likelihood, levels=levels, shape=shape, condition=condition, table=table)
        return None, e


def _units(likelihood, shape):
    """The drawn values in sampling order, each as (pixel, colour or None for all of the pixel's colours)."""
    c, h, w = shape
    if likelihood == "logistic-mixture":  # a pixel's colours are drawn together
        return [((y, x), None) for y in range(h) for x in range(w)]
    return [((y, x), ch) for y in range(h) for x in range(w) for ch in range(c)]


def _spread(pick, units, shape):
    """[m, C, H, W] bool: the image values covered by the units a [m, U] bool mask picks."""
    c, h, w = shape
    if len(units) == h * w:  # pixel units: every colour of the pixel
        return pick.view(-1, 1, h, w).expand(-1, c, h, w)
    return pick.view(-1, h, w, c).permute(0, 3, 1, 2)


def _outputs(out, likelihood, levels, c, unit):
    """[m, K] the output channels of one unit (pixel, colour) read to draw it."""
    (y, x), colour = unit
    if likelihood == "logistic-mixture":
        return out[:, :, y, x]
    if likelihood == "bernoulli":
        return out[:, colour:colour + 1, y, x]
    return out[:, colour * levels:(colour + 1) * levels, y, x]


def _condition_rows(condition, n, rows):
    """The condition of ``rows`` probe images: a tensor of batch ``n`` indexed by ``rows % n``; else as given."""
    if isinstance(condition, torch.Tensor) and condition.dim() >= 1 and condition.shape[0] == n:
        return condition[rows % n]
    return condition


@torch.no_grad()
def probe(model, *, n, likelihood, levels, shape, condition, table):
    """The numerical check (module docstring): raises CausalityError naming the first output that moves when the
    values from its own on change (and the last value it sees), or ValueError for an output the likelihood cannot read."""
    c, h, w = shape
    units = _units(likelihood, shape)
    device = table.device
    count = len(table)
    gen = torch.Generator().manual_seed(PROBE_SEED)
    base = torch.randint(count, (1, c, h, w), generator=gen)
    other = (base + count // 2) % count  # every value moved, by half the range
    base_x, other_x = table[base.to(device)], table[other.to(device)]
    # a tensor condition is repeated to any batch; anything else keeps the caller's batch of n
    per_pass = n if condition is not None and not isinstance(condition, torch.Tensor) else max(n, PROBE_BATCH)
    order = torch.arange(len(units), device=device)

    def run(x, rows):
        cond = _condition_rows(condition, n, rows)
        x = x.clone(memory_format=torch.contiguous_format)  # a fresh input: the network may write into it
        out = model(x) if condition is None else model(x, cond)
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"the network returned {type(out).__name__}: fastgen.sample needs one tensor "
                             f"[B, K, {h}, {w}] of logits (or mixture parameters) from model(x)")
        if out.dim() != 4 or out.shape[0] != x.shape[0] or tuple(out.shape[2:]) != (h, w):
            raise ValueError(f"the network's output is {tuple(out.shape)}: fastgen.sample needs [B, K, {h}, {w}] "
                             f"(one vector of logits per pixel) for input {tuple(x.shape)}")
        why = output_error(out.shape[1], likelihood, levels, c)
        if why:
            raise ValueError(why)
        return out

    def fill(rows):  # repeat the last image to a whole pass when the condition fixes the batch
        return torch.cat([rows, rows[-1:].expand(per_pass - len(rows))]) if len(rows) < per_pass else rows

    ref = run(base_x.expand(per_pass, c, h, w), torch.arange(per_pass))  # row k: the base image, condition k
    tol = torch.finfo(ref.dtype).eps ** 0.5  # far above rounding (e.g. Winograd convolutions), far below a real effect
    for t0 in range(0, len(units), per_pass):
        t = fill(torch.arange(t0, min(t0 + per_pass, len(units))))
        x = torch.where(_spread(order[None] >= t[:, None].to(device), units, shape), other_x, base_x)
        out = run(x, torch.arange(len(t)))
        for k in range(min(per_pass, len(units) - t0)):
            unit = units[t0 + k]
            a = _outputs(out[k:k + 1], likelihood, levels, c, unit)
            b = _outputs(ref[k:k + 1], likelihood, levels, c, unit)
            if ((a - b).abs() > tol * (1 + b.abs())).any():
                dep = _last_dependence(run, units, shape, t0 + k, base_x, other_x, ref, likelihood, levels, tol,
                                        per_pass)
                raise not_causal(unit[0], units[dep][0], unit[1], units[dep][1], channels=c)


def _last_dependence(run, units, shape, t, base_x, other_x, ref, likelihood, levels, tol, per_pass):
    """The last unit q >= t whose change moves the output at unit t (as the cached compilers name it: the
    last value an output depends on), by bisection over [t, U)."""
    c = shape[0]
    order = torch.arange(len(units), device=base_x.device)

    def moves(lo, hi):
        pick = _spread(((order >= lo) & (order < hi))[None], units, shape)
        x = torch.where(pick, other_x, base_x).expand(per_pass, *shape)
        out = run(x, torch.arange(per_pass))[:1]
        a, b = _outputs(out, likelihood, levels, c, units[t]), _outputs(ref[:1], likelihood, levels, c, units[t])
        return bool(((a - b).abs() > tol * (1 + b.abs())).any())

    lo, hi = t, len(units)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if moves(mid, hi):
            lo = mid
        elif moves(lo, mid):
            hi = mid
        else:  # only a change on both sides moves it: name the first unit of the range
            break
    return lo


__all__ = ["check", "probe", "CausalityError"]
