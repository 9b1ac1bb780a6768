// batch_norm_act on CPU: the `cpp` backend (fastgen.ops.batch_norm_act).
//
// y = act(weight * (x - mean) / sqrt(var + eps) + bias), act = relu or leaky_relu, per channel of x
// [N, C, H, W], with the batch's statistics (training: mean and biased variance over N, H, W, returned for
// the running statistics) or given ones (evaluation); see fastgen/ref/batch_norm_act.py. The backward reads
// ONE activation-sized tensor, `saved`: the input x, or (leaky_relu, saved_is_output) the output y, from
// which z = y (y > 0) or y / slope and xhat = (z - bias) / weight are recovered (weight != 0 is checked).
//
// Work. NCHW: one task per group of adjacent channels (about 4 KB of each sample; tasks handed out from a
// shared counter), the planes of the samples ahead prefetched by hand. The forward sums each channel's N planes,
// then normalises them while they sit in L2 (a channel of (64, 64, 32, 32) float32 is 256 KB): x is read from
// memory once. The backward makes the two sums sum(dz), sum(dz * u) over the
// channel (dz = grad_y * act'(z); u = z - bias from y, x - mean from x), then grad_x from the same planes:
//   grad_x = a dz + bu u + c1,  a = weight invstd, bu, c1 per channel from the sums (training), or a dz.
// channels_last: rows of C channels in fixed blocks of kRows rows; the reductions keep one partial sum per
// block and channel and add the blocks in order, then a second pass writes y (grad_x).
//
// Numbers. Sums in float64 for every dtype, of x - k (k the channel's first element: the variance does not
// cancel when |mean| >> std), in L fixed lanes (16 for float math, 8 for double) added in a fixed order:
// the same inputs give the same bits, whatever the thread count. Elementwise math in float32 for float32,
// bfloat16 and float16 (float64 for float64), z = x a + b with a = weight invstd, b = bias - mean a (as
// torch's CPU batch norm), no FMA (this file is built with fp-contract=off): the backward recomputes the
// forward's z bit for bit, so the activation's side (z > 0) is the forward's.
//
// Paths: AVX-512 (chosen at run time) and a portable one (other CPUs, FASTGEN_CPU_KERNEL=generic), the same
// loops (csrc/cpu/batch_norm_act_loops.h) over 16 / 8 lanes of registers or of plain arrays: the same bits.
// Layout (the CPU ops' rule, fastgen::channels_last): a channels_last x is read in place and y is
// channels_last; anything else is read NCHW-contiguous (a copy when it is not). The backward follows the
// saved tensor's layout (grad_y is brought to it; grad_x has it).

#pragma GCC optimize("no-math-errno", "no-trapping-math", "fp-contract=off")

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/cpu_features.h"  // FASTGEN_AVX512, fastgen::use_avx512()
#include "cpu/vec_math.h"      // fastgen::vec512: Lanes, 16-bit loads and stores
#include "masked_conv_args.h"  // fastgen::channels_last: the layout rule shared by the CPU ops

#define FASTGEN_INLINE inline __attribute__((always_inline))

