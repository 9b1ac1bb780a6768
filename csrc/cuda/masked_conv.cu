// masked_conv2d on CUDA: direct kernels over the visible taps only.
//
// Written without a GPU to run them (nvcc compile-checked only): kept plain so
// that correctness can be read off the code; benchmarks/RESULTS.md says whether
// they have been run and measured.
//
//   * forward and grad_x are one tiled kernel (`conv_tiled`) run in two
//     directions: a block computes 16 x 8 output pixels x 8 output channels;
//     for each chunk of input channels it stages the input patch the taps reach
//     (zero outside the image) and the chunk's weights (zero at masked taps and
//     at centre pairs the colour rule hides) in shared memory, then every
//     thread accumulates its pixel's 8 channels. grad_x reads grad_out through
//     the mirrored taps with the weights transposed.
//   * grad_w: one block per (out, in) channel pair; it walks over the images in
//     16 x 16 output tiles, staging the grad_out tile and the input patch in
//     shared memory; each thread owns one tap and a share of the tile's
//     pixels, and the shares are summed at the end in a fixed order.
//   * grad_b: one block per output channel, a block reduction.
//   * shapes whose patch does not fit in shared memory (huge dilations) use
//     plain one-thread-per-output kernels (`conv_naive`, `grad_w_naive`).
// fp16/bf16 accumulate in float, float in float, double in double.
#include "cuda/masked_conv.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastgen {
namespace cuda {
namespace {

// ---- element types ---------------------------------------------------------------------------------------

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

template <typename T>
__device__ __forceinline__ typename Acc<T>::type to_acc(T v) {
  return static_cast<typename Acc<T>::type>(v);
}
template <>
__device__ __forceinline__ float to_acc<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_acc(typename Acc<T>::type v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---- one direction of the convolution ---------------------------------------------------------------------

// Output pixel (oy, ox) of channel `out` reads input pixel (oy + y0 + i*sy,
// ox + x0 + j*sx) of channel `in` through tap (i, j), weight (out, in, i, j) at
// w[out*w_out + in*w_in + i*kw + j]. Forward: out = co, in = ci. grad_x
// (`transposed`): out = ci, in = co, the taps mirrored.
struct Pass {
  int64_t B, nin, nout, Hin, Win, Hout, Wout;
  int kh, kw, ch, cw, y0, x0, sy, sx;
  int64_t w_out, w_in;
  bool transposed;
  int64_t Ci, Co, dc;
  bool strict;
};

Pass forward_pass(const MaskedConvShape& s) {
  return Pass{s.B, s.Ci, s.Co, s.H, s.W, s.Ho, s.Wo,
              (int)s.kh, (int)s.kw, (int)(s.kh / 2), (int)(s.kw / 2), (int)-s.ph, (int)-s.pw, (int)s.dh, (int)s.dw,
              s.Ci * s.kh * s.kw, s.kh * s.kw, false, s.Ci, s.Co, s.data_channels, s.strict};
}

// grad_x[ci] at (y, x) gathers grad_out[co] at (y + ph - i*dh, x + pw - j*dw).
Pass grad_x_pass(const MaskedConvShape& s) {
  return Pass{s.B, s.Co, s.Ci, s.Ho, s.Wo, s.H, s.W,
              (int)s.kh, (int)s.kw, (int)(s.kh / 2), (int)(s.kw / 2), (int)s.ph, (int)s.pw, (int)-s.dh, (int)-s.dw,
              s.kh * s.kw, s.Ci * s.kh * s.kw, true, s.Ci, s.Co, s.data_channels, s.strict};
}

// Whether tap (i, j) joins channels (co, ci): rows above the centre, the centre
// row left of the centre, and the centre where the colour rule opens it.
__device__ __forceinline__ bool visible(int64_t co, int64_t ci, int i, int j, int ch, int cw, int64_t Co, int64_t Ci,
                                        int64_t dc, bool strict) {
  if (i != ch) return i < ch;
  if (j != cw) return j < cw;
  const int64_t g = co / (Co / dc), h = ci / (Ci / dc);
  return strict ? h < g : h <= g;
}

__device__ __forceinline__ bool visible(const Pass& p, int64_t out, int64_t in, int i, int j) {
  return p.transposed ? visible(in, out, i, j, p.ch, p.cw, p.Co, p.Ci, p.dc, p.strict)
                      : visible(out, in, i, j, p.ch, p.cw, p.Co, p.Ci, p.dc, p.strict);
}

constexpr int TW = 16, TH = 8, TCO = 8;  // conv_tiled: 16 x 8 pixels (one per thread) x 8 output channels
constexpr int kConvThreads = TW * TH;
constexpr int kMaxChunk = 16;            // input channels staged at a time (fewer if shared memory is short)
constexpr size_t kSmemBytes = 48 * 1024;  // the default dynamic shared memory limit

// Patch of input rows/columns a tile reads: rows (oy0 + y0 + rmin) .. + PH - 1.
struct Patch {
  int rmin, cmin, PH, PW;
};
Patch patch_of(const Pass& p, int th, int tw) {
  const int rspan = p.ch * p.sy, cspan = (p.kw - 1) * p.sx;
  return Patch{rspan < 0 ? rspan : 0, cspan < 0 ? cspan : 0, th + (rspan < 0 ? -rspan : rspan),
               tw + (cspan < 0 ? -cspan : cspan)};
}

// grid: x = image * tiles + tile, y = block of TCO output channels; block: kConvThreads.
// Dynamic shared memory: [chunk][PH][PW] inputs, then [chunk][(ch+1)*kw][TCO] weights.
template <typename T>
__global__ void __launch_bounds__(kConvThreads) conv_tiled(const T* __restrict__ in, const T* __restrict__ w,
                                                           const T* __restrict__ bias, T* __restrict__ out, Pass p,
                                                           Patch pt, int chunk) {
  using A = typename Acc<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* patch = reinterpret_cast<A*>(smem_raw);
  const int ntap = (p.ch + 1) * p.kw;  // the rows that hold visible taps, every column
  A* wsm = patch + chunk * pt.PH * pt.PW;

  const int64_t tiles_x = (p.Wout + TW - 1) / TW, tiles = tiles_x * ((p.Hout + TH - 1) / TH);
  const int64_t b = blockIdx.x / tiles, tile = blockIdx.x % tiles;
  const int64_t oy0 = tile / tiles_x * TH, ox0 = tile % tiles_x * TW, co0 = (int64_t)blockIdx.y * TCO;
  const int tx = threadIdx.x % TW, ty = threadIdx.x / TW;
  const int64_t iy0 = oy0 + p.y0 + pt.rmin, ix0 = ox0 + p.x0 + pt.cmin;  // input position of patch (0, 0)

  A acc[TCO];
#pragma unroll
  for (int o = 0; o < TCO; ++o) acc[o] = A(0);

  for (int64_t c0 = 0; c0 < p.nin; c0 += chunk) {
    const int nc = (int)(p.nin - c0 < chunk ? p.nin - c0 : chunk);
    __syncthreads();  // everyone is done with the previous chunk
    for (int e = threadIdx.x; e < nc * pt.PH * pt.PW; e += blockDim.x) {
      const int c = e / (pt.PH * pt.PW), r = e / pt.PW % pt.PH, q = e % pt.PW;
      const int64_t iy = iy0 + r, ix = ix0 + q;
      patch[e] = (iy >= 0 && iy < p.Hin && ix >= 0 && ix < p.Win)
                     ? to_acc(in[((b * p.nin + c0 + c) * p.Hin + iy) * p.Win + ix])
                     : A(0);
    }
    for (int e = threadIdx.x; e < nc * ntap * TCO; e += blockDim.x) {
      const int o = e % TCO, t = e / TCO % ntap, c = e / (TCO * ntap), i = t / p.kw, j = t % p.kw;
      const int64_t co = co0 + o, ci = c0 + c;
      wsm[e] = (co < p.nout && visible(p, co, ci, i, j)) ? to_acc(w[co * p.w_out + ci * p.w_in + i * p.kw + j]) : A(0);
    }
    __syncthreads();
    // Every thread computes (its patch reads stay inside the patch); only real pixels are stored.
    for (int c = 0; c < nc; ++c)
      for (int i = 0; i <= p.ch; ++i) {
        const A* prow = patch + (c * pt.PH + ty + i * p.sy - pt.rmin) * pt.PW + tx - pt.cmin;
        const A* wrow = wsm + (c * ntap + i * p.kw) * TCO;
        const int jend = i < p.ch ? p.kw : p.cw + 1;  // the centre row stops at the centre (zero weights if hidden)
        for (int j = 0; j < jend; ++j) {
          const A v = prow[j * p.sx];
#pragma unroll
          for (int o = 0; o < TCO; ++o) acc[o] += v * wrow[j * TCO + o];
        }
      }
  }
  const int64_t oy = oy0 + ty, ox = ox0 + tx;
  if (oy >= p.Hout || ox >= p.Wout) return;
#pragma unroll
  for (int o = 0; o < TCO; ++o) {
    const int64_t co = co0 + o;
    if (co < p.nout)
      out[((b * p.nout + co) * p.Hout + oy) * p.Wout + ox] = from_acc<T>(acc[o] + (bias ? to_acc(bias[co]) : A(0)));
  }
}

// One thread per output element: for shapes whose patch does not fit in shared memory.
template <typename T>
__global__ void conv_naive(const T* __restrict__ in, const T* __restrict__ w, const T* __restrict__ bias,
                           T* __restrict__ out, Pass p) {
  using A = typename Acc<T>::type;
  const int64_t n = p.B * p.nout * p.Hout * p.Wout;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n; idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t ox = idx % p.Wout, oy = idx / p.Wout % p.Hout, co = idx / (p.Wout * p.Hout) % p.nout,
                  b = idx / (p.Wout * p.Hout * p.nout);
    A acc = bias ? to_acc(bias[co]) : A(0);
    for (int i = 0; i <= p.ch; ++i) {
      const int64_t iy = oy + p.y0 + i * p.sy;
      if (iy < 0 || iy >= p.Hin) continue;
      for (int j = 0; j < p.kw; ++j) {
        const int64_t ix = ox + p.x0 + j * p.sx;
        if (ix < 0 || ix >= p.Win) continue;
        for (int64_t ci = 0; ci < p.nin; ++ci)
          if (visible(p, co, ci, i, j))
            acc += to_acc(w[co * p.w_out + ci * p.w_in + i * p.kw + j]) *
                   to_acc(in[((b * p.nin + ci) * p.Hin + iy) * p.Win + ix]);
      }
    }
    out[idx] = from_acc<T>(acc);
  }
}

int grid_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return (int)(b < 65535 * 8 ? (b > 0 ? b : 1) : 65535 * 8);  // grid-stride loops cover the rest
}

template <typename T>
cudaError_t launch_conv(const T* in, const T* w, const T* bias, T* out, const Pass& p, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  if (p.B * p.nout * p.Hout * p.Wout == 0) return cudaSuccess;
  const Patch pt = patch_of(p, TH, TW);
  const size_t per_channel = ((size_t)pt.PH * pt.PW + (size_t)(p.ch + 1) * p.kw * TCO) * sizeof(A);
  int64_t chunk = (int64_t)(kSmemBytes / per_channel);
  if (chunk > kMaxChunk) chunk = kMaxChunk;
  if (chunk > p.nin) chunk = p.nin > 0 ? p.nin : 1;
  const int64_t tiles = ((p.Wout + TW - 1) / TW) * ((p.Hout + TH - 1) / TH);
  const int64_t gx = p.B * tiles, gy = (p.nout + TCO - 1) / TCO;
  if (chunk < 1 || gx > 0x7fffffff || gy > 65535) {
    conv_naive<T><<<grid_for(p.B * p.nout * p.Hout * p.Wout, 256), 256, 0, stream>>>(in, w, bias, out, p);
  } else {
    conv_tiled<T><<<dim3((unsigned)gx, (unsigned)gy), kConvThreads, chunk * per_channel, stream>>>(in, w, bias, out, p,
                                                                                                    pt, (int)chunk);
  }
  return cudaGetLastError();
}

// ---- grad_w ------------------------------------------------------------------------------------------------

constexpr int WT = 16;  // grad_w walks the output in WT x WT tiles
constexpr int kWThreads = 256;

// Sum over the block of one value per thread, in a fixed order; the result is
// valid in every thread. `red` holds blockDim.x values.
template <typename A>
__device__ A block_sum(A v, A* red) {
  __syncthreads();
  red[threadIdx.x] = v;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) red[threadIdx.x] += red[threadIdx.x + stride];
    __syncthreads();
  }
  return red[0];
}

