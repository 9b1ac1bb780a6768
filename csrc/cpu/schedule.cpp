// The C++ engine of multi-scale cached sampling: runs a Schedule compiled by
// fastgen/sampling/schedule.py (its instruction set and encoding are documented
// there, in Schedule.encode) over the steps [t0, t1), with no Python per pixel.
// Step t runs each instruction on its queue's positions for that step (the
// positions whose inputs became complete at step t - 1), output channels
// [lo, hi) of it (a colour block), then draws: pixel t from the output (a
// discretized logistic mixture, or each channel from its Bernoulli or
// categorical logits), or with G = pixel_steps > 1 steps per pixel (colour by
// colour) colour t % G of pixel t / G from its block of logits; and feeds it to
// the input slot.
//
// Threads split the batch: each runs every step for its own images. Slots are
// rings [B, R, Cp] of positions allocated by the caller (Cp: channels rounded
// up to 16, so the convolution micro-kernel's vectors never leave a position);
// position (y, x) of a slot W wide lives at (y W + x) % R. Operands read zeros outside their
// view (Ref). Draws read the caller's uniforms u [H, W, C + 1, B] (a mixture)
// or [H, W, C, B] (float64) exactly as the torch samplers do
// (fastgen.sampling.common: draw_mixture, draw; cpu/sampling_draw.h).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/cpu_features.h"  // FASTGEN_AVX512, fastgen::use_avx512()
#include "cpu/gate_math.h"     // the gate on AVX-512 vectors (gated_activation's math)
#include "cpu/sampling.h"
#include "cpu/sampling_act.h"  // PointOp, pointwise()
#include "cpu/sampling_draw.h"  // draw, draw_mixture
#include "cpu/sampling_kernels.h"  // avx512:: and portable::conv_rows, bind_slots
#include "schedule_code.h"     // the parsed program

namespace {

using namespace fastgen::sampling;  // the opcodes, activate()

#ifdef FASTGEN_AVX512
FASTGEN_AVX512_BEGIN
namespace avx512 {

// GATE's outputs [lo, hi) at one position (a: dc blocks of a tanh half and a sigmoid half of cout / dc
// channels each), 16 float32 or 8 float64 lanes at a time.
template <class T>
void gate(const T* a, T* o, int64_t cout, int64_t dc, int64_t lo, int64_t hi) {
  using W = fastgen::gate::avx512::V<T>;
  const int64_t cd = cout / dc;
  for (int64_t d = lo / cd; d * cd < hi; ++d) {
    const int64_t j1 = std::min(hi, (d + 1) * cd) - d * cd;
    const T* f = a + 2 * d * cd;
    T* out = o + d * cd;
    for (int64_t j = std::max(lo, d * cd) - d * cd; j < j1; j += W::L) {
      const typename W::M m = j1 - j >= W::L ? typename W::M(~0u) : W::tail(j1 - j);
      W::store(out + j, fastgen::gate::avx512::Gate<T>(W::load(f + j, m), W::load(f + cd + j, m)).out(), m);
    }
  }
}

}  // namespace avx512
FASTGEN_AVX512_END
#endif
using fastgen::schedule::Code;

struct Slot {
  int64_t C, H, W, R, Cp;
  int64_t mask;  // R - 1 when R is a power of two (the compiler's rings are): position % R as position & mask
};

using Ref = fastgen::schedule::RefCode;  // an operand: channels [c0, ..) of a slot through a view

template <class T>
struct Instr : PointOp<T> {
  int64_t op = 0, out = 0, ch = 0;  // ch: channels read from a (and b); COPY, FILL: written
  int64_t lo = 0, hi = 0;           // the output channels computed, of those written
  Ref a, b;
  const int64_t* queue = nullptr;  // positions y * W + x of the output slot, by step
  const int64_t* start = nullptr;  // [steps + 1]
  // CONV: taps (dy, dx), weights [taps][cin][ldw]. CONVT: per output class (y % sy, x % sx), the taps that
  // reach it and their weights packed the same way.
  int64_t sy = 1, sx = 1, ldw = 0;
  std::vector<int64_t> dy, dx;
  const T* wp = nullptr;  // the weights: the parameter's own memory when cout fills ldw, else w
  std::vector<T> w, bias;
  std::vector<std::vector<int64_t>> class_taps;
  std::vector<std::vector<T>> class_w;
  bool has_bias = false;
  int64_t out_off = 0;  // COPY, FILL
};

// One thread's working memory, reused at every step.
template <class T>
struct Scratch {
  std::vector<const T*> src;
  std::vector<T*> out, dst;  // CONV: output rows; their destinations when they go through buf
  std::vector<T> buf;        // CONV: rows x ldw, for a block that does not start and end on a vector
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
    const int64_t p = y * sl.W + x;
    return data[s] + (b * sl.R + (sl.mask >= 0 ? p & sl.mask : p % sl.R)) * sl.Cp;
  }

