// masked_conv2d CUDA kernels: raw pointers and a stream, no torch headers, so
// `nvcc -c` checks them anywhere. The torch glue is masked_conv_glue.cpp.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "masked_conv_shape.h"

namespace fastgen {
namespace cuda {

// NCHW-contiguous tensors; the geometry and the mask rule: csrc/masked_conv_shape.h.
using fastgen::MaskedConvShape;

// T: float, double, __half or __nv_bfloat16 (the last two accumulate in float).
// The launchers only enqueue work on `stream`; they return the launch error, if any.
template <typename T>
cudaError_t masked_conv2d_forward(const T* x, const T* w, const T* bias, T* y, const MaskedConvShape& s,
                                  cudaStream_t stream);

// grad_x / grad_w / grad_b may be null: that gradient is skipped. grad_w's masked entries are written as zero.
// Deterministic: no atomics, every sum in a fixed order.
template <typename T>
cudaError_t masked_conv2d_backward(const T* grad_out, const T* x, const T* w, T* grad_x, T* grad_w, T* grad_b,
                                   const MaskedConvShape& s, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastgen
