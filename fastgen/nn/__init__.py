from fastgen.nn.masked_conv import MaskedConv2d

__all__ = ["MaskedConv2d"]
