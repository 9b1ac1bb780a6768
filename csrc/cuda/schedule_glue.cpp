// The CUDA side of fastgen._C.sample_scheduled (csrc/cpu/schedule.cpp checks
// the arguments and parses the program, then calls this for CUDA tensors):
// turns the parsed instructions into device instructions and launches the
// engine of schedule.cu on the current stream. Built only when torch has CUDA
// (setup.py defines FASTGEN_WITH_CUDA).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>
#include <vector>

#include "cpu/sampling.h"
#include "cuda/glue_util.h"  // to_device
#include "cuda/schedule.cuh"
#include "schedule_code.h"

namespace {

using fastgen::cuda::to_device;
using fastgen::cuda::ScheduleInstr;
using fastgen::cuda::ScheduleJob;
using fastgen::cuda::ScheduleRef;
using fastgen::cuda::ScheduleSlot;

ScheduleRef ref(const fastgen::schedule::RefCode& r) {
  return {int(r.slot), int(r.c0), int(r.oy), int(r.ox), int(r.y0), int(r.y1), int(r.x0), int(r.x1)};
}

}  // namespace

namespace fastgen {

void sample_scheduled_cuda(const std::vector<schedule::SlotInfo>& info, const std::vector<schedule::Code>& code,
                           const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& bufs,
                           const at::Tensor& u, const at::Tensor& feed, at::Tensor images, at::Tensor out_params,
                           const std::vector<int64_t>& config, double temperature, int64_t t0, int64_t t1,
                           bool teacher) {
  const at::Device device = images.device();
  const c10::cuda::CUDAGuard guard(device);
  std::vector<ScheduleSlot> slots;
  for (size_t s = 0; s < bufs.size(); ++s)
    slots.push_back({bufs[s].data_ptr(), int(info[s].C), int(info[s].H), int(info[s].W), int(info[s].R),
                     int(bufs[s].size(2))});
  auto ptr = [&](int64_t i) -> const void* { return i < 0 ? nullptr : params[i].data_ptr(); };
  // the taps of every convolution in one device array: (dy then dx) at tap_at[k]
  std::vector<int> taps;
  std::vector<size_t> tap_at;
  std::vector<ScheduleInstr> instrs;
  for (const schedule::Code& c : code) {
    ScheduleInstr in{};
    in.op = c.op, in.out = c.out, in.ch = c.ch, in.cout = info[c.out].C, in.lo = c.lo, in.hi = c.hi;
    in.a = ref(c.a), in.b = ref(c.b);
    in.queue = params[c.queue].data_ptr<int64_t>(), in.start = params[c.start].data_ptr<int64_t>();
    in.sy = c.sy, in.sx = c.sx, in.taps = c.dy.size();
    in.w = ptr(c.w), in.bias = ptr(c.bias);
    in.act = c.act, in.param = c.param;
    in.scale = ptr(c.scale), in.shift = ptr(c.shift), in.cst = ptr(c.cst);
    in.multiply = c.multiply, in.is_map = c.is_map, in.dc = c.dc, in.out_off = c.out_off;
    tap_at.push_back(taps.size());
    taps.insert(taps.end(), c.dy.begin(), c.dy.end());
    taps.insert(taps.end(), c.dx.begin(), c.dx.end());
    instrs.push_back(in);
  }
  const at::Tensor taps_d = to_device(taps, device);
  const int* taps_p = static_cast<const int*>(taps_d.data_ptr());
  for (size_t k = 0; k < instrs.size(); ++k)
    instrs[k].dy = taps_p + tap_at[k], instrs[k].dx = taps_p + tap_at[k] + instrs[k].taps;
  const at::Tensor code_d = to_device(instrs, device), slots_d = to_device(slots, device);

  ScheduleJob j{};
  j.code = static_cast<const ScheduleInstr*>(code_d.data_ptr());
  j.n_code = instrs.size();
  j.slots = static_cast<const ScheduleSlot*>(slots_d.data_ptr());
  namespace cfg = fastgen::code::cfg;
  j.B = images.size(0), j.C = config[cfg::CHANNELS], j.H = config[cfg::HEIGHT], j.W = config[cfg::WIDTH];
  j.in_slot = config[cfg::INPUT], j.M = config[cfg::NR_MIX], j.K = config[cfg::OUT_CHANNELS];
  j.likelihood = config[cfg::LIKELIHOOD], j.L = config[cfg::LEVELS], j.G = config[cfg::PIXEL_STEPS];
  const int64_t* o = config.data() + cfg::OUT_SLOT;
  j.out = ScheduleRef{int(o[0]), int(o[1]), int(o[2]), int(o[3]), int(o[4]), int(o[5]), int(o[6]), int(o[7])};
  j.temperature = temperature;
  j.u = u.data_ptr<double>();
  j.feed = feed.data_ptr();
  j.images = images.data_ptr<int64_t>();
  j.params = teacher ? out_params.data_ptr() : nullptr;
  j.t0 = t0, j.t1 = t1;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cudaError_t err = feed.scalar_type() == at::kFloat ? fastgen::cuda::sample_scheduled<float>(j, stream)
                                                           : fastgen::cuda::sample_scheduled<double>(j, stream);
  TORCH_CHECK(err == cudaSuccess, "sample_scheduled (cuda): launch failed: ", cudaGetErrorString(err));
}

}  // namespace fastgen
