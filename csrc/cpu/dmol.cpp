// discretized_mix_logistic_nll on CPU: the `cpp` backend (fastgen.ops.dmol).
//
// PixelCNN++'s loss (fastgen/ref/dmol.py has the math and the parameter layout)
// in one pass each way. The usual PyTorch port builds about twenty tensors of
// size B x H x W x C x nr_mix and autograd keeps most of them; here:
//
//   * forward reads x and params once and writes the per-pixel NLL [B, H, W];
//   * backward reads them again, recomputes every component's log-probability
//     and its partial derivatives in registers, and writes only grad_params.
//
// Per pixel and component k (colours c share the component):
//   lp_ck   = log P(x_c | component k, earlier colours) (edge levels, middle bins, the original's fallback)
//   L_k     = logit_k + sum_c lp_ck,   NLL = logsumexp_k logit_k - logsumexp_k L_k
//   r_k     = softmax_k L_k (the posterior of the component), pi_k = softmax_k logit_k
//   dNLL/dlogit_k = pi_k - r_k,  dNLL/dlp_ck = -r_k
// and lp's derivatives through p = s (d + 1/255), q = s (d - 1/255), t = s d, with s = exp(-log_scale),
// d = x - m: d/dm = -s (g_p + g_q + g_t), d/dlog_scale = -(p g_p + q g_q + t g_t) (- 1 in the fallback).
//
// Work: the pixels of each image in tiles of kTile positions, handed to at::parallel_for; a tile keeps its
// components' values in a per-thread scratch. Params are read with their strides (NCHW or channels_last,
// no copy); grad_params comes back in params' layout. Math in float32 for float/bfloat16/half params
// (float64 for double). Float32 params take an AVX-512 path where the CPU has it (16 pixels per step,
// gathers and scatters for channels_last, exp and log from csrc/cpu/vec_math.h); the rest the scalar path.
// Both compute sigmoid(-v) directly, not as 1 - sigmoid(v), and a bin's mass from the side of the logistic
// where its two CDF values are small, so neither difference cancels.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/cpu_features.h"  // FASTGEN_AVX512, fastgen::use_avx512()
#include "cpu/vec_math.h"      // fastgen::vec512: AVX-512 exp and log

