"""fastgen: custom kernels for the classic generative models (PixelCNN, VAE, GAN)."""
__version__ = "0.1.0"

from fastgen import functional  # noqa: E402
from fastgen._dispatch import OPS, BackendError  # noqa: E402
from fastgen.nn import GatedMaskedConv2d, GaussianLatent, MaskedConv2d  # noqa: E402
from fastgen.ops.dmol import discretized_mix_logistic_nll, sample_discretized_mix_logistic  # noqa: E402
from fastgen.ops.reparameterize_kl import reparameterize_kl  # noqa: E402
from fastgen.sampling import sample  # noqa: E402


def backends():
    """What is built and usable: {"extension": {...}, "ops": {op: {backend: None or why missing}}}."""
    import torch
    from fastgen import _ext
    return {
        "extension": {
            "cpp": _ext.cpp_unavailable(),
            "cuda": _ext.cuda_ext_unavailable() if torch.cuda.is_available() else "no CUDA device",
            "triton": _ext.triton_unavailable() or (None if torch.cuda.is_available() or _ext.interpreting()
                                                    else "no CUDA device (CPU tensors need TRITON_INTERPRET=1)"),
        },
        "ops": {name: op.status() for name, op in OPS.items()},
    }


__all__ = ["MaskedConv2d", "GatedMaskedConv2d", "GaussianLatent", "reparameterize_kl", "discretized_mix_logistic_nll",
           "sample_discretized_mix_logistic", "functional", "sample", "backends", "BackendError"]
