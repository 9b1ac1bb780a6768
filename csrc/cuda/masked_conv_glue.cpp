// TORCH_LIBRARY_IMPL(fastgen, CUDA) for masked_conv2d: checks, allocation, the
// current stream, then the raw-pointer launchers of masked_conv.cu. Built only
// when torch has CUDA (setup.py defines FASTGEN_WITH_CUDA).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/masked_conv.cuh"

namespace {

using fastgen::cuda::MaskedConvShape;

MaskedConvShape shape_of(const at::Tensor& x, const at::Tensor& weight, c10::string_view mask_type,
                         int64_t data_channels, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, "masked_conv2d (cuda): input and weight must be 4-D");
  TORCH_CHECK(x.is_cuda() && weight.is_cuda(), "masked_conv2d (cuda): tensors must be on a CUDA device");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "masked_conv2d (cuda): input and weight dtypes differ");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "masked_conv2d (cuda): takes float32 and float64, got ", x.scalar_type());
  TORCH_CHECK(mask_type == "A" || mask_type == "B", "masked_conv2d (cuda): mask_type must be 'A' or 'B'");
  TORCH_CHECK(padding.size() == 2 && dilation.size() == 2, "masked_conv2d (cuda): padding and dilation are pairs");
  MaskedConvShape s;
  s.B = x.size(0); s.Ci = x.size(1); s.H = x.size(2); s.W = x.size(3);
  s.Co = weight.size(0); s.kh = weight.size(2); s.kw = weight.size(3);
  TORCH_CHECK(weight.size(1) == s.Ci, "masked_conv2d (cuda): input has ", s.Ci, " channels, weight expects ",
              weight.size(1));
  TORCH_CHECK(s.kh % 2 == 1 && s.kw % 2 == 1, "masked_conv2d (cuda): kernel size must be odd");
  TORCH_CHECK(data_channels >= 1 && s.Ci % data_channels == 0 && s.Co % data_channels == 0,
              "masked_conv2d (cuda): channels must be divisible by data_channels");
  s.ph = padding[0]; s.pw = padding[1]; s.dh = dilation[0]; s.dw = dilation[1];
  TORCH_CHECK(s.ph >= 0 && s.pw >= 0 && s.dh >= 1 && s.dw >= 1, "masked_conv2d (cuda): bad padding or dilation");
  s.Ho = s.H + 2 * s.ph - s.dh * (s.kh - 1);
  s.Wo = s.W + 2 * s.pw - s.dw * (s.kw - 1);
  TORCH_CHECK(s.Ho >= 1 && s.Wo >= 1, "masked_conv2d (cuda): input too small for the kernel");
  s.data_channels = data_channels;
  s.strict = mask_type == "A";
  return s;
}

void check(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "masked_conv2d (cuda): ", cudaGetErrorString(err)); }

at::Tensor forward(const at::Tensor& x_in, const at::Tensor& w_in, const std::optional<at::Tensor>& bias,
                   c10::string_view mask_type, int64_t data_channels, at::IntArrayRef padding,
                   at::IntArrayRef dilation) {
  const MaskedConvShape s = shape_of(x_in, w_in, mask_type, data_channels, padding, dilation);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == s.Co && bias->scalar_type() == x.scalar_type(), "masked_conv2d (cuda): bad bias");
    b = bias->contiguous();
  }
  at::Tensor y = at::empty({s.B, s.Co, s.Ho, s.Wo}, x.options());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "masked_conv2d_forward_cuda", [&] {
    check(fastgen::cuda::masked_conv2d_forward<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                                         b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                                                         y.data_ptr<scalar_t>(), s, stream));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& go_in, const at::Tensor& x_in,
                                                        const at::Tensor& w_in, c10::string_view mask_type,
                                                        int64_t data_channels, at::IntArrayRef padding,
                                                        at::IntArrayRef dilation, const c10::List<bool>& output_mask_list) {
  const MaskedConvShape s = shape_of(x_in, w_in, mask_type, data_channels, padding, dilation);
  TORCH_CHECK(output_mask_list.size() == 3, "masked_conv2d (cuda): output_mask must have 3 entries");
  const bool output_mask[3] = {output_mask_list[0], output_mask_list[1], output_mask_list[2]};
  TORCH_CHECK(go_in.sizes() == at::IntArrayRef({s.B, s.Co, s.Ho, s.Wo}), "masked_conv2d (cuda): grad_out shape");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor go = go_in.contiguous(), x = x_in.contiguous(), w = w_in.contiguous();
  at::Tensor gx = output_mask[0] ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor gw = output_mask[1] ? at::empty_like(w) : at::empty({0}, x.options());
  at::Tensor gb = output_mask[2] ? at::empty({s.Co}, x.options()) : at::empty({0}, x.options());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "masked_conv2d_backward_cuda", [&] {
    check(fastgen::cuda::masked_conv2d_backward<scalar_t>(
        go.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
        output_mask[0] ? gx.data_ptr<scalar_t>() : nullptr, output_mask[1] ? gw.data_ptr<scalar_t>() : nullptr,
        output_mask[2] ? gb.data_ptr<scalar_t>() : nullptr, s, stream));
  });
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen, CUDA, m) {
  m.impl("masked_conv2d_forward", &forward);
  m.impl("masked_conv2d_backward", &backward);
}