namespace {

constexpr int64_t kTile = 64;  // positions per tile
const char* kOp = "discretized_mix_logistic_nll";

// The math type: float32 for float/bfloat16/half, float64 for double.
template <class T>
using math_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <class A>
inline A sigmoid(A v) {
  const A e = std::exp(-std::abs(v));
  return v >= 0 ? A(1) / (A(1) + e) : e / (A(1) + e);
}
template <class A>
inline A softplus(A v) {
  return std::max(v, A(0)) + std::log1p(std::exp(-std::abs(v)));
}

// The geometry of one call: x [B, C, H, W] (contiguous), params [B, K, H, W] with strides.
struct Geometry {
  int64_t B, C, HW, M, K;
  int64_t sb, sk, sp;  // params strides: batch, channel, position (a flattened H x W: sp = stride of W)
};

// Component k of pixel p, colour c: raw parameters.
template <class T>
struct Pixel {
  const T* base;  // params of this image
  const Geometry* g;
  int64_t p;
  math_t<T> at(int64_t ch) const { return static_cast<math_t<T>>(base[ch * g->sk + p * g->sp]); }
  math_t<T> logit(int64_t k) const { return at(k); }
  math_t<T> mean(int64_t c, int64_t k) const { return at(g->M + c * (g->C == 3 ? 3 : 2) * g->M + k); }
  math_t<T> log_scale(int64_t c, int64_t k) const {
    return at(g->M + c * (g->C == 3 ? 3 : 2) * g->M + g->M + k);
  }
  math_t<T> coeff(int64_t c, int64_t k) const { return at(g->M + c * 3 * g->M + 2 * g->M + k); }
  int64_t mean_ch(int64_t c, int64_t k) const { return g->M + c * (g->C == 3 ? 3 : 2) * g->M + k; }
};

// log P of one colour under one component, and (when wanted) its derivatives by the mean and the clamped
// log-scale.
template <class A>
struct ColourTerm {
  A lp, d_mean, d_log_scale;
};

template <class A>
inline ColourTerm<A> colour_term(A x, A m, A log_scale) {
  const A s = std::exp(-log_scale), d = x - m;
  const A p = s * (d + A(1) / A(255)), q = s * (d - A(1) / A(255));
  A lp, gp = 0, gq = 0, gt = 0, gls = 0, t = 0;
  if (x < A(-0.999)) {  // level 0: log sigmoid(p)
    lp = -softplus(-p);
    gp = sigmoid(-p);
  } else if (x > A(0.999)) {  // level 255: log (1 - sigmoid(q))
    lp = -softplus(q);
    gq = -sigmoid(q);
  } else {
    // sigmoids and their complements computed directly (1 - sigmoid(v) loses digits as v grows), and the
    // bin's mass from the side where both terms are small
    const A sp = sigmoid(p), sp_c = sigmoid(-p), sq = sigmoid(q), sq_c = sigmoid(-q);
    const A delta = q > 0 ? sq_c - sp_c : sp - sq;
    if (delta > A(1e-5)) {
      lp = std::log(std::max(delta, A(1e-12)));
      gp = sp * sp_c / delta;
      gq = -sq * sq_c / delta;
    } else {  // the original's fallback: the density at the bin's centre times its width
      t = s * d;
      lp = t - log_scale - A(2) * softplus(t) - A(4.8481163645546632);  // log(127.5)
      gt = A(1) - A(2) * sigmoid(t);
      gls = -1;
    }
  }
  return {lp, -s * (gp + gq + gt), gls - (p * gp + q * gq + t * gt)};
}

// The NLL of every pixel of tile [p0, p1) of image b; with grad (per-pixel upstream gradients), also the
// gradient of the tile's params. comp: scratch of M * (1 + 2C) values per position.
template <class T>
void tile(const Geometry& g, const T* x, const T* params, int64_t b, int64_t p0, int64_t p1,
          math_t<T>* nll, const math_t<T>* grad, T* gparams,
          std::vector<math_t<T>>& comp) {
  using A = math_t<T>;
  const int64_t M = g.M, C = g.C, stride = 1 + 2 * C;
  comp.resize(M * stride);
  for (int64_t p = p0; p < p1; ++p) {
    const Pixel<T> px{params + b * g.sb, &g, p};
    A xs[3];
    for (int64_t c = 0; c < C; ++c) xs[c] = static_cast<A>(x[(b * C + c) * g.HW + p]);
    A max_logit = -std::numeric_limits<A>::infinity(), max_l = max_logit;
    for (int64_t k = 0; k < M; ++k) {
      A* v = &comp[k * stride];
      A a[3] = {0, 0, 0};
      if (C == 3)
        for (int64_t j = 0; j < 3; ++j) a[j] = std::tanh(px.coeff(j, k));
      A total = px.logit(k);
      for (int64_t c = 0; c < C; ++c) {
        A m = px.mean(c, k);
        if (c == 1) m += a[0] * xs[0];
        if (c == 2) m += a[1] * xs[0] + a[2] * xs[1];
        const A ls_raw = px.log_scale(c, k);
        const ColourTerm<A> t = colour_term(xs[c], m, std::max(ls_raw, A(-7)));
        total += t.lp;
        v[1 + 2 * c] = t.d_mean;
        v[2 + 2 * c] = ls_raw >= A(-7) ? t.d_log_scale : A(0);  // clamp: no gradient below -7
      }
      v[0] = total;
      max_logit = std::max(max_logit, px.logit(k));
      max_l = std::max(max_l, total);
    }
    A sum_logit = 0, sum_l = 0;
    for (int64_t k = 0; k < M; ++k) {
      sum_logit += std::exp(px.logit(k) - max_logit);
      sum_l += std::exp(comp[k * stride] - max_l);
    }
    const A lse_logit = max_logit + std::log(sum_logit), lse_l = max_l + std::log(sum_l);
    if (nll) nll[b * g.HW + p] = lse_logit - lse_l;
    if (!gparams) continue;
    const A gout = grad[b * g.HW + p];
    T* gbase = gparams + b * g.sb + p * g.sp;
    for (int64_t k = 0; k < M; ++k) {
      const A* v = &comp[k * stride];
      const A r = std::exp(v[0] - lse_l), pi = std::exp(px.logit(k) - lse_logit);
      gbase[k * g.sk] = static_cast<T>(gout * (pi - r));
      const A w = -gout * r;  // dNLL / dlp of this component's colours
      for (int64_t c = 0; c < C; ++c) {
        const int64_t mc = px.mean_ch(c, k);
        gbase[mc * g.sk] = static_cast<T>(w * v[1 + 2 * c]);
        gbase[(mc + M) * g.sk] = static_cast<T>(w * v[2 + 2 * c]);
      }
      if (C == 3) {  // m_1 = mu_1 + a_0 x_0, m_2 = mu_2 + a_1 x_0 + a_2 x_1, a = tanh(raw)
        const A dm[3] = {v[1], v[3], v[5]};
        const A by[3] = {dm[1] * xs[0], dm[2] * xs[0], dm[2] * xs[1]};
        for (int64_t j = 0; j < 3; ++j) {
          const A a = std::tanh(px.coeff(j, k));
          gbase[(px.mean_ch(j, k) + 2 * M) * g.sk] = static_cast<T>(w * by[j] * (A(1) - a * a));
        }
      }
    }
  }
}


#ifdef FASTGEN_AVX512
// ---- AVX-512: float32 params, 16 pixels per step -------------------------------------------------------------
FASTGEN_AVX512_BEGIN

namespace avx512 {

using namespace fastgen::vec512;

inline V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V div(V a, V b) { return _mm512_div_ps(a, b); }
inline V vmax(V a, V b) { return _mm512_max_ps(a, b); }
inline V blend(M m, V a, V b) { return _mm512_mask_blend_ps(m, a, b); }  // m ? b : a
inline V neg(V a) {  // flips the sign bit (0 - a would turn -0 into +0)
  return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), _mm512_set1_epi32(INT32_MIN)));
}
inline V vabs(V a) {
  return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), _mm512_set1_epi32(INT32_MAX)));
}
inline M ge(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }

// Sixteen pixels p0 .. p0+15 of one image (mask m): loads and stores of one parameter channel.
struct Lanes {
  const float* base;  // params of the image, shifted to p0
  float* gbase;       // grad_params likewise
  int64_t sk, sp;
  M m;
  I index;            // lane offsets (lane * sp) when sp != 1
  V load(int64_t ch) const {
    const float* ptr = base + ch * sk;
    return sp == 1 ? _mm512_maskz_loadu_ps(m, ptr) : _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, index, ptr, 4);
  }
  void store(int64_t ch, V v) const {
    float* ptr = gbase + ch * sk;
    if (sp == 1)
      _mm512_mask_storeu_ps(ptr, m, v);
    else
      _mm512_mask_i32scatter_ps(ptr, m, index, v, 4);
  }
};

// (sigmoid(v), sigmoid(-v)) from e = exp(-|v|), each without cancellation.
inline void sigmoid_pair(V v, V e, V& s, V& s_c) {
  const V one = set(1.0f), inv = div(one, add(one, e)), ee = mul(e, inv);
  const M pos = ge(v, _mm512_setzero_ps());
  s = blend(pos, ee, inv);
  s_c = blend(pos, inv, ee);
}

inline V softplus_from(V v, V e) { return add(vmax(v, _mm512_setzero_ps()), log_pos(add(set(1.0f), e))); }

inline V tanh_v(V v) {
  const V e = exp_f(mul(set(-2.0f), vabs(v)));
  const V t = div(sub(set(1.0f), e), add(set(1.0f), e));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t),
                                             _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(INT32_MIN))));
}