// grid: Co * Ci blocks, one per channel pair; block: kWThreads.
// Dynamic shared memory: grad_out tile [WT*WT], input patch [PH*PW], [kWThreads] for the reduction.
// Thread k works on tap t = tap0 + k % nt over the tile pixels k / nt, + nq, + 2 nq, ...
template <typename T>
__global__ void __launch_bounds__(kWThreads) grad_w_tiled(const T* __restrict__ go, const T* __restrict__ x,
                                                          T* __restrict__ gw, MaskedConvShape s, Patch pt) {
  using A = typename Acc<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* gt = reinterpret_cast<A*>(smem_raw);
  A* xp = gt + WT * WT;
  A* red = xp + pt.PH * pt.PW;
  const int kh = (int)s.kh, kw = (int)s.kw, ch = kh / 2, cw = kw / 2;
  const int64_t co = blockIdx.x / s.Ci, ci = blockIdx.x % s.Ci;
  T* gwp = gw + (co * s.Ci + ci) * s.kh * s.kw;
  for (int e = threadIdx.x + (ch + 1) * kw; e < kh * kw; e += blockDim.x) gwp[e] = from_acc<T>(A(0));  // rows below

  const int ntap = (ch + 1) * kw;
  const int64_t tiles_x = (s.Wo + WT - 1) / WT, tiles = tiles_x * ((s.Ho + WT - 1) / WT);
  for (int tap0 = 0; tap0 < ntap; tap0 += kWThreads) {  // one round unless the kernel has > 256 taps in its top rows
    const int nt = ntap - tap0 < kWThreads ? ntap - tap0 : kWThreads, nq = kWThreads / nt;
    const int t = tap0 + threadIdx.x % nt, q = threadIdx.x / nt, i = t / kw, j = t % kw;
    const bool active = q < nq && visible(co, ci, i, j, ch, cw, s.Co, s.Ci, s.data_channels, s.strict);
    A acc = A(0);
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t oy0 = tile / tiles_x * WT, ox0 = tile % tiles_x * WT;
        __syncthreads();  // everyone is done with the previous tile
        for (int e = threadIdx.x; e < WT * WT; e += blockDim.x) {
          const int64_t oy = oy0 + e / WT, ox = ox0 + e % WT;
          gt[e] = oy < s.Ho && ox < s.Wo ? to_acc(go[((b * s.Co + co) * s.Ho + oy) * s.Wo + ox]) : A(0);
        }
        for (int e = threadIdx.x; e < pt.PH * pt.PW; e += blockDim.x) {
          const int64_t iy = oy0 - s.ph + e / pt.PW, ix = ox0 - s.pw + e % pt.PW;
          xp[e] = iy >= 0 && iy < s.H && ix >= 0 && ix < s.W ? to_acc(x[((b * s.Ci + ci) * s.H + iy) * s.W + ix]) : A(0);
        }
        __syncthreads();
        if (active)
          for (int e = q; e < WT * WT; e += nq) {
            const int r = e / WT, c = e % WT;
            acc += gt[e] * xp[(r + i * (int)s.dh) * pt.PW + c + j * (int)s.dw];
          }
      }
    // the shares of each tap, summed in group order
    __syncthreads();
    red[threadIdx.x] = active ? acc : A(0);
    __syncthreads();
    if (threadIdx.x < nt) {
      A sum = A(0);
      for (int g = 0; g < nq; ++g) sum += red[g * nt + threadIdx.x];
      gwp[i * kw + j] = from_acc<T>(sum);  // zero where the tap is hidden
    }
  }
}

