// masked_conv2d on CUDA: direct kernels over the visible taps only.
// Written without a GPU to run them: kept simple (one thread per output or
// input element, block reductions for the weight and bias gradients, no
// atomics) so that correctness is plain to read. benchmarks/RESULTS.md says
// whether they have been run and measured; until they are faster than the
// Triton kernels the dispatch never picks them.
#include "cuda/masked_conv.cuh"

namespace fastgen {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ bool visible(const MaskedConvShape& s, int64_t co, int64_t ci, int64_t i, int64_t j) {
  const int64_t ch = s.kh / 2, cw = s.kw / 2;
  if (i < ch) return true;
  if (i > ch) return false;
  if (j < cw) return true;
  if (j > cw) return false;
  const int64_t g = co / (s.Co / s.data_channels), h = ci / (s.Ci / s.data_channels);
  return s.strict ? h < g : h <= g;
}

// Number of kernel rows that hold a visible tap: rows 0..kh/2.
__device__ __forceinline__ int64_t visible_rows(const MaskedConvShape& s) { return s.kh / 2 + 1; }

template <typename T>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                               T* __restrict__ y, MaskedConvShape s) {
  const int64_t n = s.B * s.Co * s.Ho * s.Wo;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n; idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t ox = idx % s.Wo, oy = (idx / s.Wo) % s.Ho, co = (idx / (s.Wo * s.Ho)) % s.Co,
                  b = idx / (s.Wo * s.Ho * s.Co);
    double acc = bias ? (double)bias[co] : 0.0;
    for (int64_t i = 0; i < visible_rows(s); ++i) {
      const int64_t iy = oy - s.ph + i * s.dh;
      if (iy < 0 || iy >= s.H) continue;
      for (int64_t j = 0; j < s.kw; ++j) {
        const int64_t ix = ox - s.pw + j * s.dw;
        if (ix < 0 || ix >= s.W) continue;
        for (int64_t ci = 0; ci < s.Ci; ++ci) {
          if (!visible(s, co, ci, i, j)) continue;
          acc += (double)w[((co * s.Ci + ci) * s.kh + i) * s.kw + j] * (double)x[((b * s.Ci + ci) * s.H + iy) * s.W + ix];
        }
      }
    }
    y[idx] = (T)acc;
  }
}

template <typename T>
__global__ void grad_input_kernel(const T* __restrict__ go, const T* __restrict__ w, T* __restrict__ gx,
                                  MaskedConvShape s) {
  const int64_t n = s.B * s.Ci * s.H * s.W;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n; idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t x = idx % s.W, y = (idx / s.W) % s.H, ci = (idx / (s.W * s.H)) % s.Ci, b = idx / (s.W * s.H * s.Ci);
    double acc = 0.0;
    for (int64_t i = 0; i < visible_rows(s); ++i) {
      const int64_t oy = y + s.ph - i * s.dh;  // the output row that read this input through tap row i
      if (oy < 0 || oy >= s.Ho) continue;
      for (int64_t j = 0; j < s.kw; ++j) {
        const int64_t ox = x + s.pw - j * s.dw;
        if (ox < 0 || ox >= s.Wo) continue;
        for (int64_t co = 0; co < s.Co; ++co) {
          if (!visible(s, co, ci, i, j)) continue;
          acc += (double)w[((co * s.Ci + ci) * s.kh + i) * s.kw + j] * (double)go[((b * s.Co + co) * s.Ho + oy) * s.Wo + ox];
        }
      }
    }
    gx[idx] = (T)acc;
  }
}

// Sum of a double over the block; valid in thread 0.
__device__ double block_sum(double v) {
  __shared__ double part[kThreads];
  part[threadIdx.x] = v;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) part[threadIdx.x] += part[threadIdx.x + stride];
    __syncthreads();
  }
  return part[0];
}