namespace {

// The math type: float32 for float/bfloat16/half, float64 for double.
template <class T>
using math_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

enum class Act { Relu, Leaky };

constexpr int64_t kRows = 128;  // rows (positions) per channels_last block

// x is [N, C, P] (NCHW, P = H W positions) or [N P, C] (channels_last)
struct Geom {
  int64_t N, C, P;
  bool cl;
};

template <class M>
struct Coef {
  M r, a, b;  // invstd, and z = x a + b
};

// What the backward needs to recover dz and u from the saved tensor (see recover in the loops): from y,
// p0 = bias; from x, p0 = a, p1 = b (the forward's z = x a + b), p2 = mean.
template <class M>
struct Rec {
  M p0, p1, p2, slope, islope;
};

// grad_x = a dz + bu u + c1 (training) or a dz
template <class M>
struct Dx {
  M a, bu, c1;
};

template <class T>
struct FwdJob {
  using M = math_t<T>;
  Geom g;
  const T* x;
  T* y;
  const T* w;  // nullptr: weight 1
  const T* b;  // nullptr: bias 0
  M* mean;     // training: written here; evaluation: the given statistics
  M* var;
  bool train;
  double eps;
  M slope;
  // channels_last
  int64_t cp = 0;              // C rounded up to 16: the padded length of the per-channel arrays
  double* part = nullptr;      // [blocks][2][cp]: the blocks' sums
  const double* shift = nullptr;  // [cp]: k per channel
  const M* ca = nullptr;       // [cp]: a, b per channel
  const M* cb = nullptr;
};

template <class T>
struct BwdJob {
  using M = math_t<T>;
  Geom g;
  const T* s;   // the saved tensor: y (from_y) or x
  const T* dy;  // grad_y, in s's layout
  T* dx;        // nullptr: not wanted
  const T* w;
  const T* b;
  const M* mean;
  const M* var;
  T* dw;  // nullptr: not wanted
  T* db;
  bool train, sums;  // sums: sum(dz), sum(dz u) are needed (training, or a parameter's gradient)
  double eps;
  M slope, islope;
  // channels_last
  int64_t cp = 0;
  double* part = nullptr;
  const M *p0 = nullptr, *p1 = nullptr, *p2 = nullptr;     // [cp]: Rec per channel
  const M *da = nullptr, *dbu = nullptr, *dc1 = nullptr;  // [cp]: Dx per channel
};

// NCHW: fn(job, first channel, channels) on a group of channels; channels_last: fn(job, block)
template <class T>
using GroupFn = void (*)(const FwdJob<T>&, int64_t, int64_t);
template <class T>
using BlockFn = void (*)(const FwdJob<T>&, int64_t);
template <class T>
using BwdGroupFn = void (*)(const BwdJob<T>&, int64_t, int64_t);
template <class T>
using BwdBlockFn = void (*)(const BwdJob<T>&, int64_t);

template <class T>
struct FwdKernels {
  GroupFn<T> group;
  BlockFn<T> stats_block, apply_block;
};
template <class T>
struct BwdKernels {
  BwdGroupFn<T> group;
  BwdBlockFn<T> reduce_block, apply_block;
};

// ---- scalar steps shared by both paths -------------------------------------------------------------------------

// mean and biased variance of n values from s1 = sum(x - k), s2 = sum((x - k)^2); NaN for no values (as ref)
template <class M>
void finish_stats(double s1, double s2, double k, int64_t n, M* mean, M* var) {
  if (n == 0) {
    *mean = *var = std::numeric_limits<M>::quiet_NaN();
    return;
  }
  const double d = s1 / double(n);
  *mean = M(k + d);
  *var = M(std::max(0.0, (s2 - s1 * d) / double(n)));
}

template <class T>
Coef<math_t<T>> coefficients(const T* w, const T* b, const math_t<T>* mean, const math_t<T>* var, double eps,
                             int64_t c) {
  using M = math_t<T>;
  const M g = w ? M(w[c]) : M(1), be = b ? M(b[c]) : M(0);
  Coef<M> cf;
  cf.r = M(1) / std::sqrt(var[c] + M(eps));
  cf.a = g * cf.r;
  cf.b = be - mean[c] * cf.a;
  return cf;
}

template <class T, bool FromY>
Rec<math_t<T>> recovery(const BwdJob<T>& j, int64_t c) {
  using M = math_t<T>;
  if constexpr (FromY) return {j.b ? M(j.b[c]) : M(0), M(0), M(0), j.slope, j.islope};
  const Coef<M> cf = coefficients(j.w, j.b, j.mean, j.var, j.eps, c);
  return {cf.a, cf.b, j.mean[c], j.slope, j.islope};
}

// From S1 = sum(dz), S2 = sum(dz u): grad_weight = sum(dz xhat), grad_bias = S1 (written if wanted) and the
// coefficients of grad_x = weight invstd (dz - S1 / n - xhat grad_weight / n) (training).
template <class T, bool FromY>
Dx<math_t<T>> finish_backward(const BwdJob<T>& j, int64_t c, double S1, double S2) {
  using M = math_t<T>;
  const Coef<M> cf = coefficients(j.w, j.b, j.mean, j.var, j.eps, c);
  const double g = j.w ? double(M(j.w[c])) : 1.0, r = cf.r, n = double(j.g.N * j.g.P);
  const double dgamma = FromY ? S2 / g : r * S2;  // xhat = u / weight, or u invstd
  if (j.dw) j.dw[c] = T(dgamma);
  if (j.db) j.db[c] = T(S1);
  Dx<M> d{cf.a, M(0), M(0)};
  if (j.train && n > 0) {
    d.bu = M((FromY ? -r : -g * r * r) * dgamma / n);
    d.c1 = M(-double(cf.a) * S1 / n);
  }
  return d;
}

// NCHW: a task's group of channels (at most kMaxGroup, about kGroupBytes of each sample) and the planes
// prefetched while sample n's are read: those of sample n + d, about kPrefetchBytes ahead (a channel's planes are
// C P elements apart; the hardware prefetcher follows a stream within a page, not jumps of C P), nullptr past the
// last sample. `first`: the group's plane in sample 0.
constexpr int64_t kMaxGroup = 16, kGroupBytes = 4096, kPrefetchBytes = 8192;

template <class T>
const T* ahead_of(const T* first, int64_t n, const Geom& g, int64_t group) {
  const int64_t bytes = group * g.P * int64_t(sizeof(T));
  const int64_t d = std::clamp<int64_t>((kPrefetchBytes + bytes - 1) / bytes, 1, 16);
  return n + d < g.N ? first + (n + d) * g.C * g.P : nullptr;
}

// Channels per NCHW task: about kGroupBytes per sample, and at least two tasks per thread where there are channels
// enough (the bits do not depend on it: each channel's sums run the same way in any group)
template <class T>
int64_t group_size(const Geom& g) {
  const int64_t plane = std::max<int64_t>(1, g.P * int64_t(sizeof(T)));
  const int64_t by_bytes = std::clamp<int64_t>((kGroupBytes + plane - 1) / plane, 1, kMaxGroup);
  const int64_t by_threads = std::max<int64_t>(1, g.C / (2 * std::max(1, at::get_num_threads())));
  return std::min(by_bytes, by_threads);
}

// f(i) for i in [0, n), handed out from a shared counter (a core that another process is using takes fewer);
// small calls stay on the calling thread.
template <class F>
void run_tasks(int64_t n, int64_t elems, const F& f) {
  const int64_t nthreads = std::min<int64_t>(at::get_num_threads(), n);
  if (nthreads <= 1 || elems < (int64_t(1) << 15) || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) f(i);
  });
}

}  // namespace

