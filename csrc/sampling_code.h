// The code lists of a cached-sampling program (fastgen/sampling/program.py,
// Program.encode), parsed and checked once for both engines: the CPU engine
// (csrc/cpu/sampling.cpp) and the CUDA glue (csrc/cuda/sampling_glue.cpp) turn
// each parsed instruction into their own form.
#pragma once
#include <torch/extension.h>

#include <vector>

#include "sampling_format.h"  // the opcodes and activations (generated from fastgen/sampling/code.py)

namespace fastgen {
namespace sampling {

// The opcodes and activations; CONVT and FILL are the multi-scale schedules' only (csrc/schedule_code.h).
using namespace fastgen::code;

// One instruction; parameters as indexes into the params list (-1: none).
struct Code {
  int64_t op = 0, out = 0, a = 0, b = -1;
  std::vector<int64_t> dy, dx;     // CONV: one (dy, dx) per tap
  int64_t w = -1, bias = -1;       // CONV: weight [taps, cin, cout], bias [cout]
  int64_t cin = 0, cout = 0;       // CONV
  int64_t act = 0;                 // ACT
  double param = 0;                // ACT: slope / alpha; ADD: alpha
  int64_t scale = -1, shift = -1;  // AFFINE: [C] each
  int64_t cst = -1;                // CONST: [B, C] or [B, H, W, C]
  bool multiply = false, is_map = false;
  int64_t dc = 1, out_off = 0, in_off = 0, count = 0;  // GATE; COPY
};

// slot_info: [C0, rows0, C1, rows1, ...] (the slots' channels are checked against the convolutions' weights).
inline std::vector<Code> parse(const std::vector<int64_t>& code, const std::vector<at::Tensor>& params,
                               const std::vector<double>& scalars, const std::vector<int64_t>& slot_info) {
  const int64_t nslots = slot_info.size() / 2, nparams = params.size();
  auto param = [&](int64_t i, bool optional) {
    TORCH_CHECK((optional && i == -1) || (i >= 0 && i < nparams), "sample_cached: bad parameter index ", i);
    return i;
  };
  auto slot = [&](int64_t i) {
    TORCH_CHECK(i >= 0 && i < nslots, "sample_cached: bad slot index ", i);
    return i;
  };
  auto scalar = [&](int64_t i) {
    TORCH_CHECK(i >= 0 && i < (int64_t)scalars.size(), "sample_cached: bad scalar index ", i);
    return scalars[i];
  };
  std::vector<Code> out;
  for (size_t pos = 0; pos < code.size();) {
    const int64_t len = code[pos];
    TORCH_CHECK(len >= 4 && pos + len <= code.size(), "sample_cached: malformed program");
    const int64_t* c = code.data() + pos + 1;
    Code in;
    in.op = c[0], in.out = slot(c[1]), in.a = slot(c[2]);
    switch (in.op) {
      case CONV: {
        const int64_t taps = c[5];
        TORCH_CHECK(taps >= 0 && len == 7 + 2 * taps, "sample_cached: malformed convolution");
        in.dy.assign(c + 6, c + 6 + taps);
        in.dx.assign(c + 6 + taps, c + 6 + 2 * taps);
        const at::Tensor& w = params[in.w = param(c[3], false)];
        in.bias = param(c[4], true);
        TORCH_CHECK(w.dim() == 3 && w.size(0) == taps && w.size(1) == slot_info[2 * in.a] &&
                        w.size(2) == slot_info[2 * in.out],
                    "sample_cached: convolution weight does not match its slots");
        in.cin = w.size(1), in.cout = w.size(2);
        break;
      }
      case ACT: in.act = c[3], in.param = scalar(c[4]); break;
      case AFFINE: in.scale = param(c[3], false), in.shift = param(c[4], false); break;
      case ADD: in.b = slot(c[3]), in.param = scalar(c[4]); break;
      case MUL: in.b = slot(c[3]); break;
      case CONST: in.cst = param(c[3], false), in.multiply = c[4] != 0, in.is_map = c[5] != 0; break;
      case GATE: in.dc = c[3]; break;
      case COPY: in.out_off = c[3], in.in_off = c[4], in.count = c[5]; break;
      default: TORCH_CHECK(false, "sample_cached: unknown opcode ", in.op);
    }
    out.push_back(std::move(in));
    pos += len;
  }
  return out;
}

}  // namespace sampling
}  // namespace fastgen
