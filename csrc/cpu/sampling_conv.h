// The cached sampler's convolution micro-kernel, on GCC vector types of 64
// bytes (fastgen::vec::Vec64, csrc/cpu/vec_math.h). No include guard:
// csrc/cpu/sampling_kernels.h includes it twice, inside an AVX-512 target
// region (zmm registers) and portably (GCC splits the vectors).
//
// conv_rows computes, for each of `rows` output rows (one row = one image at
// one position), out[co] = bias[co] + sum over taps t and input channels ci
// of src[row][t][ci] * w[t][ci][co], for co in [co_begin, co_end) (multiples
// of one vector; the row length ldw of w is the padded channel count). A tile of up to 4 rows x 4 vectors of output
// channels stays in registers while the weights stream past.

template <class T, int NR, int NV>
void conv_tile(const T* const* src, int64_t taps, int64_t cin, const T* w, int64_t ldw, int64_t co0,
               T* const* out, const T* bias) {
  using V = typename fastgen::vec::Vec64<T>::V;  // csrc/cpu/vec_math.h
  constexpr int n = 64 / sizeof(T);
  V acc[NR][NV];
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      if (bias)
        acc[r][v] = *reinterpret_cast<const V*>(bias + co0 + v * n);
      else
        acc[r][v] = V{};
    }
  for (int64_t t = 0; t < taps; ++t) {
    const T* s[NR];
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) s[r] = src[r * taps + t];
    const T* wt = w + t * cin * ldw + co0;
    for (int64_t ci = 0; ci < cin; ++ci) {
      V wv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) wv[v] = *reinterpret_cast<const V*>(wt + ci * ldw + v * n);
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) {
        const T sv = s[r][ci];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] += sv * wv[v];
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) *reinterpret_cast<V*>(out[r] + co0 + v * n) = acc[r][v];
}

template <class T, int NR>
void conv_tile_nv(int nv, const T* const* src, int64_t taps, int64_t cin, const T* w, int64_t ldw, int64_t co0,
                  T* const* out, const T* bias) {
  switch (nv) {
    case 1: return conv_tile<T, NR, 1>(src, taps, cin, w, ldw, co0, out, bias);
    case 2: return conv_tile<T, NR, 2>(src, taps, cin, w, ldw, co0, out, bias);
    case 3: return conv_tile<T, NR, 3>(src, taps, cin, w, ldw, co0, out, bias);
    default: return conv_tile<T, NR, 4>(src, taps, cin, w, ldw, co0, out, bias);
  }
}

// src: rows x taps input pointers (row-major), out: rows output pointers.
template <class T>
void conv_rows(int64_t rows, const T* const* src, int64_t taps, int64_t cin, const T* w, int64_t ldw,
               int64_t co_begin, int64_t co_end, T* const* out, const T* bias) {
  constexpr int n = 64 / sizeof(T);
  for (int64_t co0 = co_begin; co0 < co_end; co0 += 4 * n) {
    const int nv = static_cast<int>(std::min<int64_t>(4, (co_end - co0) / n));
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      const T* const* s = src + r0 * taps;
      T* const* o = out + r0;
      switch (std::min<int64_t>(4, rows - r0)) {
        case 1: conv_tile_nv<T, 1>(nv, s, taps, cin, w, ldw, co0, o, bias); break;
        case 2: conv_tile_nv<T, 2>(nv, s, taps, cin, w, ldw, co0, o, bias); break;
        case 3: conv_tile_nv<T, 3>(nv, s, taps, cin, w, ldw, co0, o, bias); break;
        default: conv_tile_nv<T, 4>(nv, s, taps, cin, w, ldw, co0, o, bias); break;
      }
    }
  }
}
