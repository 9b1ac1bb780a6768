"""fastgen: custom kernels for the classic generative models.

Built: PixelCNN, Gated PixelCNN and PixelCNN++ (masked and gated convolutions,
the discretized logistic mixture loss, exact cached sampling), the VAE (fused
reparameterization + KL), DCGAN and the conditional GAN with the fused BatchNorm + activation
(BatchNormAct2d) and a judge (fastgen.metrics), and fastgen.convert (another project's PixelCNN on fastgen's
layers). Planned: PixelRNN.
"""
__version__ = "0.1.0"

from typing import Dict, Optional  # noqa: E402

from fastgen import functional  # noqa: E402
from fastgen._dispatch import OPS, BackendError  # noqa: E402
from fastgen.conversion import ConvertError, convert  # noqa: E402
from fastgen.nn import BatchNormAct2d, GatedMaskedConv2d, GaussianLatent, MaskedConv2d  # noqa: E402
from fastgen.ops.batch_norm_act import batch_norm_act  # noqa: E402
from fastgen.ops.dmol import discretized_mix_logistic_nll, sample_discretized_mix_logistic  # noqa: E402
from fastgen.ops.reparameterize_kl import reparameterize_kl  # noqa: E402
from fastgen.sampling import sample  # noqa: E402


def backends() -> Dict[str, Dict[str, object]]:
    """What is built and usable on this machine: {"extension": {name: None or
    why not}, "ops": {op: {backend: None or why not}}}. One answer per backend:
    a backend the machine lacks (no CUDA device, Triton without
    TRITON_INTERPRET=1 on a CPU-only machine) is "no" with the same reason in
    "extension" and in every op that has it."""
    import torch
    from fastgen import _ext
    cuda = torch.cuda.is_available()
    machine: Dict[str, Optional[str]] = {
        "cpp": _ext.cpp_unavailable(),
        "cuda": _ext.cuda_ext_unavailable() or (None if cuda else "no CUDA device"),
        "triton": _ext.triton_unavailable() or (None if cuda or _ext.interpreting()
                                                else "no CUDA device (CPU tensors need TRITON_INTERPRET=1)"),
    }
    # an op's own reason first (e.g. an old build without its kernel), else the machine's
    ops = {name: {b: why or machine.get(b) for b, why in op.status().items()} for name, op in OPS.items()}
    return {"extension": machine, "ops": ops}


__all__ = ["MaskedConv2d", "GatedMaskedConv2d", "GaussianLatent", "BatchNormAct2d", "reparameterize_kl",
           "discretized_mix_logistic_nll", "sample_discretized_mix_logistic", "batch_norm_act", "functional", "sample",
           "backends", "BackendError", "convert", "ConvertError"]
