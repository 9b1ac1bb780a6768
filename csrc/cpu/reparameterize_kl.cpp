// reparameterize_kl on CPU: the `cpp` backend (fastgen.ops.reparameterize_kl).
//
// z = mu + exp(logvar / 2) * eps and the Gaussian KL of fastgen/ref/reparameterize_kl.py,
// in one pass that draws eps on the fly; the backward draws the same eps again
// from the seed, so eps never reaches memory.
//
// The noise is Triton's stream (the ref's docstring): element i (row-major) is
// output i % 4 of tl.randn4x(seed, i // 4). The Philox integers are the same
// bits as Triton's; log, cos and sin are this file's own float32 polynomials
// (Cephes' coefficients, ~1 ulp), so a normal can differ from the Triton
// interpreter's (numpy) or a GPU's (libdevice) in its last bits, as those two
// differ from each other.
//
// Work: tiles of up to kTile elements of one row (row = index along the first
// dimension), handed to at::parallel_for. Each tile makes its normals into a
// stack buffer, then reads mu, logvar (and the prior) once and writes z (and
// the elementwise KL). Row sums of the KL are per-tile partial sums (kept in 16
// lanes, added in a fixed order): deterministic. Math in float32 for
// float/bfloat16/half (float64 for double).
//
// Two paths: AVX-512 (16 lanes of intrinsics, chosen at run time where the CPU
// has it; float/bfloat16/half) and a portable scalar one (double, other CPUs,
// FASTGEN_CPU_KERNEL=generic). The vector code does the scalar code's
// operations in the same order, and this file is built without FMA contraction
// (fp-contract=off), so both paths give the same bits, noise included. No errno
// and no trapping math: std::sqrt is one instruction.

#pragma GCC optimize("no-math-errno", "no-trapping-math", "fp-contract=off")

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/cpu_features.h"  // FASTGEN_AVX512, fastgen::use_avx512()
#include "cpu/vec_math.h"      // fastgen::vec512: AVX-512 exp and log