#ifdef FASTGEN_AVX512
// ---- AVX-512 lanes (this section only is compiled for AVX-512F) ---------------------------------------------
FASTGEN_AVX512_BEGIN

namespace {
namespace avx512 {

using fastgen::vec512::Lanes;

// float math: 16 lanes; float32, bfloat16 and float16 storage; sums in two halves of 8 doubles
struct VecF {
  using M = float;
  using W = Lanes<float>;
  using R = __m512;
  using Mk = __mmask16;
  using Tail = __mmask16;
  static constexpr int L = 16;
  struct Acc {
    __m512d lo, hi;
  };
  struct KD {
    __m512d lo, hi;
  };
  static FASTGEN_INLINE Tail tail(int64_t n) { return fastgen::vec512::tail16(n); }
  template <class T>
  static FASTGEN_INLINE R load(const T* p, Tail t) {
    return fastgen::vec512::load(p, t);
  }
  template <class T>
  static FASTGEN_INLINE void store(T* p, R v, Tail t) {
    fastgen::vec512::store(p, v, t);
  }
  static FASTGEN_INLINE R set(float a) { return W::set1(a); }
  static FASTGEN_INLINE R zero() { return W::zero(); }
  static FASTGEN_INLINE R add(R a, R b) { return W::add(a, b); }
  static FASTGEN_INLINE R sub(R a, R b) { return W::sub(a, b); }
  static FASTGEN_INLINE R mul(R a, R b) { return W::mul(a, b); }
  static FASTGEN_INLINE Mk positive(R z) { return W::not_le(z, W::zero()); }
  static FASTGEN_INLINE R select(Mk m, R yes, R no) { return W::blend(m, no, yes); }
  static FASTGEN_INLINE void widen(R v, __m512d& lo, __m512d& hi) {
    lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  }
  static FASTGEN_INLINE Acc acc_zero() { return {_mm512_setzero_pd(), _mm512_setzero_pd()}; }
  static FASTGEN_INLINE KD kd_set(double k) { return {_mm512_set1_pd(k), _mm512_set1_pd(k)}; }
  static FASTGEN_INLINE KD kd_load(const double* p) { return {_mm512_loadu_pd(p), _mm512_loadu_pd(p + 8)}; }
  static FASTGEN_INLINE void acc_stats(Acc& s1, Acc& s2, R x, const KD& k, Tail t) {
    __m512d lo, hi;
    widen(x, lo, hi);
    const __mmask8 tl = __mmask8(t), th = __mmask8(t >> 8);
    lo = _mm512_sub_pd(lo, k.lo), hi = _mm512_sub_pd(hi, k.hi);
    s1.lo = _mm512_mask_add_pd(s1.lo, tl, s1.lo, lo), s1.hi = _mm512_mask_add_pd(s1.hi, th, s1.hi, hi);
    s2.lo = _mm512_mask_add_pd(s2.lo, tl, s2.lo, _mm512_mul_pd(lo, lo));
    s2.hi = _mm512_mask_add_pd(s2.hi, th, s2.hi, _mm512_mul_pd(hi, hi));
  }
  static FASTGEN_INLINE void acc_prod(Acc& s1, Acc& s2, R dz, R u, Tail t) {
    __m512d dlo, dhi, ulo, uhi;
    widen(dz, dlo, dhi), widen(u, ulo, uhi);
    const __mmask8 tl = __mmask8(t), th = __mmask8(t >> 8);
    s1.lo = _mm512_mask_add_pd(s1.lo, tl, s1.lo, dlo), s1.hi = _mm512_mask_add_pd(s1.hi, th, s1.hi, dhi);
    s2.lo = _mm512_mask_add_pd(s2.lo, tl, s2.lo, _mm512_mul_pd(dlo, ulo));
    s2.hi = _mm512_mask_add_pd(s2.hi, th, s2.hi, _mm512_mul_pd(dhi, uhi));
  }
  static FASTGEN_INLINE void acc_lanes(const Acc& a, double* out) {
    _mm512_storeu_pd(out, a.lo);
    _mm512_storeu_pd(out + 8, a.hi);
  }
};

// double math: 8 lanes
struct VecD {
  using M = double;
  using W = Lanes<double>;
  using R = __m512d;
  using Mk = __mmask8;
  using Tail = __mmask8;
  static constexpr int L = 8;
  struct Acc {
    __m512d v;
  };
  struct KD {
    __m512d v;
  };
  static FASTGEN_INLINE Tail tail(int64_t n) { return n >= 8 ? Tail(0xFF) : Tail((1u << n) - 1); }
  static FASTGEN_INLINE R load(const double* p, Tail t) { return W::load(p, t); }
  static FASTGEN_INLINE void store(double* p, R v, Tail t) { W::store(p, v, t); }
  static FASTGEN_INLINE R set(double a) { return W::set1(a); }
  static FASTGEN_INLINE R zero() { return W::zero(); }
  static FASTGEN_INLINE R add(R a, R b) { return W::add(a, b); }
  static FASTGEN_INLINE R sub(R a, R b) { return W::sub(a, b); }
  static FASTGEN_INLINE R mul(R a, R b) { return W::mul(a, b); }
  static FASTGEN_INLINE Mk positive(R z) { return W::not_le(z, W::zero()); }
  static FASTGEN_INLINE R select(Mk m, R yes, R no) { return W::blend(m, no, yes); }
  static FASTGEN_INLINE Acc acc_zero() { return {_mm512_setzero_pd()}; }
  static FASTGEN_INLINE KD kd_set(double k) { return {_mm512_set1_pd(k)}; }
  static FASTGEN_INLINE KD kd_load(const double* p) { return {_mm512_loadu_pd(p)}; }
  static FASTGEN_INLINE void acc_stats(Acc& s1, Acc& s2, R x, const KD& k, Tail t) {
    const R d = _mm512_sub_pd(x, k.v);
    s1.v = _mm512_mask_add_pd(s1.v, t, s1.v, d);
    s2.v = _mm512_mask_add_pd(s2.v, t, s2.v, _mm512_mul_pd(d, d));
  }
  static FASTGEN_INLINE void acc_prod(Acc& s1, Acc& s2, R dz, R u, Tail t) {
    s1.v = _mm512_mask_add_pd(s1.v, t, s1.v, dz);
    s2.v = _mm512_mask_add_pd(s2.v, t, s2.v, _mm512_mul_pd(dz, u));
  }
  static FASTGEN_INLINE void acc_lanes(const Acc& a, double* out) { _mm512_storeu_pd(out, a.v); }
};

template <class T>
using Vec = std::conditional_t<std::is_same_v<T, double>, VecD, VecF>;

#include "cpu/batch_norm_act_loops.h"

}  // namespace avx512
}  // namespace