  // The operand at position (y, x) of its view, or zeros outside it.
  const T* read(const Ref& r, int64_t b, int64_t y, int64_t x) const {
    const int64_t sy = y - r.oy, sx = x - r.ox;
    if (sy < r.y0 || sy >= r.y1 || sx < r.x0 || sx >= r.x1) return zeros.data();
    return at(r.slot, b, sy, sx) + r.c0;
  }

  // Output channels [lo, hi) of `rows` rows. The micro-kernel works in whole vectors: a block that does not
  // start and end on one (or at the slot's last channel) goes through s.buf, so the channels of the other
  // blocks, computed at other steps, are left alone.
  void conv_kernel(int64_t rows, const T* const* src, int64_t taps, const Instr<T>& in, const T* w, T** out,
                   Scratch<T>& s) const {
    constexpr int64_t n = 64 / sizeof(T);
    const T* bias = in.has_bias ? in.bias.data() : nullptr;
    const int64_t co0 = in.lo / n * n, co1 = std::min(in.ldw, (in.hi + n - 1) / n * n);
    const bool exact = co0 == in.lo && (co1 == in.hi || in.hi == slots[in.out].C);
    if (!exact) {
      s.dst.assign(out, out + rows), s.buf.resize(rows * in.ldw);
      for (int64_t r = 0; r < rows; ++r) out[r] = s.buf.data() + r * in.ldw;
    }
#ifdef FASTGEN_AVX512
    if (avx512)
      avx512::conv_rows<T>(rows, src, taps, in.ch, w, in.ldw, co0, co1, out, bias);
    else
#endif
      portable::conv_rows<T>(rows, src, taps, in.ch, w, in.ldw, co0, co1, out, bias);
    if (!exact)
      for (int64_t r = 0; r < rows; ++r) std::copy(out[r] + in.lo, out[r] + in.hi, s.dst[r] + in.lo);
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
        for (int64_t t = 0; t < taps; ++t)
          s.src[r * taps + t] = read(in.a, b, y * in.sy + in.dy[t], x * in.sx + in.dx[t]);
      }
    conv_kernel(rows, s.src.data(), taps, in, in.wp, s.out.data(), s);
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
      conv_kernel(nb, s.src.data(), nt, in, in.class_w[cls].data(), s.out.data(), s);
    }
  }

  // A position-wise instruction at one position for images [b0, b1): the operands' pointers found once, each
  // further image's a ring further on (zeros stay zeros).
  void pointwise(const Instr<T>& in, int64_t b0, int64_t b1, int64_t y, int64_t x) const {
    const Slot& so = slots[in.out];
    T* o = at(in.out, b0, y, x);
    const int64_t c = in.ch, o_step = so.R * so.Cp;
    if (in.op == FILL) {
      for (int64_t b = b0; b < b1; ++b, o += o_step) std::fill(o + in.out_off + in.lo, o + in.out_off + in.hi, in.param);
      return;
    }
    const T* a = read(in.a, b0, y, x);
    const int64_t a_step = a == zeros.data() ? 0 : slots[in.a.slot].R * slots[in.a.slot].Cp;
    if (in.op == COPY) {
      for (int64_t b = b0; b < b1; ++b, o += o_step, a += a_step) std::copy(a + in.lo, a + in.hi, o + in.out_off + in.lo);
      return;
    }
    const int64_t cout = in.op == GATE ? c / 2 : c;
    const T* q = in.op == ADD || in.op == MUL ? read(in.b, b0, y, x) : nullptr;
    const int64_t q_step = q == nullptr || q == zeros.data() ? 0 : slots[in.b.slot].R * slots[in.b.slot].Cp;
#ifdef FASTGEN_AVX512
    if (in.op == GATE && avx512) {
      for (int64_t b = b0; b < b1; ++b, o += o_step, a += a_step) avx512::gate<T>(a, o, cout, in.dc, in.lo, in.hi);
      return;
    }
#endif
    for (int64_t b = b0; b < b1; ++b, o += o_step, a += a_step, q += q_step) {
      const T* k = in.op == CONST ? in.constant(b, y, x, so.H, so.W, c) : nullptr;
      fastgen::sampling::pointwise(in.op, in, a, q, k, o, cout, in.lo, in.hi);
    }
  }

  void run(const Instr<T>& in, const int64_t* pos, int64_t n, int64_t b0, int64_t b1, Scratch<T>& s) const {
    if (in.op == CONV) return conv(in, pos, n, b0, b1, s);
    if (in.op == CONVT) return conv_transpose(in, pos, n, b0, b1, s);
    const int64_t W = slots[in.out].W;
    for (int64_t p = 0; p < n; ++p) pointwise(in, b0, b1, pos[p] / W, pos[p] % W);
  }
};