namespace {

constexpr int64_t kTile = 2048;  // elements of one row per tile
constexpr int kLanes = 16;       // lanes of the AVX-512 path (and of the KL partial sums in both paths)

// ---- float32 math without library calls ----------------------------------------------------------------------

inline uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float from_bits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// log(x) for normal x > 0 (Cephes logf): x = 2^e m with m in [sqrt(1/2), sqrt(2)).
inline float log_pos(float x) {
  const uint32_t ix = bits(x);
  int32_t e = int32_t(ix >> 23) - 127;
  uint32_t mb = (ix & 0x7FFFFFu) | 0x3F800000u;  // m in [1, 2)
  const int32_t big = mb > 0x3FB504F3u;         // m > sqrt(2): halve it
  mb -= uint32_t(big) << 23;
  e += big;
  const float f = from_bits(mb) - 1.0f, z = f * f, fe = float(e);
  float p = 7.0376836292E-2f;
  p = p * f - 1.1514610310E-1f;
  p = p * f + 1.1676998740E-1f;
  p = p * f - 1.2420140846E-1f;
  p = p * f + 1.4249322787E-1f;
  p = p * f - 1.6668057665E-1f;
  p = p * f + 2.0000714765E-1f;
  p = p * f - 2.4999993993E-1f;
  p = p * f + 3.3333331174E-1f;
  float y = f * z * p - 2.12194440e-4f * fe - 0.5f * z;
  return f + y + 0.693359375f * fe;
}

// sin and cos of t in [0, 8): t = k pi/2 + r, |r| <= pi/4 (pi/2 in three parts, Cody-Waite), then
// Cephes' polynomials and the quadrant k & 3 (swap sin/cos, flip signs) with integer selects.
inline void sincos_small(float t, float& s_out, float& c_out) {
  const int32_t k = int32_t(t * 0.63661977236758134f + 0.5f);
  const float kf = float(k);
  const float r = ((t - kf * 1.5703125f) - kf * 4.837512969970703125e-4f) - kf * 7.54978995489188216e-8f;
  const float z = r * r;
  const float s = ((-1.9515295891E-4f * z + 8.3321608736E-3f) * z - 1.6666654611E-1f) * z * r + r;
  const float c = ((2.443315711809948E-5f * z - 1.388731625493765E-3f) * z + 4.166664568298827E-2f) * z * z -
                  0.5f * z + 1.0f;
  const uint32_t swap = 0u - uint32_t(k & 1);  // all ones in quadrants 1 and 3
  const uint32_t sb = bits(s), cb = bits(c);
  const uint32_t sin_b = (cb & swap) | (sb & ~swap), cos_b = (sb & swap) | (cb & ~swap);
  s_out = from_bits(sin_b ^ (uint32_t(k & 2) << 30));        // negative in quadrants 2, 3
  c_out = from_bits(cos_b ^ (uint32_t((k + 1) & 2) << 30));  // negative in quadrants 1, 2
}

// exp(x), float32 (Cephes expf): 2^n e^r; 0 below -87.3, inf above 88.7, NaN stays NaN.
inline float exp_f(float x) {
  const float xc = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  const float n = float(int32_t(xc * 1.44269504088896341f + (xc < 0 ? -0.5f : 0.5f)));
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  const float e = (p * r * r + r + 1.0f) * from_bits(uint32_t(int32_t(n) + 127) << 23);
  return x < -87.3f ? 0.0f : (x > 88.7f ? INFINITY : e);
}

// ---- the noise: Philox-4x32-10 and Box-Muller, as tl.randn4x -------------------------------------------------

constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u, kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;

// The normals of groups q0 .. q0 + n_groups - 1 into out[4 * n_groups] (n_groups a multiple of kLanes).
void normal_groups_scalar(uint64_t seed, uint64_t q0, int64_t n_groups, float* out) {
  for (int64_t g0 = 0; g0 < n_groups; g0 += kLanes) {
    uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      const uint64_t q = q0 + uint64_t(g0 + l);
      c0[l] = uint32_t(q), c1[l] = uint32_t(q >> 32), c2[l] = 0, c3[l] = 0;
    }
    uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      for (int l = 0; l < kLanes; ++l) {
        const uint64_t pa = uint64_t(kRoundA) * c0[l], pb = uint64_t(kRoundB) * c2[l];
        const uint32_t n0 = uint32_t(pb >> 32) ^ c1[l] ^ k0, n2 = uint32_t(pa >> 32) ^ c3[l] ^ k1;
        c0[l] = n0, c1[l] = uint32_t(pb), c2[l] = n2, c3[l] = uint32_t(pa);
      }
      k0 += kKeyA, k1 += kKeyB;
    }
    for (int l = 0; l < kLanes; ++l) {
      float u[4];
      const uint32_t r[4] = {c0[l], c1[l], c2[l], c3[l]};
      for (int j = 0; j < 4; ++j) {
        const int32_t v = int32_t(r[j]);
        u[j] = float(v ^ (v >> 31)) * 4.6566127342e-10f;  // negatives complemented
      }
      for (int p = 0; p < 2; ++p) {
        const float u1 = u[2 * p] < 1.0e-7f ? 1.0e-7f : u[2 * p];
        const float rad = std::sqrt(-2.0f * log_pos(u1));
        float s, c;
        sincos_small(6.28318530717958648f * u[2 * p + 1], s, c);
        out[4 * (g0 + l) + 2 * p] = rad * c;
        out[4 * (g0 + l) + 2 * p + 1] = rad * s;
      }
    }
  }
}

using GroupsFn = void (*)(uint64_t, uint64_t, int64_t, float*);