FASTGEN_AVX512_END
#endif  // FASTGEN_AVX512

// ---- portable lanes: plain arrays of the same width, the same operations --------------------------------------
namespace {
namespace portable {

template <class MT>
struct VecP {
  using M = MT;
  static constexpr int L = std::is_same_v<M, double> ? 8 : 16;
  struct R {
    M v[L];
  };
  struct Mk {
    bool v[L];
  };
  using Tail = int;  // the first n lanes
  struct Acc {
    double v[L];
  };
  using KD = Acc;
  static FASTGEN_INLINE Tail tail(int64_t n) { return int(std::min<int64_t>(n, L)); }
  template <class T>
  static FASTGEN_INLINE R load(const T* p, Tail t) {
    R r;
    for (int l = 0; l < L; ++l) r.v[l] = l < t ? static_cast<M>(p[l]) : M(0);
    return r;
  }
  template <class T>
  static FASTGEN_INLINE void store(T* p, R v, Tail t) {
    for (int l = 0; l < t; ++l) p[l] = static_cast<T>(v.v[l]);  // c10's conversions round to nearest even
  }
  static FASTGEN_INLINE R set(M a) {
    R r;
    for (int l = 0; l < L; ++l) r.v[l] = a;
    return r;
  }
  static FASTGEN_INLINE R zero() { return set(M(0)); }
#define FASTGEN_LANEWISE(name, op)                             \
  static FASTGEN_INLINE R name(R a, R b) {                     \
    R r;                                                       \
    for (int l = 0; l < L; ++l) r.v[l] = a.v[l] op b.v[l];     \
    return r;                                                  \
  }
  FASTGEN_LANEWISE(add, +)
  FASTGEN_LANEWISE(sub, -)
  FASTGEN_LANEWISE(mul, *)
#undef FASTGEN_LANEWISE
  static FASTGEN_INLINE Mk positive(R z) {
    Mk m;
    for (int l = 0; l < L; ++l) m.v[l] = !(z.v[l] <= M(0));  // > 0, or NaN (as _CMP_NLE_UQ)
    return m;
  }
  static FASTGEN_INLINE R select(Mk m, R yes, R no) {
    R r;
    for (int l = 0; l < L; ++l) r.v[l] = m.v[l] ? yes.v[l] : no.v[l];
    return r;
  }
  static FASTGEN_INLINE Acc acc_zero() { return Acc{}; }
  static FASTGEN_INLINE KD kd_set(double k) {
    KD r;
    for (int l = 0; l < L; ++l) r.v[l] = k;
    return r;
  }
  static FASTGEN_INLINE KD kd_load(const double* p) {
    KD r;
    for (int l = 0; l < L; ++l) r.v[l] = p[l];
    return r;
  }
  static FASTGEN_INLINE void acc_stats(Acc& s1, Acc& s2, R x, const KD& k, Tail t) {
    for (int l = 0; l < t; ++l) {
      const double d = double(x.v[l]) - k.v[l];
      s1.v[l] += d;
      s2.v[l] += d * d;
    }
  }
  static FASTGEN_INLINE void acc_prod(Acc& s1, Acc& s2, R dz, R u, Tail t) {
    for (int l = 0; l < t; ++l) {
      s1.v[l] += double(dz.v[l]);
      s2.v[l] += double(dz.v[l]) * double(u.v[l]);
    }
  }
  static FASTGEN_INLINE void acc_lanes(const Acc& a, double* out) {
    for (int l = 0; l < L; ++l) out[l] = a.v[l];
  }
};

template <class T>
using Vec = VecP<math_t<T>>;

#include "cpu/batch_norm_act_loops.h"

}  // namespace portable

template <class T>
FwdKernels<T> pick_forward(Act a) {
#ifdef FASTGEN_AVX512
  if (fastgen::use_avx512()) return avx512::forward_kernels<T>(a);
#endif
  return portable::forward_kernels<T>(a);
}

template <class T>
BwdKernels<T> pick_backward(Act a, bool from_y) {
#ifdef FASTGEN_AVX512
  if (fastgen::use_avx512()) return avx512::backward_kernels<T>(a, from_y);
#endif
  return portable::backward_kernels<T>(a, from_y);
}

// Whether leaky_relu's output can stand for the input in the backward (fastgen.ops.batch_norm_act.invertible):
// every weight != 0 and |bias| <= kInvertibleRatio |weight| (weight 1, bias 0 when absent; NaN: no).
constexpr double kInvertibleRatio = 8.0;

template <class T>
bool invertible(const T* w, const T* b, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const double g = w ? double(w[c]) : 1.0, be = b ? double(b[c]) : 0.0;
    if (!(g != 0 && std::abs(be) <= kInvertibleRatio * std::abs(g))) return false;
  }
  return true;
}

