// masked_conv2d on CPU: the `cpp` backend (fastgen.ops.masked_conv).
//
// The masked (causal) convolution of PixelCNN computes only the visible taps:
// the kernel rows above the centre, the centre row left of the centre, and the
// centre itself for the channel pairs the colour rule opens (mask A: input
// colour block < output block; mask B: <=). See fastgen/ref/masked_conv.py.
// mask_type 'V' runs every tap with an output as tall as the input (the Gated
// PixelCNN's vertical stack and its down-shifted link: csrc/masked_conv_shape.h).
//
// Design (AVX-512): direct convolutions whose accumulators are vectors of
// output channels (16 floats / 8 doubles), so that every sum over input
// channels, taps and positions stays in the lanes and is written once:
//
//   * forward: a tile is 6 output pixels x 4 vectors (64 channels) = 24
//     accumulators; for each visible tap and input channel it loads 4 weight
//     vectors (weights packed [tap][c_in][c_out]) and broadcasts the 6 input
//     values (4 + 6 loads per 24 FMAs). The input is first copied into a
//     zero-padded buffer (the padding the taps reach, nothing more), in the
//     layout it came in (NCHW, or NHWC for channels_last), so no tap needs a
//     bounds check. A task (48 pixels) collects its tiles in an L1 buffer and
//     writes them out NCHW through 16 x 16 register transposes (or as they are,
//     for a channels_last output).
//   * grad_x: the same kernel with the taps mirrored, reading grad_out
//     (transposed once into a zero-padded NHWC buffer) and the weights
//     transposed.
//   * grad_w: a tile is 6 input channels x 4 vectors of output channels; per
//     output position it broadcasts 6 input values and loads 4 grad_out vectors
//     from that NHWC buffer; per output row and tap only the columns whose
//     input is inside the image are visited, so padding costs nothing.
//   * work is handed out in small blocks from an atomic counter (a core that
//     another process is using just takes fewer blocks). grad_w, a sum over
//     chunks of output rows, is deterministic instead (parallel_parts): each
//     thread adds a fixed, contiguous part of the chunks in order into its own
//     sums, and the parts are added in order while unpacking, so the same
//     inputs give the same bits for a given thread count.
//
// Layout: channels_last inputs are read in place and answered in channels_last
// (as F.conv2d does); anything else is read NCHW-contiguous, answered NCHW.
//
// The AVX-512 section is compiled for that ISA only (the rest of the file is
// not) and chosen at run time. Other CPUs take a portable path: one GEMM per
// tap through ATen on a padded channels-last copy (3-4x slower than AVX-512 here);
// FASTGEN_CPU_KERNEL=generic forces it (for tests).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "masked_conv_args.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string_view>
#include <tuple>
#include <vector>

#include "cpu/cpu_features.h"  // FASTGEN_AVX512, fastgen::use_avx512()
#include "cpu/vec_math.h"      // fastgen::vec512::Lanes

namespace {

using fastgen::channels_last;

// ---- the problem, checked -------------------------------------------------------------------------------

struct Tap {
  int64_t i, j;
};

// The geometry (fastgen::MaskedConvShape, checked in csrc/masked_conv_args.h) and the visible taps.
struct Conv : fastgen::MaskedConvShape {
  std::vector<Tap> taps;  // the visible taps in raster order (the centre last, if any of it is visible)

  bool is_centre(const Tap& t) const { return !vertical && t.i == kh / 2 && t.j == kw / 2; }
  // The colour rule at the centre tap (every other visible tap sees all channel pairs).
  bool centre_open(int64_t co, int64_t ci) const {
    int64_t g = co / (Co / data_channels), h = ci / (Ci / data_channels);
    return strict ? h < g : h <= g;
  }
  bool visible(const Tap& t, int64_t co, int64_t ci) const { return !is_centre(t) || centre_open(co, ci); }
};

Conv make_conv(const char* op, const at::Tensor& x, const at::Tensor& weight, std::string_view mask_type,
               int64_t data_channels, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble), op,
              ": the CPU kernel takes 4-D float32 and float64 input, got ", x.scalar_type(), " ", x.sizes());
  Conv c;
  static_cast<fastgen::MaskedConvShape&>(c) =
      fastgen::masked_conv_shape(op, x, weight, mask_type, data_channels, padding, dilation, /*allow_vertical=*/true);
  if (c.vertical) {  // every tap, in raster order
    for (int64_t i = 0; i < c.kh; ++i)
      for (int64_t j = 0; j < c.kw; ++j) c.taps.push_back({i, j});
    return c;
  }
  const int64_t ch = c.kh / 2, cw = c.kw / 2;
  for (int64_t i = 0; i < ch; ++i)
    for (int64_t j = 0; j < c.kw; ++j) c.taps.push_back({i, j});
  for (int64_t j = 0; j < cw; ++j) c.taps.push_back({ch, j});
  // The centre is fully hidden only for mask A with one colour block.
  if (!(c.strict && c.data_channels == 1)) c.taps.push_back({ch, cw});
  return c;
}

// ---- geometry shared by the kernels ------------------------------------------------------------------


// One direction of the convolution: output pixel (oy, ox) of an [Hout, Wout]
// image reads input pixel (oy + dy[t], ox + dx[t]) of an [Hin, Win] image at tap
// t. (top, bottom, left, right): the zero padding those reads need.
struct Geo {
  int64_t Hout, Wout, Hin, Win;
  std::vector<int64_t> dy, dx;
  int64_t top = 0, bottom = 0, left = 0, right = 0;

  int64_t Hp() const { return top + Hin + bottom; }
  int64_t Wp() const { return left + Win + right; }
  void fit_padding() {
    for (size_t t = 0; t < dy.size(); ++t) {
      top = std::max(top, -dy[t]);
      bottom = std::max(bottom, Hout - 1 + dy[t] - (Hin - 1));
      left = std::max(left, -dx[t]);
      right = std::max(right, Wout - 1 + dx[t] - (Win - 1));
    }
  }
};

Geo forward_geo(const Conv& c) {
  Geo g{c.Ho, c.Wo, c.H, c.W, {}, {}};
  for (const Tap& t : c.taps) g.dy.push_back(t.i * c.dh - c.ph), g.dx.push_back(t.j * c.dw - c.pw);
  g.fit_padding();
  return g;
}

// grad_x[ci] at (y, x) gathers grad_out[co] at (y + ph - i*dh, x + pw - j*dw).
Geo grad_x_geo(const Conv& c) {
  Geo g{c.H, c.W, c.Ho, c.Wo, {}, {}};
  for (const Tap& t : c.taps) g.dy.push_back(c.ph - t.i * c.dh), g.dx.push_back(c.pw - t.j * c.dw);
  g.fit_padding();
  return g;
}

// A zero-padded copy of an image batch: element (b, c, row, col) of the padded
// image at data + b*img + c*cs + (row*Wp + col)*ps.
template <class T>
struct Padded {
  at::Tensor buf;
  const T* data;
  int64_t img, cs, ps, Wp;
};

// x [B][C][Hin][Win] (NCHW-contiguous, or channels_last: then the copy is NHWC)
// into the padding `g` asks for. Only the border is zeroed.
template <class T>
Padded<T> pad_input(const at::Tensor& x, const Geo& g) {
  const int64_t B = x.size(0), C = x.size(1), H = g.Hin, W = g.Win, Hp = g.Hp(), Wp = g.Wp();
  const bool nhwc = channels_last(x);
  const at::Tensor xc = nhwc ? x : x.contiguous();
  const T* src = xc.data_ptr<T>();
  if (Hp == H && Wp == W)  // no padding (a 1x1 kernel): the input as it is
    return nhwc ? Padded<T>{xc, src, H * W * C, 1, C, W} : Padded<T>{xc, src, C * H * W, H * W, 1, W};
  at::Tensor buf = at::empty({B * C * Hp * Wp}, x.options());
  T* dst = buf.data_ptr<T>();
  if (!nhwc) {  // plane by plane: zero rows, then (zeros, row, zeros)
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bc = begin; bc < end; ++bc) {
        T* d = dst + bc * Hp * Wp;
        const T* s = src + bc * H * W;
        std::fill(d, d + g.top * Wp, T(0));
        for (int64_t r = 0; r < H; ++r) {
          T* dr = d + (g.top + r) * Wp;
          for (int64_t k = 0; k < g.left; ++k) dr[k] = T(0);  // rows are short: plain loops, no library calls
          for (int64_t k = 0; k < W; ++k) dr[g.left + k] = s[r * W + k];
          for (int64_t k = g.left + W; k < Wp; ++k) dr[k] = T(0);
        }
        std::fill(d + (g.top + H) * Wp, d + Hp * Wp, T(0));
      }
    });
    return {buf, dst, C * Hp * Wp, Hp * Wp, 1, Wp};
  }
  at::parallel_for(0, B * Hp, 1, [&](int64_t begin, int64_t end) {  // row by row, pixels of C channels
    for (int64_t br = begin; br < end; ++br) {
      const int64_t b = br / Hp, r = br % Hp - g.top;
      T* d = dst + br * Wp * C;
      if (r < 0 || r >= H) {
        std::fill(d, d + Wp * C, T(0));
        continue;
      }
      std::fill(d, d + g.left * C, T(0));
      std::copy(src + (b * H + r) * W * C, src + (b * H + r + 1) * W * C, d + g.left * C);
      std::fill(d + (g.left + W) * C, d + Wp * C, T(0));
    }
  });
  return {buf, dst, Hp * Wp * C, 1, C, Wp};
}

