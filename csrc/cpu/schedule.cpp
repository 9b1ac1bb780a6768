// The C++ engine of multi-scale cached sampling: runs a Schedule compiled by
// fastgen/sampling/schedule.py (its instruction set and encoding are documented
// there, in Schedule.encode) over the steps [t0, t1), with no Python per pixel.
// Step t runs each instruction on its queue's positions for that step (the
// positions whose inputs became complete when pixel t - 1 was drawn), then
// draws pixel t from the discretized logistic mixture at the output and feeds
// it to the input slot.
//
// Threads split the batch: each runs every step for its own images. Slots are
// rings [B, rows, W, Cp] allocated by the caller (Cp: channels rounded up to
// 16, so the convolution micro-kernel's vectors never leave a position); the
// row y of a slot lives in ring row y % rows. Operands read zeros outside their
// view (Ref). Draws read the caller's uniforms u [H, W, C + 1, B] (float64)
// exactly as the torch samplers do (fastgen.sampling.common.draw_mixture).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/cpu_features.h"  // FASTGEN_AVX512, fastgen::use_avx512()
#include "cpu/sampling.h"
#include "cpu/sampling_act.h"  // activate()
#include "sampling_code.h"     // the opcodes

namespace {

#ifdef FASTGEN_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {
#include "cpu/sampling_conv.h"
}  // namespace avx512
#pragma GCC pop_options
#endif

namespace portable {
#include "cpu/sampling_conv.h"
}  // namespace portable

using namespace fastgen::sampling;  // the opcodes, activate()

constexpr double LOG_SCALE_MIN = -7.0;  // fastgen.ref.dmol
constexpr double U_MIN = 1e-5;          // the logistic draw's uniforms are clamped to [U_MIN, 1 - U_MIN]

struct Slot {
  int64_t C, H, W, R, Cp;
};

// An operand: channels [c0, ..) of a slot through a view (fastgen/sampling/schedule.py, Ref).
struct Ref {
  int64_t slot = -1, c0 = 0, oy = 0, ox = 0, y0 = 0, y1 = 0, x0 = 0, x1 = 0;
};

template <class T>
struct Instr {
  int64_t op = 0, out = 0, ch = 0;  // ch: channels read from a (and b); COPY, FILL: written
  Ref a, b;
  const int64_t* queue = nullptr;  // positions y * W + x of the output slot, by step
  const int64_t* start = nullptr;  // [steps + 1]
  // CONV: taps (dy, dx), weights [taps][cin][ldw]. CONVT: per output class (y % sy, x % sx), the taps that
  // reach it and their weights packed the same way.
  int64_t sy = 1, sx = 1, ldw = 0;
  std::vector<int64_t> dy, dx;
  std::vector<T> w, bias;
  std::vector<std::vector<int64_t>> class_taps;
  std::vector<std::vector<T>> class_w;
  bool has_bias = false;
  int64_t act = 0;
  T param = 0;
  const T* scale = nullptr;
  const T* shift = nullptr;
  const T* cst = nullptr;  // CONST: [B, C] or [B, H, W, C]
  bool multiply = false, is_map = false;
  int64_t dc = 1, out_off = 0;
};

// One thread's working memory, reused at every step.
template <class T>
struct Scratch {
  std::vector<const T*> src;
  std::vector<T*> out;
};

template <class T>
struct Engine {
  int64_t B = 0;
  std::vector<Slot> slots;
  std::vector<T*> data;
  std::vector<T> zeros;
  bool avx512 = false;

  T* at(int64_t s, int64_t b, int64_t y, int64_t x) const {
    const Slot& sl = slots[s];
    return data[s] + ((b * sl.R + y % sl.R) * sl.W + x) * sl.Cp;
  }

  // The operand at position (y, x) of its view, or zeros outside it.
  const T* read(const Ref& r, int64_t b, int64_t y, int64_t x) const {
    const int64_t sy = y - r.oy, sx = x - r.ox;
    if (sy < r.y0 || sy >= r.y1 || sx < r.x0 || sx >= r.x1) return zeros.data();
    return at(r.slot, b, sy, sx) + r.c0;
  }