// The normals of flat indices [i0, i0 + n) (n <= kTile): a pointer into buf (kTile + 4 * kLanes + 4 floats).
const float* normals(uint64_t seed, int64_t i0, int64_t n, float* buf, GroupsFn groups_fn) {
  const int64_t q0 = i0 / 4, q1 = (i0 + n + 3) / 4;
  const int64_t groups = (q1 - q0 + kLanes - 1) / kLanes * kLanes;
  groups_fn(seed, uint64_t(q0), groups, buf);
  return buf + (i0 - 4 * q0);
}

// ---- loads and stores in the math type -----------------------------------------------------------------------

// The math type: float32 for float/bfloat16/half, float64 for double.
template <class T>
using math_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <class T>
inline math_t<T> load(const T* p, int64_t i) {
  return static_cast<math_t<T>>(p[i]);
}
template <>
inline float load(const at::BFloat16* p, int64_t i) {
  return from_bits(uint32_t(p[i].x) << 16);
}
template <class T>
inline void store(T* p, int64_t i, math_t<T> v) {
  p[i] = static_cast<T>(v);
}
template <>
inline void store(at::BFloat16* p, int64_t i, float v) {  // round to nearest even, NaN stays NaN
  const uint32_t u = bits(v);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  p[i].x = uint16_t((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : r);
}

inline float exp_a(float x) { return exp_f(x); }
inline double exp_a(double x) { return std::exp(x); }

// ---- forward and backward of one tile --------------------------------------------------------------------------

template <class T>
struct Args {
  using A = math_t<T>;
  int64_t B = 0, D = 0;  // rows, elements per row
  uint64_t seed = 0;
  const T *mu = nullptr, *lv = nullptr, *pm = nullptr, *plv = nullptr;  // pm, plv: nullptr without a prior
  // forward
  T* z = nullptr;
  T* kl = nullptr;             // elementwise KL, or nullptr
  // backward
  const T* gz = nullptr;       // grad_z, or nullptr
  const A* gk = nullptr;       // grad_kl: per row [B] (gk_rows) or elementwise, or nullptr
  bool gk_rows = false;
  T *gmu = nullptr, *glv = nullptr, *gpm = nullptr, *gplv = nullptr;  // nullptr: not wanted
};

template <class T>
void forward_tile(const Args<T>& a, int64_t row, int64_t j0, int64_t n, math_t<T>* sum) {
  using A = math_t<T>;
  float buf[kTile + 4 * kLanes + 4];
  const int64_t i0 = row * a.D + j0;
  const float* eps = normals(a.seed, i0, n, buf, normal_groups_scalar);
  const T *mu = a.mu + i0, *lv = a.lv + i0;
  T* z = a.z + i0;
  const bool prior = a.pm != nullptr;
  A acc[kLanes] = {};
  for (int64_t k0 = 0; k0 < n; k0 += kLanes) {
    const int64_t m = std::min<int64_t>(kLanes, n - k0);
    for (int64_t l = 0; l < m; ++l) {
      const int64_t k = k0 + l;
      const A x = load(mu, k), l_ = load(lv, k);
      const A s = exp_a(A(0.5) * l_), v = exp_a(l_);
      store(z, k, x + s * A(eps[k]));
      A term;
      if (prior) {
        const A d = x - load(a.pm + i0, k), q = load(a.plv + i0, k);
        term = A(0.5) * (q - l_ + (v + d * d) * exp_a(-q) - A(1));
      } else {
        term = A(0.5) * (v + x * x - A(1) - l_);
      }
      if (a.kl) store(a.kl + i0, k, term);
      acc[l] += term;
    }
  }
  A total = 0;
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  *sum = total;
}

template <class T>
void backward_tile(const Args<T>& a, int64_t row, int64_t j0, int64_t n) {
  using A = math_t<T>;
  float buf[kTile + 4 * kLanes + 4];
  const int64_t i0 = row * a.D + j0;
  const bool need_eps = a.gz && a.glv;
  const float* eps = need_eps ? normals(a.seed, i0, n, buf, normal_groups_scalar) : nullptr;
  const bool prior = a.pm != nullptr;
  const A gk_row = a.gk && a.gk_rows ? a.gk[row] : A(0);
  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = i0 + k;
    const A x = load(a.mu, i), l_ = load(a.lv, i);
    const A gz = a.gz ? load(a.gz, i) : A(0);
    const A gk = a.gk ? (a.gk_rows ? gk_row : a.gk[i]) : A(0);
    const A d = prior ? x - load(a.pm, i) : x;
    const A ip = prior ? exp_a(-load(a.plv, i)) : A(1);
    const A v = exp_a(l_);
    if (a.gmu) store(a.gmu, i, gz + gk * d * ip);
    if (a.glv) {
      const A noise = need_eps ? gz * exp_a(A(0.5) * l_) * A(eps[k]) : A(0);
      store(a.glv, i, A(0.5) * (noise + gk * (v * ip - A(1))));
    }
    if (a.gpm) store(a.gpm, i, -gk * d * ip);
    if (a.gplv) store(a.gplv, i, A(0.5) * gk * (A(1) - (v + d * d) * ip));
  }
}