// Weights packed [tap][c_in][Cop] (c_out innermost, rounded up to whole vectors
// with zeros; zero too for the centre pairs the colour rule hides).
// `transposed` packs for grad_x, where the roles of Ci and Co swap.
// One permuted copy first, so that every row is a contiguous copy.
template <class T>
at::Tensor pack_weight(const Conv& c, const at::Tensor& weight, int64_t Cop, bool transposed) {
  const int64_t nin = transposed ? c.Co : c.Ci, nout = transposed ? c.Ci : c.Co;
  const at::Tensor w = (transposed ? weight.permute({2, 3, 0, 1}) : weight.permute({2, 3, 1, 0})).contiguous();
  // w: [kh][kw][nin][nout]
  const T* wp = w.data_ptr<T>();
  const int64_t nt = static_cast<int64_t>(c.taps.size());
  at::Tensor out = at::zeros({nt * nin * Cop}, weight.options());
  T* o = out.data_ptr<T>();
  for (int64_t t = 0; t < nt; ++t) {
    const Tap& tap = c.taps[t];
    const bool hides = c.is_centre(tap) && (c.strict || c.data_channels > 1);  // else every pair is visible
    const T* src = wp + (tap.i * c.kw + tap.j) * nin * nout;
    for (int64_t k = 0; k < nin; ++k) {
      T* dst = o + (t * nin + k) * Cop;
      std::copy(src + k * nout, src + (k + 1) * nout, dst);
      if (hides)
        for (int64_t n = 0; n < nout; ++n)
          if (!(transposed ? c.centre_open(k, n) : c.centre_open(n, k))) dst[n] = T(0);
    }
  }
  return out;
}

// Tasks [0, n) handed out in blocks of `block` from a shared counter: a thread
// that runs slower (another process on its core) just takes fewer blocks, where
// at::parallel_for's fixed shares would make the whole call wait for it.
// f(thread, begin, end) with thread < at::get_num_threads().
template <class F>
void parallel_dynamic(int64_t n, int64_t block, const F& f) {
  std::atomic<int64_t> next{0};
  const int64_t nthreads = std::min<int64_t>(at::get_num_threads(), (n + block - 1) / block);
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    const int tid = at::get_thread_num();
    for (int64_t b; (b = next.fetch_add(block)) < n;) f(tid, b, std::min(n, b + block));
  });
}

// A sum over chunks of work that comes out the same however the threads are scheduled (grad_w's sum over
// output rows): the chunks are cut into `parts` contiguous ranges (one per thread, fewer when there are fewer
// chunks) and the tiles into `tile_groups` (so that a few chunks still keep every thread busy; tiles write
// disjoint sums). Item (part, tile group) adds its chunks in order, chunk-major over its tiles (a chunk stays in
// cache while its tiles pass over it), into the part's sums, which stay in that thread's cache; the caller adds
// the parts in order. f(part, chunk, tile, first): first = the part's first chunk (it stores rather than adds,
// so the sums need no zero fill). The same bits for a given thread count.
struct Parts {
  int64_t parts, tile_groups;
};

Parts sum_parts(int64_t nchunks, int64_t ntiles) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t parts = std::clamp<int64_t>(threads, 1, std::max<int64_t>(1, nchunks));
  return {parts, std::clamp<int64_t>((threads + parts - 1) / parts, 1, std::max<int64_t>(1, ntiles))};
}

template <class F>
void parallel_parts(int64_t nchunks, int64_t ntiles, const Parts& s, const F& f) {
  at::parallel_for(0, s.parts * s.tile_groups, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t p = i / s.tile_groups, q = i % s.tile_groups;
      const int64_t c0 = p * nchunks / s.parts, c1 = (p + 1) * nchunks / s.parts;
      const int64_t j0 = q * ntiles / s.tile_groups, j1 = (q + 1) * ntiles / s.tile_groups;
      for (int64_t k = c0; k < c1; ++k)
        for (int64_t j = j0; j < j1; ++j) f(p, k, j, k == c0);
    }
  });
}

// The convolution kernel (forward and grad_x): out[q][co] = bias[co] + sum over
// taps t and input channels k of w[t][k][co] * in(pixel q shifted by tap t, k).
template <class T>
struct ConvArgs {
  const T* in;  // padded input (Padded)
  int64_t in_img, cs, ps, Wp, nin;
  const T* w;  // [ntaps][nin][Cop]
  int64_t Cop;
  const T* bias;         // [Cop] or nullptr
  const int64_t* toff;   // [ntaps]: (dy + top) * Wp + dx + left, in pixels
  int64_t ntaps, Hout, Wout;
  T* out;  // [B][nout][Hout][Wout], or [B][Hout][Wout][nout] when out_cl
  int64_t nout;
  bool out_cl;
};

// The grad_w kernel: gw[t][ci][co] = sum over images and output pixels of
// x[ci] at the pixel shifted by tap t * grad_out[co] at the pixel.
template <class T>
struct WgradArgs {
  const Conv* c;
  const Geo* geo;  // the forward geometry (dy, dx)
  const T* x;      // x[b][ci][iy][ix] at x + b*x_img + ci*x_cs + (iy*W + ix)*x_ps
  int64_t x_img, x_cs, x_ps;
  const T* g;      // grad_out pixel (b, oy, ox) at g + b*g_img + ((oy + g_top)*g_Wp + ox + g_left)*Cop
  int64_t g_img, g_top, g_left, g_Wp, Cop;
  int64_t rows_per_chunk;
};

#ifdef FASTGEN_AVX512
// ---- AVX-512 kernels (this section only is compiled for AVX-512F) ---------------------------------------
FASTGEN_AVX512_BEGIN

