// The CUDA engine of multi-scale cached sampling: the CPU engine's loop
// (csrc/cpu/schedule.cpp) with one thread block per image, so the steps
// [t0, t1) are one launch with no host round trip per pixel. Raw pointers and a
// stream, no torch headers (`nvcc -c` checks it anywhere); the glue is
// schedule_glue.cpp.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace fastgen {
namespace cuda {

// An operand: channels [c0, ..) of a slot; the value at (y, x) is the slot's at
// (y - oy, x - ox) for slot rows [y0, y1) and columns [x0, x1), else 0.
struct ScheduleRef {
  int slot, c0, oy, ox, y0, y1, x0, x1;
};

// One decoded instruction (fastgen/sampling/schedule.py); every pointer is device memory.
struct ScheduleInstr {
  int op, out, ch, cout;        // ch: channels read from a (and b); COPY, FILL: written
  int lo, hi;                   // the output channels computed, of those written (a colour block)
  ScheduleRef a, b;
  const int64_t* queue;         // positions y * W + x of the output slot, by step
  const int64_t* start;         // [steps + 1]
  int sy, sx, taps;
  const int* dy;                // CONV, CONVT: [taps]
  const int* dx;
  const void* w;                // CONV, CONVT: [taps][ch][cout]
  const void* bias;             // [cout] or null
  int act;
  double param;                 // ACT: slope / alpha; ADD: alpha; FILL: the value
  const void* scale;            // AFFINE: [ch]
  const void* shift;
  const void* cst;              // CONST: [B][ch] or [B][H][W][ch]
  int multiply, is_map, dc, out_off;
};

// A slot: [B][R][Cp] ring of positions, (y, x) at (y W + x) % R (channels C of Cp used).
struct ScheduleSlot {
  void* data;
  int C, H, W, R, Cp;
};

struct ScheduleJob {
  const ScheduleInstr* code;
  int n_code;
  const ScheduleSlot* slots;
  int B, C, H, W, in_slot, M, K;  // M: mixture components, K: parameters per pixel
  int G;                // steps per pixel: 1, or C (colour by colour)
  int likelihood, L;    // fastgen::code::Likelihood; L levels per channel
  ScheduleRef out;
  double temperature;
  const double* u;      // [H][W][C + 1][B] (a mixture), [H][W][C][B] (Bernoulli, categorical)
  const void* feed;     // [L]
  int64_t* images;      // [B][C][H][W]
  void* params;         // teacher forcing: [B][K][H][W], else null
  int t0, t1;
};

// T: float or double. Enqueues one launch on `stream`; returns the launch error, if any.
template <typename T>
cudaError_t sample_scheduled(const ScheduleJob& job, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastgen
