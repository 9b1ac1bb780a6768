// The position-wise instructions of the cached sampler's C++ engine
// (csrc/cpu/schedule.cpp): ACT, AFFINE, ADD, MUL, CONST, GATE. The opcodes and
// activations (Act) are fastgen/sampling/code.py's (sampling_format.h).
#pragma once
#include <cmath>
#include <cstdint>

#include "sampling_format.h"  // the opcodes and activations

namespace fastgen {
namespace sampling {

using namespace fastgen::code;

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

// An instruction's position-wise fields.
template <class T>
struct PointOp {
  int64_t act = 0;
  T param = 0;
  const T* scale = nullptr;
  const T* shift = nullptr;
  const T* cst = nullptr;  // CONST: [B, C] or [B, H, W, C]
  bool multiply = false, is_map = false;
  int64_t dc = 1;

  // From a parsed instruction (sampling::Code or schedule::Code: the same names); ptr(i): param i's data.
  template <class C, class P>
  void set_point(const C& c, const P& ptr) {
    act = c.act, param = static_cast<T>(c.param), scale = ptr(c.scale), shift = ptr(c.shift), cst = ptr(c.cst);
    multiply = c.multiply, is_map = c.is_map, dc = c.dc;
  }
  // CONST: the constant at position (b, y, x) of an [H, W] slot of c channels.
  const T* constant(int64_t b, int64_t y, int64_t x, int64_t H, int64_t W, int64_t c) const {
    return is_map ? cst + ((b * H + y) * W + x) * c : cst + b * c;
  }
};

// Output channels [lo, hi) of `op` at one position: a and q its operands there (q: ADD and MUL), k the
// constant (CONST), cout the output's channels (GATE reads 2 * cout: dc blocks of (tanh half, sigmoid half)).
template <class T>
inline void pointwise(int64_t op, const PointOp<T>& p, const T* a, const T* q, const T* k, T* o, int64_t cout,
                      int64_t lo, int64_t hi) {
  switch (op) {
    case ACT:
      if (p.act == RELU) {  // its own loop, which the compiler vectorises (activate's switch inside one stops it)
        for (int64_t i = lo; i < hi; ++i) o[i] = activate(RELU, a[i], p.param);
      } else if (p.act == LEAKY_RELU) {
        for (int64_t i = lo; i < hi; ++i) o[i] = activate(LEAKY_RELU, a[i], p.param);
      } else {
        for (int64_t i = lo; i < hi; ++i) o[i] = activate(p.act, a[i], p.param);
      }
      break;
    case AFFINE:
      for (int64_t i = lo; i < hi; ++i) o[i] = a[i] * p.scale[i] + p.shift[i];
      break;
    case ADD:
      if (p.param == T(1))
        for (int64_t i = lo; i < hi; ++i) o[i] = a[i] + q[i];
      else
        for (int64_t i = lo; i < hi; ++i) o[i] = a[i] + p.param * q[i];
      break;
    case MUL:
      for (int64_t i = lo; i < hi; ++i) o[i] = a[i] * q[i];
      break;
    case CONST:
      if (p.multiply)
        for (int64_t i = lo; i < hi; ++i) o[i] = a[i] * k[i];
      else
        for (int64_t i = lo; i < hi; ++i) o[i] = a[i] + k[i];
      break;
    case GATE: {
      const int64_t cd = cout / p.dc;
      for (int64_t i = lo; i < hi; ++i) {  // output i: gate block d = i / cd, channel i % cd of it
        const int64_t in = i + i / cd * cd;
        o[i] = std::tanh(a[in]) / (T(1) + std::exp(-a[in + cd]));
      }
      break;
    }
    default: break;
  }
}

}  // namespace sampling
}  // namespace fastgen
