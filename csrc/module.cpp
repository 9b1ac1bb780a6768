// fastgen._C: the op schemas (one TORCH_LIBRARY block for the namespace) and the
// Python module. Kernels register their implementations per device with
// TORCH_LIBRARY_IMPL in csrc/cpu/<op>.cpp and csrc/cuda/<op>_glue.cpp.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/sampling.h"  // fastgen::sample_scheduled

TORCH_LIBRARY(fastgen, m) {
  // masked_conv2d: see fastgen/ref/masked_conv.py for the mask and fastgen/ops/masked_conv.py for dispatch.
  m.def("masked_conv2d_forward(Tensor x, Tensor weight, Tensor? bias, str mask_type, int data_channels, "
        "int[] padding, int[] dilation) -> Tensor");
  // Entries not asked for in output_mask come back empty.
  m.def("masked_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, str mask_type, int data_channels, "
        "int[] padding, int[] dilation, bool[] output_mask) -> (Tensor, Tensor, Tensor)");
  // gated_activation: tanh(f + cf) * sigmoid(g + cg), see fastgen/ref/gated.py; backward -> (grad_x, grad_cond).
  m.def("gated_activation_forward(Tensor x, Tensor? cond, int data_channels) -> Tensor");
  m.def("gated_activation_backward(Tensor grad_out, Tensor x, Tensor? cond, int data_channels, "
        "bool[] output_mask) -> (Tensor, Tensor)");
  // reparameterize_kl: z = mu + exp(logvar/2) eps and the Gaussian KL, eps drawn from the seed (fastgen/ref/
  // reparameterize_kl.py). kl: elementwise, or the per-row sums in float32 (float64 for double inputs).
  m.def("reparameterize_kl_forward(Tensor mu, Tensor logvar, Tensor? prior_mu, Tensor? prior_logvar, int seed, "
        "bool elementwise) -> (Tensor, Tensor)");
  // -> (grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar); grad_kl per row [B] or elementwise.
  m.def("reparameterize_kl_backward(Tensor? grad_z, Tensor? grad_kl, Tensor mu, Tensor logvar, Tensor? prior_mu, "
        "Tensor? prior_logvar, int seed, bool[] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // discretized_mix_logistic_nll (fastgen/ref/dmol.py): the per-pixel NLL [B, H, W] in float32 (float64 for
  // double params), and the gradient of params for a per-pixel upstream gradient.
  m.def("dmol_nll_forward(Tensor x, Tensor params, int nr_mix) -> Tensor");
  m.def("dmol_nll_backward(Tensor grad_nll, Tensor x, Tensor params, int nr_mix) -> Tensor");
  // batch_norm_act (fastgen/ref/batch_norm_act.py): y = act(batch norm of x); mean / var given (evaluation) or
  // None (the batch's, returned: mean and biased variance, float32 or float64 for double x).
  // The fourth output: a 0-d bool, whether leaky_relu's output may stand for the input in the backward
  // (fastgen.ops.batch_norm_act.invertible_tensor).
  m.def("batch_norm_act_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? mean, Tensor? var, float eps, "
        "str activation, float negative_slope) -> (Tensor, Tensor, Tensor, Tensor)");
  // -> (grad_x, grad_weight, grad_bias) from the one saved tensor: x, or y (saved_is_output, leaky_relu).
  m.def("batch_norm_act_backward(Tensor grad_y, Tensor saved, bool saved_is_output, Tensor? weight, Tensor? bias, "
        "Tensor mean, Tensor var, float eps, bool training, str activation, float negative_slope, "
        "bool[] output_mask) -> (Tensor, Tensor, Tensor)");
}

// The kernels are not differentiable on their own: the registered ops and autograd Functions of
// fastgen/ops/<op>.py call them (below autograd) and own the gradients. Called directly on tensors that require
// grad, a kernel's outputs get a grad_fn that raises when backpropagated through, rather than the default's
// warning and a silently missing gradient.
TORCH_LIBRARY_IMPL(fastgen, Autograd, m) {
  for (const char* kernel : {"masked_conv2d_forward", "masked_conv2d_backward", "gated_activation_forward",
                             "gated_activation_backward", "reparameterize_kl_forward", "reparameterize_kl_backward",
                             "dmol_nll_forward", "dmol_nll_backward", "batch_norm_act_forward",
                             "batch_norm_act_backward"})
    m.impl(kernel, torch::autograd::autogradNotImplementedFallback());
}

static bool built_with_cuda() {
#ifdef FASTGEN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastgen C++/CUDA kernels (ops under torch.ops.fastgen)";
  m.def("built_with_cuda", &built_with_cuda, "whether the CUDA kernels were compiled in");
  m.def("sample_scheduled", &fastgen::sample_scheduled, "run a cached-sampling schedule over steps [t0, t1)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
