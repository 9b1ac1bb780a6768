// The position-wise operations and the logits' draw of the CUDA engine of cached
// sampling (schedule.cu); the opcodes and activations are
// fastgen/sampling/code.py's (sampling_format.h). No torch headers.
#pragma once

#include "sampling_format.h"

namespace fastgen {
namespace cuda {

using namespace fastgen::code;

template <typename T>
__device__ inline T activate(int act, T v, T p) {
  switch (act) {
    case RELU: return v > T(0) ? v : T(0);
    case LEAKY_RELU: return v > T(0) ? v : v * p;
    case ELU: return v > T(0) ? v : p * expm1(v);
    case TANH: return tanh(v);
    case SIGMOID: return T(1) / (T(1) + exp(-v));
    case SILU: return v / (T(1) + exp(-v));
    case GELU: return T(0.5) * v * (T(1) + erf(v * T(0.70710678118654752440)));
    case SOFTPLUS: return v > T(20) ? v : log1p(exp(v));
    default: return v;
  }
}

// ACT, AFFINE, ADD, MUL and CONST at output channel co, from the operands' values there (a; q: ADD, MUL)
// and the constant's row kk (CONST). `in`: either engine's instruction (the same field names).
template <typename T, typename I>
__device__ inline T point_value(const I& in, T a, T q, const T* kk, int co) {
  switch (in.op) {
    case ACT: return activate<T>(in.act, a, T(in.param));
    case AFFINE: return a * static_cast<const T*>(in.scale)[co] + static_cast<const T*>(in.shift)[co];
    case ADD: return in.param == 1.0 ? a + q : a + T(in.param) * q;
    case MUL: return a * q;
    case CONST: return in.multiply ? a * kk[co] : a + kk[co];
    default: return a;
  }
}

// CONST's row at (b, y, x) of an [H, W] slot of c channels: [B][c] or [B][H][W][c].
template <typename T, typename I>
__device__ inline const T* const_row(const I& in, int b, int y, int x, int H, int W, int c) {
  return static_cast<const T*>(in.cst) + (in.is_map ? ((int64_t(b) * H + y) * W + x) * c : int64_t(b) * c);
}

// GATE's output channel co of cout (dc blocks): tanh(f) * sigmoid(g) of input channels f and g of its block,
// read through at(i).
template <typename T, typename F>
__device__ inline T gate_value(const F& at, int co, int cout, int dc) {
  const int cd = cout / dc, d = co / cd, jj = co % cd;
  return tanh(at(2 * d * cd + jj)) / (T(1) + exp(-at(2 * d * cd + cd + jj)));
}

// One value from the logits logit(i) (i < L, categorical; logit(0), Bernoulli) by inverse CDF in double, as
// fastgen.sampling.common.draw and csrc/cpu/sampling_draw.h's draw. Every thread of the block calls it and gets the
// value: terms is [L] shared doubles (categorical), stat [2] shared.
template <typename F>
__device__ inline int draw_logits(const F& logit, int L, bool categorical, double temperature, double u,
                                  double* terms, double* stat) {
  if (!categorical) return u < 1.0 / (1.0 + exp(-double(logit(0)) / temperature)) ? 1 : 0;
  if (threadIdx.x == 0) {
    double m = -INFINITY;
    for (int i = 0; i < L; ++i) m = fmax(m, double(logit(i)) / temperature);
    stat[0] = m;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < L; i += blockDim.x) terms[i] = exp(double(logit(i)) / temperature - stat[0]);
  __syncthreads();
  if (threadIdx.x == 0) {
    double s = 0, cdf = 0;
    for (int i = 0; i < L; ++i) s += terms[i];
    int v = 0;
    for (int i = 0; i < L; ++i) v += (cdf += terms[i] / s) < u;
    stat[1] = v < L - 1 ? v : L - 1;
  }
  __syncthreads();
  return int(stat[1]);
}

}  // namespace cuda
}  // namespace fastgen