// ---- the drivers ------------------------------------------------------------------------------------------

int64_t padded(int64_t c) { return (c + 15) / 16 * 16; }

template <class T>
void forward_impl(FwdJob<T> j, Act act) {
  using M = math_t<T>;
  const FwdKernels<T> k = pick_forward<T>(act);
  const int64_t rows = j.g.N * j.g.P, C = j.g.C, elems = rows * C;
  if (!j.g.cl) {
    const int64_t G = group_size<T>(j.g);
    run_tasks((C + G - 1) / G, elems, [&](int64_t t) { k.group(j, t * G, std::min(G, C - t * G)); });
    return;
  }
  const int64_t blocks = (rows + kRows - 1) / kRows, cp = padded(C);
  std::vector<double> part, shift(cp, 0.0);
  std::vector<M> ca(cp, M(0)), cb(cp, M(0));
  j.cp = cp;
  if (j.train) {
    part.resize(blocks * 2 * cp);
    for (int64_t c = 0; c < C; ++c) shift[c] = double(M(j.x[c]));  // row 0: the channel's first element
    j.part = part.data(), j.shift = shift.data();
    run_tasks(blocks, elems, [&](int64_t b) { k.stats_block(j, b); });
    for (int64_t c = 0; c < C; ++c) {
      double s1 = 0, s2 = 0;
      for (int64_t b = 0; b < blocks; ++b) s1 += part[b * 2 * cp + c], s2 += part[b * 2 * cp + cp + c];
      finish_stats(s1, s2, shift[c], rows, j.mean + c, j.var + c);
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    const Coef<M> cf = coefficients(j.w, j.b, j.mean, j.var, j.eps, c);
    ca[c] = cf.a, cb[c] = cf.b;
  }
  j.ca = ca.data(), j.cb = cb.data();
  run_tasks(blocks, elems, [&](int64_t b) { k.apply_block(j, b); });
}

template <class T>
void backward_impl(BwdJob<T> j, Act act, bool from_y) {
  using M = math_t<T>;
  const BwdKernels<T> k = pick_backward<T>(act, from_y);
  const int64_t rows = j.g.N * j.g.P, C = j.g.C, elems = rows * C;
  if (!j.g.cl) {
    const int64_t G = group_size<T>(j.g);
    run_tasks((C + G - 1) / G, elems, [&](int64_t t) { k.group(j, t * G, std::min(G, C - t * G)); });
    return;
  }
  const int64_t blocks = (rows + kRows - 1) / kRows, cp = padded(C);
  std::vector<M> arrays(6 * cp, M(0));
  M *p0 = arrays.data(), *p1 = p0 + cp, *p2 = p1 + cp, *da = p2 + cp, *dbu = da + cp, *dc1 = dbu + cp;
  for (int64_t c = 0; c < C; ++c) {
    const Rec<M> q = from_y ? recovery<T, true>(j, c) : recovery<T, false>(j, c);
    p0[c] = q.p0, p1[c] = q.p1, p2[c] = q.p2;
  }
  j.cp = cp, j.p0 = p0, j.p1 = p1, j.p2 = p2;
  std::vector<double> part;
  if (j.sums) {
    part.resize(blocks * 2 * cp);
    j.part = part.data();
    run_tasks(blocks, elems, [&](int64_t b) { k.reduce_block(j, b); });
  }
  for (int64_t c = 0; c < C; ++c) {
    double s1 = 0, s2 = 0;
    for (int64_t b = 0; j.sums && b < blocks; ++b) s1 += part[b * 2 * cp + c], s2 += part[b * 2 * cp + cp + c];
    const Dx<M> d = from_y ? finish_backward<T, true>(j, c, s1, s2) : finish_backward<T, false>(j, c, s1, s2);
    da[c] = d.a, dbu[c] = d.bu, dc1[c] = d.c1;
  }
  j.da = da, j.dbu = dbu, j.dc1 = dc1;
  if (j.dx) run_tasks(blocks, elems, [&](int64_t b) { k.apply_block(j, b); });
}

// ---- the registered ops -----------------------------------------------------------------------------------

const char* kOp = "fastgen::batch_norm_act";

at::ScalarType math_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

Act parse_act(std::string_view activation, double slope) {
  TORCH_CHECK(activation == "relu" || activation == "leaky_relu", kOp,
              ": activation must be 'relu' or 'leaky_relu', got '", activation, "'");
  if (activation == "relu") return Act::Relu;
  TORCH_CHECK(std::isfinite(slope) && slope > 0, kOp, ": leaky_relu's negative_slope must be finite and > 0, got ",
              slope);
  return Act::Leaky;
}

Geom check_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), kOp, ": the cpp backend takes CPU tensors, got ", name, " on ", x.device());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, kOp, ": ", name,
              " must be float32, float64, bfloat16 or float16, got ", st);
  TORCH_CHECK(x.dim() == 4, kOp, ": ", name, " must be 4-D [N, C, H, W], got shape ", x.sizes());
  return {x.size(0), x.size(1), x.size(2) * x.size(3), fastgen::channels_last(x)};
}