#ifdef FASTGEN_AVX512
// ---- AVX-512: the same operations in the same order on 16 lanes (no FMA: bit-identical to the scalar code) ----
FASTGEN_AVX512_BEGIN

namespace avx512 {

// the shared lane math (csrc/cpu/vec_math.h); declared here so they hide the scalar exp_f and log_pos
using fastgen::vec512::I;
using fastgen::vec512::M;
using fastgen::vec512::V;
using fastgen::vec512::add;
using fastgen::vec512::exp_f;
using fastgen::vec512::gt;
using fastgen::vec512::log_pos;
using fastgen::vec512::lt;
using fastgen::vec512::mul;
using fastgen::vec512::set;
using fastgen::vec512::sub;

inline void sincos_small(V t, V& s_out, V& c_out) {
  const I k = _mm512_cvttps_epi32(add(mul(t, set(0.63661977236758134f)), set(0.5f)));
  const V kf = _mm512_cvtepi32_ps(k);
  const V r = sub(sub(sub(t, mul(kf, set(1.5703125f))), mul(kf, set(4.837512969970703125e-4f))),
                  mul(kf, set(7.54978995489188216e-8f)));
  const V z = mul(r, r);
  const V ps = sub(mul(add(mul(set(-1.9515295891E-4f), z), set(8.3321608736E-3f)), z), set(1.6666654611E-1f));
  const V s = add(mul(mul(ps, z), r), r);
  const V pc = add(mul(sub(mul(set(2.443315711809948E-5f), z), set(1.388731625493765E-3f)), z),
                   set(4.166664568298827E-2f));
  const V c = add(sub(mul(mul(pc, z), z), mul(set(0.5f), z)), set(1.0f));
  const M swap = _mm512_test_epi32_mask(k, _mm512_set1_epi32(1));
  const I sin_b = _mm512_castps_si512(_mm512_mask_blend_ps(swap, s, c));
  const I cos_b = _mm512_castps_si512(_mm512_mask_blend_ps(swap, c, s));
  const I sign_s = _mm512_slli_epi32(_mm512_and_si512(k, _mm512_set1_epi32(2)), 30);
  const I k1 = _mm512_add_epi32(k, _mm512_set1_epi32(1));
  const I sign_c = _mm512_slli_epi32(_mm512_and_si512(k1, _mm512_set1_epi32(2)), 30);
  s_out = _mm512_castsi512_ps(_mm512_xor_si512(sin_b, sign_s));
  c_out = _mm512_castsi512_ps(_mm512_xor_si512(cos_b, sign_c));
}

// (high, low) 32 bits of a * b per lane (b a broadcast constant): two 32x32->64 products (even lanes, odd
// lanes) and blends, cheaper than a 32-bit mullo.
inline void mulhilo(I a, I b, I& hi, I& lo) {
  const I even = _mm512_mul_epu32(a, b);
  const I odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), b);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