// colour_term on 16 lanes: log P and the derivatives by the mean and the raw log-scale.
inline void colour_term(V x, V m, V ls_raw, V& lp, V& d_mean, V& d_ls) {
  const V zero = _mm512_setzero_ps(), one = set(1.0f);
  const V ls = vmax(ls_raw, set(-7.0f));
  const V s = exp_f(neg(ls)), d = sub(x, m);
  const V p = mul(s, add(d, set(1.0f / 255.0f))), q = mul(s, sub(d, set(1.0f / 255.0f))), t = mul(s, d);
  const V ep = exp_f(neg(vabs(p))), eq = exp_f(neg(vabs(q))), et = exp_f(neg(vabs(t)));
  V sp, sp_c, sq, sq_c, st, st_c;
  sigmoid_pair(p, ep, sp, sp_c);
  sigmoid_pair(q, eq, sq, sq_c);
  sigmoid_pair(t, et, st, st_c);
  const V delta = blend(gt(q, zero), sub(sp, sq), sub(sq_c, sp_c));
  const M left = lt(x, set(-0.999f)), right = gt(x, set(0.999f));
  const M edge = left | right;
  const M mid = gt(delta, set(1e-5f)) & ~edge, fallback = ~(edge | mid);
  const V safe = vmax(delta, set(1e-12f));
  const V inv_delta = div(one, safe);
  V l = log_pos(safe);                                                               // middle bins
  l = blend(fallback, l, sub(sub(sub(t, ls), mul(set(2.0f), softplus_from(t, et))), set(4.8481163645546632f)));
  l = blend(left, l, neg(softplus_from(neg(p), ep)));                                // level 0
  l = blend(right, l, neg(softplus_from(q, eq)));                                    // level 255
  lp = l;
  V gp = _mm512_maskz_mov_ps(mid, mul(mul(sp, sp_c), inv_delta));
  gp = blend(left, gp, sp_c);
  V gq = _mm512_maskz_mov_ps(mid, neg(mul(mul(sq, sq_c), inv_delta)));
  gq = blend(right, gq, neg(sq));
  const V gt_ = _mm512_maskz_mov_ps(fallback, sub(one, mul(set(2.0f), st)));
  d_mean = neg(mul(s, add(add(gp, gq), gt_)));
  const V gls = _mm512_maskz_mov_ps(fallback, set(-1.0f));
  const V dl = sub(gls, add(add(mul(p, gp), mul(q, gq)), mul(t, gt_)));
  d_ls = _mm512_maskz_mov_ps(ge(ls_raw, set(-7.0f)), dl);
}

// The scalar tile's work on 16 pixels at a time (float params; x contiguous). comp: per component, 16 lanes
// each of the logit, L_k, (d mean, d log-scale) per colour and the three tanh'd coefficients.
void tile(const Geometry& g, const float* x, const float* params, int64_t b, int64_t p0, int64_t p1, float* nll,
          const float* grad, float* gparams, std::vector<float>& comp) {
  const int64_t M = g.M, C = g.C, per = C == 3 ? 3 : 2, L = 16;
  const int64_t stride = (2 + 2 * C + (C == 3 ? 3 : 0)) * L;  // logit, total, (dm, dls) per colour, a_j
  comp.resize(M * stride);
  const I iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t p = p0; p < p1; p += L) {
    const int64_t n = std::min<int64_t>(L, p1 - p);
    const auto m = static_cast<fastgen::vec512::M>(n == 16 ? 0xFFFF : (1u << n) - 1);
    Lanes lanes{params + b * g.sb + p * g.sp, gparams ? gparams + b * g.sb + p * g.sp : nullptr, g.sk, g.sp, m,
                _mm512_mullo_epi32(iota, _mm512_set1_epi32(int32_t(g.sp)))};
    V xs[3];
    for (int64_t c = 0; c < C; ++c) xs[c] = _mm512_maskz_loadu_ps(m, x + (b * C + c) * g.HW + p);
    V max_logit = set(-INFINITY), max_l = set(-INFINITY);
    for (int64_t k = 0; k < M; ++k) {
      float* v = &comp[k * stride];
      V a[3] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      if (C == 3)
        for (int64_t j = 0; j < 3; ++j) a[j] = tanh_v(lanes.load(M + j * 3 * M + 2 * M + k));
      const V logit = lanes.load(k);
      V total = logit;
      for (int64_t c = 0; c < C; ++c) {
        V mean = lanes.load(M + c * per * M + k);
        if (c == 1) mean = add(mean, mul(a[0], xs[0]));
        if (c == 2) mean = add(add(mean, mul(a[1], xs[0])), mul(a[2], xs[1]));
        V lp, dm, dls;
        colour_term(xs[c], mean, lanes.load(M + c * per * M + M + k), lp, dm, dls);
        total = add(total, lp);
        _mm512_storeu_ps(v + (2 + 2 * c) * L, dm);
        _mm512_storeu_ps(v + (3 + 2 * c) * L, dls);
      }
      if (C == 3)
        for (int64_t j = 0; j < 3; ++j) _mm512_storeu_ps(v + (2 + 2 * C + j) * L, a[j]);
      total = _mm512_maskz_mov_ps(m, total);  // masked-off lanes: 0, no inf - inf below
      _mm512_storeu_ps(v, _mm512_maskz_mov_ps(m, logit));
      _mm512_storeu_ps(v + L, total);
      max_logit = vmax(max_logit, _mm512_maskz_mov_ps(m, logit));
      max_l = vmax(max_l, total);
    }
    V sum_logit = _mm512_setzero_ps(), sum_l = _mm512_setzero_ps();
    for (int64_t k = 0; k < M; ++k) {
      const float* v = &comp[k * stride];
      sum_logit = add(sum_logit, exp_f(sub(_mm512_loadu_ps(v), max_logit)));
      sum_l = add(sum_l, exp_f(sub(_mm512_loadu_ps(v + L), max_l)));
    }
    const V lse_logit = add(max_logit, log_pos(sum_logit)), lse_l = add(max_l, log_pos(sum_l));
    if (nll) _mm512_mask_storeu_ps(nll + b * g.HW + p, m, sub(lse_logit, lse_l));
    if (!gparams) continue;
    const V gout = _mm512_maskz_loadu_ps(m, grad + b * g.HW + p);
    for (int64_t k = 0; k < M; ++k) {
      const float* v = &comp[k * stride];
      const V r = exp_f(sub(_mm512_loadu_ps(v + L), lse_l)), pi = exp_f(sub(_mm512_loadu_ps(v), lse_logit));
      lanes.store(k, mul(gout, sub(pi, r)));
      const V w = neg(mul(gout, r));
      for (int64_t c = 0; c < C; ++c) {
        const int64_t mc = M + c * per * M + k;
        lanes.store(mc, mul(w, _mm512_loadu_ps(v + (2 + 2 * c) * L)));
        lanes.store(mc + M, mul(w, _mm512_loadu_ps(v + (3 + 2 * c) * L)));
      }
      if (C == 3) {
        const V dm1 = _mm512_loadu_ps(v + 4 * L), dm2 = _mm512_loadu_ps(v + 6 * L);
        const V by[3] = {mul(dm1, xs[0]), mul(dm2, xs[0]), mul(dm2, xs[1])};
        for (int64_t j = 0; j < 3; ++j) {
          const V a = _mm512_loadu_ps(v + (2 + 2 * C + j) * L);
          lanes.store(M + j * 3 * M + 2 * M + k, mul(mul(w, by[j]), sub(set(1.0f), mul(a, a))));
        }
      }
    }
  }
}

}  // namespace avx512

