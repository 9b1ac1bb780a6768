// TORCH_LIBRARY_IMPL(fastgen, CUDA) for masked_conv2d: checks, allocation, the
// current stream, then the raw-pointer launchers of masked_conv.cu. Built only
// when torch has CUDA (setup.py defines FASTGEN_WITH_CUDA).
//
// Layout rule (the same as the CPU kernels and the fake implementations): an
// input that is channels_last-contiguous (and not contiguous) gets its output
// and grad_x in channels_last; everything else NCHW-contiguous. The kernels
// themselves work on NCHW-contiguous copies.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string_view>
#include <tuple>

#include "cuda/masked_conv.cuh"
#include "masked_conv_args.h"

namespace {

using fastgen::MaskedConvShape;
using fastgen::channels_last;

// torch's element type -> the CUDA type the kernels are instantiated for.
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
auto* ptr(const at::Tensor& t) {
  return reinterpret_cast<typename CudaType<T>::type*>(t.data_ptr<T>());
}

MaskedConvShape shape_of(const char* op, const at::Tensor& x, const at::Tensor& weight, std::string_view mask_type,
                         int64_t data_channels, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x.is_cuda() && weight.device() == x.device(), op, ": input and weight must be on one CUDA device, got ",
              x.device(), " and ", weight.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
              ": the CUDA kernel takes float16, bfloat16, float32 and float64, got ", dt);
  return fastgen::masked_conv_shape(op, x, weight, mask_type, data_channels, padding, dilation);
}

void check(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

// NCHW-contiguous result -> the layout the rule asks for.
at::Tensor in_layout_of(const at::Tensor& result, const at::Tensor& x) {
  return channels_last(x) ? result.contiguous(at::MemoryFormat::ChannelsLast) : result;
}

at::Tensor masked_conv2d_forward_cuda(const at::Tensor& x_in, const at::Tensor& w_in,
                                      const std::optional<at::Tensor>& bias, std::string_view mask_type,
                                      int64_t data_channels, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* op = "fastgen::masked_conv2d_forward (cuda)";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls inside are not recorded
  const MaskedConvShape s = shape_of(op, x_in, w_in, mask_type, data_channels, padding, dilation);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.Co, op, ": bias must have shape (", s.Co, ",), got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(), op,
                ": bias must have the input's dtype and device");
    b = bias->contiguous();
  }
  at::Tensor y = at::empty({s.B, s.Co, s.Ho, s.Wo}, x.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_conv2d_forward_cuda", [&] {
    check(op, fastgen::cuda::masked_conv2d_forward(ptr<scalar_t>(x), ptr<scalar_t>(w),
                                                   b.defined() ? ptr<scalar_t>(b) : nullptr, ptr<scalar_t>(y), s,
                                                   stream));
  });
  return in_layout_of(y, x_in);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_cuda(
    const at::Tensor& go_in, const at::Tensor& x_in, const at::Tensor& w_in, std::string_view mask_type,
    int64_t data_channels, at::IntArrayRef padding, at::IntArrayRef dilation, const c10::List<bool>& output_mask) {
  const char* op = "fastgen::masked_conv2d_backward (cuda)";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls inside are not recorded
  const MaskedConvShape s = shape_of(op, x_in, w_in, mask_type, data_channels, padding, dilation);
  fastgen::check_backward_args(op, go_in, x_in, s, output_mask.size());
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2];
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor go = go_in.contiguous(), x = x_in.contiguous(), w = w_in.contiguous();
  // entries not asked for come back empty
  at::Tensor gx = at::empty(need_x ? at::IntArrayRef(x.sizes()) : at::IntArrayRef({0}), x.options());
  at::Tensor gw = at::empty(need_w ? at::IntArrayRef(w.sizes()) : at::IntArrayRef({0}), x.options());
  at::Tensor gb = at::empty({need_b ? s.Co : 0}, x.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_conv2d_backward_cuda", [&] {
    check(op, fastgen::cuda::masked_conv2d_backward(ptr<scalar_t>(go), ptr<scalar_t>(x), ptr<scalar_t>(w),
                                                    need_x ? ptr<scalar_t>(gx) : nullptr,
                                                    need_w ? ptr<scalar_t>(gw) : nullptr,
                                                    need_b ? ptr<scalar_t>(gb) : nullptr, s, stream));
  });
  return {need_x ? in_layout_of(gx, x_in) : gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen, CUDA, m) {
  m.impl("masked_conv2d_forward", &masked_conv2d_forward_cuda);
  m.impl("masked_conv2d_backward", &masked_conv2d_backward_cuda);
}
