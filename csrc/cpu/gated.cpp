// gated_activation on CPU: the `cpp` backend (fastgen.ops.gated).
//
// out = tanh(f + cf) * sigmoid(g + cg) in the colour-block channel layout of
// fastgen/ref/gated.py: x [B, 2C, *spatial] is data_channels blocks, each a
// value half f and a gate half g of Cd = C / data_channels channels; output
// block d is the gate of x's block d. cond is absent, [B, 2C] (one bias per
// sample and channel, broadcast over positions) or x's full shape.
//
// Design: the op is bound by memory and by exp, so every element is loaded
// once, gated in registers and stored once (torch's eager version makes ~5
// passes: add, chunk, tanh, sigmoid, mul):
//
//   * forward reads x (+ cond) and writes out;
//   * backward reads grad_out, x (+ cond), recomputes the gate and writes
//     grad_x (both halves) and, in the same pass, grad_cond: a copy of grad_x
//     for a full cond, or its sum over positions for a [B, 2C] cond (per-tile
//     partial sums, added in a fixed order at the end: deterministic).
//   * The work of one (image b, block d) is a 2-D slab of rows x contiguous
//     columns. NCHW: rows = the Cd channels, columns = positions (a [B, 2C]
//     cond is one value per row). channels_last, or a single position (2-D x):
//     rows = positions, columns = the Cd channels (a [B, 2C] cond is one
//     vector per slab). Slabs are cut into tiles of ~4K outputs handed out to
//     the threads from an atomic counter (a core that another process is using
//     just takes fewer tiles); small calls stay on the calling thread.
//   * Math in the input dtype. exp only ever sees arguments <= 0 (no
//     overflow), split as x = n ln2 + r with pm = e^r - 1 from a polynomial
//     (Cephes' for float32, Taylor's to degree 12 for float64), so that both
//     exp(x) = 2^n (1 + pm) and exp(x) - 1 = 2^n pm + (2^n - 1) come with a
//     single rounding. With em1 = exp(-2|a|) - 1 and e = exp(-|b|):
//       tanh a     = sign(a) |em1| / (2 + em1)
//       1 - tanh^2 = 4 (1 + em1) / (2 + em1)^2
//       sigmoid b  = (b >= 0 ? 1 : e) / (1 + e),   1 - sigmoid b = (b >= 0 ? e : 1) / (1 + e)
//     Nothing cancels (the gradients stay accurate where torch's 1 - t*t
//     rounds to 0) and an element costs one reciprocal (float32: rcp14 and a
//     Newton step). Measured max relative error: float32 ~4e-7 (out), ~8e-7
//     (gradients); float64 ~2e-15. NaN in gives NaN out; +-inf saturate. The
//     portable path (below) flushes results under the normal range to 0.
//
// Layout (the rule of the CPU ops, fastgen::channels_last): a channels_last
// (4-D) x is read in place and answered in channels_last (out and grad_x);
// anything else is read NCHW-contiguous (a copy when it is not) and answered
// NCHW. A full cond and grad_out are brought to x's layout (no copy when they
// already have it); grad_cond has x's layout (full) or is [B, 2C].
//
// The AVX-512 section is compiled for that ISA only (the rest of the file is
// not) and chosen at run time. Other CPUs take a portable path: the same math
// on scalars in loops GCC vectorises, built twice on x86 (x86-64-v3, i.e.
// AVX2 + FMA, chosen at load time, and the SSE2 baseline, where float64 stays
// scalar), NEON on ARM; FASTGEN_CPU_KERNEL=generic forces it (for tests).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "masked_conv_args.h"  // fastgen::channels_last: the layout rule shared by the CPU ops

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "cpu/cpu_features.h"  // FASTGEN_AVX512, fastgen::use_avx512()
#include "cpu/gate_math.h"     // Gate: the gate's vector math (shared with the cached sampler)
#include "cpu/vec_math.h"      // fastgen::vec512::Lanes: the AVX-512 lane operations