inline V uniform(I r) {
  const I folded = _mm512_xor_si512(r, _mm512_srai_epi32(r, 31));
  return mul(_mm512_cvtepi32_ps(folded), set(4.6566127342e-10f));
}

inline void box_muller(V u1, V u2, V& n0, V& n1) {
  u1 = _mm512_mask_blend_ps(lt(u1, set(1.0e-7f)), u1, set(1.0e-7f));
  const V rad = _mm512_sqrt_ps(mul(set(-2.0f), log_pos(u1)));
  V s, c;
  sincos_small(mul(set(6.28318530717958648f), u2), s, c);
  n0 = mul(rad, c), n1 = mul(rad, s);
}

void normal_groups(uint64_t seed, uint64_t q0, int64_t n_groups, float* out) {
  const I ka = _mm512_set1_epi32(int32_t(kRoundA)), kb = _mm512_set1_epi32(int32_t(kRoundB));
  for (int64_t g0 = 0; g0 < n_groups; g0 += kLanes) {
    alignas(64) uint32_t lo[kLanes], hi[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      const uint64_t q = q0 + uint64_t(g0 + l);
      lo[l] = uint32_t(q), hi[l] = uint32_t(q >> 32);
    }
    I c0 = _mm512_load_si512(lo), c1 = _mm512_load_si512(hi), c2 = _mm512_setzero_si512(), c3 = c2;
    uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      I hb, lb, ha, la;
      mulhilo(c2, kb, hb, lb);
      mulhilo(c0, ka, ha, la);
      c0 = _mm512_xor_si512(_mm512_xor_si512(hb, c1), _mm512_set1_epi32(int32_t(k0)));
      c2 = _mm512_xor_si512(_mm512_xor_si512(ha, c3), _mm512_set1_epi32(int32_t(k1)));
      c1 = lb, c3 = la;
      k0 += kKeyA, k1 += kKeyB;
    }
    V n0, n1, n2, n3;
    box_muller(uniform(c0), uniform(c1), n0, n1);
    box_muller(uniform(c2), uniform(c3), n2, n3);
    // [4 normals x 16 groups] -> 16 groups of 4 consecutive normals (a 4 x 16 transpose)
    const V a = _mm512_unpacklo_ps(n0, n1), b = _mm512_unpackhi_ps(n0, n1);
    const V c = _mm512_unpacklo_ps(n2, n3), d = _mm512_unpackhi_ps(n2, n3);
    const V e = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(c)));  // groups 4k
    const V f = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(c)));  // 4k + 1
    const V g = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(b), _mm512_castps_pd(d)));  // 4k + 2
    const V h = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(b), _mm512_castps_pd(d)));  // 4k + 3
    const V t0 = _mm512_shuffle_f32x4(e, f, 0x44), t1 = _mm512_shuffle_f32x4(g, h, 0x44);
    const V t2 = _mm512_shuffle_f32x4(e, f, 0xEE), t3 = _mm512_shuffle_f32x4(g, h, 0xEE);
    float* o = out + 4 * g0;
    _mm512_storeu_ps(o, _mm512_shuffle_f32x4(t0, t1, 0x88));
    _mm512_storeu_ps(o + 16, _mm512_shuffle_f32x4(t0, t1, 0xDD));
    _mm512_storeu_ps(o + 32, _mm512_shuffle_f32x4(t2, t3, 0x88));
    _mm512_storeu_ps(o + 48, _mm512_shuffle_f32x4(t2, t3, 0xDD));
  }
}

// loads and stores of 16 elements in float, 16-bit types converted (csrc/cpu/vec_math.h)
using fastgen::vec512::load;
using fastgen::vec512::store;

inline M tail(int64_t n) { return fastgen::vec512::tail16(n); }

