import torch
from torch import nn

from fastgen.ops.reparameterize_kl import reparameterize_kl


class GaussianLatent(nn.Module):
    """The Gaussian latent layer of a VAE: a linear map of features [..., in_features]
    to the posterior's mu and logvar [..., latent_features], then
    ``fastgen.reparameterize_kl``: returns ``(z, kl)``, the sample and the KL to
    the prior (standard normal unless ``prior_mu`` / ``prior_logvar`` are given
    to forward, as a hierarchical VAE's top-down prior), reduced by
    ``reduction`` ('sum' over all but the batch dimension, 'mean', 'none').

    ``params(h)`` gives ``(mu, logvar)`` alone (e.g. to decode the posterior mean)."""

    def __init__(self, in_features, latent_features, *, reduction="sum", bias=True, backend=None):
        super().__init__()
        if reduction not in ("sum", "mean", "none"):
            raise ValueError(f"GaussianLatent: reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
        self.latent_features = latent_features
        self.reduction = reduction
        self.backend = backend
        self.proj = nn.Linear(in_features, 2 * latent_features, bias=bias)

    def params(self, h):
        mu, logvar = self.proj(h).chunk(2, dim=-1)
        return mu, logvar

    def forward(self, h, *, prior_mu=None, prior_logvar=None, seed=None):
        mu, logvar = self.params(h)
        return reparameterize_kl(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar, seed=seed,
                                 reduction=self.reduction, backend=self.backend)

    def extra_repr(self):
        return f"{self.proj.in_features} -> {self.latent_features}, reduction={self.reduction!r}"