  void conv_kernel(int64_t rows, const T* const* src, int64_t taps, const Instr<T>& in, const T* w, T* const* out)
      const {
    const T* bias = in.has_bias ? in.bias.data() : nullptr;
#ifdef FASTGEN_AVX512
    if (avx512) return avx512::conv_rows<T>(rows, src, taps, in.ch, w, in.ldw, 0, in.ldw, out, bias);
#endif
    portable::conv_rows<T>(rows, src, taps, in.ch, w, in.ldw, 0, in.ldw, out, bias);
  }

  // A convolution at n positions for images [b0, b1): every (image, position) one row of the micro-kernel.
  void conv(const Instr<T>& in, const int64_t* pos, int64_t n, int64_t b0, int64_t b1, Scratch<T>& s) const {
    const int64_t taps = in.dy.size(), W = slots[in.out].W, rows = (b1 - b0) * n;
    s.src.resize(rows * taps);
    s.out.resize(rows);
    int64_t r = 0;
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t p = 0; p < n; ++p, ++r) {
        const int64_t y = pos[p] / W, x = pos[p] % W;
        s.out[r] = at(in.out, b, y, x);
        for (int64_t t = 0; t < taps; ++t) s.src[r * taps + t] = read(in.a, b, y * in.sy + in.dy[t], x * in.sx + in.dx[t]);
      }
    conv_kernel(rows, s.src.data(), taps, in, in.w.data(), s.out.data());
  }

  // A transposed convolution: output (y, x) takes input ((y - dy) / sy, (x - dx) / sx) through the taps
  // where that divides exactly, the same taps for all positions of one class (y % sy, x % sx).
  void conv_transpose(const Instr<T>& in, const int64_t* pos, int64_t n, int64_t b0, int64_t b1,
                      Scratch<T>& s) const {
    const int64_t W = slots[in.out].W, nb = b1 - b0;
    s.out.resize(nb);
    for (int64_t p = 0; p < n; ++p) {
      const int64_t y = pos[p] / W, x = pos[p] % W;
      const int64_t cls = (y % in.sy) * in.sx + x % in.sx;
      const std::vector<int64_t>& taps = in.class_taps[cls];
      const int64_t nt = taps.size();
      s.src.resize(nb * nt);
      for (int64_t b = b0; b < b1; ++b) {
        s.out[b - b0] = at(in.out, b, y, x);
        for (int64_t k = 0; k < nt; ++k) {
          const int64_t t = taps[k];
          s.src[(b - b0) * nt + k] = read(in.a, b, (y - in.dy[t]) / in.sy, (x - in.dx[t]) / in.sx);
        }
      }
      conv_kernel(nb, s.src.data(), nt, in, in.class_w[cls].data(), s.out.data());
    }
  }

  void pointwise(const Instr<T>& in, int64_t b, int64_t y, int64_t x) const {
    T* o = at(in.out, b, y, x);
    const int64_t c = in.ch;
    if (in.op == FILL) {
      std::fill_n(o + in.out_off, c, in.param);
      return;
    }
    const T* a = read(in.a, b, y, x);
    switch (in.op) {
      case COPY: std::copy_n(a, c, o + in.out_off); break;
      case ACT:
        for (int64_t i = 0; i < c; ++i) o[i] = activate(in.act, a[i], in.param);
        break;
      case AFFINE:
        for (int64_t i = 0; i < c; ++i) o[i] = a[i] * in.scale[i] + in.shift[i];
        break;
      case ADD: {
        const T* q = read(in.b, b, y, x);
        if (in.param == T(1))
          for (int64_t i = 0; i < c; ++i) o[i] = a[i] + q[i];
        else
          for (int64_t i = 0; i < c; ++i) o[i] = a[i] + in.param * q[i];
        break;
      }
      case MUL: {
        const T* q = read(in.b, b, y, x);
        for (int64_t i = 0; i < c; ++i) o[i] = a[i] * q[i];
        break;
      }
      case CONST: {
        const Slot& so = slots[in.out];
        const T* k = in.is_map ? in.cst + ((b * so.H + y) * so.W + x) * c : in.cst + b * c;
        if (in.multiply)
          for (int64_t i = 0; i < c; ++i) o[i] = a[i] * k[i];
        else
          for (int64_t i = 0; i < c; ++i) o[i] = a[i] + k[i];
        break;
      }
      case GATE: {  // input [dc blocks of (tanh half, sigmoid half)] -> dc blocks
        const int64_t cd = c / (2 * in.dc);
        for (int64_t d = 0; d < in.dc; ++d)
          for (int64_t j = 0; j < cd; ++j) {
            const T f = a[2 * d * cd + j], g = a[2 * d * cd + cd + j];
            o[d * cd + j] = std::tanh(f) / (T(1) + std::exp(-g));
          }
        break;
      }
    }
  }

  void run(const Instr<T>& in, const int64_t* pos, int64_t n, int64_t b0, int64_t b1, Scratch<T>& s) const {
    if (in.op == CONV) return conv(in, pos, n, b0, b1, s);
    if (in.op == CONVT) return conv_transpose(in, pos, n, b0, b1, s);
    const int64_t W = slots[in.out].W;
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t p = 0; p < n; ++p) pointwise(in, b, pos[p] / W, pos[p] % W);
  }
};

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