// A per-channel vector: [C], dtype st, on x's device, made contiguous
at::Tensor channel_vector(const at::Tensor& t, const at::Tensor& x, at::ScalarType st, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), kOp, ": ", name, " must have shape (", x.size(1),
              ",), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == st && t.device() == x.device(), kOp, ": ", name, " must be ", st, " on ",
              x.device(), ", got ", t.scalar_type(), " on ", t.device());
  return t.contiguous();
}

at::Tensor optional_vector(const std::optional<at::Tensor>& t, const at::Tensor& x, const char* name) {
  return t.has_value() && t->defined() ? channel_vector(*t, x, x.scalar_type(), name) : at::Tensor();
}

template <class T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// -> (y, mean, var, invertible): mean and var (float32, float64 for double x) are the batch's (mean, biased
// variance) when none are given, else copies of the given ones; invertible (a 0-d bool): the rule above, which
// decides whether leaky_relu's backward may take y (read here, where weight and bias are read anyway).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_forward_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var, double eps,
    std::string_view activation, double negative_slope) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Geom g = check_input(x, "input");
  const Act act = parse_act(activation, negative_slope);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, kOp, ": eps must be finite and >= 0, got ", eps);
  const bool given = mean.has_value() && mean->defined();
  TORCH_CHECK(given == (var.has_value() && var->defined()), kOp, ": give both mean and var, or neither");
  const auto mt = math_type(x.scalar_type());
  const at::Tensor w = optional_vector(weight, x, "weight"), b = optional_vector(bias, x, "bias");
  at::Tensor m_out, v_out;
  if (given) {
    m_out = channel_vector(*mean, x, mt, "mean").clone();
    v_out = channel_vector(*var, x, mt, "var").clone();
  } else {
    m_out = at::empty({g.C}, x.options().dtype(mt));
    v_out = at::empty({g.C}, x.options().dtype(mt));
  }
  const auto fmt = g.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor inv = at::empty({}, x.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_act_invertible", [&] {
    inv.fill_(invertible(ptr_or_null<scalar_t>(w), ptr_or_null<scalar_t>(b), g.C));
  });
  if (g.N * g.P == 0 || g.C == 0) {
    if (!given) m_out.fill_(std::nan("")), v_out.fill_(std::nan(""));  // no values: NaN, as ref's mean
    return {y, m_out, v_out, inv};
  }
  const at::Tensor xc = x.contiguous(fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_act_forward", [&] {
    using M = math_t<scalar_t>;
    FwdJob<scalar_t> j{};
    j.g = g, j.x = xc.const_data_ptr<scalar_t>(), j.y = y.mutable_data_ptr<scalar_t>();
    j.w = ptr_or_null<scalar_t>(w), j.b = ptr_or_null<scalar_t>(b);
    j.mean = m_out.mutable_data_ptr<M>(), j.var = v_out.mutable_data_ptr<M>();
    j.train = !given, j.eps = eps, j.slope = M(act == Act::Relu ? 0.0 : negative_slope);
    forward_impl(j, act);
  });
  return {y, m_out, v_out, inv};
}