FASTGEN_AVX512_END
#endif  // FASTGEN_AVX512

// The AVX-512 tile for float params on CPUs that have it (with strides that fit its int32 gathers), else the
// scalar one.
template <class T>
void any_tile(const Geometry& g, const T* x, const T* params, int64_t b, int64_t p0, int64_t p1,
              math_t<T>* nll, const math_t<T>* grad, T* gparams,
              std::vector<math_t<T>>& comp) {
#ifdef FASTGEN_AVX512
  if constexpr (std::is_same_v<T, float>) {
    if (fastgen::use_avx512() && g.sp * 16 < (int64_t(1) << 31) && g.sp * 16 * g.K < (int64_t(1) << 31))
      return avx512::tile(g, x, params, b, p0, p1, nll, grad, gparams, comp);
  }
#endif
  tile<T>(g, x, params, b, p0, p1, nll, grad, gparams, comp);
}

Geometry geometry(const at::Tensor& x, const at::Tensor& params, int64_t nr_mix) {
  TORCH_CHECK(x.device().is_cpu() && params.device().is_cpu(), kOp, ": the cpp backend takes CPU tensors, got ",
              x.device(), " and ", params.device());
  TORCH_CHECK(x.dim() == 4 && params.dim() == 4, kOp, ": x and params must be 4-D, got ", x.sizes(), " and ",
              params.sizes());
  const auto st = params.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, kOp,
              ": params must be float32, float64, bfloat16 or float16, got ", st);
  TORCH_CHECK(x.scalar_type() == st, kOp, ": x must have params' dtype ", st, ", got ", x.scalar_type());
  Geometry g;
  g.B = x.size(0), g.C = x.size(1), g.HW = x.size(2) * x.size(3), g.M = nr_mix, g.K = params.size(1);
  TORCH_CHECK(g.C == 1 || g.C == 3, kOp, ": x must have 1 or 3 channels, got ", g.C);
  TORCH_CHECK(nr_mix >= 1 && g.K == (g.C == 3 ? 10 : 3) * nr_mix, kOp, ": params has ", g.K,
              " channels; with nr_mix=", nr_mix, " and ", g.C, " colours it needs ", (g.C == 3 ? 10 : 3) * nr_mix);
  TORCH_CHECK(params.size(0) == g.B && params.size(2) == x.size(2) && params.size(3) == x.size(3), kOp,
              ": x ", x.sizes(), " and params ", params.sizes(), " must agree in batch, height and width");
  return g;
}

