// The C++ engine of cached sampling (csrc/cpu/schedule.cpp), exposed as
// fastgen._C.sample_scheduled by csrc/module.cpp; fastgen/sampling/api.py calls it.
#pragma once
#include <torch/extension.h>

#include <vector>

#include "schedule_code.h"

namespace fastgen {

// Runs a Schedule (fastgen/sampling/schedule.py, Schedule.encode) over the steps [t0, t1).
void sample_scheduled(const std::vector<int64_t>& slot_info, const std::vector<int64_t>& code,
                      const std::vector<at::Tensor>& params, const std::vector<double>& scalars,
                      const std::vector<at::Tensor>& bufs, const at::Tensor& u, const at::Tensor& feed,
                      at::Tensor images, at::Tensor out_params, const std::vector<int64_t>& config,
                      double temperature, int64_t t0, int64_t t1, bool teacher);

#ifdef FASTGEN_WITH_CUDA
// The same for CUDA tensors (csrc/cuda/schedule_glue.cpp), after sample_scheduled's checks and parse.
void sample_scheduled_cuda(const std::vector<schedule::SlotInfo>& slots, const std::vector<schedule::Code>& code,
                           const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& bufs,
                           const at::Tensor& u, const at::Tensor& feed, at::Tensor images, at::Tensor out_params,
                           const std::vector<int64_t>& config, double temperature, int64_t t0, int64_t t1,
                           bool teacher);
#endif

}  // namespace fastgen
