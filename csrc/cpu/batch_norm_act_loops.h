// The loops of csrc/cpu/batch_norm_act.cpp, written once over a lane policy and included twice by it:
// inside namespace avx512 (compiled for AVX-512F; Vec<T> = AVX-512 registers) and inside namespace
// portable (Vec<T> = plain arrays of the same width). Both instantiations do the same operations in the
// same order on the same lanes (no FMA: the file is built with fp-contract=off), so the two paths give the
// same bits. Include only from batch_norm_act.cpp (it defines Act, the jobs, Vec and the scalar helpers).
//
// A lane policy W = Vec<T> (T the storage type, W::M = math_t<T>) has: L lanes; R (a vector of M), Mk (a
// lane mask), Tail (the first n lanes); load / store of T with a tail (lanes past it read as 0, are not
// written); set, zero, add, sub, mul; positive(z) (z > 0 or NaN: the activation's "pass" side) and
// select(m, yes, no); the double accumulators Acc (acc_zero, acc_stats: s1 += x - k, s2 += (x - k)^2;
// acc_prod: s1 += dz, s2 += dz u; both only in the tail's lanes; acc_lanes: the L sums) and KD (the shift k
// per lane: kd_set, kd_load).

// Rec and Dx (batch_norm_act.cpp) as vectors of the policy W
template <class W>
struct RecV {
  typename W::R p0, p1, p2, slope, islope;
};
template <class W>
struct DxV {
  typename W::R a, bu, c1;
};

// z = x a + b, then the activation
template <class T, Act A>
FASTGEN_INLINE typename Vec<T>::R act(typename Vec<T>::R x, typename Vec<T>::R a, typename Vec<T>::R b,
                                      typename Vec<T>::R slope) {
  using W = Vec<T>;
  const typename W::R z = W::add(W::mul(x, a), b);
  const typename W::Mk pos = W::positive(z);
  if constexpr (A == Act::Relu) return W::select(pos, z, W::zero());
  else return W::select(pos, z, W::mul(z, slope));
}

// From the saved tensor s (y or x) and grad_y: dz = grad_y * act'(z) and u, with xhat = u / gamma (from y:
// u = z - beta, z recovered by inverting leaky_relu) or xhat = u * invstd (from x: u = x - mean; z = x a + b
// exactly as the forward computed it, so the activation's side is the forward's).
template <class T, Act A, bool FromY>
FASTGEN_INLINE void recover(typename Vec<T>::R s, typename Vec<T>::R dy, const RecV<Vec<T>>& q,
                            typename Vec<T>::R& dz, typename Vec<T>::R& u) {
  using W = Vec<T>;
  if constexpr (FromY) {
    static_assert(A == Act::Leaky, "only leaky_relu's output is invertible");
    const typename W::Mk pos = W::positive(s);
    dz = W::select(pos, dy, W::mul(dy, q.slope));
    u = W::sub(W::select(pos, s, W::mul(s, q.islope)), q.p0);
  } else {
    const typename W::Mk pos = W::positive(W::add(W::mul(s, q.p0), q.p1));
    if constexpr (A == Act::Relu) dz = W::select(pos, dy, W::zero());
    else dz = W::select(pos, dy, W::mul(dy, q.slope));
    u = W::sub(s, q.p2);
  }
}

template <class T>
FASTGEN_INLINE typename Vec<T>::R grad_x(typename Vec<T>::R dz, typename Vec<T>::R u, const DxV<Vec<T>>& d,
                                         bool train) {
  using W = Vec<T>;
  if (!train) return W::mul(d.a, dz);
  return W::add(W::add(W::mul(d.a, dz), W::mul(d.bu, u)), d.c1);
}

template <class T>
FASTGEN_INLINE RecV<Vec<T>> rec_vec(const Rec<math_t<T>>& r) {
  using W = Vec<T>;
  return {W::set(r.p0), W::set(r.p1), W::set(r.p2), W::set(r.slope), W::set(r.islope)};
}

template <class T>
FASTGEN_INLINE RecV<Vec<T>> rec_load(const BwdJob<T>& j, int64_t c) {  // channels c .. c + L - 1
  using W = Vec<T>;
  const auto all = W::tail(W::L);
  return {W::load(j.p0 + c, all), W::load(j.p1 + c, all), W::load(j.p2 + c, all), W::set(j.slope),
          W::set(j.islope)};
}

// ---- NCHW: a task per group of channels, each channel's N planes of P contiguous elements ------------------------------------