// -> (grad_x, grad_weight, grad_bias); entries not asked for come back empty. `saved` is the forward's input
// (saved_is_output false) or its output y (leaky_relu only; every weight must be non-zero).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& saved, bool saved_is_output, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var, double eps, bool training,
    std::string_view activation, double negative_slope, const c10::List<bool>& output_mask) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Geom g = check_input(saved, "saved");
  const Act act = parse_act(activation, negative_slope);
  TORCH_CHECK(output_mask.size() == 3, kOp, ": output_mask must have 3 entries (grad_x, grad_weight, grad_bias), got ",
              output_mask.size());
  TORCH_CHECK(grad_y.sizes() == saved.sizes() && grad_y.scalar_type() == saved.scalar_type() &&
                  grad_y.device() == saved.device(),
              kOp, ": grad_y must have the saved tensor's shape ", saved.sizes(), " and dtype ", saved.scalar_type(),
              ", got ", grad_y.sizes(), " ", grad_y.scalar_type());
  const auto mt = math_type(saved.scalar_type());
  const at::Tensor w = optional_vector(weight, saved, "weight"), b = optional_vector(bias, saved, "bias");
  const at::Tensor mc = channel_vector(mean, saved, mt, "mean"), vc = channel_vector(var, saved, mt, "var");
  if (saved_is_output) {
    TORCH_CHECK(act == Act::Leaky, kOp, ": only leaky_relu's output can be inverted (relu's loses z <= 0): the "
                "backward of relu takes the input");
    bool nonzero = true;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, saved.scalar_type(), "batch_norm_act_check", [&] {
      const scalar_t* wp = ptr_or_null<scalar_t>(w);
      for (int64_t c = 0; wp && c < g.C; ++c) nonzero = nonzero && double(wp[c]) != 0;
    });
    TORCH_CHECK(nonzero, kOp, ": the output can be inverted only where weight != 0; a zero weight needs the "
                "input saved");
  }
  const auto fmt = g.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const bool want_x = output_mask[0], want_w = output_mask[1], want_b = output_mask[2];
  const bool none = g.N * g.P == 0 || g.C == 0;  // no values: zero parameter gradients
  auto vec = [&](bool want) {
    return !want ? saved.new_empty({0}) : none ? at::zeros({g.C}, saved.options()) : at::empty({g.C}, saved.options());
  };
  at::Tensor gx = want_x ? at::empty(saved.sizes(), saved.options().memory_format(fmt)) : saved.new_empty({0});
  at::Tensor gw = vec(want_w), gb = vec(want_b);  // written for every channel by the kernel
  if (none || !(want_x || want_w || want_b)) return {gx, gw, gb};
  const at::Tensor sc = saved.contiguous(fmt), gyc = grad_y.contiguous(fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, saved.scalar_type(), "batch_norm_act_backward", [&] {
    using M = math_t<scalar_t>;
    BwdJob<scalar_t> j{};
    j.g = g, j.s = sc.const_data_ptr<scalar_t>(), j.dy = gyc.const_data_ptr<scalar_t>();
    j.dx = want_x ? gx.mutable_data_ptr<scalar_t>() : nullptr;
    j.w = ptr_or_null<scalar_t>(w), j.b = ptr_or_null<scalar_t>(b);
    j.mean = mc.const_data_ptr<M>(), j.var = vc.const_data_ptr<M>();
    j.dw = want_w ? gw.mutable_data_ptr<scalar_t>() : nullptr;
    j.db = want_b ? gb.mutable_data_ptr<scalar_t>() : nullptr;
    j.train = training, j.sums = training || want_w || want_b, j.eps = eps;
    j.slope = M(act == Act::Relu ? 0.0 : negative_slope);
    j.islope = act == Act::Relu ? M(0) : M(1.0 / negative_slope);
    backward_impl(j, act, saved_is_output);
  });
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen, CPU, m) {
  m.impl("batch_norm_act_forward", &batch_norm_act_forward_cpu);
  m.impl("batch_norm_act_backward", &batch_norm_act_backward_cpu);
}
