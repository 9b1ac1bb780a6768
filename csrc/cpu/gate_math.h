// The gate tanh(a) * sigmoid(b) on AVX-512 vectors, float32 and float64: the math of the gated_activation op
// (csrc/cpu/gated.cpp, its forward and backward) and of the cached sampler's GATE (csrc/cpu/schedule.cpp).
// exp only ever sees arguments <= 0 (no overflow), split as x = n ln2 + r with pm = e^r - 1 from a polynomial
// (Cephes' for float32, Taylor's to degree 12 for float64), so that exp(x) = 2^n (1 + pm) and exp(x) - 1 =
// 2^n pm + (2^n - 1) come with a single rounding (gated.cpp's header comment has the formulas and the
// measured errors). Internal linkage: each file compiles its own copy with its own flags.
#pragma once
#include "cpu/cpu_features.h"  // FASTGEN_AVX512
#include "cpu/vec_math.h"      // fastgen::vec512::Lanes

// The per-vector math must inline into the row loops (GCC keeps the gate out of line otherwise).
#define FASTGEN_INLINE inline __attribute__((always_inline))

namespace fastgen::gate {
namespace {

// Constants of the math: exp(r) - 1 = r + r^2 q(r), |r| <= ln2 / 2, with Cephes' expf polynomial for float
// and Taylor's to degree 12 for double; ln2 split in two for an exact n ln2.
constexpr double kLog2e = 1.44269504088896340736;
constexpr float kExpF[6] = {1.9875691500E-4f, 1.3981999507E-3f, 8.3334519073E-3f,
                            4.1665795894E-2f, 1.6666665459E-1f, 5.0000001201E-1f};
constexpr float kLn2HiF = 0.693359375f, kLn2LoF = -2.12194440e-4f;
constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
constexpr double kInvFact[11] = {1.0 / 479001600, 1.0 / 39916800, 1.0 / 3628800, 1.0 / 362880, 1.0 / 40320,
                                 1.0 / 5040,      1.0 / 720,      1.0 / 120,     1.0 / 24,     1.0 / 6,
                                 1.0 / 2};  // 1/k!, k = 12 .. 2

#ifdef FASTGEN_AVX512
FASTGEN_AVX512_BEGIN

namespace avx512 {

template <class T>
using V = fastgen::vec512::Lanes<T>;

// exp of x <= 0 (or NaN) in two parts: x = n ln2 + r, |r| <= ln2/2, pm = e^r - 1 (no cancellation), so
// exp(x) = 2^n (1 + pm) and exp(x) - 1 = 2^n pm + (2^n - 1), both one rounding from exact.
FASTGEN_INLINE void exp_parts(__m512 x, __m512& pm, __m512& n) {
  using W = V<float>;
  x = W::max(W::set1(-104.f), x);  // 2^n rounds to 0 below; max(lo, NaN) keeps the NaN
  n = W::round(W::mul(x, W::set1(float(kLog2e))));
  __m512 r = W::fnma(n, W::set1(kLn2HiF), x);
  r = W::fnma(n, W::set1(kLn2LoF), r);
  __m512 q = W::set1(kExpF[0]);
  for (int k = 1; k < 6; ++k) q = W::fma(q, r, W::set1(kExpF[k]));
  pm = W::fma(q, W::mul(r, r), r);
}
FASTGEN_INLINE void exp_parts(__m512d x, __m512d& pm, __m512d& n) {
  using W = V<double>;
  x = W::max(W::set1(-800.), x);
  n = W::round(W::mul(x, W::set1(kLog2e)));
  __m512d r = W::fnma(n, W::set1(kLn2Hi), x);
  r = W::fnma(n, W::set1(kLn2Lo), r);
  __m512d q = W::set1(kInvFact[0]);
  for (int k = 1; k < 11; ++k) q = W::fma(q, r, W::set1(kInvFact[k]));
  pm = W::fma(q, W::mul(r, r), r);
}

// The gate of one vector: tanh(a) = tn / td, sigmoid(b) = sn / sd, 1 - sigmoid(b) = sm / sd.
// With em1 = exp(-2|a|) - 1: tanh(a) = sign(a) |em1| / (2 + em1) and 1 - tanh^2 = 4 e2 / (2 + em1)^2.
template <class T>
struct Gate {
  using W = V<T>;
  using R = typename W::R;
  R tn, td, sn, sd, sm, pm2, p2n;  // exp(-2|a|) = p2n (1 + pm2)

  FASTGEN_INLINE Gate(R a, R b) {
    const R one = W::set1(T(1));
    R n2, pm, n;
    exp_parts(W::mul(W::abs(a), W::set1(T(-2))), pm2, n2);
    p2n = W::scalef(one, n2);
    const R em1 = W::fma(p2n, pm2, W::sub(p2n, one));
    tn = W::select_sign(em1, a);
    td = W::add(W::set1(T(2)), em1);
    exp_parts(W::neg_abs(b), pm, n);
    const R e = W::scalef(W::add(pm, one), n);
    const typename W::M pos = W::ge(b, W::zero());  // false for NaN: sn = e = NaN propagates
    sn = W::blend(pos, e, one);
    sm = W::blend(pos, one, e);
    sd = W::add(one, e);
  }
  // 1 / d for d in [1, 4]
  FASTGEN_INLINE static R recip(R d) {
    if constexpr (std::is_same_v<T, float>) {  // rcp14 and one Newton step (~2^-28): cheaper than a division
      const R r = W::rcp14(d);
      return W::mul(r, W::fnma(d, r, W::set1(2.f)));
    } else {
      return W::div(W::set1(1.), d);
    }
  }
  FASTGEN_INLINE R out() const { return W::mul(W::mul(tn, sn), recip(W::mul(td, sd))); }
  // go * d out / d a, go * d out / d b
  FASTGEN_INLINE void grad(R go, R& da, R& db) const {
    const R inv = recip(W::mul(td, sd));
    const R rt = W::mul(sd, inv), rs = W::mul(td, inv);  // 1 / td, 1 / sd
    const R t = W::mul(tn, rt), s = W::mul(sn, rs), oms = W::mul(sm, rs);
    const R e2 = W::fma(p2n, pm2, p2n);
    const R rt2 = W::add(rt, rt);
    const R omt2 = W::mul(e2, W::mul(rt2, rt2));  // 4 e2 / td^2
    const R gs = W::mul(go, s);
    da = W::mul(gs, omt2);
    db = W::mul(W::mul(gs, t), oms);
  }
};

}  // namespace avx512

FASTGEN_AVX512_END
#endif

}  // namespace
}  // namespace fastgen::gate