// One vector per cache line or less: while a plane is read, the plane `ahead` (nullptr: none) is prefetched
// line by line (a channel's planes are C P elements apart: the hardware prefetcher does not follow them).
template <class T>
FASTGEN_INLINE void prefetch_line(const T* ahead, int64_t i, bool write = false) {
  if (ahead) write ? __builtin_prefetch(ahead + i, 1) : __builtin_prefetch(ahead + i);
}

template <class T>
FASTGEN_INLINE void stats_plane(const T* x, const T* ahead, int64_t P, const typename Vec<T>::KD& k,
                                typename Vec<T>::Acc& s1, typename Vec<T>::Acc& s2) {
  using W = Vec<T>;
  const auto all = W::tail(W::L);
  int64_t i = 0;
  for (; i + W::L <= P; i += W::L) {
    prefetch_line(ahead, i);
    W::acc_stats(s1, s2, W::load(x + i, all), k, all);
  }
  if (i < P) {
    const auto t = W::tail(P - i);
    W::acc_stats(s1, s2, W::load(x + i, t), k, t);
  }
}

template <class T>
double lane_sum(const typename Vec<T>::Acc& acc) {
  double lanes[Vec<T>::L], s = 0;
  Vec<T>::acc_lanes(acc, lanes);
  for (int l = 0; l < Vec<T>::L; ++l) s += lanes[l];  // a fixed order: the same bits on every path
  return s;
}

// A task is a group of G adjacent channels (kMaxGroup at most): in sample n their planes are G P contiguous
// elements, a stream the hardware prefetcher follows better than one short plane (an 8 x 8 float32 plane is 4
// cache lines). Each channel's sums run over its planes in sample order, as for G = 1: G does not change the bits.

// Training: the group's statistics, then (while its planes are still in L2) y. Evaluation: y.
template <class T, Act A>
void forward_group(const FwdJob<T>& j, int64_t c0, int64_t G) {
  using W = Vec<T>;
  using M = math_t<T>;
  const int64_t N = j.g.N, CP = j.g.C * j.g.P, P = j.g.P;
  const T* x0 = j.x + c0 * P;  // sample n's planes of the group: x0 + n CP, G P elements
  if (j.train) {
    typename W::Acc s1[kMaxGroup], s2[kMaxGroup];
    typename W::KD kv[kMaxGroup];
    double k[kMaxGroup];
    for (int64_t g = 0; g < G; ++g) {
      k[g] = double(M(x0[g * P]));  // the shift: sums of x - k do not cancel when |mean| >> std
      kv[g] = W::kd_set(k[g]), s1[g] = W::acc_zero(), s2[g] = W::acc_zero();
    }
    for (int64_t n = 0; n < N; ++n) {
      const T* ahead = ahead_of(x0, n, j.g, G);
      for (int64_t g = 0; g < G; ++g)
        stats_plane<T>(x0 + n * CP + g * P, ahead ? ahead + g * P : nullptr, P, kv[g], s1[g], s2[g]);
    }
    for (int64_t g = 0; g < G; ++g)
      finish_stats(lane_sum<T>(s1[g]), lane_sum<T>(s2[g]), k[g], N * P, j.mean + c0 + g, j.var + c0 + g);
  }
  typename W::R a[kMaxGroup], b[kMaxGroup];
  for (int64_t g = 0; g < G; ++g) {
    const Coef<M> cf = coefficients(j.w, j.b, j.mean, j.var, j.eps, c0 + g);
    a[g] = W::set(cf.a), b[g] = W::set(cf.b);
  }
  const typename W::R slope = W::set(j.slope);
  const auto all = W::tail(W::L);
  const T* y0 = j.y + c0 * P;
  for (int64_t n = 0; n < N; ++n) {
    const T* xrow = j.train ? nullptr : ahead_of(x0, n, j.g, G);  // training: the planes are in L2 already
    const T* yrow = ahead_of(y0, n, j.g, G);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t o = n * CP + g * P;
      const T* x = x0 + o;
      T* y = j.y + c0 * P + o;
      const T *xa = xrow ? xrow + g * P : nullptr, *ya = yrow ? yrow + g * P : nullptr;
      int64_t i = 0;
      for (; i + W::L <= P; i += W::L) {
        prefetch_line(xa, i), prefetch_line(ya, i, true);
        W::store(y + i, act<T, A>(W::load(x + i, all), a[g], b[g], slope), all);
      }
      if (i < P) {
        const auto t = W::tail(P - i);
        W::store(y + i, act<T, A>(W::load(x + i, t), a[g], b[g], slope), t);
      }
    }
  }
}