// The CPU form of the parsed program (csrc/schedule_code.h): pointers, and each convolution's weights
// repacked [taps][cin][ldw] (ldw: the output slot's padded channels) with a padded bias.
template <class T>
std::vector<Instr<T>> decode(const std::vector<fastgen::schedule::Code>& codes, const std::vector<at::Tensor>& params,
                             const std::vector<Slot>& slots) {
  auto ptr = [&](int64_t i) -> const T* { return i < 0 ? nullptr : params[i].data_ptr<T>(); };
  std::vector<Instr<T>> out;
  for (const fastgen::schedule::Code& c : codes) {
    Instr<T> in;
    in.op = c.op, in.out = c.out, in.ch = c.ch, in.a = c.a, in.b = c.b, in.lo = c.lo, in.hi = c.hi;
    in.queue = params[c.queue].data_ptr<int64_t>(), in.start = params[c.start].data_ptr<int64_t>();
    in.set_point(c, ptr);
    in.out_off = c.out_off;
    if (c.op == CONV || c.op == CONVT) {
      const int64_t taps = c.dy.size(), cout = slots[c.out].C;
      in.sy = c.sy, in.sx = c.sx, in.dy = c.dy, in.dx = c.dx;
      in.ldw = slots[c.out].Cp;
      in.wp = ptr(c.w);
      if (cout != in.ldw) {  // rows padded to ldw (a copy per call: large weights are mostly aligned, read in place)
        in.w.assign(taps * in.ch * in.ldw, T(0));
        for (int64_t t = 0; t < taps * in.ch; ++t) std::copy_n(in.wp + t * cout, cout, in.w.begin() + t * in.ldw);
        in.wp = in.w.data();
      }
      in.has_bias = c.bias >= 0;
      if (in.has_bias) {
        in.bias.assign(in.ldw, T(0));
        std::copy_n(ptr(c.bias), cout, in.bias.begin());
      }
      if (c.op == CONVT) {  // the taps that reach each output class (y % sy, x % sx): (y - dy) divides exactly
        const int64_t block = in.ch * in.ldw;
        for (int64_t py = 0; py < in.sy; ++py)
          for (int64_t px = 0; px < in.sx; ++px) {
            std::vector<int64_t> ts;
            std::vector<T> ws;
            for (int64_t t = 0; t < taps; ++t)
              if (((py - in.dy[t]) % in.sy + in.sy) % in.sy == 0 && ((px - in.dx[t]) % in.sx + in.sx) % in.sx == 0) {
                ts.push_back(t);
                ws.insert(ws.end(), in.wp + t * block, in.wp + (t + 1) * block);
              }
            in.class_taps.push_back(ts);
            in.class_w.push_back(ws);
          }
      }
    }
    out.push_back(std::move(in));
  }
  return out;
}

template <class T>
void generate(const std::vector<Slot>& slots, const std::vector<fastgen::schedule::Code>& code,
              const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& bufs, const at::Tensor& u,
              const at::Tensor& feed, at::Tensor& images, at::Tensor& out_params, const std::vector<int64_t>& config,
              double temperature, int64_t t0, int64_t t1, bool teacher) {
  const int64_t C = config[cfg::CHANNELS], H = config[cfg::HEIGHT], W = config[cfg::WIDTH],
                in_slot = config[cfg::INPUT], M = config[cfg::NR_MIX], K = config[cfg::OUT_CHANNELS],
                L = config[cfg::LEVELS], like = config[cfg::LIKELIHOOD], G = config[cfg::PIXEL_STEPS];
  const int64_t per = like == CATEGORICAL ? L : 1;  // logits per channel (Bernoulli, categorical)
  const int64_t draws = like == LOGISTIC_MIXTURE ? C + 1 : C;  // uniforms per pixel
  Engine<T> e;
  e.B = images.size(0);
  e.slots = slots;
  e.avx512 = fastgen::use_avx512();
  bind_slots(bufs, slots, e.data, e.zeros);
  const int64_t* o = config.data() + cfg::OUT_SLOT;
  const Ref out_ref{o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]};
  const std::vector<Instr<T>> prog = decode<T>(code, params, slots);
  const double* uu = u.data_ptr<double>();
  const T* table = feed.data_ptr<T>();
  int64_t* img = images.data_ptr<int64_t>();
  T* po = teacher ? out_params.data_ptr<T>() : nullptr;
  const int64_t B = e.B;
  const T temp = static_cast<T>(temperature);

  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    Scratch<T> s;
    std::vector<int64_t> lv(C);
    std::vector<double> terms;
    for (int64_t t = t0; t < t1; ++t) {
      for (const Instr<T>& in : prog) {
        const int64_t lo = in.start[t], hi = in.start[t + 1];
        if (hi > lo) e.run(in, in.queue + lo, hi - lo, b0, b1, s);
      }
      const int64_t pix = t / G, y = pix / W, x = pix % W;
      const int64_t c0 = G == 1 ? 0 : t % G, c1 = G == 1 ? C : c0 + 1;  // the channels drawn at this step
      for (int64_t b = b0; b < b1; ++b) {
        const T* p = e.read(out_ref, b, y, x);
        if (teacher) {  // the output's block of the drawn channels: all of it at once
          const int64_t k0 = G == 1 ? 0 : c0 * (K / G), k1 = G == 1 ? K : k0 + K / G;
          for (int64_t k = k0; k < k1; ++k) po[((b * K + k) * H + y) * W + x] = p[k];
          for (int64_t c = c0; c < c1; ++c) lv[c] = img[((b * C + c) * H + y) * W + x];
        } else if (like == LOGISTIC_MIXTURE) {
          draw_mixture<T>(p, C, M, temp, uu + pix * draws * B + b, B, lv.data());
        } else {  // each channel from its own logits
          for (int64_t c = c0; c < c1; ++c)
            lv[c] = draw<T>(p + c * per, L, like == CATEGORICAL, temperature, uu[(pix * draws + c) * B + b],
                            terms);
        }
        T* in = e.at(in_slot, b, y, x);
        for (int64_t c = c0; c < c1; ++c) {
          img[((b * C + c) * H + y) * W + x] = lv[c];
          in[c] = table[lv[c]];
        }
      }
    }
  });
}

}  // namespace

namespace fastgen {

void sample_scheduled(const std::vector<int64_t>& slot_info, const std::vector<int64_t>& code_list,
                      const std::vector<at::Tensor>& params, const std::vector<double>& scalars,
                      const std::vector<at::Tensor>& bufs, const at::Tensor& u, const at::Tensor& feed,
                      at::Tensor images, at::Tensor out_params, const std::vector<int64_t>& config,
                      double temperature, int64_t t0, int64_t t1, bool teacher) {
  using namespace fastgen::code;  // cfg, the likelihoods
  TORCH_CHECK(config.size() == cfg::LEN, "sample_scheduled: config must have fastgen/sampling/code.py's CONFIG fields");
  TORCH_CHECK(slot_info.size() == 4 * bufs.size(), "sample_scheduled: one buffer per slot");
  const at::ScalarType dt = feed.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "sample_scheduled: float32 or float64 only, got ", dt);
  const int64_t C = config[cfg::CHANNELS], H = config[cfg::HEIGHT], W = config[cfg::WIDTH], M = config[cfg::NR_MIX],
                K = config[cfg::OUT_CHANNELS], L = config[cfg::LEVELS], like = config[cfg::LIKELIHOOD],
                G = config[cfg::PIXEL_STEPS];
  TORCH_CHECK(like == LOGISTIC_MIXTURE || like == BERNOULLI || like == CATEGORICAL,
              "sample_scheduled: unknown likelihood ", like);
  const bool mixture = like == LOGISTIC_MIXTURE;
  TORCH_CHECK(G == 1 || (G == C && !mixture), "sample_scheduled: pixel_steps must be 1, or C (colour by colour: "
              "Bernoulli and categorical draws)");
  TORCH_CHECK(!mixture || (L == 256 && ((C == 1 && K == 3 * M) || (C == 3 && K == 10 * M))),
              "sample_scheduled: a mixture has 256 levels and K = 3 nr_mix (C = 1) or 10 nr_mix (C = 3)");
  TORCH_CHECK(mixture || (L == 2 && like == BERNOULLI && K == C) || (L >= 2 && like == CATEGORICAL && K == C * L),
              "sample_scheduled: Bernoulli logits are [C] per pixel (2 levels), categorical [C L]");
  const int64_t draws = mixture ? C + 1 : C;
  const at::Device device = images.device();
  TORCH_CHECK(images.dim() == 4 && images.scalar_type() == at::kLong && images.is_contiguous() &&
                  images.size(1) == C && images.size(2) == H && images.size(3) == W,
              "sample_scheduled: images must be contiguous int64 [B, C, H, W]");
  const int64_t B = images.size(0);
  TORCH_CHECK(u.scalar_type() == at::kDouble && u.is_contiguous() && u.numel() == H * W * draws * B &&
                  u.device() == device,
              "sample_scheduled: u must be contiguous float64 [H, W, C + 1, B] (a mixture) or [H, W, C, B] on the "
              "images' device");
  TORCH_CHECK(0 <= t0 && t0 <= t1 && t1 <= H * W * G, "sample_scheduled: bad step range");
  std::vector<Slot> slots;
  std::vector<fastgen::schedule::SlotInfo> info;
  for (size_t s = 0; s < bufs.size(); ++s) {
    const at::Tensor& t = bufs[s];
    const int64_t c = slot_info[4 * s], h = slot_info[4 * s + 1], w = slot_info[4 * s + 2], r = slot_info[4 * s + 3];
    TORCH_CHECK(t.scalar_type() == dt && t.is_contiguous() && t.device() == device && t.dim() == 3 &&
                    t.size(0) == B && r >= 1 && r <= h * w && t.size(1) == r && t.size(2) >= c && t.size(2) % 16 == 0,
                "sample_scheduled: slot ", s, " must be a contiguous ring [B, R, Cp] on the images' device, with "
                "1 <= R <= H W and Cp >= C a multiple of 16");
    slots.push_back({c, h, w, r, t.size(2), (r & (r - 1)) == 0 ? r - 1 : -1});
    info.push_back({c, h, w, r});
  }
  const int64_t in_slot = config[cfg::INPUT];
  TORCH_CHECK(in_slot >= 0 && in_slot < (int64_t)slots.size() && slots[in_slot].C == C && slots[in_slot].H == H &&
                  slots[in_slot].W == W,
              "sample_scheduled: the input slot must be [C, H, W]");
  for (const auto& p : params)
    TORCH_CHECK(p.is_contiguous() && p.device() == device && (p.scalar_type() == dt || p.scalar_type() == at::kLong),
                "sample_scheduled: parameters must be contiguous ", dt, " (queues int64) on the images' device");
  TORCH_CHECK(feed.numel() == L && feed.is_contiguous() && feed.device() == device,
              "sample_scheduled: a feed table of one value per level on the images' device");
  const std::vector<fastgen::schedule::Code> code =
      fastgen::schedule::parse(code_list, params, scalars, info, H * W * G, dt);
  fastgen::schedule::parse_ref(config.data() + cfg::OUT_SLOT, info, K, false);  // checks the output's Ref
  if (teacher) {
    TORCH_CHECK(out_params.scalar_type() == dt && out_params.is_contiguous() && out_params.dim() == 4 &&
                    out_params.size(0) == B && out_params.size(1) == K && out_params.size(2) == H &&
                    out_params.size(3) == W && out_params.device() == device,
                "sample_scheduled: teacher forcing needs contiguous parameters [B, K, H, W]");
    TORCH_CHECK(images.numel() == 0 || (images.min().item<int64_t>() >= 0 && images.max().item<int64_t>() < L),
                "sample_scheduled: teacher images must hold values 0..", L - 1);
  }
  if (images.is_cuda()) {
#ifdef FASTGEN_WITH_CUDA
    return sample_scheduled_cuda(info, code, params, bufs, u, feed, images, out_params, config, temperature, t0, t1,
                                 teacher);
#else
    TORCH_CHECK(false, "sample_scheduled: fastgen._C was built without CUDA");
#endif
  }
  if (dt == at::kFloat)
    generate<float>(slots, code, params, bufs, u, feed, images, out_params, config, temperature, t0, t1, teacher);
  else
    generate<double>(slots, code, params, bufs, u, feed, images, out_params, config, temperature, t0, t1, teacher);
}

}  // namespace fastgen
