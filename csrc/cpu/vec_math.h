// AVX-512 float32 math shared by the CPU kernels (csrc/cpu/*.cpp): branch-free exp
// and log on 16 lanes (Cephes' coefficients, ~1 ulp) and short names for the
// lane operations. Compiled for AVX-512F only (the callers check
// fastgen::use_avx512() first). Plain mul/add (no FMA in the source): a file
// that compiles with fp-contract=off gets the scalar code's exact roundings
// (csrc/cpu/reparameterize_kl.cpp relies on it). Internal linkage (static): each
// file keeps its own copy, compiled with its own flags; as plain inline
// functions the linker would keep one copy for all, perhaps one with FMA.
#pragma once
#include "cpu/cpu_features.h"

#ifdef FASTGEN_AVX512
#include <cmath>
#include <cstdint>

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

}  // namespace fastgen::vec512

FASTGEN_AVX512_END
#endif  // FASTGEN_AVX512
