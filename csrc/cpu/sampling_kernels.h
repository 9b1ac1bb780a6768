// The cached samplers' convolution micro-kernel (sampling_conv.h) compiled
// twice into the including translation unit: in an AVX-512 target region
// (namespace avx512) and portably (namespace portable). Included once by each
// C++ engine (csrc/cpu/sampling.cpp, schedule.cpp), each its own copy.
#pragma once
#include <algorithm>
#include <cstdint>

#include "cpu/cpu_features.h"  // FASTGEN_AVX512

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

}  // namespace
