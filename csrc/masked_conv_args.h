// Argument checks and the layout rule of masked_conv2d, shared by the CPU
// kernels (csrc/cpu) and the CUDA glue (csrc/cuda). Dtype and device checks
// stay with each backend: they differ.
#pragma once
#include <ATen/ATen.h>

#include <string_view>

#include "masked_conv_shape.h"

namespace fastgen {

// The layout rule (the fake implementations in Python follow it): a tensor that
// is channels_last-contiguous and not contiguous is read, and answered, in
// channels_last; anything else is read as (made) NCHW-contiguous.
inline bool channels_last(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

// Checks shapes and arguments with a clear message; returns the call's geometry.
// allow_vertical: the kernel knows mask_type 'V' (see masked_conv_shape.h).
inline MaskedConvShape masked_conv_shape(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                         std::string_view mask_type, int64_t data_channels, at::IntArrayRef padding,
                                         at::IntArrayRef dilation, bool allow_vertical = false) {
  TORCH_CHECK(x.dim() == 4, op, ": input must be 4-D [batch, channels, height, width], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be 4-D [out_channels, in_channels, kh, kw], got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": input and weight must share a dtype, got input ",
              x.scalar_type(), ", weight ", weight.scalar_type());
  const bool vertical = mask_type == "V";
  TORCH_CHECK(mask_type == "A" || mask_type == "B" || (vertical && allow_vertical), op, ": mask_type must be 'A' or 'B'",
              allow_vertical ? " (or 'V')" : "", ", got '", mask_type, "'");
  TORCH_CHECK(padding.size() == 2 && dilation.size() == 2, op, ": padding and dilation must have 2 entries, got ",
              padding, " and ", dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, op, ": padding must be >= 0, got ", padding);
  TORCH_CHECK(dilation[0] >= 1 && dilation[1] >= 1, op, ": dilation must be >= 1, got ", dilation);
  MaskedConvShape s;
  s.B = x.size(0), s.Ci = x.size(1), s.H = x.size(2), s.W = x.size(3);
  s.Co = weight.size(0), s.kh = weight.size(2), s.kw = weight.size(3);
  TORCH_CHECK(weight.size(1) == s.Ci, op, ": input has ", s.Ci, " channels but weight expects ", weight.size(1));
  TORCH_CHECK(vertical || (s.kh % 2 == 1 && s.kw % 2 == 1), op, ": kernel size must be odd in both dimensions, got (",
              s.kh, ", ", s.kw, ")");
  TORCH_CHECK(data_channels >= 1 && s.Ci % data_channels == 0 && s.Co % data_channels == 0, op,
              ": in_channels (", s.Ci, ") and out_channels (", s.Co, ") must both be divisible by data_channels (",
              data_channels, ")");
  s.ph = padding[0], s.pw = padding[1], s.dh = dilation[0], s.dw = dilation[1];
  s.Ho = vertical ? s.H : s.H + 2 * s.ph - s.dh * (s.kh - 1);
  s.Wo = s.W + 2 * s.pw - s.dw * (s.kw - 1);
  TORCH_CHECK(s.Ho >= 1 && s.Wo >= 1, op, ": input (", s.H, ", ", s.W, ") is too small for kernel (", s.kh, ", ",
              s.kw, ") with padding ", padding, " and dilation ", dilation);
  s.data_channels = data_channels;
  s.strict = mask_type == "A";
  s.vertical = vertical;
  return s;
}

// The backward's own arguments: output_mask's length, grad_out's dtype, device and shape.
inline void check_backward_args(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                                const MaskedConvShape& s, size_t output_mask_size) {
  TORCH_CHECK(output_mask_size == 3, op, ": output_mask must have 3 entries (grad_x, grad_weight, grad_bias), got ",
              output_mask_size);
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type() && grad_out.device() == x.device(), op,
              ": grad_out must have the input's dtype ", x.scalar_type(), " and device ", x.device(), ", got ",
              grad_out.scalar_type(), " on ", grad_out.device());
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == s.B && grad_out.size(1) == s.Co &&
                  grad_out.size(2) == s.Ho && grad_out.size(3) == s.Wo,
              op, ": grad_out must have shape (", s.B, ", ", s.Co, ", ", s.Ho, ", ", s.Wo, "), got ", grad_out.sizes());
}

}  // namespace fastgen
