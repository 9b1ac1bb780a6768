// The C++ engine of cached sampling: runs a Program compiled by
// fastgen/sampling/program.py (the instruction set and its encoding are
// documented there, in Program.encode) for the rows [y0, y1) of the image, with
// no Python per pixel: the pixel pass, the draw from the logits, the feed and
// the post pass at every pixel and colour channel (colour block by block when
// Program.blocks = C), the row pass after every row.
//
// Threads split the batch: each runs the whole loop for its own images, so the
// loop needs no synchronisation (a batch smaller than the thread count leaves
// threads idle). Slots are rings [B, rows, W + 2 pad, Cp] allocated by the
// caller (Cp: channels rounded up to 16, so the micro-kernel's vectors never
// leave a position; the extra channels stay zero). Draws read the caller's
// uniforms u [H, W, C, B] (float64) exactly as the torch samplers do.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/cpu_features.h"  // FASTGEN_AVX512, fastgen::use_avx512()
#include "cpu/sampling.h"
#include "cpu/sampling_act.h"  // PointOp, pointwise()
#include "cpu/sampling_draw.h"  // draw
#include "cpu/sampling_kernels.h"  // avx512:: and portable::conv_rows, bind_slots
#include "sampling_code.h"  // the program's code lists, parsed for both engines

namespace {

using namespace fastgen::sampling;  // the opcodes

template <class T>
struct Instr : PointOp<T> {
  int64_t op = 0, out = 0, a = 0, b = -1;
  // CONV: weights repacked [taps][cin][ldw] and bias [ldw], zero beyond cout
  int64_t taps = 0, cin = 0, ldw = 0;
  std::vector<int64_t> dy, dx;
  std::vector<T> w, bias;
  bool has_bias = false;
  int64_t out_off = 0, in_off = 0, count = 0;  // COPY
};

struct Slot {
  int64_t C, R, Cp;
};

// One thread's working memory, reused at every pixel (no allocation in the loop).
template <class T>
struct Scratch {
  std::vector<const T*> src;  // CONV: rows x taps input pointers
  std::vector<T*> out, dst;   // CONV: output rows; their destinations when they go through buf
  std::vector<T> buf;         // CONV: rows x ldw, for a colour block not aligned to vectors
  std::vector<double> terms;  // the draw: softmax terms
};

template <class T>
struct Engine {
  int64_t B, C, H, W, P, in_slot, out_slot, L, blocks;
  bool categorical;
  T temperature;
  std::vector<Slot> slots;
  std::vector<T*> data;
  std::vector<T> zeros;  // a tap above row 0 reads zeros
  bool avx512;

  T* at(int64_t s, int64_t b, int64_t y, int64_t x) const {
    const Slot& sl = slots[s];
    return data[s] + ((b * sl.R + y % sl.R) * (W + 2 * P) + x + P) * sl.Cp;
  }

  // Output channels [lo, hi). The kernel works in whole vectors: a colour
  // block that does not start and end on one goes through a scratch buffer, so
  // that the other blocks' channels (which in-place instructions may have
  // updated since) are left alone.
  void conv(const Instr<T>& in, int64_t b0, int64_t b1, int64_t y, int64_t x0, int64_t x1, int64_t lo,
            int64_t hi, Scratch<T>& s) const {
    constexpr int64_t n = 64 / sizeof(T);
    const int64_t rows = (b1 - b0) * (x1 - x0);
    const int64_t co0 = lo / n * n, co1 = std::min(in.ldw, (hi + n - 1) / n * n);
    const bool exact = co0 == lo && (co1 == hi || hi == slots[in.out].C);
    s.src.resize(rows * in.taps);
    s.out.resize(rows);
    if (!exact) s.dst.resize(rows), s.buf.resize(rows * in.ldw);
    const T** src = s.src.data();
    T** out = s.out.data();
    int64_t r = 0;
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t x = x0; x < x1; ++x, ++r) {
        out[r] = at(in.out, b, y, x);
        if (!exact) s.dst[r] = out[r], out[r] = s.buf.data() + r * in.ldw;
        for (int64_t t = 0; t < in.taps; ++t)
          src[r * in.taps + t] = y + in.dy[t] < 0 ? zeros.data() : at(in.a, b, y + in.dy[t], x + in.dx[t]);
      }
    const T* bias = in.has_bias ? in.bias.data() : nullptr;
#ifdef FASTGEN_AVX512
    if (avx512)
      avx512::conv_rows<T>(rows, src, in.taps, in.cin, in.w.data(), in.ldw, co0, co1, out, bias);
    else
#endif
      portable::conv_rows<T>(rows, src, in.taps, in.cin, in.w.data(), in.ldw, co0, co1, out, bias);
    if (!exact)
      for (int64_t r = 0; r < rows; ++r) std::copy(out[r] + lo, out[r] + hi, s.dst[r] + lo);
  }

