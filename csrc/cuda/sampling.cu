// The CUDA engine of cached sampling (see sampling.cuh). One thread block runs
// the whole loop for one image: at each pixel and colour channel the pixel
// pass (threads across output channels, a barrier between instructions), the
// draw (softmax terms in parallel, the cumulative sum by one thread, in double,
// like fastgen.sampling.common.draw), the feed and the post pass; the row pass
// after each row. Weights are read from global memory (L2-resident for these
// models); the convolutions touch only the taps the program lists.
#include <cstdint>

#include "cuda/sampling.cuh"
#include "cuda/sampling_ops.cuh"  // the opcodes, activate()

namespace fastgen {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ T* slot_at(const SampleJob& j, int s, int b, int y, int x) {
  const SampleSlot& sl = j.slots[s];
  return static_cast<T*>(sl.data) + ((int64_t(b) * sl.R + y % sl.R) * (j.W + 2 * j.P) + x + j.P) * sl.Cp;
}

// The instructions for image b at row y, columns [x0, x1): all output channels,
// or colour block `block` (>= 0) of them. Ends with a barrier.
template <typename T>
__device__ void run(const SampleJob& j, const SampleInstr* code, int n, int b, int y, int x0, int x1, int block) {
  for (int k = 0; k < n; ++k) {
    const SampleInstr& in = code[k];
    const int c_out = j.slots[in.out].C;
    int lo = 0, hi = c_out;
    if (block >= 0) lo = block * c_out / j.blocks, hi = (block + 1) * c_out / j.blocks;
    if (in.op == COPY) lo = 0, hi = in.count;  // COPY only runs without colour blocks
    const int width = hi - lo, total = width * (x1 - x0);
    for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
      const int x = x0 + idx / width, co = lo + idx % width;
      T* o = slot_at<T>(j, in.out, b, y, x);
      const T* a = slot_at<T>(j, in.a, b, y, x);
      switch (in.op) {
        case CONV: {
          const T* w = static_cast<const T*>(in.w);
          T acc = in.bias ? static_cast<const T*>(in.bias)[co] : T(0);
          for (int t = 0; t < in.taps; ++t) {
            if (y + in.dy[t] < 0) continue;  // above row 0: zero padding
            const T* s = slot_at<T>(j, in.a, b, y + in.dy[t], x + in.dx[t]);
            const T* wt = w + int64_t(t) * in.cin * in.cout + co;
            for (int ci = 0; ci < in.cin; ++ci) acc += s[ci] * wt[int64_t(ci) * in.cout];
          }
          o[co] = acc;
          break;
        }
        case ACT:
        case AFFINE:
        case ADD:
        case MUL:
        case CONST: {
          const T q = in.op == ADD || in.op == MUL ? slot_at<T>(j, in.b, b, y, x)[co] : T(0);
          const T* kk = in.op == CONST ? const_row<T>(in, b, y, x, j.H, j.W, c_out) : nullptr;
          o[co] = point_value<T>(in, a[co], q, kk, co);
          break;
        }
        case GATE: o[co] = gate_value<T>([&](int i) { return a[i]; }, co, c_out, in.dc); break;
        case COPY: o[in.out_off + co] = a[in.in_off + co]; break;
      }
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sample_kernel(SampleJob j) {
  extern __shared__ double terms[];  // categorical: exp(logit / T - max), [L]
  __shared__ double stat[2];         // max, then the drawn value
  const int b = blockIdx.x;
  const int per = j.categorical ? j.L : 1;
  const int cout = j.slots[j.out_slot].C;
  const T* feed = static_cast<const T*>(j.feed);
  for (int y = j.y0; y < j.y1; ++y) {
    for (int x = 0; x < j.W; ++x) {
      T* inp = slot_at<T>(j, j.in_slot, b, y, x);  // the ring row still holds row y - rows
      for (int i = threadIdx.x; i < j.slots[j.in_slot].Cp; i += blockDim.x) inp[i] = T(0);
      __syncthreads();
      for (int c = 0; c < j.C; ++c) {
        const int block = j.blocks > 1 ? c : -1;
        run<T>(j, j.pixel, j.n_pixel, b, y, x, x + 1, block);
        const T* lo = slot_at<T>(j, j.out_slot, b, y, x) + c * per;
        int64_t* img = j.images + ((int64_t(b) * j.C + c) * j.H + y) * j.W + x;
        if (j.logits) {  // teacher forcing
          for (int i = threadIdx.x; i < per; i += blockDim.x)
            static_cast<T*>(j.logits)[((int64_t(b) * cout + c * per + i) * j.H + y) * j.W + x] = lo[i];
        } else {
          const double u = j.u[((int64_t(y) * j.W + x) * j.C + c) * j.B + b];
          const int v = draw_logits([&](int i) { return lo[i]; }, j.L, j.categorical, j.temperature, u, terms, stat);
          if (threadIdx.x == 0) *img = v;
        }
        __syncthreads();
        if (threadIdx.x == 0) inp[c] = feed[*img];
        __syncthreads();
        if (block >= 0) run<T>(j, j.post, j.n_post, b, y, x, x + 1, block);
      }
      if (j.blocks == 1) run<T>(j, j.post, j.n_post, b, y, x, x + 1, -1);
    }
    if (y + 1 < j.H) run<T>(j, j.row, j.n_row, b, y, 0, j.W, -1);
  }
}

}  // namespace

template <typename T>
cudaError_t sample_cached(const SampleJob& job, cudaStream_t stream) {
  if (job.B == 0 || job.y0 >= job.y1) return cudaSuccess;
  const size_t shared = job.categorical ? size_t(job.L) * sizeof(double) : 0;
  sample_kernel<T><<<job.B, kThreads, shared, stream>>>(job);
  return cudaGetLastError();
}

template cudaError_t sample_cached<float>(const SampleJob&, cudaStream_t);
template cudaError_t sample_cached<double>(const SampleJob&, cudaStream_t);

}  // namespace cuda
}  // namespace fastgen