namespace avx512 {

template <class T>
using Vec = fastgen::vec512::Lanes<T>;  // the lane operations (csrc/cpu/vec_math.h)

// Convolution tile: PM pixels x NV vectors of output channels (NV <= 4: 24
// accumulators of 32 registers). Input channels go in blocks of CB so that the
// input lines a tile reads stay in L1 across the taps.
constexpr int PM = 6, CB = 16;

// Pixels p0 .. p0+np-1 (np <= PM) of image b, channels co0 .. co0 + NV*L - 1,
// into dst[pixel][ldd].
template <class T, int NV>
void conv_tile(const ConvArgs<T>& a, int64_t b, int64_t p0, int64_t np, int64_t co0, T* dst, int64_t ldd) {
  using V = Vec<T>;
  using R = typename V::R;
  constexpr int L = V::L;
  const int64_t cs = a.cs, Cop = a.Cop;
  int64_t off[PM];  // each pixel's offset in the padded input (the tail repeats the last pixel, not stored)
  for (int m = 0; m < PM; ++m) {
    const int64_t p = p0 + std::min<int64_t>(m, np - 1), oy = p / a.Wout, ox = p % a.Wout;
    off[m] = b * a.in_img + (oy * a.Wp + ox) * a.ps;
  }
  R acc[PM][NV];
#pragma GCC unroll 4
  for (int k = 0; k < NV; ++k) {
    const R b0 = a.bias ? V::load(a.bias + co0 + k * L) : V::zero();
#pragma GCC unroll 8
    for (int m = 0; m < PM; ++m) acc[m][k] = b0;
  }
  for (int64_t c0 = 0; c0 < a.nin; c0 += CB) {
    const int64_t c1 = std::min(a.nin, c0 + CB);
    for (int64_t t = 0; t < a.ntaps; ++t) {
      const T* xp[PM];
#pragma GCC unroll 8
      for (int m = 0; m < PM; ++m) xp[m] = a.in + (off[m] + a.toff[t] * a.ps + c0 * cs);
      const T* wt = a.w + (t * a.nin + c0) * Cop + co0;
      int64_t idx = 0;
      for (int64_t k = c0; k < c1; ++k, wt += Cop, idx += cs) {
        R wv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) wv[v] = V::load(wt + v * L);
#pragma GCC unroll 8
        for (int m = 0; m < PM; ++m) {
          const R xv = V::set1(xp[m][idx]);
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[m][v] = V::fma(xv, wv[v], acc[m][v]);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < PM; ++m)
    if (m < np)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) V::store(dst + m * ldd + v * L, acc[m][v]);
}

// Tasks are (image, block of QB pixels, block of 4 vectors of channels), channel
// blocks inner (they share the input). A task computes its tiles into a small
// buffer and transposes it into the NCHW output while it is in L1.
constexpr int QB = 8 * PM;

template <class T>
void to_channels_first(const T* src, int64_t lds, int64_t C, int64_t n, T* dst, int64_t ldd);

template <class T>
void conv_tasks(const ConvArgs<T>& a, int64_t begin, int64_t end) {
  constexpr int L = Vec<T>::L, LDB = 4 * L;
  alignas(64) T buf[QB * LDB];
  const int64_t P = a.Hout * a.Wout, nq = (P + QB - 1) / QB, nvec = a.Cop / L, nblk = (nvec + 3) / 4;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / (nq * nblk), p0 = task / nblk % nq * QB, blk = task % nblk, co0 = blk * 4 * L;
    const int64_t np = std::min<int64_t>(QB, P - p0), nv = std::min<int64_t>(4, nvec - blk * 4);
    for (int64_t s = 0; s < np; s += PM) {
      const int64_t n = std::min<int64_t>(PM, np - s);
      switch (nv) {
        case 4: conv_tile<T, 4>(a, b, p0 + s, n, co0, buf + s * LDB, LDB); break;
        case 3: conv_tile<T, 3>(a, b, p0 + s, n, co0, buf + s * LDB, LDB); break;
        case 2: conv_tile<T, 2>(a, b, p0 + s, n, co0, buf + s * LDB, LDB); break;
        default: conv_tile<T, 1>(a, b, p0 + s, n, co0, buf + s * LDB, LDB); break;
      }
    }
    const int64_t nc = std::min<int64_t>(nv * L, a.nout - co0);
    if (a.out_cl)
      for (int64_t m = 0; m < np; ++m) std::copy(buf + m * LDB, buf + m * LDB + nc, a.out + (b * P + p0 + m) * a.nout + co0);
    else
      to_channels_first(buf, LDB, nc, np, a.out + (b * a.nout + co0) * P + p0, P);
  }
}

// dst[q][c] = src[c][q] for a 16 x 16 (fp32) or 8 x 8 (fp64) block; src rows
// are ls apart, dst rows ld. Register transposes: unpacks, then 128-bit block
// shuffles.
inline void transpose_block(const float* src, int64_t ls, float* dst, int64_t ld) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ls);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i)
    for (int k = 0; k < 2; ++k) {
      const __m512d a = _mm512_castps_pd(t[4 * i + k]), b = _mm512_castps_pd(t[4 * i + 2 + k]);
      r[4 * i + 2 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      r[4 * i + 2 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  for (int i = 0; i < 2; ++i)
    for (int k = 0; k < 4; ++k) {
      t[8 * i + k] = _mm512_shuffle_f32x4(r[8 * i + k], r[8 * i + 4 + k], 0x88);
      t[8 * i + 4 + k] = _mm512_shuffle_f32x4(r[8 * i + k], r[8 * i + 4 + k], 0xDD);
    }
  for (int k = 0; k < 8; ++k) {
    r[k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0x88);
    r[8 + k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0xDD);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ld, r[i]);
}
inline void transpose_block(const double* src, int64_t ls, double* dst, int64_t ld) {
  __m512d r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm512_loadu_pd(src + i * ls);
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm512_unpacklo_pd(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_pd(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {
    const __m512d a = _mm512_shuffle_f64x2(t[h], t[2 + h], 0x88), b = _mm512_shuffle_f64x2(t[h], t[2 + h], 0xDD);
    const __m512d c = _mm512_shuffle_f64x2(t[4 + h], t[6 + h], 0x88), d = _mm512_shuffle_f64x2(t[4 + h], t[6 + h], 0xDD);
    r[h] = _mm512_shuffle_f64x2(a, c, 0x88);
    r[4 + h] = _mm512_shuffle_f64x2(a, c, 0xDD);
    r[2 + h] = _mm512_shuffle_f64x2(b, d, 0x88);
    r[6 + h] = _mm512_shuffle_f64x2(b, d, 0xDD);
  }
  for (int i = 0; i < 8; ++i) _mm512_storeu_pd(dst + i * ld, r[i]);
}

// Channels-last [n][lds] -> channels-first [C][ldd] (n pixels of C channels).
template <class T>
void to_channels_first(const T* src, int64_t lds, int64_t C, int64_t n, T* dst, int64_t ldd) {
  constexpr int64_t L = Vec<T>::L;
  for (int64_t c0 = 0; c0 < C; c0 += L) {
    const int64_t c1 = std::min(C, c0 + L), nfull = c1 - c0 == L ? n / L * L : 0;
    for (int64_t p0 = 0; p0 < nfull; p0 += L) transpose_block(src + p0 * lds + c0, lds, dst + c0 * ldd + p0, ldd);
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t p = nfull; p < n; ++p) dst[c * ldd + p] = src[p * lds + c];
  }
}

// Channels-first [C][Hin][Win] -> the interior of a zero-padded channels-last
// image [Hp][Wp][ld] (border and channels past C already zero), row by row.
template <class T>
void to_channels_last_padded(const T* src, int64_t C, int64_t H, int64_t W, T* dst, int64_t Wp, int64_t ld) {
  constexpr int64_t L = Vec<T>::L;
  for (int64_t c0 = 0; c0 < C; c0 += L) {
    const int64_t c1 = std::min(C, c0 + L), wfull = c1 - c0 == L ? W / L * L : 0;
    for (int64_t r = 0; r < H; ++r) {
      const T* s = src + r * W;
      T* d = dst + r * Wp * ld;
      for (int64_t x0 = 0; x0 < wfull; x0 += L) transpose_block(s + c0 * H * W + x0, H * W, d + x0 * ld + c0, ld);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t x = wfull; x < W; ++x) d[x * ld + c] = s[c * H * W + x];
    }
  }
}

// grad_w: gw[t][ci][co] += x[ci] at each output pixel shifted by tap t * grad_out[co] there.
// A tile: WR input channels x NV vectors of output channels (NV <= 4: 24
// accumulators); per output pixel and tap 6 broadcasts + 4 loads per 24 FMAs.
// Per output row and tap only the columns whose input is inside the image are
// visited, so zero padding costs nothing.
constexpr int WR = 6;

// A grad_w tile's sums s[r][0..NV*L) (shared by the direct and the Winograd grad_w).
template <class T, int NV>
struct WgradAcc {
  using V = Vec<T>;
  using R = typename V::R;
  static constexpr int L = V::L;
  R s[WR][NV];

  WgradAcc() {
#pragma GCC unroll 8
    for (int r = 0; r < WR; ++r)
#pragma GCC unroll 4
      for (int k = 0; k < NV; ++k) s[r][k] = V::zero();
  }
  // += x(m, r) * g(m) for m < n: x(m, r) at x[m * xstep + xoff[r]], g(m)'s NV vectors at g + m * gstep.
  __attribute__((always_inline)) inline void add(const T* x, int64_t xstep, const int64_t* xoff, const T* g,
                                                 int64_t gstep, int64_t n) {
    for (int64_t m = 0; m < n; ++m, x += xstep, g += gstep) {
      R gv[NV];
#pragma GCC unroll 4
      for (int k = 0; k < NV; ++k) gv[k] = V::load(g + k * L);
#pragma GCC unroll 8
      for (int r = 0; r < WR; ++r) {
        const R xv = V::set1(x[xoff[r]]);
#pragma GCC unroll 4
        for (int k = 0; k < NV; ++k) s[r][k] = V::fma(xv, gv[k], s[r][k]);
      }
    }
  }
  // dst[r * ld + ..] = s[r] (first) or += s[r], for the rows r < nr.
  __attribute__((always_inline)) inline void flush(int64_t nr, T* dst, int64_t ld, bool first) const {
#pragma GCC unroll 8
    for (int r = 0; r < WR; ++r)
      if (r < nr)
#pragma GCC unroll 4
        for (int k = 0; k < NV; ++k)
          V::store(dst + r * ld + k * L, first ? s[r][k] : V::add(V::load(dst + r * ld + k * L), s[r][k]));
  }
};

template <class T, int NV>
void wgrad_tile(const WgradArgs<T>& a, int64_t row0, int64_t row1, int64_t t, int64_t ci0, int64_t co0, T* gw,
                bool first) {
  const Conv& c = *a.c;
  const int64_t dy = a.geo->dy[t], dx = a.geo->dx[t], Cop = a.Cop, xps = a.x_ps;
  const int64_t lo = std::max<int64_t>(0, -dx), hi = std::min<int64_t>(c.Wo, c.W - dx);
  const int64_t nr = std::min<int64_t>(WR, c.Ci - ci0);
  int64_t xoff[WR];  // channels past the last one read the last one again (and are not written)
  for (int r = 0; r < WR; ++r) xoff[r] = std::min<int64_t>(r, nr - 1) * a.x_cs;
  WgradAcc<T, NV> acc;
  for (int64_t row = row0; row < row1; ++row) {
    const int64_t b = row / c.Ho, oy = row % c.Ho, iy = oy + dy;
    if (iy < 0 || iy >= c.H || lo >= hi) continue;
    const T* xr = a.x + b * a.x_img + ci0 * a.x_cs + (iy * c.W + lo + dx) * xps;
    const T* gr = a.g + b * a.g_img + ((oy + a.g_top) * a.g_Wp + lo + a.g_left) * Cop + co0;
    acc.add(xr, xps, xoff, gr, Cop, hi - lo);
  }
  acc.flush(nr, gw + (t * c.Ci + ci0) * Cop + co0, Cop, first);
}

// One item of grad_w: tile `tile` (WR input channels x 4 vectors of output channels) over chunk `chunk` of
// output rows, every tap, into its part's gw [ntaps][Ci][Cop]. Each part goes chunk-major (parallel_parts), so
// that a chunk stays in cache while its tiles pass over it.
template <class T>
void wgrad_item(const WgradArgs<T>& a, T* gw, int64_t chunk, int64_t tile, bool first) {
  constexpr int L = Vec<T>::L;
  const Conv& c = *a.c;
  const int64_t nt = static_cast<int64_t>(c.taps.size()), nrows = c.B * c.Ho;
  const int64_t nco = (a.Cop / L + 3) / 4;
  const int64_t row0 = chunk * a.rows_per_chunk, row1 = std::min(nrows, row0 + a.rows_per_chunk);
  const int64_t ci0 = tile / nco * WR, co0 = tile % nco * 4 * L;
  for (int64_t t = 0; t < nt; ++t) {
    switch (std::min<int64_t>(4, (a.Cop - co0) / L)) {
      case 4: wgrad_tile<T, 4>(a, row0, row1, t, ci0, co0, gw, first); break;
      case 3: wgrad_tile<T, 3>(a, row0, row1, t, ci0, co0, gw, first); break;
      case 2: wgrad_tile<T, 2>(a, row0, row1, t, ci0, co0, gw, first); break;
      default: wgrad_tile<T, 1>(a, row0, row1, t, ci0, co0, gw, first); break;
    }
  }
}

// ---- the three computations on AVX-512 ----

// out [B][nout][Hout][Wout] (NCHW, or channels_last) = the convolution of the
// padded input `in` with the weights packed by pack_weight, plus bias.
template <class T>
void run_conv(const Conv& c, const Geo& geo, const Padded<T>& in, int64_t nin, const at::Tensor& wpk,
              const T* bias, int64_t nout, int64_t Cop, at::Tensor& out) {
  const int64_t nt = static_cast<int64_t>(c.taps.size()), P = geo.Hout * geo.Wout;
  std::vector<int64_t> toff(nt);
  for (int64_t t = 0; t < nt; ++t) toff[t] = (geo.dy[t] + geo.top) * in.Wp + geo.dx[t] + geo.left;
  const ConvArgs<T> a{in.data, in.img, in.cs, in.ps, in.Wp, nin, wpk.data_ptr<T>(), Cop, bias, toff.data(),
                      nt, geo.Hout, geo.Wout, out.data_ptr<T>(), nout, channels_last(out)};
  const int64_t ntasks = c.B * ((P + QB - 1) / QB) * ((Cop / Vec<T>::L + 3) / 4);
  parallel_dynamic(ntasks, 2, [&](int, int64_t b, int64_t e) { conv_tasks<T>(a, b, e); });
}

// A batch [B][C][Hin][Win] (NCHW-contiguous: transposed; channels_last: copied)
// -> a zero-padded channels-last buffer [B][Hp][Wp][ld] with the padding `geo`
// asks for (ld >= C; zeros past C). With `sum` ([C]), also the sum of x over
// batch, rows and columns (grad_out's: the bias gradient) while each image is
// still in cache: each row summed in vectors, rows and images added in double,
// images in order (the same result for any number of threads).
template <class T>
Padded<T> pad_channels_last(const at::Tensor& x, const Geo& geo, int64_t ld, at::Tensor* sum = nullptr) {
  using V = Vec<T>;
  const int64_t B = x.size(0), C = x.size(1), H = geo.Hin, W = geo.Win, Hp = geo.Hp(), Wp = geo.Wp();
  const bool cl = channels_last(x);
  const at::Tensor xc = cl ? x : x.contiguous();
  at::Tensor buf = at::empty({B * Hp * Wp * ld}, x.options());
  T* dst = buf.data_ptr<T>();
  const T* src = xc.data_ptr<T>();
  std::vector<double> sums(sum ? B * ld : 0, 0.0);  // per image
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      // zero only what the copy below does not write: border rows and columns, and lanes C..ld
      T* img = dst + b * Hp * Wp * ld;
      std::fill(img, img + geo.top * Wp * ld, T(0));
      std::fill(img + (geo.top + H) * Wp * ld, img + Hp * Wp * ld, T(0));
      for (int64_t r = geo.top; r < geo.top + H; ++r) {
        T* row = img + r * Wp * ld;
        std::fill(row, row + geo.left * ld, T(0));
        std::fill(row + (geo.left + W) * ld, row + Wp * ld, T(0));
        if (ld > C)
          for (int64_t q = geo.left; q < geo.left + W; ++q) std::fill(row + q * ld + C, row + (q + 1) * ld, T(0));
      }
      T* d = dst + ((b * Hp + geo.top) * Wp + geo.left) * ld;
      if (!cl)
        to_channels_last_padded(src + b * C * H * W, C, H, W, d, Wp, ld);
      else
        for (int64_t r = 0; r < H; ++r)
          for (int64_t q = 0; q < W; ++q)
            std::copy(src + ((b * H + r) * W + q) * C, src + ((b * H + r) * W + q + 1) * C, d + (r * Wp + q) * ld);
      if (!sum) continue;
      double* s = sums.data() + b * ld;
      alignas(64) T part[V::L];
      for (int64_t r = 0; r < H; ++r)
        for (int64_t c = 0; c < ld; c += V::L) {
          typename V::R acc = V::zero();
          for (int64_t q = 0; q < W; ++q) acc = V::add(acc, V::load(d + (r * Wp + q) * ld + c));
          V::store(part, acc);
          for (int l = 0; l < V::L; ++l) s[c + l] += part[l];
        }
    }
  });
  if (sum) {
    T* out = sum->data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) {
      double t = 0.0;
      for (int64_t b = 0; b < B; ++b) t += sums[b * ld + c];
      out[c] = static_cast<T>(t);
    }
  }
  return {buf, dst, Hp * Wp * ld, 1, ld, Wp};
}

