// The one SIMD header of the CPU kernels (csrc/cpu/*.cpp). Portable: Vec64<T>,
// GCC vector types of 64 bytes (zmm registers inside an AVX-512 target region,
// split by the compiler elsewhere: the cached samplers' micro-kernel,
// sampling_conv.h, compiled both ways). AVX-512: branch-free float32 exp and log
// on 16 lanes (Cephes' coefficients, ~1 ulp) and short names for the float32
// lane operations; Lanes<float> / Lanes<double>, the lane operations of one type
// for kernels templated on it (gated.cpp, batch_norm_act.cpp, masked_conv.cpp);
// loads and stores of 16 float32, bfloat16 or float16 elements as float32 lanes.
// The AVX-512 part is compiled for AVX-512F only (the callers check
// fastgen::use_avx512() first). exp and log
// use plain mul/add (no FMA): a file that compiles with fp-contract=off gets the
// scalar code's exact roundings (csrc/cpu/reparameterize_kl.cpp relies on it);
// Lanes' fma / fnma are FMA instructions, for the files that ask for them.
// Internal linkage (static, or an unnamed namespace): each file keeps its own
// copy, compiled with its own flags; as plain inline functions the linker would
// keep one copy for all, perhaps one with FMA.
#pragma once
#include "cpu/cpu_features.h"

namespace fastgen::vec {

template <class T>
struct Vec64;
template <>
struct Vec64<float> {
  typedef float V __attribute__((vector_size(64), aligned(4)));
};
template <>
struct Vec64<double> {
  typedef double V __attribute__((vector_size(64), aligned(8)));
};

}  // namespace fastgen::vec

#ifdef FASTGEN_AVX512
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>

FASTGEN_AVX512_BEGIN

namespace fastgen::vec512 {

using V = __m512;
using I = __m512i;
using M = __mmask16;

static inline V set(float a) { return _mm512_set1_ps(a); }
static inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
static inline V add(V a, V b) { return _mm512_add_ps(a, b); }
static inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
static inline M lt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
static inline M gt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }

// exp(x): 2^n e^r; 0 below -87.3, inf above 88.7, NaN stays NaN.
static inline V exp_f(V x) {
  const V lo = set(-87.3f), hi = set(88.7f);
  const M small = lt(x, lo), big = gt(x, hi);
  const V xc = _mm512_mask_blend_ps(big, _mm512_mask_blend_ps(small, x, lo), hi);
  const V half = _mm512_mask_blend_ps(lt(xc, set(0.0f)), set(0.5f), set(-0.5f));
  const I ni = _mm512_cvttps_epi32(add(mul(xc, set(1.44269504088896341f)), half));
  const V n = _mm512_cvtepi32_ps(ni);
  const V r = add(sub(xc, mul(n, set(0.693359375f))), mul(n, set(2.12194440e-4f)));
  V p = set(1.9875691500E-4f);
  p = add(mul(p, r), set(1.3981999507E-3f));
  p = add(mul(p, r), set(8.3334519073E-3f));
  p = add(mul(p, r), set(4.1665795894E-2f));
  p = add(mul(p, r), set(1.6666665459E-1f));
  p = add(mul(p, r), set(5.0000001201E-1f));
  const V two_n = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(ni, _mm512_set1_epi32(127)), 23));
  const V e = mul(add(add(mul(mul(p, r), r), r), set(1.0f)), two_n);
  return _mm512_mask_blend_ps(big, _mm512_mask_blend_ps(small, e, set(0.0f)), set(INFINITY));
}

// log(x) for normal x > 0: x = 2^e m with m in [sqrt(1/2), sqrt(2)).
static inline V log_pos(V x) {
  const I ix = _mm512_castps_si512(x);
  I e = _mm512_sub_epi32(_mm512_srli_epi32(ix, 23), _mm512_set1_epi32(127));
  I mb = _mm512_or_si512(_mm512_and_si512(ix, _mm512_set1_epi32(0x7FFFFF)), _mm512_set1_epi32(0x3F800000));
  const M big = _mm512_cmpgt_epi32_mask(mb, _mm512_set1_epi32(0x3FB504F3));
  mb = _mm512_mask_sub_epi32(mb, big, mb, _mm512_set1_epi32(1 << 23));
  e = _mm512_mask_add_epi32(e, big, e, _mm512_set1_epi32(1));
  const V f = sub(_mm512_castsi512_ps(mb), set(1.0f)), z = mul(f, f), fe = _mm512_cvtepi32_ps(e);
  V p = set(7.0376836292E-2f);
  p = sub(mul(p, f), set(1.1514610310E-1f));
  p = add(mul(p, f), set(1.1676998740E-1f));
  p = sub(mul(p, f), set(1.2420140846E-1f));
  p = add(mul(p, f), set(1.4249322787E-1f));
  p = sub(mul(p, f), set(1.6668057665E-1f));
  p = add(mul(p, f), set(2.0000714765E-1f));
  p = sub(mul(p, f), set(2.4999993993E-1f));
  p = add(mul(p, f), set(3.3333331174E-1f));
  const V y = sub(sub(mul(mul(f, z), p), mul(set(2.12194440e-4f), fe)), mul(set(0.5f), z));
  return add(add(f, y), mul(set(0.693359375f), fe));
}


