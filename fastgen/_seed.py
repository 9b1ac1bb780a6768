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