template <class T>
void forward(const Conv& c, const at::Tensor& x, const at::Tensor& weight, const at::Tensor* bias, at::Tensor& out) {
  constexpr int64_t L = Vec<T>::L;
  const int64_t Cop = (c.Co + L - 1) / L * L;
  const Geo geo = forward_geo(c);
  const Padded<T> in = pad_input<T>(x, geo);
  const at::Tensor wpk = pack_weight<T>(c, weight, Cop, /*transposed=*/false);
  at::Tensor bpad;
  if (bias) bpad = at::constant_pad_nd(bias->contiguous(), {0, Cop - c.Co}, 0);
  run_conv<T>(c, geo, in, c.Ci, wpk, bias ? bpad.data_ptr<T>() : nullptr, c.Co, Cop, out);
}

// grad_x: the convolution of grad_out (padded channels-last) with the mirrored taps and transposed weights.
template <class T>
void grad_x(const Conv& c, const Padded<T>& gpad, const Geo& gx_geo, const at::Tensor& weight, at::Tensor& gx) {
  constexpr int64_t L = Vec<T>::L;
  const int64_t Cip = (c.Ci + L - 1) / L * L;
  const at::Tensor wpk = pack_weight<T>(c, weight, Cip, /*transposed=*/true);
  run_conv<T>(c, gx_geo, gpad, c.Co, wpk, nullptr, c.Ci, Cip, gx);
}

