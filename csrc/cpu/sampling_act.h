// The activations of the cached samplers' ACT instruction, shared by the C++
// engines (csrc/cpu/sampling.cpp, schedule.cpp); the order is ACTS in
// fastgen/sampling/program.py.
#pragma once
#include <cmath>
#include <cstdint>

namespace fastgen {
namespace sampling {

enum Act : int64_t { IDENTITY, RELU, LEAKY_RELU, ELU, TANH, SIGMOID, SILU, GELU, SOFTPLUS };

template <class T>
inline T activate(int64_t act, T v, T p) {
  switch (act) {
    case RELU: return v > 0 ? v : T(0);
    case LEAKY_RELU: return v > 0 ? v : v * p;
    case ELU: return v > 0 ? v : p * std::expm1(v);
    case TANH: return std::tanh(v);
    case SIGMOID: return T(1) / (T(1) + std::exp(-v));
    case SILU: return v / (T(1) + std::exp(-v));
    case GELU: return T(0.5) * v * (T(1) + std::erf(v * T(0.70710678118654752440)));
    case SOFTPLUS: return v > T(20) ? v : std::log1p(std::exp(v));
    default: return v;
  }
}

}  // namespace sampling
}  // namespace fastgen
