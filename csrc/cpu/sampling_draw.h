// The draws of cached sampling on the CPU (csrc/cpu/schedule.cpp), one of each, exactly as
// the torch samplers draw (fastgen.sampling.common.draw and draw_mixture) from the same uniforms.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace fastgen {
namespace sampling {

constexpr double LOG_SCALE_MIN = -7.0;  // fastgen.ref.dmol
constexpr double U_MIN = 1e-5;          // the logistic draw's uniforms are clamped to [U_MIN, 1 - U_MIN]

// One value from the logits at one position (double math, as draw): a Bernoulli logit, or L categorical logits
// by inverse CDF; e: scratch for the softmax terms.
template <class T>
int64_t draw(const T* logits, int64_t L, bool categorical, double temperature, double u, std::vector<double>& e) {
  if (!categorical) return u < 1.0 / (1.0 + std::exp(-double(logits[0]) / temperature)) ? 1 : 0;
  double m = -INFINITY;
  for (int64_t i = 0; i < L; ++i) m = std::max(m, double(logits[i]) / temperature);
  double s = 0;
  e.resize(L);
  for (int64_t i = 0; i < L; ++i) s += (e[i] = std::exp(double(logits[i]) / temperature - m));
  double cdf = 0;
  int64_t v = 0;
  for (int64_t i = 0; i < L; ++i) v += (cdf += e[i] / s) < u;
  return std::min(v, L - 1);
}

// The nearest of the 256 levels to v (clamped to [-1, 1]), as fastgen.ref.dmol.quantize.
template <class T>
int64_t quantize(T v) {
  return static_cast<int64_t>(std::nearbyint((std::min(std::max(v, T(-1)), T(1)) + T(1)) * T(127.5)));
}

// One pixel's levels from the mixture parameters p (fastgen.ref.dmol's layout), in T as the torch sampler
// computes in float32 / float64: u[0] picks the component, u[1 + c] draws colour c (stride: between uniforms).
template <class T>
void draw_mixture(const T* p, int64_t C, int64_t M, T temperature, const double* u, int64_t stride,
                  int64_t* levels) {
  T mx = -INFINITY;
  for (int64_t k = 0; k < M; ++k) mx = std::max(mx, p[k] / temperature);
  T sum = 0;
  for (int64_t k = 0; k < M; ++k) sum += std::exp(p[k] / temperature - mx);
  T cdf = 0;
  int64_t k = 0;
  const T um = static_cast<T>(u[0]);
  for (int64_t i = 0; i < M; ++i) k += (cdf += std::exp(p[i] / temperature - mx) / sum) < um;
  k = std::min(k, M - 1);
  const int64_t per = C == 1 ? 2 : 3;  // means, log-scales (, coefficients) per colour
  T x[3];
  for (int64_t c = 0; c < C; ++c) {
    const T* blk = p + M + c * per * M;
    const T mu = blk[k], ls = std::max(blk[M + k], T(LOG_SCALE_MIN));
    const T uc = std::min(std::max(static_cast<T>(u[(1 + c) * stride]), T(U_MIN)), T(1 - U_MIN));
    T v = mu + std::exp(ls) * temperature * (std::log(uc) - std::log1p(-uc));
    if (c == 1) v += std::tanh(p[M + k + 2 * M]) * x[0];  // colour 0's coefficient a_0
    if (c == 2) {  // in the torch sampler's order: (draw + a_1 x_0) + a_2 x_1
      v += std::tanh(p[M + 3 * M + k + 2 * M]) * x[0];
      v += std::tanh(p[M + 6 * M + k + 2 * M]) * x[1];
    }
    levels[c] = quantize(v);
    x[c] = static_cast<T>(levels[c]) / T(127.5) - T(1);
  }
}

}  // namespace sampling
}  // namespace fastgen