Ref decode_ref(const int64_t* c, const std::vector<Slot>& slots, int64_t channels, bool optional) {
  Ref r;
  if (optional && c[0] == -1) return r;
  r.slot = c[0], r.c0 = c[1], r.oy = c[2], r.ox = c[3], r.y0 = c[4], r.y1 = c[5], r.x0 = c[6], r.x1 = c[7];
  TORCH_CHECK(r.slot >= 0 && r.slot < (int64_t)slots.size(), "sample_scheduled: bad slot index ", r.slot);
  const Slot& s = slots[r.slot];
  TORCH_CHECK(r.c0 >= 0 && r.c0 + channels <= s.C && 0 <= r.y0 && r.y1 <= s.H && 0 <= r.x0 && r.x1 <= s.W,
              "sample_scheduled: an operand outside its slot");
  return r;
}

// The parsed, checked program: weights repacked for the micro-kernel.
template <class T>
std::vector<Instr<T>> decode(const std::vector<int64_t>& code, const std::vector<at::Tensor>& params,
                             const std::vector<double>& scalars, const std::vector<Slot>& slots, int64_t steps) {
  const int64_t nparams = params.size();
  auto param = [&](int64_t i, bool optional) -> const at::Tensor* {
    TORCH_CHECK((optional && i == -1) || (i >= 0 && i < nparams), "sample_scheduled: bad parameter index ", i);
    return i < 0 ? nullptr : &params[i];
  };
  auto values = [&](int64_t i, int64_t n) {
    const at::Tensor* t = param(i, false);
    TORCH_CHECK(t->scalar_type() == c10::CppTypeToScalarType<T>::value && t->numel() == n,
                "sample_scheduled: a parameter of the wrong size or dtype");
    return t->data_ptr<T>();
  };
  auto scalar = [&](int64_t i) {
    TORCH_CHECK(i >= 0 && i < (int64_t)scalars.size(), "sample_scheduled: bad scalar index ", i);
    return static_cast<T>(scalars[i]);
  };
  std::vector<Instr<T>> out;
  for (size_t pos = 0; pos < code.size();) {
    const int64_t len = code[pos];
    TORCH_CHECK(len >= 22 && pos + len <= code.size(), "sample_scheduled: malformed program");
    const int64_t* c = code.data() + pos + 1;
    Instr<T> in;
    in.op = c[0], in.out = c[1], in.ch = c[2];
    TORCH_CHECK(in.out >= 0 && in.out < (int64_t)slots.size() && in.ch >= 0, "sample_scheduled: bad instruction");
    const Slot& so = slots[in.out];
    const bool reads = in.op != FILL;
    if (reads) in.a = decode_ref(c + 3, slots, in.ch, false);
    in.b = decode_ref(c + 11, slots, in.ch, true);
    const at::Tensor* q = param(c[19], false);
    const at::Tensor* st = param(c[20], false);
    TORCH_CHECK(q->scalar_type() == at::kLong && st->scalar_type() == at::kLong && st->numel() == steps + 1,
                "sample_scheduled: a queue must be int64 with int64 starts [steps + 1]");
    in.queue = q->data_ptr<int64_t>(), in.start = st->data_ptr<int64_t>();
    TORCH_CHECK(in.start[0] == 0 && in.start[steps] <= q->numel() &&
                    (q->numel() == 0 || (q->min().item<int64_t>() >= 0 && q->max().item<int64_t>() < so.H * so.W)),
                "sample_scheduled: a queue outside its slot");
    const int64_t* e = c + 21;  // the op's own fields
    const int64_t extra = len - 22;
    switch (in.op) {
      case CONV:
      case CONVT: {
        TORCH_CHECK(extra >= 5 && extra == 5 + 2 * e[4], "sample_scheduled: malformed convolution");
        const int64_t taps = e[4], cout = so.C;
        in.sy = e[2], in.sx = e[3];
        TORCH_CHECK(in.sy >= 1 && in.sx >= 1, "sample_scheduled: bad stride");
        in.dy.assign(e + 5, e + 5 + taps);
        in.dx.assign(e + 5 + taps, e + 5 + 2 * taps);
        const T* wp = values(e[0], taps * in.ch * cout);
        in.ldw = so.Cp;
        in.w.assign(taps * in.ch * in.ldw, T(0));
        for (int64_t t = 0; t < taps * in.ch; ++t) std::copy_n(wp + t * cout, cout, in.w.begin() + t * in.ldw);
        in.has_bias = e[1] >= 0;
        if (in.has_bias) {
          in.bias.assign(in.ldw, T(0));
          std::copy_n(values(e[1], cout), cout, in.bias.begin());
        }
        if (in.op == CONVT) {
          const int64_t block = in.ch * in.ldw;
          for (int64_t py = 0; py < in.sy; ++py)
            for (int64_t px = 0; px < in.sx; ++px) {
              std::vector<int64_t> ts;
              std::vector<T> ws;
              for (int64_t t = 0; t < taps; ++t)
                if (((py - in.dy[t]) % in.sy + in.sy) % in.sy == 0 && ((px - in.dx[t]) % in.sx + in.sx) % in.sx == 0) {
                  ts.push_back(t);
                  ws.insert(ws.end(), in.w.begin() + t * block, in.w.begin() + (t + 1) * block);
                }
              in.class_taps.push_back(ts);
              in.class_w.push_back(ws);
            }
          // a negative dy would make (y - dy) / sy round toward zero: the class test guarantees exact division
        }
        break;
      }
      case ACT: TORCH_CHECK(extra == 2, "sample_scheduled: malformed ACT"); in.act = e[0], in.param = scalar(e[1]); break;
      case AFFINE:
        TORCH_CHECK(extra == 2, "sample_scheduled: malformed AFFINE");
        in.scale = values(e[0], in.ch), in.shift = values(e[1], in.ch);
        break;
      case ADD: TORCH_CHECK(extra == 1 && in.b.slot >= 0, "sample_scheduled: malformed ADD"); in.param = scalar(e[0]); break;
      case MUL: TORCH_CHECK(extra == 0 && in.b.slot >= 0, "sample_scheduled: malformed MUL"); break;
      case CONST: {
        TORCH_CHECK(extra == 3, "sample_scheduled: malformed CONST");
        in.multiply = e[1] != 0, in.is_map = e[2] != 0;
        const at::Tensor* k = param(e[0], false);
        TORCH_CHECK(k->numel() == (in.is_map ? so.H * so.W : 1) * in.ch * k->size(0),
                    "sample_scheduled: CONST of the wrong size");
        in.cst = values(e[0], k->numel());
        break;
      }
      case GATE:
        TORCH_CHECK(extra == 1 && e[0] >= 1 && in.ch % (2 * e[0]) == 0, "sample_scheduled: malformed GATE");
        in.dc = e[0];
        break;
      case COPY:
        TORCH_CHECK(extra == 1 && e[0] >= 0 && e[0] + in.ch <= so.C, "sample_scheduled: malformed COPY");
        in.out_off = e[0];
        break;
      case FILL:
        TORCH_CHECK(extra == 2 && e[0] >= 0 && e[0] + in.ch <= so.C, "sample_scheduled: malformed FILL");
        in.out_off = e[0], in.param = scalar(e[1]);
        break;
      default: TORCH_CHECK(false, "sample_scheduled: unknown opcode ", in.op);
    }
    if (in.op != COPY && in.op != FILL && in.op != CONV && in.op != CONVT)
      TORCH_CHECK(so.C == (in.op == GATE ? in.ch / 2 : in.ch), "sample_scheduled: output slot channels");
    out.push_back(std::move(in));
    pos += len;
  }
  return out;
}