template <class T>
void forward_tile(const Args<T>& a, int64_t row, int64_t j0, int64_t n, float* sum) {
  alignas(64) float buf[kTile + 4 * kLanes + 4];
  const int64_t i0 = row * a.D + j0;
  const float* eps = normals(a.seed, i0, n, buf, normal_groups);
  V acc = _mm512_setzero_ps();
  const V one = set(1.0f), half = set(0.5f);
  for (int64_t k = 0; k < n; k += kLanes) {
    const M m = tail(n - k);
    const int64_t i = i0 + k;
    const V x = load(a.mu + i, m), l = load(a.lv + i, m);
    const V s = exp_f(mul(half, l)), v = exp_f(l);
    store(a.z + i, add(x, mul(s, _mm512_maskz_loadu_ps(m, eps + k))), m);
    V term;
    if (a.pm) {
      const V d = sub(x, load(a.pm + i, m)), q = load(a.plv + i, m);
      term = mul(half, sub(add(sub(q, l), mul(add(v, mul(d, d)), exp_f(sub(_mm512_setzero_ps(), q)))), one));
    } else {
      term = mul(half, sub(sub(add(v, mul(x, x)), one), l));
    }
    if (a.kl) store(a.kl + i, term, m);
    acc = add(acc, _mm512_maskz_mov_ps(m, term));
  }
  alignas(64) float lanes[kLanes];
  _mm512_store_ps(lanes, acc);
  float total = 0;
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  *sum = total;
}

template <class T>
void backward_tile(const Args<T>& a, int64_t row, int64_t j0, int64_t n) {
  alignas(64) float buf[kTile + 4 * kLanes + 4];
  const int64_t i0 = row * a.D + j0;
  const bool need_eps = a.gz && a.glv;
  const float* eps = need_eps ? normals(a.seed, i0, n, buf, normal_groups) : nullptr;
  const V one = set(1.0f), half = set(0.5f), zero = _mm512_setzero_ps();
  const V gk_row = a.gk && a.gk_rows ? set(a.gk[row]) : zero;
  for (int64_t k = 0; k < n; k += kLanes) {
    const M m = tail(n - k);
    const int64_t i = i0 + k;
    const V x = load(a.mu + i, m), l = load(a.lv + i, m);
    const V gz = a.gz ? load(a.gz + i, m) : zero;
    const V gk = a.gk ? (a.gk_rows ? gk_row : _mm512_maskz_loadu_ps(m, a.gk + i)) : zero;
    const V d = a.pm ? sub(x, load(a.pm + i, m)) : x;
    const V ip = a.pm ? exp_f(sub(zero, load(a.plv + i, m))) : one;
    const V v = exp_f(l);
    if (a.gmu) store(a.gmu + i, add(gz, mul(mul(gk, d), ip)), m);
    if (a.glv) {
      const V noise = need_eps ? mul(mul(gz, exp_f(mul(half, l))), _mm512_maskz_loadu_ps(m, eps + k)) : zero;
      store(a.glv + i, mul(half, add(noise, mul(gk, sub(mul(v, ip), one)))), m);
    }
    if (a.gpm) store(a.gpm + i, mul(mul(sub(zero, gk), d), ip), m);
    if (a.gplv) store(a.gplv + i, mul(mul(half, gk), sub(one, mul(add(v, mul(d, d)), ip))), m);
  }
}

}  // namespace avx512

FASTGEN_AVX512_END
#endif  // FASTGEN_AVX512

// The AVX-512 tile where the CPU has it (float math: not for double), else the scalar one.
template <class T>
void forward_any(const Args<T>& a, int64_t row, int64_t j0, int64_t n, math_t<T>* sum) {
#ifdef FASTGEN_AVX512
  if constexpr (!std::is_same_v<T, double>) {
    if (fastgen::use_avx512()) return avx512::forward_tile(a, row, j0, n, sum);
  }
#endif
  forward_tile(a, row, j0, n, sum);
}

