// The CUDA engine of cached sampling: the CPU engine's loop (csrc/cpu/sampling.cpp)
// with one thread block per image, so the whole generation of rows [y0, y1) is
// one launch with no host round trip per pixel. Raw pointers and a stream, no
// torch headers (`nvcc -c` checks it anywhere); the glue is sampling_glue.cpp.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace fastgen {
namespace cuda {

// One decoded instruction (fastgen/sampling/program.py); every pointer is device memory.
struct SampleInstr {
  int op, out, a, b;
  int taps, cin, cout;
  const int* dy;        // CONV: [taps]
  const int* dx;
  const void* w;        // CONV: [taps][cin][cout]
  const void* bias;     // CONV: [cout] or null
  int act;
  double param;         // ACT: slope / alpha; ADD: alpha
  const void* scale;    // AFFINE: [C]
  const void* shift;
  const void* cst;      // CONST: [B][C] or [B][H][W][C]
  int multiply, is_map;
  int dc, out_off, in_off, count;
};

// A slot: [B][R][W + 2P][Cp] ring of rows (channels C of Cp used).
struct SampleSlot {
  void* data;
  int C, R, Cp;
};

struct SampleJob {
  const SampleInstr* pixel;
  const SampleInstr* post;
  const SampleInstr* row;
  int n_pixel, n_post, n_row;
  const SampleSlot* slots;
  int B, C, H, W, P, in_slot, out_slot, categorical, L, blocks;
  double temperature;
  const double* u;      // [H][W][C][B]
  const void* feed;     // [L]
  int64_t* images;      // [B][C][H][W]
  void* logits;         // teacher forcing: [B][C_out][H][W], else null
  int y0, y1;
};

// T: float or double. Enqueues one launch on `stream`; returns the launch error, if any.
template <typename T>
cudaError_t sample_cached(const SampleJob& job, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastgen
