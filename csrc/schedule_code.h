// The code of a multi-scale schedule (fastgen/sampling/schedule.py,
// Schedule.encode), parsed and checked once for both engines: the CPU engine
// (csrc/cpu/schedule.cpp) and the CUDA glue (csrc/cuda/schedule_glue.cpp)
// turn each parsed instruction into their own form.
#pragma once
#include <torch/extension.h>

#include <vector>

#include "sampling_format.h"  // the opcodes (generated from fastgen/sampling/code.py)

namespace fastgen {
namespace schedule {

using namespace fastgen::code;  // the opcodes

// A slot: channels, height, width, ring rows.
struct SlotInfo {
  int64_t C, H, W, R;
};

// An operand: channels [c0, ..) of a slot through a view; slot -1: none (Ref in schedule.py).
struct RefCode {
  int64_t slot = -1, c0 = 0, oy = 0, ox = 0, y0 = 0, y1 = 0, x0 = 0, x1 = 0;
};

// One instruction; parameters as indexes into the params list (-1: none).
struct Code {
  int64_t op = 0, out = 0, ch = 0;  // ch: channels read from a (and b); COPY, FILL: written
  RefCode a, b;
  int64_t queue = -1, start = -1;   // int64 params: positions by step, [steps + 1] starts
  int64_t w = -1, bias = -1;        // CONV, CONVT: weight [taps, ch, C_out], bias [C_out]
  int64_t sy = 1, sx = 1;
  std::vector<int64_t> dy, dx;
  int64_t act = 0;
  double param = 0;                 // ACT: slope / alpha; ADD: alpha; FILL: the value
  int64_t scale = -1, shift = -1;   // AFFINE: [ch]
  int64_t cst = -1;                 // CONST: [B, ch] or [B, H, W, ch]
  bool multiply = false, is_map = false;
  int64_t dc = 1, out_off = 0;      // GATE; COPY, FILL
  int64_t lo = 0, hi = 0;           // the output channels computed: [lo, hi) of those written
};

inline RefCode parse_ref(const int64_t* c, const std::vector<SlotInfo>& slots, int64_t channels, bool optional) {
  using namespace fastgen::code::field;
  RefCode r;
  if (optional && c[REF_SLOT] == -1) return r;
  r.slot = c[REF_SLOT], r.c0 = c[REF_C0], r.oy = c[REF_OY], r.ox = c[REF_OX];
  r.y0 = c[REF_Y0], r.y1 = c[REF_Y1], r.x0 = c[REF_X0], r.x1 = c[REF_X1];
  TORCH_CHECK(r.slot >= 0 && r.slot < (int64_t)slots.size(), "sample_scheduled: bad slot index ", r.slot);
  const SlotInfo& s = slots[r.slot];
  TORCH_CHECK(r.c0 >= 0 && r.c0 + channels <= s.C && 0 <= r.y0 && r.y1 <= s.H && 0 <= r.x0 && r.x1 <= s.W,
              "sample_scheduled: an operand outside its slot");
  return r;
}

// Whether a queue (positions < n) and its starts ([steps + 1], increasing from 0 to at most the queue's
// length) are sound: loops over CPU memory (the engine may run per row: this runs at every call), tensor
// ops on a GPU.
inline bool queue_ok(const at::Tensor& q, const at::Tensor& st, int64_t steps, int64_t n) {
  if (st.dim() != 1 || q.dim() != 1) return false;
  if (q.is_cuda())
    return st[0].item<int64_t>() == 0 && st[steps].item<int64_t>() <= q.numel() &&
           (st.slice(0, 1) >= st.slice(0, 0, steps)).all().item<bool>() &&
           (q.numel() == 0 || (q.min().item<int64_t>() >= 0 && q.max().item<int64_t>() < n));
  const int64_t* s = st.data_ptr<int64_t>();
  const int64_t* p = q.data_ptr<int64_t>();
  bool ok = s[0] == 0 && s[steps] <= q.numel();
  for (int64_t t = 0; t < steps; ++t) ok &= s[t + 1] >= s[t];
  for (int64_t i = 0; i < q.numel(); ++i) ok &= p[i] >= 0 && p[i] < n;
  return ok;
}

// Parses and checks the code against the slots, the params (dtype dt; queues int64) and `steps` = H * W
// times the steps per pixel.
inline std::vector<Code> parse(const std::vector<int64_t>& code, const std::vector<at::Tensor>& params,
                               const std::vector<double>& scalars, const std::vector<SlotInfo>& slots,
                               int64_t steps, at::ScalarType dt) {
  const int64_t nparams = params.size();
  auto param = [&](int64_t i, int64_t numel, at::ScalarType type) {
    TORCH_CHECK(i >= 0 && i < nparams, "sample_scheduled: bad parameter index ", i);
    TORCH_CHECK(params[i].scalar_type() == type && (numel < 0 || params[i].numel() == numel),
                "sample_scheduled: a parameter of the wrong size or dtype");
    return i;
  };
  auto scalar = [&](int64_t i) {
    TORCH_CHECK(i >= 0 && i < (int64_t)scalars.size(), "sample_scheduled: bad scalar index ", i);
    return scalars[i];
  };
  using namespace fastgen::code::field;  // the fields' offsets after an instruction's length
  std::vector<Code> out;
  for (size_t pos = 0; pos < code.size();) {
    const int64_t len = code[pos];
    TORCH_CHECK(len >= 1 + HEAD_LEN && pos + len <= code.size(), "sample_scheduled: malformed program");
    const int64_t* c = code.data() + pos + 1;
    const int64_t n = len - 1;  // fields after the length
    Code in;
    in.op = c[OP], in.out = c[OUT], in.ch = c[CHANNELS];
    TORCH_CHECK(in.out >= 0 && in.out < (int64_t)slots.size() && in.ch >= 0, "sample_scheduled: bad instruction");
    const SlotInfo& so = slots[in.out];
    if (in.op != FILL) in.a = parse_ref(c + A_SLOT, slots, in.ch, false);
    in.b = parse_ref(c + B_SLOT, slots, in.ch, true);
    in.queue = param(c[QUEUE], -1, at::kLong);
    in.start = param(c[START], steps + 1, at::kLong);
    TORCH_CHECK(queue_ok(params[in.queue], params[in.start], steps, so.H * so.W),
                "sample_scheduled: a queue outside its slot, or starts that do not increase from 0");
    switch (in.op) {
      case CONV:
      case CONVT: {  // CONVT's fields are CONV's (fastgen/sampling/code.py)
        TORCH_CHECK(n >= CONV_LEN && n == CONV_LEN + 2 * c[CONV_TAPS], "sample_scheduled: malformed convolution");
        const int64_t taps = c[CONV_TAPS];
        in.w = param(c[CONV_WEIGHT], taps * in.ch * so.C, dt);
        if (c[CONV_BIAS] >= 0) in.bias = param(c[CONV_BIAS], so.C, dt);
        in.sy = c[CONV_SY], in.sx = c[CONV_SX];
        TORCH_CHECK(in.sy >= 1 && in.sx >= 1, "sample_scheduled: bad stride");
        in.dy.assign(c + CONV_LEN, c + CONV_LEN + taps);
        in.dx.assign(c + CONV_LEN + taps, c + CONV_LEN + 2 * taps);
        break;
      }
      case ACT:
        TORCH_CHECK(n == ACT_LEN, "sample_scheduled: malformed ACT");
        in.act = c[ACT_ACT], in.param = scalar(c[ACT_SCALAR]);
        break;
      case AFFINE:
        TORCH_CHECK(n == AFFINE_LEN, "sample_scheduled: malformed AFFINE");
        in.scale = param(c[AFFINE_SCALE], in.ch, dt), in.shift = param(c[AFFINE_SHIFT], in.ch, dt);
        break;
      case ADD:
        TORCH_CHECK(n == ADD_LEN && in.b.slot >= 0, "sample_scheduled: malformed ADD");
        in.param = scalar(c[ADD_SCALAR]);
        break;
      case MUL: TORCH_CHECK(n == MUL_LEN && in.b.slot >= 0, "sample_scheduled: malformed MUL"); break;
      case CONST: {
        TORCH_CHECK(n == CONST_LEN, "sample_scheduled: malformed CONST");
        in.multiply = c[CONST_MULTIPLY] != 0, in.is_map = c[CONST_IS_MAP] != 0;
        in.cst = param(c[CONST_CONST], -1, dt);
        const at::Tensor& k = params[in.cst];
        TORCH_CHECK(k.dim() >= 1 && k.numel() == (in.is_map ? so.H * so.W : 1) * in.ch * k.size(0),
                    "sample_scheduled: CONST of the wrong size");
        break;
      }
      case GATE:
        TORCH_CHECK(n == GATE_LEN && c[GATE_DATA_CHANNELS] >= 1 && in.ch % (2 * c[GATE_DATA_CHANNELS]) == 0,
                    "sample_scheduled: malformed GATE");
        in.dc = c[GATE_DATA_CHANNELS];
        break;
      case COPY:
        TORCH_CHECK(n == COPY_LEN && c[COPY_OUT_OFF] >= 0 && c[COPY_OUT_OFF] + in.ch <= so.C,
                    "sample_scheduled: malformed COPY");
        in.out_off = c[COPY_OUT_OFF];
        break;
      case FILL:
        TORCH_CHECK(n == FILL_LEN && c[FILL_OUT_OFF] >= 0 && c[FILL_OUT_OFF] + in.ch <= so.C,
                    "sample_scheduled: malformed FILL");
        in.out_off = c[FILL_OUT_OFF], in.param = scalar(c[FILL_SCALAR]);
        break;
      default: TORCH_CHECK(false, "sample_scheduled: unknown opcode ", in.op);
    }
    if (in.op != COPY && in.op != FILL && in.op != CONV && in.op != CONVT)
      TORCH_CHECK(so.C == (in.op == GATE ? in.ch / 2 : in.ch), "sample_scheduled: output slot channels");
    const int64_t width = in.op == CONV || in.op == CONVT ? so.C : in.op == GATE ? in.ch / 2 : in.ch;
    in.lo = c[LO], in.hi = c[HI];
    TORCH_CHECK(0 <= in.lo && in.lo < in.hi && in.hi <= width, "sample_scheduled: bad output channel range");
    out.push_back(std::move(in));
    pos += len;
  }
  return out;
}

}  // namespace schedule
}  // namespace fastgen