namespace {

using fastgen::gate::kExpF;  // the constants of the math (csrc/cpu/gate_math.h), for the portable path too
using fastgen::gate::kInvFact;
using fastgen::gate::kLn2Hi;
using fastgen::gate::kLn2HiF;
using fastgen::gate::kLn2Lo;
using fastgen::gate::kLn2LoF;
using fastgen::gate::kLog2e;

// How the cond of a tile element (row r, column j) is found; see Tile.
enum class Cond {
  None,
  Row,   // cf[r]: NCHW with a [B, 2C] cond (one bias per channel = per row)
  Col,   // cf[j]: channels_last (or one position) with a [B, 2C] cond
  Full,  // cf[r * xr + j]: a full cond, in x's layout
};

// One tile: rows x cols elements of a slab, each row contiguous.
template <class T>
struct Tile {
  int64_t rows, cols;
  const T* f;          // value half: f[r * xr + j]
  const T* g;          // gate half, same strides
  int64_t xr;          // row stride of x (and of grad_x, a full cond and its grad)
  const T* cf;         // cond of the value half (see Cond), nullptr for Cond::None
  const T* cg;         // cond of the gate half
  T* o;                // forward: out[r * orow + j]
  const T* go;         // backward: grad_out[r * orow + j]
  int64_t orow;
  T* gxf;              // backward: grad_x halves (x's strides); nullptr: not wanted
  T* gxg;
  T* gcf;              // backward: grad_cond, nullptr: not wanted. Full: x's strides;
  T* gcg;              //   Row: the tile's per-row sums [rows]; Col: its per-column sums [cols]
  int64_t pf, pf_end;  // pf > 0: prefetch the row pf rows ahead while below pf_end (short rows, see tile_at)
};

template <class T>
using TileFn = void (*)(const Tile<T>&);

#ifdef FASTGEN_AVX512
// ---- AVX-512 kernels (this section only is compiled for AVX-512F) ---------------------------------------
FASTGEN_AVX512_BEGIN

namespace avx512 {

// The lane operations (csrc/cpu/vec_math.h, shared with batch_norm_act.cpp)
template <class T>
using V = fastgen::vec512::Lanes<T>;

using fastgen::gate::avx512::Gate;  // csrc/cpu/gate_math.h

// Loads and stores of a full vector, or of the first n lanes (the row's tail; other lanes read as 0).
template <class T, bool Tail>
struct Io {
  using W = V<T>;
  using R = typename W::R;
  typename W::M m;
  R load(const T* p) const {
    if constexpr (Tail) return W::load(p, m);
    else return W::load(p);
  }
  void store(T* p, R v) const {
    if constexpr (Tail) W::store(p, v, m);
    else W::store(p, v);
  }
  R keep(R v) const {  // zero in the lanes past the tail (they must not reach a sum)
    if constexpr (Tail) return W::keep(v, m);
    else return v;
  }
};

// Short rows (channels_last) jump every few lines, which the hardware's stride prefetcher does not follow
// (measured: 2x slower than NCHW on large tensors): prefetch the rows ahead by hand.
template <class T>
FASTGEN_INLINE void prefetch(const T* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
}

// The pre-activations (a, b) of the vector at (r, j): x + cond.
template <class T, Cond CM, class IO>
FASTGEN_INLINE void preact(const Tile<T>& t, int64_t r, int64_t j, const IO& io, typename V<T>::R bf,
                           typename V<T>::R bg, typename V<T>::R& a, typename V<T>::R& b) {
  using W = V<T>;
  const int64_t xo = r * t.xr + j;
  a = io.load(t.f + xo);
  b = io.load(t.g + xo);
  if constexpr (CM == Cond::Row) {
    a = W::add(a, bf), b = W::add(b, bg);
  } else if constexpr (CM == Cond::Col) {
    a = W::add(a, io.load(t.cf + j)), b = W::add(b, io.load(t.cg + j));
  } else if constexpr (CM == Cond::Full) {
    a = W::add(a, io.load(t.cf + xo)), b = W::add(b, io.load(t.cg + xo));
  }
}

template <class T, Cond CM, class IO>
FASTGEN_INLINE void forward_vec(const Tile<T>& t, int64_t r, int64_t j, const IO& io, typename V<T>::R bf,
                                typename V<T>::R bg, bool pf) {
  typename V<T>::R a, b;
  if (pf) prefetch(t.f + (r + t.pf) * t.xr + j), prefetch(t.g + (r + t.pf) * t.xr + j);
  preact<T, CM>(t, r, j, io, bf, bg, a, b);
  io.store(t.o + r * t.orow + j, Gate<T>(a, b).out());
}

template <class T, Cond CM>
void forward_tile(const Tile<T>& t) {
  using W = V<T>;
  constexpr int L = W::L;
  const int64_t nfull = t.cols / L * L;
  const Io<T, false> io{};
  const Io<T, true> tio{W::tail(t.cols - nfull)};
  for (int64_t r = 0; r < t.rows; ++r) {
    typename W::R bf = W::zero(), bg = W::zero();
    if constexpr (CM == Cond::Row) bf = W::set1(t.cf[r]), bg = W::set1(t.cg[r]);
    const bool pf = r + t.pf < t.pf_end;
    for (int64_t j = 0; j < nfull; j += L) forward_vec<T, CM>(t, r, j, io, bf, bg, pf);
    if (nfull < t.cols) forward_vec<T, CM>(t, r, nfull, tio, bf, bg, false);
  }
}

template <class T, Cond CM, class IO>
FASTGEN_INLINE void backward_vec(const Tile<T>& t, int64_t r, int64_t j, const IO& io, typename V<T>::R bf,
                                 typename V<T>::R bg, typename V<T>::R& sf, typename V<T>::R& sg, bool pf) {
  using W = V<T>;
  typename W::R a, b, da, db;
  if (pf) {
    prefetch(t.f + (r + t.pf) * t.xr + j), prefetch(t.g + (r + t.pf) * t.xr + j);
    prefetch(t.go + (r + t.pf) * t.orow + j);
  }
  preact<T, CM>(t, r, j, io, bf, bg, a, b);
  Gate<T>(a, b).grad(io.load(t.go + r * t.orow + j), da, db);
  const int64_t xo = r * t.xr + j;
  if (t.gxf) io.store(t.gxf + xo, da), io.store(t.gxg + xo, db);
  if constexpr (CM == Cond::Full) {
    if (t.gcf) io.store(t.gcf + xo, da), io.store(t.gcg + xo, db);
  } else if constexpr (CM == Cond::Row) {
    sf = W::add(sf, io.keep(da)), sg = W::add(sg, io.keep(db));
  } else if constexpr (CM == Cond::Col) {
    if (t.gcf) {  // the tile's column sums, in L1
      io.store(t.gcf + j, W::add(io.load(t.gcf + j), da));
      io.store(t.gcg + j, W::add(io.load(t.gcg + j), db));
    }
  }
}

template <class T, Cond CM>
void backward_tile(const Tile<T>& t) {
  using W = V<T>;
  constexpr int L = W::L;
  const int64_t nfull = t.cols / L * L;
  const Io<T, false> io{};
  const Io<T, true> tio{W::tail(t.cols - nfull)};
  if (CM == Cond::Col && t.gcf) std::fill(t.gcf, t.gcf + t.cols, T(0)), std::fill(t.gcg, t.gcg + t.cols, T(0));
  for (int64_t r = 0; r < t.rows; ++r) {
    typename W::R bf = W::zero(), bg = W::zero(), sf = W::zero(), sg = W::zero();
    if constexpr (CM == Cond::Row) bf = W::set1(t.cf[r]), bg = W::set1(t.cg[r]);
    const bool pf = r + t.pf < t.pf_end;
    for (int64_t j = 0; j < nfull; j += L) backward_vec<T, CM>(t, r, j, io, bf, bg, sf, sg, pf);
    if (nfull < t.cols) backward_vec<T, CM>(t, r, nfull, tio, bf, bg, sf, sg, false);
    if (CM == Cond::Row && t.gcf) t.gcf[r] = W::hsum(sf), t.gcg[r] = W::hsum(sg);
  }
}

template <class T>
TileFn<T> kernel(bool backward, Cond cm) {
  switch (cm) {
    case Cond::None: return backward ? &backward_tile<T, Cond::None> : &forward_tile<T, Cond::None>;
    case Cond::Row: return backward ? &backward_tile<T, Cond::Row> : &forward_tile<T, Cond::Row>;
    case Cond::Col: return backward ? &backward_tile<T, Cond::Col> : &forward_tile<T, Cond::Col>;
    case Cond::Full: break;
  }
  return backward ? &backward_tile<T, Cond::Full> : &forward_tile<T, Cond::Full>;
}

}  // namespace avx512

FASTGEN_AVX512_END
#endif  // FASTGEN_AVX512

using fastgen::use_avx512;

// ---- portable path: the same math on scalars, in loops the compiler vectorises --------------------------
//
// No library calls and no float comparisons in the loops: GCC would not
// vectorise them (a call; a comparison may trap, and GCC threads constants
// through the branches it makes of them). exp builds 2^n in the exponent bits,
// selects are integer bit operations, the sums of a [B, 2C] cond are kept per
// lane in blocks of W elements (a plain float sum is not vectorised without
// -ffast-math). x86 CPUs get an x86-64-v3 (AVX2 + FMA) clone chosen at load
// time by feature (an arch=<cpu> clone would test the CPU model instead).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTGEN_PORTABLE_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FASTGEN_PORTABLE_CLONES
#endif

namespace portable {

template <class T>
struct Bits;
template <>
struct Bits<float> {
  using S = int32_t;
  using U = uint32_t;
  static constexpr int mant = 23, bias = 127;
  static constexpr float magic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  static constexpr float hi = 104.f;          // exp(-hi) rounds to 0
};
template <>
struct Bits<double> {
  using S = int64_t;
  using U = uint64_t;
  static constexpr int mant = 52, bias = 1023;
  static constexpr double magic = 6755399441055744.;  // 1.5 * 2^52
  static constexpr double hi = 800.;
};

// Helpers are always_inline: a library function, even std::bit_cast or std::min, would not inline into the
// x86-64-v3 clones (another -march) and its call would stop the vectoriser.
template <class To, class From>
FASTGEN_INLINE constexpr To cast(From v) {
  return __builtin_bit_cast(To, v);
}
template <class T>
FASTGEN_INLINE typename Bits<T>::S bits(T v) {
  return cast<typename Bits<T>::S>(v);
}
// All ones where v's sign bit is set, else 0.
template <class T>
FASTGEN_INLINE typename Bits<T>::S sign_mask(T v) {
  return -static_cast<typename Bits<T>::S>(bits(v) < 0);
}
template <class T>  // mask ? yes : no, on the bits
FASTGEN_INLINE T select(typename Bits<T>::S mask, T yes, T no) {
  return cast<T>((mask & bits(yes)) | (~mask & bits(no)));
}
// std::fabs and std::copysign, on the bits
template <class T>
FASTGEN_INLINE T abs(T v) {
  constexpr auto no_sign = std::numeric_limits<typename Bits<T>::S>::max();
  return cast<T>(bits(v) & no_sign);
}
template <class T>
FASTGEN_INLINE T copysign(T mag, T sgn) {
  constexpr auto no_sign = std::numeric_limits<typename Bits<T>::S>::max();
  return cast<T>((bits(mag) & no_sign) | (bits(sgn) & ~no_sign));
}

// exp(-m), m >= 0 or NaN, in two parts as in the AVX-512 section: exp(-m) = p2n (1 + pm), p2n = 2^n
// (0 where 2^n is below the normal range).
template <class T>
FASTGEN_INLINE void exp_parts(T m, T& pm, T& p2n) {
  using B = Bits<T>;
  using S = typename B::S;
  using U = typename B::U;
  constexpr S inf = cast<S>(std::numeric_limits<T>::infinity()), hi = cast<S>(B::hi);
  constexpr S qnan = cast<S>(std::numeric_limits<T>::quiet_NaN());
  const S mb = bits(m), nan = -static_cast<S>(mb > inf);
  // min(m, hi) on the bits (m >= 0), a NaN kept a NaN
  const T x = -cast<T>((mb < hi ? mb : hi) | (nan & qnan));
  const T v = x * T(kLog2e) + B::magic;
  const T n = v - B::magic;
  constexpr U magic = cast<U>(B::magic);
  const S k = static_cast<S>(static_cast<U>(bits(v)) - magic);  // n
  const S e = k + B::bias;
  p2n = cast<T>((e > 0 ? e : S(0)) << B::mant);
  T q;
  if constexpr (std::is_same_v<T, float>) {
    const T r = (x - n * kLn2HiF) - n * kLn2LoF;
    q = kExpF[0];
    for (int i = 1; i < 6; ++i) q = q * r + kExpF[i];
    pm = q * (r * r) + r;
  } else {
    const T r = (x - n * kLn2Hi) - n * kLn2Lo;
    q = kInvFact[0];
    for (int i = 1; i < 11; ++i) q = q * r + kInvFact[i];
    pm = q * (r * r) + r;
  }
}

template <class T>
struct Gate {
  T tn, td, sn, sd, sm, pm2, p2n;

