// The C++ engine of cached sampling's (csrc/cpu/schedule.cpp) kernels: the
// convolution micro-kernel (sampling_conv.h) compiled twice, in an AVX-512
// target region (namespace avx512) and portably (namespace portable), and the
// binding of the slots.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/cpu_features.h"  // FASTGEN_AVX512
#include "cpu/vec_math.h"      // fastgen::vec::Vec64: sampling_conv.h's vector types

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

// Each slot's data, and zeros as long as the widest slot's padded channels (what a tap outside the image
// or a view reads). S: an engine's slot, with its padded channel count Cp.
template <class T, class S>
void bind_slots(const std::vector<at::Tensor>& bufs, const std::vector<S>& slots, std::vector<T*>& data,
                std::vector<T>& zeros) {
  int64_t cmax = 0;
  for (size_t s = 0; s < bufs.size(); ++s) {
    data.push_back(bufs[s].data_ptr<T>());
    cmax = std::max(cmax, slots[s].Cp);
  }
  zeros.assign(cmax, T(0));
}

}  // namespace