// params as the kernels read it: channels_last kept, anything else NCHW-contiguous.
at::Tensor kernel_params(const at::Tensor& params, Geometry& g) {
  const bool cl = params.is_contiguous(at::MemoryFormat::ChannelsLast) && !params.is_contiguous();
  at::Tensor p = cl ? params : params.contiguous();
  g.sb = p.stride(0), g.sk = p.stride(1), g.sp = p.stride(3);
  TORCH_CHECK(p.size(3) == 1 || p.stride(2) == p.size(3) * p.stride(3), kOp, ": internal: params rows not dense");
  return p;
}

template <class F>
void for_tiles(const Geometry& g, F f) {
  const int64_t per_image = (g.HW + kTile - 1) / kTile;
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, kTile * g.M));
  at::parallel_for(0, g.B * per_image, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / per_image, p0 = (t % per_image) * kTile;
      f(b, p0, std::min(g.HW, p0 + kTile));
    }
  });
}

at::ScalarType math_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// Every tile of the call, in parallel: the per-pixel NLL into nll, or (with the per-pixel upstream gradient
// grad) the gradient of params into gparams.
void run(const Geometry& g, const at::Tensor& x, const at::Tensor& params, const at::Tensor& nll,
         const at::Tensor& grad, const at::Tensor& gparams) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params.scalar_type(), "dmol_nll", [&] {
    using A = math_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* pp = params.const_data_ptr<scalar_t>();
    A* out = nll.defined() ? nll.mutable_data_ptr<A>() : nullptr;
    const A* gp = grad.defined() ? grad.const_data_ptr<A>() : nullptr;
    scalar_t* gout = gparams.defined() ? gparams.mutable_data_ptr<scalar_t>() : nullptr;
    for_tiles(g, [&](int64_t b, int64_t p0, int64_t p1) {
      thread_local std::vector<A> comp;
      any_tile<scalar_t>(g, xp, pp, b, p0, p1, out, gp, gout, comp);
    });
  });
}

// -> the NLL of every pixel [B, H, W] in the math type (float32, float64 for double).
at::Tensor dmol_nll_forward_cpu(const at::Tensor& x_in, const at::Tensor& params_in, int64_t nr_mix) {
  Geometry g = geometry(x_in, params_in, nr_mix);
  const at::Tensor x = x_in.contiguous(), params = kernel_params(params_in, g);
  at::Tensor nll = at::empty({g.B, x.size(2), x.size(3)}, x.options().dtype(math_type(x.scalar_type())));
  run(g, x, params, nll, at::Tensor(), at::Tensor());
  return nll;
}

// grad_nll: [B, H, W] in the math type -> grad_params in params' dtype and layout.
at::Tensor dmol_nll_backward_cpu(const at::Tensor& grad_nll, const at::Tensor& x_in, const at::Tensor& params_in,
                                 int64_t nr_mix) {
  Geometry g = geometry(x_in, params_in, nr_mix);
  const at::Tensor x = x_in.contiguous(), params = kernel_params(params_in, g);
  TORCH_CHECK(grad_nll.scalar_type() == math_type(x.scalar_type()) && grad_nll.numel() == g.B * g.HW, kOp,
              ": grad_nll must be ", math_type(x.scalar_type()), " of shape (", g.B, ", ", x.size(2), ", ", x.size(3),
              "), got ", grad_nll.scalar_type(), " ", grad_nll.sizes());
  at::Tensor gparams = at::empty_like(params);  // params' layout (empty_like keeps the strides)
  run(g, x, params, at::Tensor(), grad_nll.contiguous(), gparams);
  return gparams;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen, CPU, m) {
  m.impl("dmol_nll_forward", &dmol_nll_forward_cpu);
  m.impl("dmol_nll_backward", &dmol_nll_backward_cpu);
}
