// The CUDA engine of multi-scale cached sampling (see schedule.cuh). One
// thread block runs every step for one image: at step t each instruction on its
// queue's positions for t (threads across positions and output channels, a
// barrier between instructions), then the draw of pixel t from the output (a
// mixture: one thread, in T, as csrc/cpu/schedule.cpp and the torch sampler
// compute it; Bernoulli or categorical logits: the block, draw_logits) and the
// feed. Weights are read from global memory ([taps][cin]
// [cout]: consecutive threads read consecutive output channels).
#include <cstdint>

#include "cuda/schedule.cuh"
#include "cuda/sampling_ops.cuh"  // the opcodes, activate()

namespace fastgen {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr double kLogScaleMin = -7.0;  // fastgen.ref.dmol
constexpr double kUMin = 1e-5;         // the logistic draw's uniforms are clamped to [kUMin, 1 - kUMin]

template <typename T>
__device__ T* slot_at(const ScheduleJob& j, int s, int b, int y, int x) {
  const ScheduleSlot& sl = j.slots[s];
  return static_cast<T*>(sl.data) + (int64_t(b) * sl.R + (int64_t(y) * sl.W + x) % sl.R) * sl.Cp;
}

// The operand at position (y, x) of its view, or null (zeros) outside it.
template <typename T>
__device__ const T* read(const ScheduleJob& j, const ScheduleRef& r, int b, int y, int x) {
  const int sy = y - r.oy, sx = x - r.ox;
  if (sy < r.y0 || sy >= r.y1 || sx < r.x0 || sx >= r.x1) return nullptr;
  return slot_at<T>(j, r.slot, b, sy, sx) + r.c0;
}

template <typename T>
__device__ T value(const T* p, int i) {
  return p ? p[i] : T(0);
}

// One instruction for image b at its queue's positions [lo, hi), output channels [in.lo, in.hi). Ends with a
// barrier.
template <typename T>
__device__ void run(const ScheduleJob& j, const ScheduleInstr& in, int b, int64_t lo, int64_t hi) {
  const ScheduleSlot& so = j.slots[in.out];
  const int width = in.hi - in.lo;
  const int64_t total = (hi - lo) * width;
  for (int64_t idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int64_t p = in.queue[lo + idx / width];
    const int co = in.lo + idx % width, y = p / so.W, x = p % so.W;
    T* o = slot_at<T>(j, in.out, b, y, x);
    switch (in.op) {
      case CONV:
      case CONVT: {
        const T* w = static_cast<const T*>(in.w);
        T acc = in.bias ? static_cast<const T*>(in.bias)[co] : T(0);
        for (int t = 0; t < in.taps; ++t) {
          int iy, ix;
          if (in.op == CONV) {
            iy = y * in.sy + in.dy[t], ix = x * in.sx + in.dx[t];
          } else {  // input (y - dy) / sy where that divides exactly
            const int ry = y - in.dy[t], rx = x - in.dx[t];
            if (ry % in.sy != 0 || rx % in.sx != 0) continue;
            iy = ry / in.sy, ix = rx / in.sx;
          }
          const T* s = read<T>(j, in.a, b, iy, ix);
          if (!s) continue;
          const T* wt = w + int64_t(t) * in.ch * in.cout + co;
          for (int ci = 0; ci < in.ch; ++ci) acc += s[ci] * wt[int64_t(ci) * in.cout];
        }
        o[co] = acc;
        break;
      }
      case FILL: o[in.out_off + co] = T(in.param); break;
      case COPY: o[in.out_off + co] = value(read<T>(j, in.a, b, y, x), co); break;
      case ACT:
      case AFFINE:
      case ADD:
      case MUL:
      case CONST: {
        const T q = in.op == ADD || in.op == MUL ? value(read<T>(j, in.b, b, y, x), co) : T(0);
        const T* kk = in.op == CONST ? const_row<T>(in, b, y, x, so.H, so.W, in.ch) : nullptr;
        o[co] = point_value<T>(in, value(read<T>(j, in.a, b, y, x), co), q, kk, co);
        break;
      }
      case GATE: {  // input: dc blocks of (tanh half, sigmoid half)
        const T* a = read<T>(j, in.a, b, y, x);
        o[co] = gate_value<T>([&](int i) { return value(a, i); }, co, in.ch / 2, in.dc);
        break;
      }
    }
  }
  __syncthreads();
}

template <typename T>
__device__ int quantize(T v) {
  return int(nearbyint((fmin(fmax(v, T(-1)), T(1)) + T(1)) * T(127.5)));
}

// One pixel's levels from the mixture parameters p (fastgen.ref.dmol's layout), as csrc/cpu/schedule.cpp's
// draw_mixture: u[0] picks the component, u[(1 + c) * stride] draws colour c. p null: zeros (an output
// outside its slot).
template <typename T>
__device__ void draw_mixture(const T* p, int C, int M, T temperature, const double* u, int stride, int* levels) {
  T mx = -INFINITY;
  for (int k = 0; k < M; ++k) mx = fmax(mx, value(p, k) / temperature);
  T sum = 0;
  for (int k = 0; k < M; ++k) sum += exp(value(p, k) / temperature - mx);
  T cdf = 0;
  int k = 0;
  const T um = T(u[0]);
  for (int i = 0; i < M; ++i) k += (cdf += exp(value(p, i) / temperature - mx) / sum) < um;
  k = k < M - 1 ? k : M - 1;
  const int per = C == 1 ? 2 : 3;
  T x[3];
  for (int c = 0; c < C; ++c) {
    const int blk = M + c * per * M;
    const T mu = value(p, blk + k), ls = fmax(value(p, blk + M + k), T(kLogScaleMin));
    const T uc = fmin(fmax(T(u[(1 + c) * stride]), T(kUMin)), T(1 - kUMin));
    T v = mu + exp(ls) * temperature * (log(uc) - log1p(-uc));
    if (c == 1) v += tanh(value(p, M + k + 2 * M)) * x[0];
    if (c == 2) {  // in the torch sampler's order: (draw + a_1 x_0) + a_2 x_1
      v += tanh(value(p, M + 3 * M + k + 2 * M)) * x[0];
      v += tanh(value(p, M + 6 * M + k + 2 * M)) * x[1];
    }
    levels[c] = quantize(v);
    x[c] = T(levels[c]) / T(127.5) - T(1);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) schedule_kernel(ScheduleJob j) {
  extern __shared__ double terms[];  // categorical: exp(logit / T - max), [L]
  __shared__ double stat[2];         // the draw's max, then the drawn value
  const int b = blockIdx.x;
  const T* feed = static_cast<const T*>(j.feed);
  for (int t = j.t0; t < j.t1; ++t) {
    for (int k = 0; k < j.n_code; ++k) {
      const ScheduleInstr& in = j.code[k];
      const int64_t lo = in.start[t], hi = in.start[t + 1];
      if (hi > lo) run<T>(j, in, b, lo, hi);  // the same test in every thread: the barrier is safe
    }
    const int pix = t / j.G, y = pix / j.W, x = pix % j.W;
    const int c0 = j.G == 1 ? 0 : t % j.G, c1 = j.G == 1 ? j.C : c0 + 1;  // the channels drawn at this step
    const T* p = read<T>(j, j.out, b, y, x);
    const int64_t plane = int64_t(j.H) * j.W;
    int64_t* img = j.images + int64_t(b) * j.C * plane + int64_t(y) * j.W + x;  // channel c at img[c * plane]
    T* inp = slot_at<T>(j, j.in_slot, b, y, x);
    if (j.params || j.likelihood == LOGISTIC_MIXTURE) {
      if (threadIdx.x == 0) {
        int lv[3];
        if (j.params) {  // teacher forcing: the output's block of the drawn channels
          const int k0 = j.G == 1 ? 0 : c0 * (j.K / j.G), k1 = j.G == 1 ? j.K : k0 + j.K / j.G;
          for (int k = k0; k < k1; ++k)
            static_cast<T*>(j.params)[((int64_t(b) * j.K + k) * j.H + y) * j.W + x] = value(p, k);
        } else {
          draw_mixture<T>(p, j.C, j.M, T(j.temperature), j.u + int64_t(pix) * (j.C + 1) * j.B + b, j.B, lv);
        }
        for (int c = c0; c < c1; ++c) {
          if (!j.params) img[c * plane] = lv[c];
          inp[c] = feed[img[c * plane]];
        }
      }
    } else {  // each channel from its own logits (every thread: the block draws together)
      const bool categorical = j.likelihood == CATEGORICAL;
      const int per = categorical ? j.L : 1;
      for (int c = c0; c < c1; ++c) {
        const double u = j.u[(int64_t(pix) * j.C + c) * j.B + b];
        const int v = draw_logits([&](int i) { return value(p, c * per + i); }, j.L, categorical, j.temperature, u,
                                  terms, stat);
        if (threadIdx.x == 0) img[c * plane] = v, inp[c] = feed[v];
      }
    }
    __syncthreads();
  }
}

}  // namespace

template <typename T>
cudaError_t sample_scheduled(const ScheduleJob& job, cudaStream_t stream) {
  if (job.B == 0 || job.t0 >= job.t1) return cudaSuccess;
  const size_t shared = job.likelihood == CATEGORICAL ? size_t(job.L) * sizeof(double) : 0;
  schedule_kernel<T><<<job.B, kThreads, shared, stream>>>(job);
  return cudaGetLastError();
}

template cudaError_t sample_scheduled<float>(const ScheduleJob&, cudaStream_t);
template cudaError_t sample_scheduled<double>(const ScheduleJob&, cudaStream_t);

}  // namespace cuda
}  // namespace fastgen