// Loads and stores of 16 elements in float; m is always a prefix (a tile's tail). 16-bit types move
// through a small buffer at the tail (masked 16-bit moves need AVX-512BW).
static inline int count(M m) { return __builtin_popcount(unsigned(m)); }
static inline __m256i load16(const void* p, M m) {
  if (m == M(0xFFFF)) return _mm256_loadu_si256(static_cast<const __m256i*>(p));
  alignas(32) uint16_t tmp[16] = {};
  std::memcpy(tmp, p, 2 * count(m));
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp));
}
static inline void store16(void* p, __m256i v, M m) {
  if (m == M(0xFFFF)) return _mm256_storeu_si256(static_cast<__m256i*>(p), v);
  alignas(32) uint16_t tmp[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), v);
  std::memcpy(p, tmp, 2 * count(m));
}
static inline V load(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
static inline V load(const at::BFloat16* p, M m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(load16(p, m)), 16));
}
static inline V load(const at::Half* p, M m) { return _mm512_cvtph_ps(load16(p, m)); }
static inline void store(float* p, V v, M m) { _mm512_mask_storeu_ps(p, m, v); }
static inline void store(at::BFloat16* p, V v, M m) {  // round to nearest even, NaN stays NaN (as the scalar store)
  const I u = _mm512_castps_si512(v);
  const I lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  I r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const M nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)),
                                        _mm512_set1_epi32(0x7F800000));
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  store16(p, _mm512_cvtepi32_epi16(r), m);
}
static inline void store(at::Half* p, V v, M m) { store16(p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT), m); }

// The lanes of a tile's tail: the first n (n < 16), or all 16.
static inline M tail16(int64_t n) { return n >= 16 ? M(0xFFFF) : M((1u << n) - 1); }

namespace {  // internal linkage, as the static functions above

template <class T>
struct Lanes;
template <>
struct Lanes<float> {
  using R = __m512;
  using M = __mmask16;
  static constexpr int L = 16;
  static R set1(float a) { return _mm512_set1_ps(a); }
  static R zero() { return _mm512_setzero_ps(); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static R load(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static void store(float* p, R v, M m) { _mm512_mask_storeu_ps(p, m, v); }
  static R keep(R v, M m) { return _mm512_maskz_mov_ps(m, v); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R div(R a, R b) { return _mm512_div_ps(a, b); }
  static R rcp14(R a) { return _mm512_rcp14_ps(a); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }   // a b + c
  static R fnma(R a, R b, R c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b
  static R abs(R a) { return _mm512_abs_ps(a); }
  static R neg_abs(R a) {  // -|a|: set the sign bit (integer ops: AVX-512F has no float or)
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(a), _mm512_set1_epi32(INT32_MIN)));
  }
  static R select_sign(R mag, R s) {  // |mag| with s's sign: one ternary-logic op (sign bit ? s : mag)
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_castps_si512(mag), _mm512_castps_si512(s),
                                                         _mm512_set1_epi32(INT32_MIN), 0xD8));
  }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }  // b where either is NaN
  static M ge(R a, R b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
  static M not_le(R a, R b) { return _mm512_cmp_ps_mask(a, b, _CMP_NLE_UQ); }  // a > b, or either NaN
  static R blend(M m, R a, R b) { return _mm512_mask_blend_ps(m, a, b); }  // b where m
  static R round(R a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static R scalef(R a, R n) { return _mm512_scalef_ps(a, n); }  // a 2^n, gradual underflow included
  static float hsum(R a) { return _mm512_reduce_add_ps(a); }
  static M tail(int64_t n) { return static_cast<M>((1u << n) - 1); }
};
template <>
struct Lanes<double> {
  using R = __m512d;
  using M = __mmask8;
  static constexpr int L = 8;
  static R set1(double a) { return _mm512_set1_pd(a); }
  static R zero() { return _mm512_setzero_pd(); }
  static R load(const double* p) { return _mm512_loadu_pd(p); }
  static R load(const double* p, M m) { return _mm512_maskz_loadu_pd(m, p); }
  static void store(double* p, R v) { _mm512_storeu_pd(p, v); }
  static void store(double* p, R v, M m) { _mm512_mask_storeu_pd(p, m, v); }
  static R keep(R v, M m) { return _mm512_maskz_mov_pd(m, v); }
  static R add(R a, R b) { return _mm512_add_pd(a, b); }
  static R sub(R a, R b) { return _mm512_sub_pd(a, b); }
  static R mul(R a, R b) { return _mm512_mul_pd(a, b); }
  static R div(R a, R b) { return _mm512_div_pd(a, b); }
  static R rcp14(R a) { return _mm512_rcp14_pd(a); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_pd(a, b, c); }
  static R fnma(R a, R b, R c) { return _mm512_fnmadd_pd(a, b, c); }
  static R abs(R a) { return _mm512_abs_pd(a); }
  static R neg_abs(R a) {
    return _mm512_castsi512_pd(_mm512_or_si512(_mm512_castpd_si512(a), _mm512_set1_epi64(INT64_MIN)));
  }
  static R select_sign(R mag, R s) {
    return _mm512_castsi512_pd(_mm512_ternarylogic_epi64(_mm512_castpd_si512(mag), _mm512_castpd_si512(s),
                                                         _mm512_set1_epi64(INT64_MIN), 0xD8));
  }
  static R max(R a, R b) { return _mm512_max_pd(a, b); }
  static M ge(R a, R b) { return _mm512_cmp_pd_mask(a, b, _CMP_GE_OQ); }
  static M not_le(R a, R b) { return _mm512_cmp_pd_mask(a, b, _CMP_NLE_UQ); }
  static R blend(M m, R a, R b) { return _mm512_mask_blend_pd(m, a, b); }
  static R round(R a) { return _mm512_roundscale_pd(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static R scalef(R a, R n) { return _mm512_scalef_pd(a, n); }
  static double hsum(R a) { return _mm512_reduce_add_pd(a); }
  static M tail(int64_t n) { return static_cast<M>((1u << n) - 1); }
};

}  // namespace

}  // namespace fastgen::vec512

FASTGEN_AVX512_END
#endif  // FASTGEN_AVX512