  FASTGEN_INLINE Gate(T a, T b) {
    exp_parts(T(2) * abs(a), pm2, p2n);
    const T em1 = p2n * pm2 + (p2n - T(1));  // p2n * pm2 is exact (a power of 2 times pm2)
    tn = copysign(em1, a);
    td = T(2) + em1;
    T pm, p;
    exp_parts(abs(b), pm, p);
    const T e = p * pm + p, one = T(1);
    const auto neg = sign_mask(b);
    sn = select(neg, e, one);
    sm = select(neg, one, e);
    sd = one + e;
  }
  FASTGEN_INLINE T out() const { return (tn * sn) / (td * sd); }
  FASTGEN_INLINE void grad(T go, T& da, T& db) const {
    const T inv = T(1) / (td * sd);
    const T rt = sd * inv, rs = td * inv;
    const T t = tn * rt, s = sn * rs, oms = sm * rs;
    const T e2 = p2n * pm2 + p2n;
    const T rt2 = rt + rt;
    const T omt2 = e2 * (rt2 * rt2);
    const T gs = go * s;
    da = gs * omt2;
    db = (gs * t) * oms;
  }
};

constexpr int W = 16;

template <class T, Cond CM>
FASTGEN_INLINE void preact(const Tile<T>& t, int64_t r, int64_t j, T& a, T& b) {
  const int64_t xo = r * t.xr + j;
  a = t.f[xo], b = t.g[xo];
  if constexpr (CM == Cond::Row) a += t.cf[r], b += t.cg[r];
  if constexpr (CM == Cond::Col) a += t.cf[j], b += t.cg[j];
  if constexpr (CM == Cond::Full) a += t.cf[xo], b += t.cg[xo];
}

template <class T, Cond CM>
FASTGEN_PORTABLE_CLONES void forward_tile(const Tile<T>& t) {
  for (int64_t r = 0; r < t.rows; ++r) {
    T* __restrict__ o = t.o + r * t.orow;
    for (int64_t j = 0; j < t.cols; ++j) {
      T a, b;
      preact<T, CM>(t, r, j, a, b);
      o[j] = Gate<T>(a, b).out();
    }
  }
}

// Elements [j, j + n) of row r; Row sums per lane k into sf[k], sg[k].
template <class T, Cond CM>
FASTGEN_INLINE void backward_block(const Tile<T>& t, int64_t r, int64_t j, int n, T* __restrict__ sf,
                                   T* __restrict__ sg) {
  T da[W], db[W];
  const T* __restrict__ go = t.go + r * t.orow + j;
  for (int k = 0; k < n; ++k) {
    T a, b;
    preact<T, CM>(t, r, j + k, a, b);
    Gate<T>(a, b).grad(go[k], da[k], db[k]);
  }
  const int64_t xo = r * t.xr + j;
  if (t.gxf)
    for (int k = 0; k < n; ++k) t.gxf[xo + k] = da[k], t.gxg[xo + k] = db[k];
  if constexpr (CM == Cond::Full) {
    if (t.gcf)
      for (int k = 0; k < n; ++k) t.gcf[xo + k] = da[k], t.gcg[xo + k] = db[k];
  } else if constexpr (CM == Cond::Row) {
    for (int k = 0; k < n; ++k) sf[k] += da[k], sg[k] += db[k];
  } else if constexpr (CM == Cond::Col) {
    if (t.gcf)
      for (int k = 0; k < n; ++k) t.gcf[j + k] += da[k], t.gcg[j + k] += db[k];
  }
}

template <class T, Cond CM>
FASTGEN_PORTABLE_CLONES void backward_tile(const Tile<T>& t) {
  if (CM == Cond::Col && t.gcf)
    for (int64_t j = 0; j < t.cols; ++j) t.gcf[j] = T(0), t.gcg[j] = T(0);
  const int64_t nfull = t.cols / W * W;
  for (int64_t r = 0; r < t.rows; ++r) {
    T sf[W] = {}, sg[W] = {};
    for (int64_t j = 0; j < nfull; j += W) backward_block<T, CM>(t, r, j, W, sf, sg);
    if (nfull < t.cols) backward_block<T, CM>(t, r, nfull, static_cast<int>(t.cols - nfull), sf, sg);
    if (CM == Cond::Row && t.gcf) {
      T a = 0, b = 0;
      for (int k = 0; k < W; ++k) a += sf[k], b += sg[k];
      t.gcf[r] = a, t.gcg[r] = b;
    }
  }
}

template <class T>
TileFn<T> kernel(bool backward, Cond cm) {
  switch (cm) {
    case Cond::None: return backward ? &backward_tile<T, Cond::None> : &forward_tile<T, Cond::None>;
    case Cond::Row: return backward ? &backward_tile<T, Cond::Row> : &forward_tile<T, Cond::Row>;
    case Cond::Col: return backward ? &backward_tile<T, Cond::Col> : &forward_tile<T, Cond::Col>;
    case Cond::Full: break;
  }
  return backward ? &backward_tile<T, Cond::Full> : &forward_tile<T, Cond::Full>;
}

}  // namespace portable

template <class T>
TileFn<T> pick_kernel(bool backward, Cond cm) {
#ifdef FASTGEN_AVX512
  if (use_avx512()) return avx512::kernel<T>(backward, cm);
#endif
  return portable::kernel<T>(backward, cm);
}

// ---- the problem, checked, and its tiles ------------------------------------------------------------------

struct Call {
  int64_t B, C2, C, dc, Cd, P;  // x [B, C2 = 2C, P positions], data_channels blocks of 2 Cd channels
  bool rowwise;                 // rows = positions (channels_last or P == 1), else rows = channels
  Cond cm;
  at::MemoryFormat fmt;  // of x as read, and of out / grad_x
  std::vector<int64_t> out_shape;
};

Call check_call(const char* op, const at::Tensor& x, const at::Tensor* cond, int64_t data_channels) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": the CPU kernel takes float32 or float64 input, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 2, op, ": x must be at least 2-D [batch, 2 * channels, *spatial], got shape ", x.sizes());
  TORCH_CHECK(data_channels >= 1, op, ": data_channels must be >= 1, got ", data_channels);
  Call c;
  c.B = x.size(0), c.C2 = x.size(1), c.dc = data_channels;
  TORCH_CHECK(c.C2 % (2 * data_channels) == 0, op, ": x has ", c.C2, " channels, which must be divisible by ",
              "2 * data_channels = ", 2 * data_channels, " (data_channels blocks, each a value half and a gate half)");
  c.C = c.C2 / 2, c.Cd = c.C / data_channels;
  c.P = 1;
  for (int64_t i = 2; i < x.dim(); ++i) c.P *= x.size(i);
  const bool cl = fastgen::channels_last(x);
  c.fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  c.rowwise = cl || c.P == 1;  // one position: NCHW and NHWC are the same memory
  c.out_shape = x.sizes().vec();
  c.out_shape[1] = c.C;
  c.cm = Cond::None;
  if (cond) {
    TORCH_CHECK(cond->scalar_type() == x.scalar_type(), op, ": cond must have x's dtype ", x.scalar_type(), ", got ",
                cond->scalar_type());
    TORCH_CHECK(cond->device() == x.device(), op, ": cond must be on x's device ", x.device(), ", got ",
                cond->device());
    if (cond->sizes() == x.sizes()) {
      c.cm = Cond::Full;
    } else {
      TORCH_CHECK(cond->dim() == 2 && cond->size(0) == c.B && cond->size(1) == c.C2, op, ": cond must have shape [",
                  c.B, ", ", c.C2, "] (one bias per sample and channel) or x's shape ", x.sizes(), ", got ",
                  cond->sizes());
      c.cm = c.rowwise ? Cond::Col : Cond::Row;
    }
  }
  return c;
}

