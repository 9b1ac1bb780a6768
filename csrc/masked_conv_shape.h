// The geometry of one masked_conv2d call, shared by the CPU kernels, the CUDA
// kernels and their glue. Plain C++ (no torch, no CUDA headers) so nvcc -c and
// the C++ build both take it.
#pragma once
#include <cstdint>

namespace fastgen {

// stride 1, groups 1. Visible taps: rows i < kh/2; row kh/2 with j < kw/2; the
// centre (kh/2, kw/2) where in-block h and out-block g (data_channels blocks)
// have h < g (mask A, strict) or h <= g (mask B). See fastgen/ref/masked_conv.py.
// mask_type 'V' (vertical, CPU kernel only): every tap visible and an output as
// tall as the input, tap (i, j) of output row y reading input row y + i*dh - ph:
// the Gated PixelCNN's vertical stack (ph = kh-1) and its down-shifted 1x1 link
// (kh = 1, ph = 1). See fastgen/ref/gated.py.
struct MaskedConvShape {
  int64_t B, Ci, H, W, Co, kh, kw, Ho, Wo, ph, pw, dh, dw;
  int64_t data_channels;
  bool strict;    // mask A
  bool vertical;  // mask 'V'
};

}  // namespace fastgen