// One block per weight entry (co, ci, i, j): the sum over batch and output positions.
template <typename T>
__global__ void grad_weight_kernel(const T* __restrict__ go, const T* __restrict__ x, T* __restrict__ gw,
                                   MaskedConvShape s) {
  const int64_t idx = blockIdx.x;
  const int64_t j = idx % s.kw, i = (idx / s.kw) % s.kh, ci = (idx / (s.kw * s.kh)) % s.Ci,
                co = idx / (s.kw * s.kh * s.Ci);
  if (!visible(s, co, ci, i, j)) {  // block-uniform: the whole block leaves together
    if (threadIdx.x == 0) gw[idx] = (T)0;
    return;
  }
  double acc = 0.0;
  const int64_t m = s.B * s.Ho * s.Wo;
  for (int64_t p = threadIdx.x; p < m; p += blockDim.x) {
    const int64_t ox = p % s.Wo, oy = (p / s.Wo) % s.Ho, b = p / (s.Wo * s.Ho);
    const int64_t iy = oy - s.ph + i * s.dh, ix = ox - s.pw + j * s.dw;
    if (iy < 0 || iy >= s.H || ix < 0 || ix >= s.W) continue;
    acc += (double)go[((b * s.Co + co) * s.Ho + oy) * s.Wo + ox] * (double)x[((b * s.Ci + ci) * s.H + iy) * s.W + ix];
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) gw[idx] = (T)acc;
}

template <typename T>
__global__ void grad_bias_kernel(const T* __restrict__ go, T* __restrict__ gb, MaskedConvShape s) {
  const int64_t co = blockIdx.x, hw = s.Ho * s.Wo, m = s.B * hw;
  double acc = 0.0;
  for (int64_t p = threadIdx.x; p < m; p += blockDim.x) acc += (double)go[((p / hw) * s.Co + co) * hw + p % hw];
  acc = block_sum(acc);
  if (threadIdx.x == 0) gb[co] = (T)acc;
}

int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return (int)(b < 65535 * 8 ? (b > 0 ? b : 1) : 65535 * 8);  // grid-stride loops cover the rest
}

}  // namespace

template <typename T>
cudaError_t masked_conv2d_forward(const T* x, const T* w, const T* bias, T* y, const MaskedConvShape& s,
                                  cudaStream_t stream) {
  forward_kernel<T><<<blocks_for(s.B * s.Co * s.Ho * s.Wo), kThreads, 0, stream>>>(x, w, bias, y, s);
  return cudaGetLastError();
}

template <typename T>
cudaError_t masked_conv2d_backward(const T* grad_out, const T* x, const T* w, T* grad_x, T* grad_w, T* grad_b,
                                   const MaskedConvShape& s, cudaStream_t stream) {
  if (grad_x) grad_input_kernel<T><<<blocks_for(s.B * s.Ci * s.H * s.W), kThreads, 0, stream>>>(grad_out, w, grad_x, s);
  if (grad_w) grad_weight_kernel<T><<<(unsigned)(s.Co * s.Ci * s.kh * s.kw), kThreads, 0, stream>>>(grad_out, x, grad_w, s);
  if (grad_b) grad_bias_kernel<T><<<(unsigned)s.Co, kThreads, 0, stream>>>(grad_out, grad_b, s);
  return cudaGetLastError();
}

template cudaError_t masked_conv2d_forward<float>(const float*, const float*, const float*, float*,
                                                  const MaskedConvShape&, cudaStream_t);
template cudaError_t masked_conv2d_forward<double>(const double*, const double*, const double*, double*,
                                                   const MaskedConvShape&, cudaStream_t);
template cudaError_t masked_conv2d_backward<float>(const float*, const float*, const float*, float*, float*, float*,
                                                   const MaskedConvShape&, cudaStream_t);
template cudaError_t masked_conv2d_backward<double>(const double*, const double*, const double*, double*, double*,
                                                    double*, const MaskedConvShape&, cudaStream_t);

}  // namespace cuda
}  // namespace fastgen