template <class T>
void backward_any(const Args<T>& a, int64_t row, int64_t j0, int64_t n) {
#ifdef FASTGEN_AVX512
  if constexpr (!std::is_same_v<T, double>) {
    if (fastgen::use_avx512()) return avx512::backward_tile(a, row, j0, n);
  }
#endif
  backward_tile(a, row, j0, n);
}

// Tiles of the rows, in parallel; f(row, j0, n, tile index).
template <class F>
void for_tiles(int64_t B, int64_t D, F f) {
  const int64_t per_row = (D + kTile - 1) / kTile, tiles = B * per_row;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::min(D, kTile));  // small calls stay on one thread
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t row = t / per_row, j0 = (t % per_row) * kTile;
      f(row, j0, std::min(kTile, D - j0), t);
    }
  });
}

// ---- the registered ops ----------------------------------------------------------------------------------------

const char* kOp = "reparameterize_kl";

void check_like(const at::Tensor& t, const at::Tensor& mu, const char* name) {
  TORCH_CHECK(t.scalar_type() == mu.scalar_type() && t.device() == mu.device(), kOp, ": ", name,
              " must have mu's dtype ", mu.scalar_type(), " and device ", mu.device(), ", got ", t.scalar_type(),
              " on ", t.device());
  TORCH_CHECK(t.sizes() == mu.sizes(), kOp, ": ", name, " must have mu's shape ", mu.sizes(), ", got ", t.sizes());
}

// Checks mu, logvar and the prior; returns them contiguous.
std::vector<at::Tensor> inputs(const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& pm,
                               const std::optional<at::Tensor>& plv, int64_t seed) {
  TORCH_CHECK(mu.device().is_cpu(), kOp, ": the cpp backend takes CPU tensors, got ", mu.device());
  const auto st = mu.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, kOp,
              ": mu must be float32, float64, bfloat16 or float16, got ", st);
  TORCH_CHECK(mu.dim() >= 1, kOp, ": mu must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK(seed >= 0, kOp, ": seed must be >= 0, got ", seed);
  TORCH_CHECK(pm.has_value() == plv.has_value(), kOp, ": the kernel takes both prior tensors or neither");
  check_like(logvar, mu, "logvar");
  std::vector<at::Tensor> out = {mu.contiguous(), logvar.contiguous()};
  if (pm) {
    check_like(*pm, mu, "prior_mu");
    check_like(*plv, mu, "prior_logvar");
    out.push_back(pm->contiguous());
    out.push_back(plv->contiguous());
  }
  return out;
}

template <class T>
Args<T> base_args(const std::vector<at::Tensor>& in, int64_t seed) {
  Args<T> a;
  a.B = in[0].size(0);
  a.D = a.B ? in[0].numel() / a.B : 0;
  a.seed = uint64_t(seed);
  a.mu = in[0].const_data_ptr<T>();
  a.lv = in[1].const_data_ptr<T>();
  if (in.size() == 4) a.pm = in[2].const_data_ptr<T>(), a.plv = in[3].const_data_ptr<T>();
  return a;
}

