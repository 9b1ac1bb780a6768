"""One seed rule for the whole library: a seed is an int in [0, 2**63).

Every function that takes ``seed=`` (the samplers, the reparameterization's
noise, the mixture draw, the VAE's latent draws, the training job) checks it
here, so a seed accepted by one is accepted by all, and each stream it keys
(torch.Generator, Philox) sees the same number."""
import torch

SEED_LIMIT = 2 ** 63


def check_seed(seed, who="seed"):
    """``seed`` as an int, or a ValueError naming ``who`` and the rule. None stays None."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{who}: seed must be an int in [0, 2**63), got {seed!r}")
    return int(seed)


def draw_seed():
    """A fresh seed from torch's default CPU generator (torch.manual_seed makes it reproducible)."""
    return int(torch.randint(0, SEED_LIMIT - 1, (), dtype=torch.int64).item())


def generator(seed, who="seed"):
    """A CPU torch.Generator seeded by ``seed`` (checked); a fresh seed when None."""
    seed = check_seed(seed, who)
    return torch.Generator().manual_seed(draw_seed() if seed is None else seed)


def prior_draws(who, n, dim, seed, temperature, like):
    """(z [n, dim] ~ N(0, temperature^2 I) on ``like``'s device and dtype, the generator) of a model's
    ``sample``: float64 draws from a CPU generator seeded by ``seed`` (checked), so a seed gives the same z on
    every device; None: torch's default generator (and None). ``n`` and ``temperature`` are checked too."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{who}: n must be an int >= 1, got {n!r}")
    if not temperature > 0:
        raise ValueError(f"{who}: temperature must be > 0, got {temperature}")
    gen = torch.Generator().manual_seed(check_seed(seed, who)) if seed is not None else None
    z = torch.randn(n, dim, generator=gen, dtype=torch.float64) * temperature
    return z.to(like.device, like.dtype), gen
