from fastgen.nn.batch_norm_act import BatchNormAct2d, recomputed_outputs
from fastgen.nn.gated import GatedMaskedConv2d
from fastgen.nn.latent import GaussianLatent
from fastgen.nn.masked_conv import MaskedConv2d

__all__ = ["MaskedConv2d", "GatedMaskedConv2d", "GaussianLatent", "BatchNormAct2d", "recomputed_outputs"]