// One block per weight entry: for shapes whose patch does not fit in shared memory.
template <typename T>
__global__ void __launch_bounds__(kWThreads) grad_w_naive(const T* __restrict__ go, const T* __restrict__ x,
                                                          T* __restrict__ gw, MaskedConvShape s) {
  using A = typename Acc<T>::type;
  __shared__ A red[kWThreads];
  const int64_t idx = blockIdx.x;
  const int j = (int)(idx % s.kw), i = (int)(idx / s.kw % s.kh);
  const int64_t ci = idx / (s.kw * s.kh) % s.Ci, co = idx / (s.kw * s.kh * s.Ci);
  if (!visible(co, ci, i, j, (int)s.kh / 2, (int)s.kw / 2, s.Co, s.Ci, s.data_channels, s.strict)) {
    if (threadIdx.x == 0) gw[idx] = from_acc<T>(A(0));  // block-uniform: the whole block leaves together
    return;
  }
  A acc = A(0);
  const int64_t m = s.B * s.Ho * s.Wo;
  for (int64_t e = threadIdx.x; e < m; e += blockDim.x) {
    const int64_t ox = e % s.Wo, oy = e / s.Wo % s.Ho, b = e / (s.Wo * s.Ho);
    const int64_t iy = oy - s.ph + i * s.dh, ix = ox - s.pw + j * s.dw;
    if (iy >= 0 && iy < s.H && ix >= 0 && ix < s.W)
      acc += to_acc(go[((b * s.Co + co) * s.Ho + oy) * s.Wo + ox]) * to_acc(x[((b * s.Ci + ci) * s.H + iy) * s.W + ix]);
  }
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) gw[idx] = from_acc<T>(acc);
}

