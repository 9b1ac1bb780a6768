// The CUDA side of fastgen._C.sample_cached (csrc/cpu/sampling.cpp checks the
// arguments and calls this for CUDA tensors): decodes the program into device
// instructions and launches the engine of sampling.cu on the current stream.
// Built only when torch has CUDA (setup.py defines FASTGEN_WITH_CUDA).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>
#include <vector>

#include "cpu/sampling.h"
#include "cuda/sampling.cuh"

namespace {

using fastgen::cuda::SampleInstr;
using fastgen::cuda::SampleJob;
using fastgen::cuda::SampleSlot;

// Host-side decode of one code list (layout: fastgen/sampling/program.py, Program.encode).
std::vector<SampleInstr> decode(const std::vector<int64_t>& code, const std::vector<at::Tensor>& params,
                                const std::vector<double>& scalars, const std::vector<SampleSlot>& slots,
                                std::vector<int>& taps, std::vector<size_t>& tap_at) {
  std::vector<SampleInstr> out;
  auto ptr = [&](int64_t i) -> const void* {
    if (i < 0) return nullptr;
    TORCH_CHECK(i < (int64_t)params.size(), "sample_cached: bad parameter index ", i);
    return params[i].data_ptr();
  };
  for (size_t pos = 0; pos < code.size();) {
    const int64_t len = code[pos];
    TORCH_CHECK(len >= 4 && pos + len <= code.size(), "sample_cached: malformed program");
    const int64_t* c = code.data() + pos + 1;
    SampleInstr in{};
    in.op = c[0], in.out = c[1], in.a = c[2], in.b = -1;
    TORCH_CHECK(in.out >= 0 && in.out < (int)slots.size() && in.a >= 0 && in.a < (int)slots.size(),
                "sample_cached: bad slot index");
    switch (in.op) {
      case 1: {  // CONV
        in.taps = c[5];
        TORCH_CHECK(len == 7 + 2 * in.taps && c[3] >= 0 && c[3] < (int64_t)params.size(),
                    "sample_cached: malformed convolution");
        const at::Tensor& w = params[c[3]];
        in.cin = w.size(1), in.cout = w.size(2);
        TORCH_CHECK(w.size(0) == in.taps && in.cin == slots[in.a].C && in.cout == slots[in.out].C,
                    "sample_cached: convolution weight does not match its slots");
        in.w = w.data_ptr(), in.bias = ptr(c[4]);
        tap_at.push_back(taps.size());  // pointers into the device copy of `taps`, set by the caller
        taps.insert(taps.end(), c + 6, c + 6 + 2 * in.taps);
        break;
      }
      case 2: in.act = c[3], in.param = scalars.at(c[4]); break;
      case 3: in.scale = ptr(c[3]), in.shift = ptr(c[4]); break;
      case 4: in.b = c[3], in.param = scalars.at(c[4]); break;
      case 5: in.b = c[3]; break;
      case 6: in.cst = ptr(c[3]), in.multiply = c[4] != 0, in.is_map = c[5] != 0; break;
      case 7: in.dc = c[3]; break;
      case 8: in.out_off = c[3], in.in_off = c[4], in.count = c[5]; break;
      default: TORCH_CHECK(false, "sample_cached: unknown opcode ", in.op);
    }
    out.push_back(in);
    pos += len;
  }
  return out;
}

// A host array of PODs as a device tensor (kept alive by the caller until the launch is enqueued;
// the caching allocator reuses memory in stream order).
template <typename S>
at::Tensor to_device(const std::vector<S>& v, const at::Device& device) {
  at::Tensor host = at::empty({int64_t(v.size() * sizeof(S))}, at::TensorOptions().dtype(at::kByte));
  if (!v.empty()) std::memcpy(host.data_ptr(), v.data(), v.size() * sizeof(S));
  return host.to(device);
}

}  // namespace

namespace fastgen {

void sample_cached_cuda(const std::vector<int64_t>& slot_info, const std::vector<int64_t>& pixel_code,
                        const std::vector<int64_t>& post_code, const std::vector<int64_t>& row_code,
                        const std::vector<at::Tensor>& params, const std::vector<double>& scalars,
                        const std::vector<at::Tensor>& bufs, const at::Tensor& u, const at::Tensor& feed,
                        at::Tensor images, at::Tensor logits, const std::vector<int64_t>& config, double temperature,
                        int64_t y0, int64_t y1, bool teacher) {
  const at::Device device = images.device();
  const c10::cuda::CUDAGuard guard(device);
  for (const auto& t : params) TORCH_CHECK(t.device() == device, "sample_cached: parameters on another device");
  for (const auto& t : bufs) TORCH_CHECK(t.device() == device, "sample_cached: slots on another device");
  TORCH_CHECK(u.device() == device && feed.device() == device && (!teacher || logits.device() == device),
              "sample_cached: u, feed and logits must be on the images' device");
  std::vector<SampleSlot> slots;
  for (size_t s = 0; s < bufs.size(); ++s)
    slots.push_back({bufs[s].data_ptr(), int(slot_info[2 * s]), int(slot_info[2 * s + 1]), int(bufs[s].size(3))});
  std::vector<int> taps;
  std::vector<size_t> tap_at;
  std::vector<SampleInstr> lists[3] = {decode(pixel_code, params, scalars, slots, taps, tap_at),
                                       decode(post_code, params, scalars, slots, taps, tap_at),
                                       decode(row_code, params, scalars, slots, taps, tap_at)};
  const at::Tensor taps_d = to_device(taps, device);
  const int* taps_p = static_cast<const int*>(taps_d.data_ptr());
  size_t conv = 0;
  for (auto& list : lists)
    for (auto& in : list)
      if (in.op == 1) in.dy = taps_p + tap_at[conv], in.dx = taps_p + tap_at[conv] + in.taps, ++conv;
  const at::Tensor pixel_d = to_device(lists[0], device), post_d = to_device(lists[1], device),
                   row_d = to_device(lists[2], device), slots_d = to_device(slots, device);

  SampleJob j{};
  j.pixel = static_cast<const SampleInstr*>(pixel_d.data_ptr());
  j.post = static_cast<const SampleInstr*>(post_d.data_ptr());
  j.row = static_cast<const SampleInstr*>(row_d.data_ptr());
  j.n_pixel = lists[0].size(), j.n_post = lists[1].size(), j.n_row = lists[2].size();
  j.slots = static_cast<const SampleSlot*>(slots_d.data_ptr());
  j.B = images.size(0), j.C = config[0], j.H = config[1], j.W = config[2], j.P = config[3];
  j.in_slot = config[4], j.out_slot = config[5], j.categorical = config[6], j.L = config[7], j.blocks = config[8];
  j.temperature = temperature;
  j.u = u.data_ptr<double>();
  j.feed = feed.data_ptr();
  j.images = images.data_ptr<int64_t>();
  j.logits = teacher ? logits.data_ptr() : nullptr;
  j.y0 = y0, j.y1 = y1;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cudaError_t err = feed.scalar_type() == at::kFloat ? fastgen::cuda::sample_cached<float>(j, stream)
                                                           : fastgen::cuda::sample_cached<double>(j, stream);
  TORCH_CHECK(err == cudaSuccess, "sample_cached (cuda): launch failed: ", cudaGetErrorString(err));
}

}  // namespace fastgen