// The two sums of each channel of the group, its coefficients, then (planes still in L2) grad_x.
template <class T, Act A, bool FromY>
void backward_group(const BwdJob<T>& j, int64_t c0, int64_t G) {
  using W = Vec<T>;
  using M = math_t<T>;
  const int64_t N = j.g.N, CP = j.g.C * j.g.P, P = j.g.P;
  const T *s0 = j.s + c0 * P, *dy0 = j.dy + c0 * P;
  RecV<W> q[kMaxGroup];
  for (int64_t g = 0; g < G; ++g) q[g] = rec_vec<T>(recovery<T, FromY>(j, c0 + g));
  const auto all = W::tail(W::L);
  double S1[kMaxGroup] = {}, S2[kMaxGroup] = {};
  if (j.sums) {
    typename W::Acc s1[kMaxGroup], s2[kMaxGroup];
    for (int64_t g = 0; g < G; ++g) s1[g] = W::acc_zero(), s2[g] = W::acc_zero();
    for (int64_t n = 0; n < N; ++n) {
      const T *srow = ahead_of(s0, n, j.g, G), *dyrow = ahead_of(dy0, n, j.g, G);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t o = n * CP + g * P;
        const T *s = s0 + o, *dy = dy0 + o;
        const T *sa = srow ? srow + g * P : nullptr, *dya = dyrow ? dyrow + g * P : nullptr;
        int64_t i = 0;
        typename W::R dz, u;
        for (; i + W::L <= P; i += W::L) {
          prefetch_line(sa, i), prefetch_line(dya, i);
          recover<T, A, FromY>(W::load(s + i, all), W::load(dy + i, all), q[g], dz, u);
          W::acc_prod(s1[g], s2[g], dz, u, all);
        }
        if (i < P) {
          const auto t = W::tail(P - i);
          recover<T, A, FromY>(W::load(s + i, t), W::load(dy + i, t), q[g], dz, u);
          W::acc_prod(s1[g], s2[g], dz, u, t);
        }
      }
    }
    for (int64_t g = 0; g < G; ++g) S1[g] = lane_sum<T>(s1[g]), S2[g] = lane_sum<T>(s2[g]);
  }
  DxV<W> dv[kMaxGroup];
  for (int64_t g = 0; g < G; ++g) {
    const Dx<M> d = finish_backward<T, FromY>(j, c0 + g, S1[g], S2[g]);
    dv[g] = {W::set(d.a), W::set(d.bu), W::set(d.c1)};
  }
  if (!j.dx) return;
  const T* dx0 = j.dx + c0 * P;
  for (int64_t n = 0; n < N; ++n) {
    // the sums read the planes into L2; without them (evaluation, no parameter gradient) they come from memory
    const T *srow = j.sums ? nullptr : ahead_of(s0, n, j.g, G), *dyrow = j.sums ? nullptr : ahead_of(dy0, n, j.g, G);
    const T* dxrow = ahead_of(dx0, n, j.g, G);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t o = n * CP + g * P;
      const T *s = s0 + o, *dy = dy0 + o;
      T* dx = j.dx + c0 * P + o;
      const T *sa = srow ? srow + g * P : nullptr, *dya = dyrow ? dyrow + g * P : nullptr;
      const T* dxa = dxrow ? dxrow + g * P : nullptr;
      int64_t i = 0;
      typename W::R dz, u;
      for (; i + W::L <= P; i += W::L) {
        prefetch_line(sa, i), prefetch_line(dya, i), prefetch_line(dxa, i, true);
        recover<T, A, FromY>(W::load(s + i, all), W::load(dy + i, all), q[g], dz, u);
        W::store(dx + i, grad_x<T>(dz, u, dv[g], j.train), all);
      }
      if (i < P) {
        const auto t = W::tail(P - i);
        recover<T, A, FromY>(W::load(s + i, t), W::load(dy + i, t), q[g], dz, u);
        W::store(dx + i, grad_x<T>(dz, u, dv[g], j.train), t);
      }
    }
  }
}

// ---- channels_last: rows of C contiguous channels, in blocks of kRows rows ---------------------------------
//
// A reduction writes each block's per-channel sums (the lanes are channels) to partial[block][Cp]; the caller
// adds the blocks in order. The blocks depend on the shape only, so the bits do not depend on the threads.

