// Run-time choice of the CPU kernels' AVX-512 paths, shared by csrc/cpu/*.cpp.
// Each file compiles its AVX-512 section only where FASTGEN_AVX512 is defined
// (x86-64 with GCC/Clang) and asks use_avx512() before running it.
#pragma once
#include <cstdlib>
#include <string_view>

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTGEN_AVX512 1
#include <immintrin.h>
// Open and close a region compiled for AVX-512F only. GCC 12's AVX-512 headers trip
// -W(maybe-)uninitialized on their own "undefined vector" idiom (false positives).
#define FASTGEN_AVX512_BEGIN                                  \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f\")") \
      _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wuninitialized\"") \
          _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define FASTGEN_AVX512_END _Pragma("GCC diagnostic pop") _Pragma("GCC pop_options")
#endif

namespace fastgen {

// Whether FASTGEN_CPU_KERNEL names `kernel` (for tests and benchmarks): 'generic' forces the portable
// paths, 'direct' the masked conv's direct kernel instead of Winograd (csrc/cpu/masked_conv.cpp).
inline bool cpu_kernel_forced(std::string_view kernel) {
  const char* forced = std::getenv("FASTGEN_CPU_KERNEL");
  return forced && std::string_view(forced) == kernel;
}

inline bool use_avx512() {
#ifdef FASTGEN_AVX512
  if (cpu_kernel_forced("generic")) return false;
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

}  // namespace fastgen