template <class T>
void grad_w(const Conv& c, const Padded<T>& gpad, int64_t Cop, const Geo& gx_geo, const at::Tensor& x, at::Tensor& gw) {
  const int64_t nt = static_cast<int64_t>(c.taps.size()), nrows = c.B * c.Ho;
  const Geo geo = forward_geo(c);
  // x read in place: NCHW, or NHWC when it is channels_last
  const bool nhwc = channels_last(x);
  const at::Tensor xc = nhwc ? x : x.contiguous();
  const int64_t x_cs = nhwc ? 1 : c.H * c.W, x_ps = nhwc ? c.Ci : 1;
  // chunks of ~256 KiB of grad_out rows: they stay in L2 while every tile and tap passes over them
  // (measured: 256 KiB best; 32 KiB ~10% and 4 MiB ~5% slower)
  const int64_t rows_per_chunk = std::max<int64_t>(1, (256 << 10) / (c.Wo * Cop * int64_t(sizeof(T))));
  const WgradArgs<T> a{&c, &geo, xc.data_ptr<T>(), c.Ci * c.H * c.W, x_cs, x_ps,
                       gpad.data, gpad.img, gx_geo.top, gx_geo.left, gpad.Wp, Cop, rows_per_chunk};
  const int64_t ntiles = (c.Ci + WR - 1) / WR * ((Cop / Vec<T>::L + 3) / 4);
  const int64_t nchunks = (nrows + rows_per_chunk - 1) / rows_per_chunk;
  const Parts parts = sum_parts(nchunks, ntiles);
  const int64_t groups = parts.parts;
  // one [ntaps][Ci][Cop] sum per part (each written by its first chunk), added in order while unpacking
  const int64_t size = nt * c.Ci * Cop;
  const std::unique_ptr<T[]> packed(new T[groups * size]);
  parallel_parts(nchunks, ntiles, parts, [&](int64_t part, int64_t chunk, int64_t tile, bool first) {
    wgrad_item<T>(a, packed.get() + part * size, chunk, tile, first);
  });
  // unpack into [Co, Ci, kh, kw] (zeros: masked taps and hidden centre pairs stay exactly zero), through
  // [kh][kw][Ci][Co] rows and one permuted copy
  at::Tensor rows = at::zeros({c.kh, c.kw, c.Ci, c.Co}, x.options());
  T* r = rows.data_ptr<T>();
  for (int64_t t = 0; t < nt; ++t) {
    const Tap& tap = c.taps[t];
    const bool hides = c.is_centre(tap) && (c.strict || c.data_channels > 1);
    for (int64_t ci = 0; ci < c.Ci; ++ci) {
      T* dst = r + ((tap.i * c.kw + tap.j) * c.Ci + ci) * c.Co;
      const T* src = packed.get() + (t * c.Ci + ci) * Cop;
      for (int64_t co = 0; co < c.Co; ++co) {
        T s = src[co];
        for (int64_t grp = 1; grp < groups; ++grp) s += src[grp * size + co];
        dst[co] = hides && !c.centre_open(co, ci) ? T(0) : s;
      }
    }
  }
  gw.copy_(rows.permute({3, 2, 0, 1}));
}

// ---- Winograd F(2x2, 2x3): the vertical stack's 2 x 3 kernel ------------------------------------------------
//
// The Gated PixelCNN's vertical stack (a 2 x 3 kernel over rows y-1 and y, every
// tap) is over half of a gated layer's multiply-adds, and the direct kernel above
// already runs it near the machine's FMA peak. Winograd's minimal filtering
// (Lavin & Gray 2016) needs fewer: a tile of 2 x 2 outputs comes from a 3 x 4
// input patch d through 12 products per channel pair instead of 24,
//   Y = A^T [ (G g G^T) (.) (B^T d B) ] A,
// with F(2,2) along rows and F(2,3) along columns, whose transforms use only
// +-1 and 1/2 (float32 error stays at the direct kernel's level; tests/test_gated.py):
//   rows    B^T d: d0 - d1, d1, d2 - d1        G g: g0, g0 + g1, g1      A^T m: m0 + m1, m1 + m2
//   columns B^T d: d0 - d2, d1 + d2, d2 - d1, d1 - d3
//           G g:   g0, (g0 + g1 + g2)/2, (g0 - g1 + g2)/2, g2             A^T m: m0 + m1 + m2, m1 - m2 - m3
// Work goes in blocks of tile rows (about 48 tiles), all of whose buffers stay
// in L2: transform the block's patches into 12 matrices [tiles][Ci], multiply
// each by its transformed weights [Ci][Co] with conv_tile (a 1-tap, 1-row
// "image" of tiles), transform the 12 products back into output rows.
// grad_x is the same computation on grad_out with the mirrored, transposed
// kernel (rows y and y+1). grad_w is the transpose of the forward:
//   grad g = G^T [ sum over tiles of (A dy A^T) (.) (B^T d B) ] G.

constexpr int WK = 12;  // transform points: 3 rows x 4 columns, k = 4 * row + column

// Tile (ty, tx) makes output rows 2ty, 2ty+1 and columns 2tx, 2tx+1 from the 3 x 4 patch at rows 2ty..2ty+2
// and columns 2tx..2tx+3 of a zero-padded channels-last buffer [B][2Ht+1][2Wt+2][ld] whose first row is
// input row -top (forward: 1, the row above; grad_x: 0) and whose first column is input column -1.
struct WinoGrid {
  int64_t B, H, W, Ht, Wt, R;  // R tile rows per block
  int64_t Hp() const { return 2 * Ht + 1; }
  int64_t Wp() const { return 2 * Wt + 2; }
  int64_t blocks() const { return B * ((Ht + R - 1) / R); }
  Geo geo(int64_t top) const {
    Geo g{H, W, H, W, {}, {}};
    g.top = top, g.bottom = Hp() - top - H, g.left = 1, g.right = Wp() - 1 - W;
    return g;
  }
};

WinoGrid wino_grid(const Conv& c) {
  const int64_t Ht = (c.H + 1) / 2, Wt = (c.W + 1) / 2;
  return {c.B, c.H, c.W, Ht, Wt, std::max<int64_t>(1, std::min<int64_t>(Ht, 48 / Wt))};
}

// U[k][i][Cop] = (G g G^T)[k] for the 2 x 3 kernels g(r, j) = w[r][j][i][o] (w: [2][3][nin][nout], contiguous;
// `mirror`: g(r, j) = w[1-r][2-j]), zero past nout.
template <class T>
std::vector<T> wino_weights(const at::Tensor& w, int64_t Cop, bool mirror) {
  using V = Vec<T>;
  const int64_t nin = w.size(2), nout = w.size(3);
  const T* wp = w.data_ptr<T>();
  std::vector<T> U(WK * nin * Cop, T(0));
  // out[k] for k = 4*row + column from the rows' (g0, g1, g2), for scalars or vectors of o
  auto transform = [](auto g, auto add, auto sub, auto halve, auto out) {
    decltype(g(0, 0)) a[2][4];
    for (int r = 0; r < 2; ++r) {
      const auto g0 = g(r, 0), g1 = g(r, 1), g2 = g(r, 2);
      a[r][0] = g0, a[r][1] = halve(add(add(g0, g1), g2)), a[r][2] = halve(add(sub(g0, g1), g2)), a[r][3] = g2;
    }
    for (int q = 0; q < 4; ++q) out(0 + q, a[0][q]), out(4 + q, add(a[0][q], a[1][q])), out(8 + q, a[1][q]);
  };
  const auto half = V::set1(T(0.5));
  int64_t tap[2][3];  // where g(r, j) is: src[tap[r][j] + o]
  for (int r = 0; r < 2; ++r)
    for (int j = 0; j < 3; ++j) tap[r][j] = (mirror ? (1 - r) * 3 + (2 - j) : r * 3 + j) * nin * nout;
  for (int64_t i = 0; i < nin; ++i) {
    const T* src = wp + i * nout;
    T* dst = U.data() + i * Cop;  // U[k] at dst[k * nin * Cop + o]
    int64_t o = 0;
    for (; o + V::L <= nout; o += V::L)  // whole vectors of o
      transform([&](int r, int j) { return V::load(src + tap[r][j] + o); }, V::add, V::sub,
                [&](typename V::R v) { return V::fma(v, half, V::zero()); },
                [&](int k, typename V::R v) { V::store(dst + k * nin * Cop + o, v); });
    for (; o < nout; ++o)
      transform([&](int r, int j) { return src[tap[r][j] + o]; }, [](T a, T b) { return a + b; },
                [](T a, T b) { return a - b; }, [](T a) { return T(0.5) * a; },
                [&](int k, T v) { dst[k * nin * Cop + o] = v; });
  }
  return U;
}

// The tiles of block `blk`: image b, tile rows ty0 .. ty1-1, n tiles (tile m = (ty - ty0) * Wt + tx).
struct WinoBlock {
  int64_t b, ty0, ty1, n;
};
WinoBlock wino_block(const WinoGrid& g, int64_t blk) {
  const int64_t per = (g.Ht + g.R - 1) / g.R, ty0 = blk % per * g.R, ty1 = std::min(g.Ht, ty0 + g.R);
  return {blk / per, ty0, ty1, (ty1 - ty0) * g.Wt};
}

// f(m, ty, tx) for every tile of the block.
template <class F>
void for_tiles(const WinoGrid& g, const WinoBlock& k, const F& f) {
  for (int64_t ty = k.ty0; ty < k.ty1; ++ty)
    for (int64_t tx = 0; tx < g.Wt; ++tx) f((ty - k.ty0) * g.Wt + tx, ty, tx);
}

