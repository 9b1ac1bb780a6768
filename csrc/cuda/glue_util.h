// Helpers of the CUDA glue files (built only when torch has CUDA).
#pragma once
#include <ATen/ATen.h>

#include <cstring>
#include <vector>

namespace fastgen {
namespace cuda {

// A host array of PODs as a device tensor (kept alive by the caller until the launch is enqueued;
// the caching allocator reuses memory in stream order).
template <typename S>
at::Tensor to_device(const std::vector<S>& v, const at::Device& device) {
  at::Tensor host = at::empty({int64_t(v.size() * sizeof(S))}, at::TensorOptions().dtype(at::kByte));
  if (!v.empty()) std::memcpy(host.data_ptr(), v.data(), v.size() * sizeof(S));
  return host.to(device);
}

}  // namespace cuda
}  // namespace fastgen