// A cond as the kernels read it: [B, 2C] contiguous, or a full map in x's layout.
at::Tensor cond_as_read(const Call& c, const at::Tensor& cond) {
  return c.cm == Cond::Full ? cond.contiguous(c.fmt) : cond.contiguous();
}

// Slabs (b, d) of rows x cols cut into tiles of rb x cb, nrb x ncb per slab.
struct Plan {
  int64_t rows, cols;
  int64_t xb, xd, xgo, xr;  // x: offset of image b, of block d, of the gate half; row stride
  int64_t ob, od, orow;     // out / grad_out
  int64_t rb, cb, nrb, ncb, ntiles;
};

constexpr int64_t kTile = 4096;  // outputs per tile (a few us of work: many tiles, small overhead)

Plan make_plan(const Call& c) {
  Plan p;
  if (c.rowwise) {
    p.rows = c.P, p.cols = c.Cd;
    p.xb = c.P * c.C2, p.xd = 2 * c.Cd, p.xgo = c.Cd, p.xr = c.C2;
    p.ob = c.P * c.C, p.od = c.Cd, p.orow = c.C;
  } else {
    p.rows = c.Cd, p.cols = c.P;
    p.xb = c.C2 * c.P, p.xd = 2 * c.Cd * c.P, p.xgo = c.Cd * c.P, p.xr = c.P;
    p.ob = c.C * c.P, p.od = c.Cd * c.P, p.orow = c.P;
  }
  p.cb = std::min(p.cols, kTile);
  p.rb = std::clamp<int64_t>(kTile / p.cb, 1, p.rows);
  p.nrb = (p.rows + p.rb - 1) / p.rb, p.ncb = (p.cols + p.cb - 1) / p.cb;
  p.ntiles = c.B * c.dc * p.nrb * p.ncb;
  return p;
}