// V[k][m][0..ld) = (B^T d B)[k] of tile m's input patch, for every lane of the padded buffer.
template <class T>
void wino_input(const Padded<T>& in, const WinoGrid& g, const WinoBlock& k, T* V) {
  using V_ = Vec<T>;
  using R = typename V_::R;
  const int64_t ld = in.ps, row = g.Wp() * ld, n = k.n;
  for_tiles(g, k, [&](int64_t m, int64_t ty, int64_t tx) {
    const T* p = in.data + k.b * in.img + (2 * ty * g.Wp() + 2 * tx) * ld;
    for (int64_t c = 0; c < ld; c += V_::L) {
      R u[3][4];
#pragma GCC unroll 3
      for (int i = 0; i < 3; ++i) {
        const T* r = p + i * row + c;
        const R d0 = V_::load(r), d1 = V_::load(r + ld), d2 = V_::load(r + 2 * ld), d3 = V_::load(r + 3 * ld);
        u[i][0] = V_::sub(d0, d2), u[i][1] = V_::add(d1, d2), u[i][2] = V_::sub(d2, d1), u[i][3] = V_::sub(d1, d3);
      }
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        V_::store(V + ((0 + q) * n + m) * ld + c, V_::sub(u[0][q], u[1][q]));
        V_::store(V + ((4 + q) * n + m) * ld + c, u[1][q]);
        V_::store(V + ((8 + q) * n + m) * ld + c, V_::sub(u[2][q], u[1][q]));
      }
    }
  });
}

// D[k][m][0..ld) = (A dy A^T)[k] of tile m's 2 x 2 block of grad_out (padded as for grad_x: top 0, left 1).
// Rows: dy0, dy0 + dy1, dy1; columns: dy0, dy0 + dy1, dy0 - dy1, -dy1.
template <class T>
void wino_grad_out(const Padded<T>& gin, const WinoGrid& g, const WinoBlock& k, T* D) {
  using V_ = Vec<T>;
  using R = typename V_::R;
  const int64_t ld = gin.ps, row = g.Wp() * ld, n = k.n;
  for_tiles(g, k, [&](int64_t m, int64_t ty, int64_t tx) {
    const T* p = gin.data + k.b * gin.img + (2 * ty * g.Wp() + 2 * tx + 1) * ld;
    for (int64_t c = 0; c < ld; c += V_::L) {
      R u[2][4];
#pragma GCC unroll 2
      for (int a = 0; a < 2; ++a) {
        const R e0 = V_::load(p + a * row + c), e1 = V_::load(p + a * row + ld + c);
        u[a][0] = e0, u[a][1] = V_::add(e0, e1), u[a][2] = V_::sub(e0, e1), u[a][3] = V_::sub(V_::zero(), e1);
      }
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        V_::store(D + ((0 + q) * n + m) * ld + c, u[0][q]);
        V_::store(D + ((4 + q) * n + m) * ld + c, V_::add(u[0][q], u[1][q]));
        V_::store(D + ((8 + q) * n + m) * ld + c, u[1][q]);
      }
    }
  });
}

// rows[2(ty-ty0) + a][x][0..Cop) = (A^T M A)[a][e] + bias for x = 2tx + e < W.
template <class T>
void wino_output(const T* M, int64_t Cop, const T* bias, const WinoGrid& g, const WinoBlock& k, T* rows) {
  using V_ = Vec<T>;
  using R = typename V_::R;
  const int64_t n = k.n;
  for_tiles(g, k, [&](int64_t m, int64_t ty, int64_t tx) {
    for (int64_t c = 0; c < Cop; c += V_::L) {
      R s[3][2];
#pragma GCC unroll 3
      for (int p = 0; p < 3; ++p) {
        const T* mp = M + (4 * p * n + m) * Cop + c;
        const R m0 = V_::load(mp), m1 = V_::load(mp + n * Cop), m2 = V_::load(mp + 2 * n * Cop),
                m3 = V_::load(mp + 3 * n * Cop);
        s[p][0] = V_::add(V_::add(m0, m1), m2), s[p][1] = V_::sub(V_::sub(m1, m2), m3);
      }
      const R bv = bias ? V_::load(bias + c) : V_::zero();
#pragma GCC unroll 2
      for (int a = 0; a < 2; ++a)
#pragma GCC unroll 2
        for (int e = 0; e < 2; ++e) {
          const int64_t x = 2 * tx + e;
          if (x < g.W)
            V_::store(rows + ((2 * (ty - k.ty0) + a) * g.W + x) * Cop + c,
                      V_::add(V_::add(s[a][e], s[a + 1][e]), bv));
        }
    }
  });
}

// out [B][nout][H][W] (NCHW, or channels_last) = the 2 x 3 convolution of the padded channels-last `in`
// (WinoGrid::geo) with the transformed weights U [12][nin][Cop], plus bias [Cop] (or nullptr).
template <class T>
void wino_conv(const WinoGrid& g, const Padded<T>& in, int64_t nin, const T* U, const T* bias, int64_t nout,
               int64_t Cop, at::Tensor& out) {
  constexpr int L = Vec<T>::L;
  const int64_t ld = in.ps, nmax = g.R * g.Wt, HW = g.H * g.W;
  const int64_t vsize = WK * nmax * ld, msize = WK * nmax * Cop, rsize = 2 * g.R * g.W * Cop;
  // scratch per thread, written before it is read
  const at::Tensor scratch = at::empty({at::get_num_threads() * (vsize + msize + rsize)}, out.options());
  T* const bufs = scratch.data_ptr<T>();
  const bool cl = channels_last(out);
  T* o = out.data_ptr<T>();
  const int64_t zero = 0;
  parallel_dynamic(g.blocks(), 1, [&](int tid, int64_t begin, int64_t end) {
    T* V = bufs + tid * (vsize + msize + rsize);
    T* M = V + vsize;
    T* rows = M + msize;
    for (int64_t blk = begin; blk < end; ++blk) {
      const WinoBlock k = wino_block(g, blk);
      wino_input<T>(in, g, k, V);
      for (int64_t t = 0; t < WK; ++t) {
        // a 1-tap convolution over a 1 x n "image" of tiles
        const ConvArgs<T> a{V + t * k.n * ld, 0, 1, ld, k.n, nin, U + t * nin * Cop, Cop, nullptr, &zero, 1, 1, k.n,
                            nullptr, Cop, true};
        for (int64_t co0 = 0; co0 < Cop; co0 += 4 * L)
          for (int64_t p0 = 0; p0 < k.n; p0 += PM) {
            const int64_t np = std::min<int64_t>(PM, k.n - p0);
            T* dst = M + (t * k.n + p0) * Cop + co0;
            switch (std::min<int64_t>(4, (Cop - co0) / L)) {
              case 4: conv_tile<T, 4>(a, 0, p0, np, co0, dst, Cop); break;
              case 3: conv_tile<T, 3>(a, 0, p0, np, co0, dst, Cop); break;
              case 2: conv_tile<T, 2>(a, 0, p0, np, co0, dst, Cop); break;
              default: conv_tile<T, 1>(a, 0, p0, np, co0, dst, Cop); break;
            }
          }
      }
      wino_output<T>(M, Cop, bias, g, k, rows);
      const int64_t r0 = 2 * k.ty0, npix = (std::min(g.H, 2 * k.ty1) - r0) * g.W;
      if (cl)
        for (int64_t q = 0; q < npix; ++q)
          std::copy(rows + q * Cop, rows + q * Cop + nout, o + ((k.b * g.H + r0) * g.W + q) * nout);
      else
        to_channels_first(rows, Cop, nout, npix, o + k.b * nout * HW + r0 * g.W, HW);
    }
  });
}

// acc[r][0..NV*L) = (first) or += the sum over tiles m < n of v[m][r] * d[m][0..NV*L) for r < nr (<= WR):
// grad_w's products.
template <class T, int NV>
void wino_wgrad_tile(const T* v, int64_t ldv, const T* d, int64_t ldd, int64_t n, int64_t nr, T* acc, int64_t lda,
                     bool first) {
  int64_t roff[WR];  // rows past nr read the last one again (and are not written)
  for (int r = 0; r < WR; ++r) roff[r] = std::min<int64_t>(r, nr - 1);
  WgradAcc<T, NV> s;
  s.add(v, ldv, roff, d, ldd, n);
  s.flush(nr, acc, lda, first);
}

// gw [Co][Ci][2][3] = G^T [sum over tiles of (A dy A^T) (.) (B^T d B)] G, from x padded as for the forward
// (xin: ld >= Ci) and grad_out padded as for grad_x (gin: ld = Cop).
template <class T>
void wino_grad_w(const Conv& c, const WinoGrid& g, const Padded<T>& xin, const Padded<T>& gin, int64_t Cop,
                 at::Tensor& gw) {
  constexpr int L = Vec<T>::L;
  const int64_t nmax = g.R * g.Wt, ldx = xin.ps, size = WK * c.Ci * Cop;
  const int64_t vsize = WK * nmax * ldx, dsize = WK * nmax * Cop, nthreads = at::get_num_threads();
  const at::Tensor scratch = at::empty({nthreads * (vsize + dsize)}, xin.buf.options());  // written before read
  T* const bufs = scratch.data_ptr<T>();
  // one sum per part of the blocks (parallel_parts: a block is one chunk of one tile), added in order below
  const Parts parts = sum_parts(g.blocks(), 1);
  const int64_t groups = parts.parts;
  const std::unique_ptr<T[]> sums(new T[groups * size]);
  parallel_parts(g.blocks(), 1, parts, [&](int64_t grp, int64_t blk, int64_t, bool first) {
    T* V = bufs + at::get_thread_num() * (vsize + dsize);
    T* D = V + vsize;
    T* S = sums.get() + grp * size;
    const WinoBlock k = wino_block(g, blk);
    wino_input<T>(xin, g, k, V);
    wino_grad_out<T>(gin, g, k, D);
    for (int64_t t = 0; t < WK; ++t)
      for (int64_t ci0 = 0; ci0 < c.Ci; ci0 += WR)
        for (int64_t co0 = 0; co0 < Cop; co0 += 4 * L) {
          const T* v = V + t * k.n * ldx + ci0;
          const T* d = D + t * k.n * Cop + co0;
          T* acc = S + (t * c.Ci + ci0) * Cop + co0;
          const int64_t nr = std::min<int64_t>(WR, c.Ci - ci0);
          switch (std::min<int64_t>(4, (Cop - co0) / L)) {
            case 4: wino_wgrad_tile<T, 4>(v, ldx, d, Cop, k.n, nr, acc, Cop, first); break;
            case 3: wino_wgrad_tile<T, 3>(v, ldx, d, Cop, k.n, nr, acc, Cop, first); break;
            case 2: wino_wgrad_tile<T, 2>(v, ldx, d, Cop, k.n, nr, acc, Cop, first); break;
            default: wino_wgrad_tile<T, 1>(v, ldx, d, Cop, k.n, nr, acc, Cop, first); break;
          }
        }
  });
  // G^T along rows, then columns, into [2][3][Ci][Co] rows (whole vectors of co), then one permuted copy
  using V = Vec<T>;
  at::Tensor rows = at::empty({2, 3, c.Ci, c.Co}, gw.options());
  T* rp = rows.data_ptr<T>();
  const int64_t plane = c.Ci * c.Co;
  auto finish = [&](auto load, auto add, auto sub, auto halve, auto store) {
    decltype(load(0)) e[WK];
    for (int k = 0; k < WK; ++k) e[k] = load(k);
    for (int r = 0; r < 2; ++r) {
      decltype(load(0)) f[4];
      for (int q = 0; q < 4; ++q) f[q] = add(e[4 * r + q], e[4 * (r + 1) + q]);
      store(r * 3 + 0, add(f[0], halve(add(f[1], f[2]))));
      store(r * 3 + 1, halve(sub(f[1], f[2])));
      store(r * 3 + 2, add(halve(add(f[1], f[2])), f[3]));
    }
  };
  const auto half = V::set1(T(0.5));
  for (int64_t ci = 0; ci < c.Ci; ++ci) {
    const T* src = sums.get() + ci * Cop;  // sum k of group grp at src[grp * size + k * Ci * Cop + co]
    T* dst = rp + ci * c.Co;               // tap (r, j) at dst[(r*3 + j) * plane + co]
    // sum k: the groups' sums added in order
    auto vsum = [&](int k, int64_t co) {
      typename V::R s = V::load(src + k * c.Ci * Cop + co);
      for (int64_t grp = 1; grp < groups; ++grp) s = V::add(s, V::load(src + grp * size + k * c.Ci * Cop + co));
      return s;
    };
    auto ssum = [&](int k, int64_t co) {
      T s = src[k * c.Ci * Cop + co];
      for (int64_t grp = 1; grp < groups; ++grp) s += src[grp * size + k * c.Ci * Cop + co];
      return s;
    };
    int64_t co = 0;
    for (; co + V::L <= c.Co; co += V::L)
      finish([&](int k) { return vsum(k, co); }, V::add, V::sub,
             [&](typename V::R v) { return V::fma(v, half, V::zero()); },
             [&](int tap, typename V::R v) { V::store(dst + tap * plane + co, v); });
    for (; co < c.Co; ++co)
      finish([&](int k) { return ssum(k, co); }, [](T a, T b) { return a + b; },
             [](T a, T b) { return a - b; }, [](T a) { return T(0.5) * a; },
             [&](int tap, T v) { dst[tap * plane + co] = v; });
  }
  gw.copy_(rows.permute({3, 2, 0, 1}));
}

template <class T>
void wino_forward(const Conv& c, const at::Tensor& x, const at::Tensor& weight, const at::Tensor* bias,
                  at::Tensor& out) {
  constexpr int64_t L = Vec<T>::L;
  const int64_t Cip = (c.Ci + L - 1) / L * L, Cop = (c.Co + L - 1) / L * L;
  const WinoGrid g = wino_grid(c);
  const Padded<T> in = pad_channels_last<T>(x, g.geo(1), Cip);
  const std::vector<T> U = wino_weights<T>(weight.permute({2, 3, 1, 0}).contiguous(), Cop, false);  // [r][j][ci][co]
  std::vector<T> bpad(Cop, T(0));
  if (bias) {
    const at::Tensor bc = bias->contiguous();
    std::copy(bc.data_ptr<T>(), bc.data_ptr<T>() + c.Co, bpad.begin());
  }
  wino_conv<T>(g, in, c.Ci, U.data(), bias ? bpad.data() : nullptr, c.Co, Cop, out);
}

template <class T>
void wino_backward(const Conv& c, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                   at::Tensor* gx, at::Tensor* gw, at::Tensor* gb) {
  constexpr int64_t L = Vec<T>::L;
  const int64_t Cip = (c.Ci + L - 1) / L * L, Cop = (c.Co + L - 1) / L * L;
  const WinoGrid g = wino_grid(c);
  const Padded<T> gin = pad_channels_last<T>(grad_out, g.geo(0), Cop, gb);
  if (gx) {  // grad_x(y, x) = sum of w(co, ci, 1-r, 2-j) * grad_out(co, y+r, x-1+j): rows y and y+1
    const std::vector<T> U = wino_weights<T>(weight.permute({2, 3, 0, 1}).contiguous(), Cip, true);
    wino_conv<T>(g, gin, c.Co, U.data(), nullptr, c.Ci, Cip, *gx);
  }
  if (gw) wino_grad_w<T>(c, g, pad_channels_last<T>(x, g.geo(1), Cip), gin, Cop, *gw);
}

}  // namespace avx512

FASTGEN_AVX512_END
#endif  // FASTGEN_AVX512

using fastgen::use_avx512;

// ---- portable path (CPUs without AVX-512): one GEMM per tap through ATen ----------------------------------
//
// The input goes, zero-padded and channels-last, into rows of channels; outputs
// are computed on the padded width (the extra columns are dropped at the end),
// so output row q reads input row q + toff[t] at tap t: every tap is one GEMM
// (MKL/OpenBLAS) on a shifted view, no bounds checks.
struct Grid {
  int64_t Hs, Wp, rows;       // image stride (rows of Wp pixels), padded width, output rows B*Hs*Wp
  std::vector<int64_t> toff;  // per tap: the input row offset
  int64_t extra;              // zero rows after the last image (the largest offset)
};

Grid grid_of(const Geo& g, int64_t B) {
  Grid r{std::max(g.Hp(), g.Hout), std::max(g.Wp(), g.Wout), 0, {}, 0};  // (larger output: no taps at all)
  r.rows = B * r.Hs * r.Wp;
  for (size_t t = 0; t < g.dy.size(); ++t) {
    r.toff.push_back((g.dy[t] + g.top) * r.Wp + g.dx[t] + g.left);
    r.extra = std::max(r.extra, r.toff.back());
  }
  return r;
}

// [B][C][Hin][Win] (any layout) -> [rows + extra][C]: each image at its padded place.
at::Tensor to_rows(const at::Tensor& x, const Geo& g, const Grid& r) {
  const int64_t B = x.size(0), C = x.size(1);
  at::Tensor buf = at::zeros({r.rows + r.extra, C}, x.options());
  buf.narrow(0, 0, r.rows).view({B, r.Hs, r.Wp, C}).narrow(1, g.top, g.Hin).narrow(2, g.left, g.Win)
      .copy_(x.permute({0, 2, 3, 1}));
  return buf;
}

// Rows on the output grid -> the visible [B][C][Hout][Wout] part, into `out` (any layout).
void from_rows(const at::Tensor& rows, const Geo& g, const Grid& r, at::Tensor& out) {
  const int64_t B = out.size(0), C = out.size(1);
  out.copy_(rows.view({B, r.Hs, r.Wp, C}).narrow(1, 0, g.Hout).narrow(2, 0, g.Wout).permute({0, 3, 1, 2}));
}