  // One instruction at one position, output channels [lo, hi) (the non-convolution ops).
  void pointwise(const Instr<T>& in, int64_t b, int64_t y, int64_t x, int64_t lo, int64_t hi) const {
    T* o = at(in.out, b, y, x);
    const T* a = at(in.a, b, y, x);
    if (in.op == COPY) {
      std::memmove(o + in.out_off, a + in.in_off, in.count * sizeof(T));
      return;
    }
    const int64_t c = slots[in.out].C;
    const T* q = in.op == ADD || in.op == MUL ? at(in.b, b, y, x) : nullptr;
    const T* k = in.op == CONST ? in.constant(b, y, x, H, W, c) : nullptr;
    fastgen::sampling::pointwise(in.op, in, a, q, k, o, c, lo, hi);
  }

  // The instructions at row y, columns [x0, x1): all output channels, or colour block `block` (>= 0).
  void run(const std::vector<Instr<T>>& code, int64_t b0, int64_t b1, int64_t y, int64_t x0, int64_t x1,
           Scratch<T>& s, int64_t block = -1) const {
    for (const auto& in : code) {
      int64_t lo = 0, hi = slots[in.out].C;
      if (block >= 0) lo = block * hi / blocks, hi = (block + 1) * hi / blocks;
      if (in.op == CONV) {
        conv(in, b0, b1, y, x0, x1, lo, hi, s);
      } else {
        for (int64_t b = b0; b < b1; ++b)
          for (int64_t x = x0; x < x1; ++x) pointwise(in, b, y, x, lo, hi);
      }
    }
  }
};

// The CPU form of the parsed instructions: pointers, and each convolution's weights repacked
// [taps][cin][ldw] (ldw: the output slot's padded channels) with a padded bias.
template <class T>
std::vector<Instr<T>> decode(const std::vector<int64_t>& code, const std::vector<at::Tensor>& params,
                             const std::vector<double>& scalars, const std::vector<int64_t>& slot_info,
                             const std::vector<Slot>& slots) {
  std::vector<Instr<T>> out;
  auto ptr = [&](int64_t i) -> const T* { return i < 0 ? nullptr : params[i].data_ptr<T>(); };
  for (const fastgen::sampling::Code& c : fastgen::sampling::parse(code, params, scalars, slot_info)) {
    Instr<T> in;
    in.op = c.op, in.out = c.out, in.a = c.a, in.b = c.b;
    in.set_point(c, ptr);
    in.out_off = c.out_off, in.in_off = c.in_off, in.count = c.count;
    if (c.op == CONV) {
      in.taps = c.dy.size(), in.dy = c.dy, in.dx = c.dx, in.cin = c.cin;
      in.ldw = slots[in.out].Cp;
      in.w.assign(in.taps * in.cin * in.ldw, T(0));
      const T* wp = ptr(c.w);
      for (int64_t t = 0; t < in.taps * in.cin; ++t)
        std::copy(wp + t * c.cout, wp + (t + 1) * c.cout, in.w.begin() + t * in.ldw);
      in.has_bias = c.bias >= 0;
      if (in.has_bias) {
        in.bias.assign(in.ldw, T(0));
        std::copy(ptr(c.bias), ptr(c.bias) + c.cout, in.bias.begin());
      }
    }
    out.push_back(std::move(in));
  }
  return out;
}