template <class T>
void stats_block(const FwdJob<T>& j, int64_t blk) {
  using W = Vec<T>;
  const int64_t C = j.g.C, r0 = blk * kRows, r1 = std::min(r0 + kRows, j.g.N * j.g.P);
  double* p1 = j.part + blk * 2 * j.cp;
  double* p2 = p1 + j.cp;
  for (int64_t c = 0; c < C; c += W::L) {
    const auto t = W::tail(C - c);
    const typename W::KD kv = W::kd_load(j.shift + c);
    typename W::Acc s1 = W::acc_zero(), s2 = W::acc_zero();
    for (int64_t r = r0; r < r1; ++r) W::acc_stats(s1, s2, W::load(j.x + r * C + c, t), kv, t);
    W::acc_lanes(s1, p1 + c);  // lanes past C land in the padding
    W::acc_lanes(s2, p2 + c);
  }
}

template <class T, Act A>
void apply_block(const FwdJob<T>& j, int64_t blk) {
  using W = Vec<T>;
  const int64_t C = j.g.C, r0 = blk * kRows, r1 = std::min(r0 + kRows, j.g.N * j.g.P);
  const typename W::R slope = W::set(j.slope);
  const auto all = W::tail(W::L);
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t c = 0; c < C; c += W::L) {
      const auto t = W::tail(C - c);
      const typename W::R a = W::load(j.ca + c, all), b = W::load(j.cb + c, all);
      W::store(j.y + r * C + c, act<T, A>(W::load(j.x + r * C + c, t), a, b, slope), t);
    }
  }
}

template <class T, Act A, bool FromY>
void backward_reduce_block(const BwdJob<T>& j, int64_t blk) {
  using W = Vec<T>;
  const int64_t C = j.g.C, r0 = blk * kRows, r1 = std::min(r0 + kRows, j.g.N * j.g.P);
  double* p1 = j.part + blk * 2 * j.cp;
  double* p2 = p1 + j.cp;
  for (int64_t c = 0; c < C; c += W::L) {
    const auto t = W::tail(C - c);
    const RecV<W> q = rec_load<T>(j, c);
    typename W::Acc s1 = W::acc_zero(), s2 = W::acc_zero();
    typename W::R dz, u;
    for (int64_t r = r0; r < r1; ++r) {
      recover<T, A, FromY>(W::load(j.s + r * C + c, t), W::load(j.dy + r * C + c, t), q, dz, u);
      W::acc_prod(s1, s2, dz, u, t);
    }
    W::acc_lanes(s1, p1 + c);
    W::acc_lanes(s2, p2 + c);
  }
}

template <class T, Act A, bool FromY>
void backward_apply_block(const BwdJob<T>& j, int64_t blk) {
  using W = Vec<T>;
  const int64_t C = j.g.C, r0 = blk * kRows, r1 = std::min(r0 + kRows, j.g.N * j.g.P);
  const auto all = W::tail(W::L);
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t c = 0; c < C; c += W::L) {
      const auto t = W::tail(C - c);
      const RecV<W> q = rec_load<T>(j, c);
      const DxV<W> dv{W::load(j.da + c, all), W::load(j.dbu + c, all), W::load(j.dc1 + c, all)};
      typename W::R dz, u;
      recover<T, A, FromY>(W::load(j.s + r * C + c, t), W::load(j.dy + r * C + c, t), q, dz, u);
      W::store(j.dx + r * C + c, grad_x<T>(dz, u, dv, j.train), t);
    }
  }
}

template <class T, Act A>
FwdKernels<T> forward_kernels_of() {
  return {&forward_group<T, A>, &stats_block<T>, &apply_block<T, A>};
}

template <class T, Act A, bool FromY>
BwdKernels<T> backward_kernels_of() {
  return {&backward_group<T, A, FromY>, &backward_reduce_block<T, A, FromY>, &backward_apply_block<T, A, FromY>};
}

template <class T>
FwdKernels<T> forward_kernels(Act a) {
  return a == Act::Relu ? forward_kernels_of<T, Act::Relu>() : forward_kernels_of<T, Act::Leaky>();
}

template <class T>
BwdKernels<T> backward_kernels(Act a, bool from_y) {
  if (from_y) return backward_kernels_of<T, Act::Leaky, true>();
  return a == Act::Relu ? backward_kernels_of<T, Act::Relu, false>() : backward_kernels_of<T, Act::Leaky, false>();
}