template <class T>
void generate(const std::vector<Slot>& slots, const std::vector<int64_t>& code, const std::vector<at::Tensor>& params,
              const std::vector<double>& scalars, const std::vector<at::Tensor>& bufs, const at::Tensor& u,
              const at::Tensor& feed, at::Tensor& images, at::Tensor& out_params, const std::vector<int64_t>& config,
              double temperature, int64_t t0, int64_t t1, bool teacher) {
  const int64_t C = config[0], H = config[1], W = config[2], in_slot = config[3], M = config[4], K = config[5];
  Engine<T> e;
  e.B = images.size(0);
  e.slots = slots;
  e.avx512 = fastgen::use_avx512();
  int64_t cmax = 0;
  for (size_t s = 0; s < bufs.size(); ++s) {
    e.data.push_back(bufs[s].data_ptr<T>());
    cmax = std::max(cmax, slots[s].Cp);
  }
  e.zeros.assign(cmax, T(0));
  Ref out_ref = decode_ref(config.data() + 6, slots, K, false);
  const std::vector<Instr<T>> prog = decode<T>(code, params, scalars, slots, H * W);
  const double* uu = u.data_ptr<double>();
  const T* table = feed.data_ptr<T>();
  int64_t* img = images.data_ptr<int64_t>();
  T* po = teacher ? out_params.data_ptr<T>() : nullptr;
  const int64_t B = e.B;
  const T temp = static_cast<T>(temperature);

  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    Scratch<T> s;
    int64_t lv[3];
    for (int64_t t = t0; t < t1; ++t) {
      for (const Instr<T>& in : prog) {
        const int64_t lo = in.start[t], hi = in.start[t + 1];
        if (hi > lo) e.run(in, in.queue + lo, hi - lo, b0, b1, s);
      }
      const int64_t y = t / W, x = t % W;
      for (int64_t b = b0; b < b1; ++b) {
        const T* p = e.read(out_ref, b, y, x);
        if (teacher) {
          for (int64_t k = 0; k < K; ++k) po[((b * K + k) * H + y) * W + x] = p[k];
          for (int64_t c = 0; c < C; ++c) lv[c] = img[((b * C + c) * H + y) * W + x];
        } else {
          draw_mixture<T>(p, C, M, temp, uu + t * (C + 1) * B + b, B, lv);
        }
        T* in = e.at(in_slot, b, y, x);
        for (int64_t c = 0; c < C; ++c) {
          img[((b * C + c) * H + y) * W + x] = lv[c];
          in[c] = table[lv[c]];
        }
      }
    }
  });
}

}  // namespace