// 1 where tap t joins (co, ci), else 0: [Co, Ci].
at::Tensor tap_mask(const Conv& c, int64_t t, const at::TensorOptions& opt) {
  at::Tensor m = at::empty({c.Co, c.Ci}, at::kFloat);
  auto ma = m.accessor<float, 2>();
  for (int64_t co = 0; co < c.Co; ++co)
    for (int64_t ci = 0; ci < c.Ci; ++ci) ma[co][ci] = c.visible(c.taps[t], co, ci) ? 1.f : 0.f;
  return m.to(opt);
}

// The visible weights of tap t: [Co, Ci].
at::Tensor tap_weight(const Conv& c, const at::Tensor& weight, int64_t t) {
  const at::Tensor w = weight.select(3, c.taps[t].j).select(2, c.taps[t].i);
  return c.is_centre(c.taps[t]) ? w * tap_mask(c, t, weight.options()) : w;
}

void forward_gemm(const Conv& c, const at::Tensor& x, const at::Tensor& weight, const at::Tensor* bias,
                  at::Tensor& out) {
  const Geo g = forward_geo(c);
  const Grid r = grid_of(g, c.B);
  const at::Tensor xr = to_rows(x, g, r);
  at::Tensor y = bias ? bias->view({1, c.Co}).expand({r.rows, c.Co}).contiguous()
                      : at::zeros({r.rows, c.Co}, x.options());
  for (size_t t = 0; t < c.taps.size(); ++t) y.addmm_(xr.narrow(0, r.toff[t], r.rows), tap_weight(c, weight, t).t());
  from_rows(y, g, r, out);
}

void backward_gemm(const Conv& c, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                   at::Tensor* gx, at::Tensor* gw) {
  if (gx) {  // grad_out through the mirrored taps, weights [Co, Ci]
    const Geo g = grad_x_geo(c);
    const Grid r = grid_of(g, c.B);
    const at::Tensor gr = to_rows(grad_out, g, r);
    at::Tensor acc = at::zeros({r.rows, c.Ci}, x.options());
    for (size_t t = 0; t < c.taps.size(); ++t) acc.addmm_(gr.narrow(0, r.toff[t], r.rows), tap_weight(c, weight, t));
    from_rows(acc, g, r, *gx);
  }
  if (gw) {  // per tap: shifted input rows^T x grad_out on the output grid (zeros in the dropped columns)
    const Geo g = forward_geo(c);
    const Grid r = grid_of(g, c.B);
    const at::Tensor xr = to_rows(x, g, r);
    at::Tensor go = at::zeros({r.rows, c.Co}, x.options());
    go.view({c.B, r.Hs, r.Wp, c.Co}).narrow(1, 0, c.Ho).narrow(2, 0, c.Wo).copy_(grad_out.permute({0, 2, 3, 1}));
    for (size_t t = 0; t < c.taps.size(); ++t) {
      at::Tensor gwt = go.t().mm(xr.narrow(0, r.toff[t], r.rows));  // [Co, Ci]
      if (c.is_centre(c.taps[t])) gwt.mul_(tap_mask(c, t, x.options()));  // exactly zero where hidden
      gw->select(3, c.taps[t].j).select(2, c.taps[t].i).copy_(gwt);
    }
  }
}

// ---- the ops --------------------------------------------------------------------------------------------

// The AVX-512 path takes Winograd F(2x2, 2x3) for the vertical stack's 2 x 3 kernel (rows y-1 and y) when
// both channel counts fill a vector: half the multiply-adds of the direct kernel (measured: benchmarks/RESULTS.md).
// FASTGEN_CPU_KERNEL=direct keeps the direct kernel (for tests and benchmarks).
bool use_winograd(const Conv& c) {
  if (fastgen::cpu_kernel_forced("direct")) return false;
  return c.vertical && c.kh == 2 && c.kw == 3 && c.ph == 1 && c.pw == 1 && c.dh == 1 && c.dw == 1 &&
         c.Ho == c.H && c.Wo == c.W && c.Ci >= 16 && c.Co >= 16;
}

template <class T>
void forward_impl(const Conv& c, const at::Tensor& x, const at::Tensor& weight, const at::Tensor* bias,
                  at::Tensor& out) {
#ifdef FASTGEN_AVX512
  if (use_avx512()) {
    if (use_winograd(c)) return avx512::wino_forward<T>(c, x, weight, bias, out);
    return avx512::forward<T>(c, x, weight, bias, out);
  }
#endif
  forward_gemm(c, x, weight, bias, out);
}

// Returns whether it also wrote the bias gradient gb (the AVX-512 paths sum grad_out as they repack it).
template <class T>
bool backward_impl(const Conv& c, const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight, at::Tensor* gx,
                   at::Tensor* gw, at::Tensor* gb) {
#ifdef FASTGEN_AVX512
  if (use_avx512()) {
    if (use_winograd(c)) {
      avx512::wino_backward<T>(c, g, x, weight, gx, gw, gb);
      return true;
    }
    constexpr int64_t L = avx512::Vec<T>::L;
    const int64_t Cop = (c.Co + L - 1) / L * L;
    const Geo gx_geo = grad_x_geo(c);
    const Padded<T> gpad = avx512::pad_channels_last<T>(g, gx_geo, Cop, gb);
    if (gx) avx512::grad_x<T>(c, gpad, gx_geo, weight, *gx);
    if (gw) avx512::grad_w<T>(c, gpad, Cop, gx_geo, x, *gw);
    return true;
  }
#endif
  backward_gemm(c, g, x, weight, gx, gw);
  return false;
}

at::Tensor masked_conv2d_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, std::string_view mask_type,
                                     int64_t data_channels, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* op = "fastgen::masked_conv2d_forward";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls inside are not recorded
  const Conv c = make_conv(op, x, weight, mask_type, data_channels, padding, dilation);
  const at::Tensor* b = bias.has_value() && bias->defined() ? &*bias : nullptr;
  if (b) {
    TORCH_CHECK(b->dim() == 1 && b->size(0) == c.Co, op, ": bias must have shape (", c.Co, ",), got ", b->sizes());
    TORCH_CHECK(b->scalar_type() == x.scalar_type(), op, ": bias must have the input's dtype ", x.scalar_type(),
                ", got ", b->scalar_type());
  }
  // the output is channels_last when the input is (as F.conv2d does), else NCHW-contiguous
  const auto fmt = channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty({c.B, c.Co, c.Ho, c.Wo}, x.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  if (c.Ci == 0 || x.numel() == 0) return b ? out.copy_(b->view({1, c.Co, 1, 1}).expand_as(out)) : out.zero_();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "masked_conv2d_forward",
                             [&] { forward_impl<scalar_t>(c, x, weight, b, out); });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, std::string_view mask_type,
    int64_t data_channels, at::IntArrayRef padding, at::IntArrayRef dilation, const c10::List<bool>& output_mask) {
  const char* op = "fastgen::masked_conv2d_backward";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls inside are not recorded
  const Conv c = make_conv(op, x, weight, mask_type, data_channels, padding, dilation);
  fastgen::check_backward_args(op, grad_out, x, c, output_mask.size());
  // grad_out is read in place when channels_last (see channels_last()), else made NCHW-contiguous
  const at::Tensor g = channels_last(grad_out) ? grad_out : grad_out.contiguous();
  // entries not asked for come back empty; grad_x has x's layout; grad_weight is exactly zero at masked taps
  const auto fmt = channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor gx = output_mask[0] ? at::empty({c.B, c.Ci, c.H, c.W}, x.options().memory_format(fmt))
                                 : at::empty({0}, x.options());
  at::Tensor gw = output_mask[1] ? at::zeros({c.Co, c.Ci, c.kh, c.kw}, x.options()) : at::empty({0}, x.options());
  at::Tensor gb = output_mask[2] ? at::empty({c.Co}, x.options()) : at::empty({0}, x.options());
  const bool run = g.numel() > 0 && !c.taps.empty();  // else every gradient is zero
  const bool need_x = output_mask[0] && gx.numel() > 0, need_w = output_mask[1] && gw.numel() > 0;
  if (need_x && !run) gx.zero_();
  bool gb_done = false;
  if ((need_x || need_w) && run)  // the kernels write every element of grad_x
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "masked_conv2d_backward", [&] {
      gb_done = backward_impl<scalar_t>(c, g, x, weight, need_x ? &gx : nullptr, need_w ? &gw : nullptr,
                                        output_mask[2] ? &gb : nullptr);
    });
  if (output_mask[2] && !gb_done) gb = g.sum({0, 2, 3});
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen, CPU, m) {
  m.impl("masked_conv2d_forward", &masked_conv2d_forward_cpu);
  m.impl("masked_conv2d_backward", &masked_conv2d_backward_cpu);
}