// Where a tile's grad_cond sums go for a [B, 2C] cond: Row: [slab][ncb][rows]; Col: [slab][nrb][cols].
int64_t partial_size(const Call& c, const Plan& p) {
  return c.cm == Cond::Row ? c.B * c.dc * p.ncb * p.rows : c.B * c.dc * p.nrb * p.cols;
}

template <class T>
struct Ptrs {
  const T* x;
  const T* cond = nullptr;
  T* out = nullptr;
  const T* go = nullptr;
  T* gx = nullptr;
  T* gc = nullptr;  // full: grad_cond itself; [B, 2C]: the partial sums (f half, then g half)
  int64_t half = 0;  // offset of the g half of the partial sums
};

template <class T>
Tile<T> tile_at(const Call& c, const Plan& p, const Ptrs<T>& q, int64_t i) {
  const int64_t slab = i / (p.nrb * p.ncb), ri = i / p.ncb % p.nrb, ci = i % p.ncb;
  const int64_t b = slab / c.dc, d = slab % c.dc, r0 = ri * p.rb, c0 = ci * p.cb;
  const int64_t xo = b * p.xb + d * p.xd + r0 * p.xr + c0, oo = b * p.ob + d * p.od + r0 * p.orow + c0;
  Tile<T> t{};
  t.rows = std::min(p.rb, p.rows - r0), t.cols = std::min(p.cb, p.cols - c0);
  t.f = q.x + xo, t.g = t.f + p.xgo, t.xr = p.xr;
  if (c.rowwise) {  // ~2 KiB of x ahead (1 to 8 KiB measured alike), into the slab's next tile too
    t.pf = std::max<int64_t>(1, 2048 / (p.xr * int64_t(sizeof(T))));
    t.pf_end = p.rows - r0;
  }
  t.orow = p.orow;
  if (q.out) t.o = q.out + oo;
  if (q.go) t.go = q.go + oo;
  if (q.gx) t.gxf = q.gx + xo, t.gxg = t.gxf + p.xgo;
  const int64_t co = b * c.C2 + d * 2 * c.Cd;  // [B, 2C] cond: this slab's f half; + Cd: its g half
  switch (c.cm) {
    case Cond::None: break;
    case Cond::Row:
      t.cf = q.cond + co + r0, t.cg = t.cf + c.Cd;
      if (q.gc) t.gcf = q.gc + (slab * p.ncb + ci) * p.rows + r0, t.gcg = t.gcf + q.half;
      break;
    case Cond::Col:
      t.cf = q.cond + co + c0, t.cg = t.cf + c.Cd;
      if (q.gc) t.gcf = q.gc + (slab * p.nrb + ri) * p.cols + c0, t.gcg = t.gcf + q.half;
      break;
    case Cond::Full:
      t.cf = q.cond + xo, t.cg = t.cf + p.xgo;
      if (q.gc) t.gcf = q.gc + xo, t.gcg = t.gcf + p.xgo;
      break;
  }
  return t;
}