namespace fastgen {

void sample_scheduled(const std::vector<int64_t>& slot_info, const std::vector<int64_t>& code,
                      const std::vector<at::Tensor>& params, const std::vector<double>& scalars,
                      const std::vector<at::Tensor>& bufs, const at::Tensor& u, const at::Tensor& feed,
                      at::Tensor images, at::Tensor out_params, const std::vector<int64_t>& config,
                      double temperature, int64_t t0, int64_t t1, bool teacher) {
  TORCH_CHECK(config.size() == 14,
              "sample_scheduled: config must be [C, H, W, input slot, nr_mix, K, output Ref (8 values)]");
  TORCH_CHECK(slot_info.size() == 4 * bufs.size(), "sample_scheduled: one buffer per slot");
  const at::ScalarType dt = feed.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "sample_scheduled: float32 or float64 only, got ", dt);
  const int64_t C = config[0], H = config[1], W = config[2], M = config[4], K = config[5];
  TORCH_CHECK((C == 1 && K == 3 * M) || (C == 3 && K == 10 * M), "sample_scheduled: K must be 3 nr_mix (C = 1) "
              "or 10 nr_mix (C = 3)");
  TORCH_CHECK(images.dim() == 4 && images.scalar_type() == at::kLong && images.is_contiguous() &&
                  images.size(1) == C && images.size(2) == H && images.size(3) == W && !images.is_cuda(),
              "sample_scheduled: images must be contiguous int64 CPU [B, C, H, W]");
  const int64_t B = images.size(0);
  TORCH_CHECK(u.scalar_type() == at::kDouble && u.is_contiguous() && u.numel() == H * W * (C + 1) * B,
              "sample_scheduled: u must be contiguous float64 [H, W, C + 1, B]");
  TORCH_CHECK(0 <= t0 && t0 <= t1 && t1 <= H * W, "sample_scheduled: bad step range");
  std::vector<Slot> slots;
  for (size_t s = 0; s < bufs.size(); ++s) {
    const at::Tensor& t = bufs[s];
    const int64_t c = slot_info[4 * s], h = slot_info[4 * s + 1], w = slot_info[4 * s + 2], r = slot_info[4 * s + 3];
    TORCH_CHECK(t.scalar_type() == dt && t.is_contiguous() && !t.is_cuda() && t.dim() == 4 && t.size(0) == B &&
                    r >= 1 && r <= h && t.size(1) == r && t.size(2) == w && t.size(3) >= c && t.size(3) % 16 == 0,
                "sample_scheduled: slot ", s, " must be contiguous CPU [B, rows, W, Cp] with Cp >= C, a multiple of 16");
    slots.push_back({c, h, w, r, t.size(3)});
  }
  TORCH_CHECK(config[3] >= 0 && config[3] < (int64_t)slots.size() && slots[config[3]].C == C &&
                  slots[config[3]].H == H && slots[config[3]].W == W,
              "sample_scheduled: the input slot must be [C, H, W]");
  for (const auto& p : params)
    TORCH_CHECK(p.is_contiguous() && !p.is_cuda() && (p.scalar_type() == dt || p.scalar_type() == at::kLong),
                "sample_scheduled: parameters must be contiguous CPU ", dt, " (queues int64)");
  TORCH_CHECK(feed.numel() == 256 && feed.is_contiguous(), "sample_scheduled: feed table of 256 values");
  if (teacher) {
    TORCH_CHECK(out_params.scalar_type() == dt && out_params.is_contiguous() && out_params.dim() == 4 &&
                    out_params.size(0) == B && out_params.size(1) == K && out_params.size(2) == H &&
                    out_params.size(3) == W,
                "sample_scheduled: teacher forcing needs contiguous parameters [B, K, H, W]");
    TORCH_CHECK(images.numel() == 0 || (images.min().item<int64_t>() >= 0 && images.max().item<int64_t>() < 256),
                "sample_scheduled: teacher images must hold values 0..255");
  }
  if (dt == at::kFloat)
    generate<float>(slots, code, params, scalars, bufs, u, feed, images, out_params, config, temperature, t0, t1,
                    teacher);
  else
    generate<double>(slots, code, params, scalars, bufs, u, feed, images, out_params, config, temperature, t0, t1,
                     teacher);
}

}  // namespace fastgen
