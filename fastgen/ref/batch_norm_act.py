"""Executable spec of batch_norm_act: 2-D batch normalisation followed by an activation, as
``nn.BatchNorm2d`` then ``nn.ReLU`` / ``nn.LeakyReLU``, in one op.

``batch_norm_act(x, weight, bias, mean, var, eps, activation, negative_slope)`` -> ``(y, mean, var)``:

* statistics over (N, H, W) per channel: when ``mean`` and ``var`` are None (training, or no running
  statistics) the batch's mean and *biased* variance (the ones BatchNorm2d normalises with); otherwise the
  given ones (evaluation with running statistics);
* ``xhat = (x - mean) / sqrt(var + eps)``, ``z = weight * xhat + bias`` (weight 1 and bias 0 when None);
* ``y = relu(z)`` or ``leaky_relu(z, negative_slope)``;
* the returned ``mean`` and ``var`` are the statistics used (detached): the caller updates the running
  statistics from them (``fastgen.ops.batch_norm_act``: momentum, the unbiased variance n / (n - 1), as
  BatchNorm2d does).

Math in float32 for float16/bfloat16/float32 inputs (float64 for float64); y has x's dtype, the statistics
the math type (fastgen.ref.precision). Autograd differentiates through the batch statistics, as
BatchNorm2d's backward does.

:func:`backward` is the gradient the kernels compute from what they keep (the spec of their backward,
plain PyTorch): the kernels save one activation-sized tensor, either the input x or, for leaky_relu, the
output y, from which z and xhat are recovered by inverting the activation and the affine map
(fastgen.ops.batch_norm_act says which and why).
"""
import torch
import torch.nn.functional as F

from fastgen.ref.precision import compute_dtype

ACTIVATIONS = ("relu", "leaky_relu")


def activation_fn(z, activation, negative_slope):
    return F.relu(z) if activation == "relu" else F.leaky_relu(z, negative_slope)


def batch_norm_act(x, weight=None, bias=None, mean=None, var=None, eps=1e-5, activation="relu", negative_slope=0.2):
    ct = compute_dtype(x.dtype)
    xc = x.to(ct)
    if mean is None:
        mean = xc.mean((0, 2, 3))
        var = (xc - mean.reshape(1, -1, 1, 1)).square().mean((0, 2, 3))  # biased; NaN for no values
    else:
        mean, var = mean.to(ct), var.to(ct)
    shape = (1, -1, 1, 1)
    xhat = (xc - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + eps)
    z = xhat
    if weight is not None:
        z = z * weight.to(ct).reshape(shape)
    if bias is not None:
        z = z + bias.to(ct).reshape(shape)
    y = activation_fn(z, activation, negative_slope).to(x.dtype)
    return y, mean.detach(), var.detach()


def backward(grad_y, saved, saved_is_output, weight, bias, mean, var, eps, training, activation, negative_slope):
    """(grad_x, grad_weight, grad_bias) from the saved tensor (x, or y for leaky_relu), the statistics used
    and the parameters (None: weight 1, bias 0), in the math type then cast back. ``training``: the statistics
    were the batch's (grad_x has the terms through the mean and the variance); else they were constants."""
    ct = compute_dtype(saved.dtype)
    shape = (1, -1, 1, 1)
    gy, s = grad_y.to(ct), saved.to(ct)
    gamma = torch.ones_like(mean, dtype=ct) if weight is None else weight.to(ct)
    beta = torch.zeros_like(mean, dtype=ct) if bias is None else bias.to(ct)
    g4, b4 = gamma.reshape(shape), beta.reshape(shape)
    invstd = torch.rsqrt(var.to(ct) + eps).reshape(shape)
    if saved_is_output:  # leaky_relu is invertible: z from y, xhat from z (gamma != 0)
        positive = s > 0
        z = torch.where(positive, s, s / negative_slope)
        xhat = (z - b4) / g4
    else:
        xhat = (s - mean.to(ct).reshape(shape)) * invstd
        positive = xhat * g4 + b4 > 0
    slope = 0.0 if activation == "relu" else negative_slope
    dz = torch.where(positive, gy, gy * slope)
    n = dz.numel() // max(dz.shape[1], 1)
    dbeta = dz.sum((0, 2, 3))
    dgamma = (dz * xhat).sum((0, 2, 3))
    gx = dz
    if training and n > 0:
        gx = dz - (dbeta.reshape(shape) + xhat * dgamma.reshape(shape)) / n
    gx = gx * g4 * invstd
    dtype = saved.dtype if weight is None else weight.dtype
    return gx.to(saved.dtype), dgamma.to(dtype), dbeta.to(dtype)
