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
#include "cuda/glue_util.h"  // to_device
#include "cuda/sampling.cuh"
#include "sampling_code.h"

namespace {

using fastgen::cuda::to_device;
using fastgen::cuda::SampleInstr;
using fastgen::cuda::SampleJob;
using fastgen::cuda::SampleSlot;

// The device form of the parsed instructions (csrc/sampling_code.h): pointers into params, each
// convolution's taps as offsets into `taps` (dy then dx), which the caller copies to the device.
std::vector<SampleInstr> decode(const std::vector<int64_t>& code, const std::vector<at::Tensor>& params,
                                const std::vector<double>& scalars, const std::vector<int64_t>& slot_info,
                                std::vector<int>& taps, std::vector<size_t>& tap_at) {
  std::vector<SampleInstr> out;
  auto ptr = [&](int64_t i) -> const void* { return i < 0 ? nullptr : params[i].data_ptr(); };
  for (const fastgen::sampling::Code& c : fastgen::sampling::parse(code, params, scalars, slot_info)) {
    SampleInstr in{};
    in.op = c.op, in.out = c.out, in.a = c.a, in.b = c.b;
    in.w = ptr(c.w), in.bias = ptr(c.bias), in.cin = c.cin, in.cout = c.cout;
    in.act = c.act, in.param = c.param;
    in.scale = ptr(c.scale), in.shift = ptr(c.shift), in.cst = ptr(c.cst);
    in.multiply = c.multiply, in.is_map = c.is_map;
    in.dc = c.dc, in.out_off = c.out_off, in.in_off = c.in_off, in.count = c.count;
    if (c.op == fastgen::sampling::CONV) {
      in.taps = c.dy.size();
      tap_at.push_back(taps.size());
      taps.insert(taps.end(), c.dy.begin(), c.dy.end());
      taps.insert(taps.end(), c.dx.begin(), c.dx.end());
    }
    out.push_back(in);
  }
  return out;
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
  std::vector<SampleInstr> lists[3] = {decode(pixel_code, params, scalars, slot_info, taps, tap_at),
                                       decode(post_code, params, scalars, slot_info, taps, tap_at),
                                       decode(row_code, params, scalars, slot_info, taps, tap_at)};
  const at::Tensor taps_d = to_device(taps, device);
  const int* taps_p = static_cast<const int*>(taps_d.data_ptr());
  size_t conv = 0;
  for (auto& list : lists)
    for (auto& in : list)
      if (in.op == fastgen::sampling::CONV) in.dy = taps_p + tap_at[conv], in.dx = taps_p + tap_at[conv] + in.taps, ++conv;
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