template <class T>
void generate(const std::vector<int64_t>& slot_info, const std::vector<Slot>& slots,
              const std::vector<int64_t>& pixel_code,
              const std::vector<int64_t>& post_code, const std::vector<int64_t>& row_code,
              const std::vector<at::Tensor>& params, const std::vector<double>& scalars,
              const std::vector<at::Tensor>& bufs, const at::Tensor& u, const at::Tensor& feed, at::Tensor& images,
              at::Tensor& logits, const std::vector<int64_t>& config, double temperature, int64_t y0, int64_t y1,
              bool teacher) {
  Engine<T> e;
  e.C = config[0], e.H = config[1], e.W = config[2], e.P = config[3];
  e.in_slot = config[4], e.out_slot = config[5], e.categorical = config[6] != 0, e.L = config[7];
  e.blocks = config[8];
  e.B = images.size(0);
  e.slots = slots;
  e.avx512 = fastgen::use_avx512();
  bind_slots(bufs, slots, e.data, e.zeros);
  const auto pixel = decode<T>(pixel_code, params, scalars, slot_info, slots);
  const auto post = decode<T>(post_code, params, scalars, slot_info, slots);
  const auto row = decode<T>(row_code, params, scalars, slot_info, slots);
  const double* uu = u.data_ptr<double>();
  const T* table = feed.data_ptr<T>();
  int64_t* img = images.data_ptr<int64_t>();
  T* lg = teacher ? logits.data_ptr<T>() : nullptr;
  const int64_t C = e.C, H = e.H, W = e.W, B = e.B, L = e.L;
  const int64_t per = e.categorical ? L : 1;  // logits per colour channel
  const int64_t cout = slots[e.out_slot].C;

  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    Scratch<T> s;
    for (int64_t y = y0; y < y1; ++y) {
      for (int64_t x = 0; x < W; ++x) {
        for (int64_t b = b0; b < b1; ++b)  // the ring row still holds row y - rows
          std::fill_n(e.at(e.in_slot, b, y, x), slots[e.in_slot].Cp, T(0));
        for (int64_t c = 0; c < C; ++c) {
          const int64_t block = e.blocks > 1 ? c : -1;
          e.run(pixel, b0, b1, y, x, x + 1, s, block);
          for (int64_t b = b0; b < b1; ++b) {
            const T* lo = e.at(e.out_slot, b, y, x) + c * per;
            int64_t* v = img + ((b * C + c) * H + y) * W + x;
            if (teacher) {
              for (int64_t i = 0; i < per; ++i) lg[((b * cout + c * per + i) * H + y) * W + x] = lo[i];
            } else {
              *v = draw<T>(lo, L, e.categorical, temperature, uu[((y * W + x) * C + c) * B + b], s.terms);
            }
            e.at(e.in_slot, b, y, x)[c] = table[*v];
          }
          if (block >= 0) e.run(post, b0, b1, y, x, x + 1, s, block);  // block c of what depends on the pixel
        }
        if (e.blocks == 1) e.run(post, b0, b1, y, x, x + 1, s);
      }
      if (y + 1 < H) e.run(row, b0, b1, y, 0, W, s);
    }
  });
}

}  // namespace