// f(i) for tiles i in [0, n), handed out from a shared counter: a thread that
// runs slower (another process on its core) just takes fewer tiles.
template <class F>
void run_tiles(int64_t n, int64_t elems, const F& f) {
  const int64_t nthreads = std::min<int64_t>(at::get_num_threads(), n);
  if (nthreads <= 1 || elems < (int64_t(1) << 14) || at::in_parallel_region()) {  // forking would cost more
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) f(i);
  });
}

template <class T>
void forward_impl(const Call& c, const at::Tensor& x, const at::Tensor& cond, at::Tensor& out) {
  const Plan p = make_plan(c);
  const TileFn<T> fn = pick_kernel<T>(false, c.cm);
  Ptrs<T> q{x.data_ptr<T>()};
  if (cond.defined()) q.cond = cond.data_ptr<T>();
  q.out = out.data_ptr<T>();
  run_tiles(p.ntiles, out.numel(), [&](int64_t i) { fn(tile_at(c, p, q, i)); });
}

template <class T>
void backward_impl(const Call& c, const at::Tensor& go, const at::Tensor& x, const at::Tensor& cond, at::Tensor* gx,
                   at::Tensor* gc) {
  const Plan p = make_plan(c);
  const TileFn<T> fn = pick_kernel<T>(true, c.cm);
  Ptrs<T> q{x.data_ptr<T>()};
  if (cond.defined()) q.cond = cond.data_ptr<T>();
  q.go = go.data_ptr<T>();
  if (gx) q.gx = gx->data_ptr<T>();
  const bool sums = gc && (c.cm == Cond::Row || c.cm == Cond::Col);
  std::vector<T> partial;
  if (sums) {
    q.half = partial_size(c, p);
    partial.resize(2 * q.half);
    q.gc = partial.data();
  } else if (gc) {
    q.gc = gc->data_ptr<T>();
  }
  run_tiles(p.ntiles, go.numel(), [&](int64_t i) { fn(tile_at(c, p, q, i)); });
  if (!sums) return;
  // the tiles' sums, added in a fixed order, into grad_cond [B, 2C]
  T* out = gc->data_ptr<T>();
  const int64_t n = c.cm == Cond::Row ? p.ncb : p.nrb, len = c.cm == Cond::Row ? p.rows : p.cols;
  for (int64_t slab = 0; slab < c.B * c.dc; ++slab) {
    T* of = out + slab / c.dc * c.C2 + slab % c.dc * 2 * c.Cd;
    for (int h = 0; h < 2; ++h) {
      const T* src = q.gc + h * q.half + slab * n * len;
      T* dst = of + h * c.Cd;
      std::copy(src, src + len, dst);
      for (int64_t k = 1; k < n; ++k)
        for (int64_t j = 0; j < len; ++j) dst[j] += src[k * len + j];
    }
  }
}

