// The opcodes and activations shared by the CUDA engines of cached sampling
// (sampling.cu, schedule.cu); the values are fastgen/sampling/program.py's
// (opcodes, ACTS) and schedule.py's (CONVT, FILL). No torch headers.
#pragma once

namespace fastgen {
namespace cuda {

enum Op { CONV = 1, ACT, AFFINE, ADD, MUL, CONST, GATE, COPY, CONVT, FILL };
enum Act { IDENTITY, RELU, LEAKY_RELU, ELU, TANH, SIGMOID, SILU, GELU, SOFTPLUS };

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

}  // namespace cuda
}  // namespace fastgen