at::ScalarType math_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// -> (z, kl): kl elementwise in mu's dtype, else the per-row sums [B] in the math type (float32 or float64).
std::tuple<at::Tensor, at::Tensor> reparameterize_kl_forward_cpu(const at::Tensor& mu, const at::Tensor& logvar,
                                                                 const std::optional<at::Tensor>& prior_mu,
                                                                 const std::optional<at::Tensor>& prior_logvar,
                                                                 int64_t seed, bool elementwise) {
  const auto in = inputs(mu, logvar, prior_mu, prior_logvar, seed);
  at::Tensor z = at::empty_like(in[0]);
  at::Tensor kl = elementwise ? at::empty_like(in[0])
                              : at::empty({mu.size(0)}, mu.options().dtype(math_type(mu.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mu.scalar_type(), "reparameterize_kl_forward", [&] {
    using A = math_t<scalar_t>;
    Args<scalar_t> a = base_args<scalar_t>(in, seed);
    a.z = z.mutable_data_ptr<scalar_t>();
    const int64_t per_row = (a.D + kTile - 1) / kTile;
    std::vector<A> partial(a.B * per_row);
    if (elementwise) a.kl = kl.mutable_data_ptr<scalar_t>();
    if (a.D > 0)
      for_tiles(a.B, a.D,
                [&](int64_t row, int64_t j0, int64_t n, int64_t t) { forward_any(a, row, j0, n, &partial[t]); });
    if (!elementwise) {
      A* rows = kl.mutable_data_ptr<A>();
      for (int64_t b = 0; b < a.B; ++b) {
        A s = 0;
        for (int64_t t = 0; t < per_row; ++t) s += partial[b * per_row + t];
        rows[b] = s;
      }
    }
  });
  return {z, kl};
}

// -> (grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar); entries not asked for come back empty.
// grad_kl: per row [B] or elementwise (mu's shape), in the math type; grad_z in mu's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reparameterize_kl_backward_cpu(
    const std::optional<at::Tensor>& grad_z, const std::optional<at::Tensor>& grad_kl, const at::Tensor& mu,
    const at::Tensor& logvar, const std::optional<at::Tensor>& prior_mu, const std::optional<at::Tensor>& prior_logvar,
    int64_t seed, const c10::List<bool>& output_mask) {
  const auto in = inputs(mu, logvar, prior_mu, prior_logvar, seed);
  TORCH_CHECK(output_mask.size() == 4, kOp,
              ": output_mask must have 4 entries (grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar), got ",
              output_mask.size());
  at::Tensor gz, gk;
  if (grad_z) {
    check_like(*grad_z, mu, "grad_z");
    gz = grad_z->contiguous();
  }
  bool gk_rows = false;
  if (grad_kl) {
    const auto mt = math_type(mu.scalar_type());
    TORCH_CHECK(grad_kl->scalar_type() == mt && grad_kl->device() == mu.device(), kOp, ": grad_kl must be ", mt,
                " on ", mu.device(), ", got ", grad_kl->scalar_type(), " on ", grad_kl->device());
    gk_rows = grad_kl->dim() == 1 && grad_kl->size(0) == mu.size(0);
    TORCH_CHECK(gk_rows || grad_kl->sizes() == mu.sizes(), kOp, ": grad_kl must have shape (", mu.size(0),
                ",) (per row) or mu's shape ", mu.sizes(), ", got ", grad_kl->sizes());
    gk = grad_kl->contiguous();
  }
  const bool prior = in.size() == 4;
  auto make = [&](bool want) { return want ? at::empty_like(in[0]) : in[0].new_empty({0}); };
  at::Tensor gmu = make(output_mask[0]), glv = make(output_mask[1]);
  at::Tensor gpm = make(prior && output_mask[2]), gplv = make(prior && output_mask[3]);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mu.scalar_type(), "reparameterize_kl_backward", [&] {
    using A = math_t<scalar_t>;
    Args<scalar_t> a = base_args<scalar_t>(in, seed);
    if (gz.defined()) a.gz = gz.const_data_ptr<scalar_t>();
    if (gk.defined()) a.gk = gk.const_data_ptr<A>(), a.gk_rows = gk_rows;
    auto out = [](at::Tensor& t) { return t.numel() ? t.mutable_data_ptr<scalar_t>() : nullptr; };
    a.gmu = out(gmu), a.glv = out(glv), a.gpm = out(gpm), a.gplv = out(gplv);
    if (a.D == 0) return;
    for_tiles(a.B, a.D, [&](int64_t row, int64_t j0, int64_t n, int64_t) { backward_any(a, row, j0, n); });
  });
  return {gmu, glv, gpm, gplv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen, CPU, m) {
  m.impl("reparameterize_kl_forward", &reparameterize_kl_forward_cpu);
  m.impl("reparameterize_kl_backward", &reparameterize_kl_backward_cpu);
}