template <typename T>
__global__ void __launch_bounds__(kWThreads) grad_b_kernel(const T* __restrict__ go, T* __restrict__ gb,
                                                           MaskedConvShape s) {
  using A = typename Acc<T>::type;
  __shared__ A red[kWThreads];
  const int64_t co = blockIdx.x, hw = s.Ho * s.Wo, m = s.B * hw;
  A acc = A(0);
  for (int64_t e = threadIdx.x; e < m; e += blockDim.x) acc += to_acc(go[(e / hw * s.Co + co) * hw + e % hw]);
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) gb[co] = from_acc<T>(acc);
}

template <typename T>
cudaError_t launch_grad_w(const T* go, const T* x, T* gw, const MaskedConvShape& s, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const int64_t pairs = s.Co * s.Ci;
  if (pairs == 0 || s.kh * s.kw == 0) return cudaSuccess;
  const Patch pt{0, 0, (int)(WT + (s.kh / 2) * s.dh), (int)(WT + (s.kw - 1) * s.dw)};
  const size_t smem = ((size_t)WT * WT + (size_t)pt.PH * pt.PW + kWThreads) * sizeof(A);
  if (smem <= kSmemBytes && pairs <= 0x7fffffff)
    grad_w_tiled<T><<<(unsigned)pairs, kWThreads, smem, stream>>>(go, x, gw, s, pt);
  else
    grad_w_naive<T><<<(unsigned)(pairs * s.kh * s.kw), kWThreads, 0, stream>>>(go, x, gw, s);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t masked_conv2d_forward(const T* x, const T* w, const T* bias, T* y, const MaskedConvShape& s,
                                  cudaStream_t stream) {
  return launch_conv<T>(x, w, bias, y, forward_pass(s), stream);
}

template <typename T>
cudaError_t masked_conv2d_backward(const T* grad_out, const T* x, const T* w, T* grad_x, T* grad_w, T* grad_b,
                                   const MaskedConvShape& s, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (grad_x) err = launch_conv<T>(grad_out, w, nullptr, grad_x, grad_x_pass(s), stream);
  if (err == cudaSuccess && grad_w) err = launch_grad_w<T>(grad_out, x, grad_w, s, stream);
  if (err == cudaSuccess && grad_b && s.Co > 0) {
    grad_b_kernel<T><<<(unsigned)s.Co, kWThreads, 0, stream>>>(grad_out, grad_b, s);
    err = cudaGetLastError();
  }
  return err;
}

#define FASTGEN_INSTANTIATE(T)                                                                                  \
  template cudaError_t masked_conv2d_forward<T>(const T*, const T*, const T*, T*, const MaskedConvShape&,       \
                                                cudaStream_t);                                                  \
  template cudaError_t masked_conv2d_backward<T>(const T*, const T*, const T*, T*, T*, T*, const MaskedConvShape&, \
                                                 cudaStream_t);
FASTGEN_INSTANTIATE(float)
FASTGEN_INSTANTIATE(double)
FASTGEN_INSTANTIATE(__half)
FASTGEN_INSTANTIATE(__nv_bfloat16)
#undef FASTGEN_INSTANTIATE

}  // namespace cuda
}  // namespace fastgen