namespace fastgen {

void sample_cached(const std::vector<int64_t>& slot_info, const std::vector<int64_t>& pixel,
                   const std::vector<int64_t>& post, const std::vector<int64_t>& row,
                   const std::vector<at::Tensor>& params, const std::vector<double>& scalars,
                   const std::vector<at::Tensor>& bufs, const at::Tensor& u, const at::Tensor& feed,
                   at::Tensor images, at::Tensor logits, const std::vector<int64_t>& config, double temperature,
                   int64_t y0, int64_t y1, bool teacher) {
  TORCH_CHECK(config.size() == 9,
              "sample_cached: config must be [C, H, W, pad, input, output, categorical, L, blocks]");
  TORCH_CHECK(config[8] == 1 || config[8] == config[0], "sample_cached: blocks must be 1 or C");
  TORCH_CHECK(slot_info.size() == 2 * bufs.size(), "sample_cached: one buffer per slot");
  const at::ScalarType dt = feed.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "sample_cached: float32 or float64 only, got ", dt);
  const int64_t C = config[0], H = config[1], W = config[2], P = config[3];
  TORCH_CHECK(images.dim() == 4 && images.scalar_type() == at::kLong && images.is_contiguous() &&
                  images.size(1) == C && images.size(2) == H && images.size(3) == W,
              "sample_cached: images must be contiguous int64 [B, C, H, W]");
  const int64_t B = images.size(0);
  TORCH_CHECK(u.scalar_type() == at::kDouble && u.is_contiguous() && u.numel() == H * W * C * B,
              "sample_cached: u must be contiguous float64 [H, W, C, B]");
  TORCH_CHECK(0 <= y0 && y0 <= y1 && y1 <= H, "sample_cached: bad row range");
  std::vector<Slot> slots;
  for (size_t s = 0; s < bufs.size(); ++s) {
    const at::Tensor& t = bufs[s];
    const int64_t c = slot_info[2 * s], r = slot_info[2 * s + 1];
    TORCH_CHECK(t.scalar_type() == dt && t.is_contiguous() && t.dim() == 4 && t.size(0) == B && t.size(1) == r &&
                    t.size(2) == W + 2 * P && t.size(3) >= c && t.size(3) % 16 == 0,
                "sample_cached: slot ", s, " must be contiguous [B, rows, W + 2 pad, Cp] with Cp >= C, a multiple "
                "of 16");
    slots.push_back({c, r, t.size(3)});
  }
  for (const auto& p : params)
    TORCH_CHECK(p.scalar_type() == dt && p.is_contiguous(), "sample_cached: parameters must be contiguous ", dt);
  const int64_t levels = config[6] ? config[7] : 2;
  TORCH_CHECK(feed.numel() == levels && feed.is_contiguous(), "sample_cached: feed table of ", levels, " values");
  TORCH_CHECK(slots[config[5]].C == C * (config[6] ? config[7] : 1), "sample_cached: output slot channels");
  if (teacher) {
    TORCH_CHECK(logits.scalar_type() == dt && logits.is_contiguous() && logits.dim() == 4 &&
                    logits.size(0) == B && logits.size(1) == slots[config[5]].C && logits.size(2) == H &&
                    logits.size(3) == W,
                "sample_cached: teacher forcing needs contiguous logits [B, C_out, H, W]");
    TORCH_CHECK(images.numel() == 0 || (images.min().item<int64_t>() >= 0 &&
                                         images.max().item<int64_t>() < levels),
                "sample_cached: teacher images must hold values 0..", levels - 1);
  }
  if (images.is_cuda()) {
#ifdef FASTGEN_WITH_CUDA
    return sample_cached_cuda(slot_info, pixel, post, row, params, scalars, bufs, u, feed, images, logits, config,
                              temperature, y0, y1, teacher);
#else
    TORCH_CHECK(false, "sample_cached: fastgen._C was built without CUDA");
#endif
  }
  if (dt == at::kFloat)
    generate<float>(slot_info, slots, pixel, post, row, params, scalars, bufs, u, feed, images, logits, config,
                    temperature, y0, y1, teacher);
  else
    generate<double>(slot_info, slots, pixel, post, row, params, scalars, bufs, u, feed, images, logits, config,
                     temperature, y0, y1, teacher);
}

}  // namespace fastgen
