"""Functional forms of fastgen's ops."""
from fastgen.ops.batch_norm_act import batch_norm_act
from fastgen.ops.dmol import discretized_mix_logistic_nll, sample_discretized_mix_logistic
from fastgen.ops.gated import gated_activation, gated_conv2d, vertical_conv2d
from fastgen.ops.masked_conv import masked_conv2d
from fastgen.ops.reparameterize_kl import reparameterize_kl

__all__ = ["masked_conv2d", "gated_activation", "gated_conv2d", "vertical_conv2d", "reparameterize_kl",
           "discretized_mix_logistic_nll", "sample_discretized_mix_logistic", "batch_norm_act"]