// ---- the ops --------------------------------------------------------------------------------------------

const at::Tensor* cond_ptr(const std::optional<at::Tensor>& cond) {
  return cond.has_value() && cond->defined() ? &*cond : nullptr;
}

at::Tensor gated_activation_forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& cond,
                                        int64_t data_channels) {
  const char* op = "fastgen::gated_activation_forward";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls inside are not recorded
  const Call c = check_call(op, x, cond_ptr(cond), data_channels);
  // the output is channels_last when x is (as F.conv2d does), else contiguous
  at::Tensor out = at::empty(c.out_shape, x.options().memory_format(c.fmt));
  if (out.numel() == 0) return out;
  const at::Tensor xc = x.contiguous(c.fmt);
  const at::Tensor cc = c.cm == Cond::None ? at::Tensor() : cond_as_read(c, *cond);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gated_activation_forward",
                             [&] { forward_impl<scalar_t>(c, xc, cc, out); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_activation_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                                 const std::optional<at::Tensor>& cond,
                                                                 int64_t data_channels,
                                                                 const c10::List<bool>& output_mask) {
  const char* op = "fastgen::gated_activation_backward";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Call c = check_call(op, x, cond_ptr(cond), data_channels);
  TORCH_CHECK(output_mask.size() == 2, op, ": output_mask must have 2 entries (grad_x, grad_cond), got ",
              output_mask.size());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out must have x's dtype ", x.scalar_type(),
              ", got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == x.device(), op, ": grad_out must be on x's device ", x.device(), ", got ",
              grad_out.device());
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(c.out_shape), op, ": grad_out must have the output's shape ",
              at::IntArrayRef(c.out_shape), " (x's with ", c.C, " channels), got ", grad_out.sizes());
  // entries not asked for come back empty; grad_x has x's layout (as read), grad_cond cond's shape
  const bool want_x = output_mask[0], want_c = output_mask[1] && c.cm != Cond::None;
  at::Tensor gx = want_x ? at::empty(x.sizes(), x.options().memory_format(c.fmt)) : at::empty({0}, x.options());
  at::Tensor gc = !want_c                ? at::empty({0}, x.options())
                  : c.cm == Cond::Full ? at::empty(x.sizes(), x.options().memory_format(c.fmt))
                                       : at::empty({c.B, c.C2}, x.options());
  if (!want_x && !want_c) return {gx, gc};
  if (x.numel() == 0) {  // no positions: a [B, 2C] grad_cond sums nothing
    gc.zero_();
    return {gx, gc};
  }
  const at::Tensor xc = x.contiguous(c.fmt), goc = grad_out.contiguous(c.fmt);
  const at::Tensor cc = c.cm == Cond::None ? at::Tensor() : cond_as_read(c, *cond);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gated_activation_backward", [&] {
    backward_impl<scalar_t>(c, goc, xc, cc, want_x ? &gx : nullptr, want_c ? &gc : nullptr);
  });
  return {gx, gc};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen, CPU, m) {
  m.impl("gated_activation_forward", &gated_activation_forward_cpu);
  m.impl("gated_activation_backward", &gated_activation_backward_cpu);
}
