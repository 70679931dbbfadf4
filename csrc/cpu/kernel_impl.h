// The CPU attention-pooling kernels, written once over a SIMD vector class `V` and included by
// each per-ISA translation unit (kernel_avx512.cpp, kernel_avx2.cpp, kernel_generic.cpp) after
// it defines its `V`. Everything here has internal linkage (anonymous namespace), so the
// ISA-specific copies can never be merged by the linker.
//
// V provides: W (lanes), A (accumulator scalar), zero/set1/load/load_partial/store/
// store_partial for A and for every input type T, + - *, fma, max, reduce_add, reduce_max,
// exp2 (exactly 0 for -inf), mask_tail(nb) (lanes >= nb set to -inf) and
// transpose_reduce(V a[W]) (lane j = horizontal sum of a[j]).
//
// Shape of the work: keys are processed in blocks of W positions. For each block the scores of
// every query are W dot products, reduced horizontally all at once by transpose_reduce, so the
// K/V block is read from memory once and then reused from L1 for all N queries.
#pragma once

#include "kernel_common.h"

namespace attnkern {
namespace cpu {
namespace {

constexpr double kLog2e = 1.4426950408889634;

template <class A>
inline A scalar_exp2(A x);
template <>
inline float scalar_exp2<float>(float x) {
  return __builtin_exp2f(x);
}
template <>
inline double scalar_exp2<double>(double x) {
  return __builtin_exp2(x);
}

template <class A>
inline A neg_inf() {
  return -__builtin_inf();
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Loads chunk c of a head vector whose last chunk holds `tail` (1..W) elements.
template <class V, class T>
inline V load_chunk(const T* p, int64_t c, int64_t last, int tail) {
  return (c < last || tail == V::W) ? V::load(p + c * V::W) : V::load_partial(p + c * V::W, tail);
}

// Scores of one query against the W keys of a block: lane j = <x, k_j>. x is a padded fp32/64
// vector in the workspace (zeros past D), kp[j] points at key j (repeated past the block end).
// Keys are read row by row (each row front to back, as the hardware prefetchers like it),
// with up to four chunks of x held in registers.
template <class V, class T>
inline V block_dots(const typename V::A* x, const T* const* kp, int64_t nch, int tail) {
  constexpr int W = V::W;
  V acc[W];
#pragma GCC unroll 16
  for (int j = 0; j < W; ++j) acc[j] = V::zero();
  const int64_t nfull = tail == W ? nch : nch - 1;
  int64_t c = 0;
  for (; c + 4 <= nfull; c += 4) {
    const V x0 = V::load(x + c * W), x1 = V::load(x + (c + 1) * W);
    const V x2 = V::load(x + (c + 2) * W), x3 = V::load(x + (c + 3) * W);
#pragma GCC unroll 16
    for (int j = 0; j < W; ++j) {
      const T* r = kp[j] + c * W;
      V a = V::fma(x0, V::load(r), acc[j]);
      a = V::fma(x1, V::load(r + W), a);
      a = V::fma(x2, V::load(r + 2 * W), a);
      acc[j] = V::fma(x3, V::load(r + 3 * W), a);
    }
  }
  for (; c < nfull; ++c) {
    const V xc = V::load(x + c * W);
#pragma GCC unroll 16
    for (int j = 0; j < W; ++j) acc[j] = V::fma(xc, V::load(kp[j] + c * W), acc[j]);
  }
  if (c < nch) {
    const V xc = V::load(x + c * W);
#pragma GCC unroll 16
    for (int j = 0; j < W; ++j) acc[j] = V::fma(xc, V::load_partial(kp[j] + c * W, tail), acc[j]);
  }
  return V::transpose_reduce(acc);
}

// y[0:nch*W] = y * y_scale + sum_{j < nb} w[j] * row_j, rows read from input rows rp[j]
// (dtype T). Four chunks at a time stay in registers while the rows stream past, so each row is
// read front to back and the four FMA chains run in parallel.
template <class V, class T>
inline void block_axpy_rows(typename V::A* y, const typename V::A* w, const T* const* rp, int nb,
                            int64_t nch, int tail, typename V::A y_scale) {
  constexpr int W = V::W;
  const V ys = V::set1(y_scale);
  const int64_t nfull = tail == W ? nch : nch - 1;
  int64_t c = 0;
  for (; c + 4 <= nfull; c += 4) {
    V a0 = V::load(y + c * W) * ys, a1 = V::load(y + (c + 1) * W) * ys;
    V a2 = V::load(y + (c + 2) * W) * ys, a3 = V::load(y + (c + 3) * W) * ys;
    for (int j = 0; j < nb; ++j) {
      const V wj = V::set1(w[j]);
      const T* r = rp[j] + c * W;
      a0 = V::fma(wj, V::load(r), a0);
      a1 = V::fma(wj, V::load(r + W), a1);
      a2 = V::fma(wj, V::load(r + 2 * W), a2);
      a3 = V::fma(wj, V::load(r + 3 * W), a3);
    }
    a0.store(y + c * W);
    a1.store(y + (c + 1) * W);
    a2.store(y + (c + 2) * W);
    a3.store(y + (c + 3) * W);
  }
  for (; c < nfull; ++c) {
    V a = V::load(y + c * W) * ys;
    for (int j = 0; j < nb; ++j) a = V::fma(V::set1(w[j]), V::load(rp[j] + c * W), a);
    a.store(y + c * W);
  }
  if (c < nch) {
    V a = V::load(y + c * W) * ys;
    for (int j = 0; j < nb; ++j) a = V::fma(V::set1(w[j]), V::load_partial(rp[j] + c * W, tail), a);
    a.store(y + c * W);
  }
}

// Row pointers of the block starting at valid position i0; past the block end (nb <= j < W)
// they repeat the last row, whose scores are then masked to -inf.
template <int W, class T>
inline void block_rows(const Span& s, int64_t i0, int nb, const T* base, int64_t stride_l, const T** rp) {
  if (!s.idx) {
    const T* r = base + (s.start + i0) * stride_l;
    for (int j = 0; j < W; ++j) rp[j] = r + (j < nb ? j : nb - 1) * stride_l;
  } else {
    for (int j = 0; j < W; ++j) rp[j] = base + (s.start + int64_t(s.idx[i0 + (j < nb ? j : nb - 1)])) * stride_l;
  }
}

// Online-softmax step of one query for one block: updates its running max/sum and returns
// the block's probabilities (in pb) and the factor alpha that rescales its accumulator.
template <class V>
inline typename V::A softmax_step(V sc, typename V::A* mm, typename V::A* ll, typename V::A* pb) {
  using A = typename V::A;
  const A mold = *mm;
  const A bmax = sc.reduce_max();
  const A mnew = mold > bmax ? mold : bmax;
  const V pr = V::exp2(sc - V::set1(mnew));
  const A alpha = mold == mnew ? A(1) : V::exp2(V::set1(mold - mnew)).first();
  *ll = *ll * alpha + pr.reduce_add();
  *mm = mnew;
  pr.store(pb);
  return alpha;
}

// acc_i = acc_i * alpha_i + sum_j pb_i[j] v_j for four queries i at once (G chunks of the value
// rows in flight, 4 x G accumulators in registers): each value row is loaded once for all four.
template <class V, class T, int G>
inline void pv4_chunks(typename V::A* const* acc, const typename V::A* alpha, const typename V::A* pb,
                       const T* const* vp, int nb, int64_t c, int tail) {
  constexpr int W = V::W;
  V a[4][G];
  for (int i = 0; i < 4; ++i)
    for (int g = 0; g < G; ++g) a[i][g] = V::load(acc[i] + (c + g) * W) * V::set1(alpha[i]);
  for (int j = 0; j < nb; ++j) {
    V x[G];
    for (int g = 0; g < G; ++g)
      x[g] = tail == W ? V::load(vp[j] + (c + g) * W) : V::load_partial(vp[j] + (c + g) * W, tail);
    for (int i = 0; i < 4; ++i) {
      const V w = V::set1(pb[i * W + j]);
      for (int g = 0; g < G; ++g) a[i][g] = V::fma(w, x[g], a[i][g]);
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int g = 0; g < G; ++g) a[i][g].store(acc[i] + (c + g) * W);
}

template <class V, class T>
void fwd_span(const FwdParams& p, const Span& s, typename V::A* ws, typename V::A* acc_out,
              typename V::A* m_out, typename V::A* l_out) {
  using A = typename V::A;
  constexpr int W = V::W;
  const int64_t N = p.N, Dk = p.Dk, Dv = p.Dv;
  const int64_t nck = ceil_div(Dk, W), ncv = ceil_div(Dv, W);
  const int64_t Dkp = nck * W, Dvp = ncv * W;
  const int kt = int(Dk - (nck - 1) * W), vt = int(Dv - (ncv - 1) * W);
  A* qs = ws;
  A* acc = qs + N * Dkp;
  A* mm = acc + N * Dvp;
  A* ll = mm + N;
  A* pb = ll + N;
  A* p4 = pb + W;             // probabilities of four queries [4][W]
  A* kt_buf = p4 + 4 * W;     // key block transposed [Dkp][W]
  A* rows_buf = kt_buf + Dkp * W;  // key block as fp32 rows [W][Dkp]

  // Queries pre-scaled by scale*log2(e): the softmax then runs in base 2.
  const T* q = static_cast<const T*>(p.q) + s.b * p.q_sb + s.h * p.q_sh;
  const V c2 = V::set1(A(p.scale * kLog2e));
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < nck; ++c)
      (load_chunk<V>(q + n * p.q_sn, c, nck - 1, kt) * c2).store(qs + n * Dkp + c * W);
    for (int64_t c = 0; c < ncv; ++c) V::zero().store(acc + n * Dvp + c * W);
    mm[n] = neg_inf<A>();
    ll[n] = A(0);
  }

  const T* kb = static_cast<const T*>(p.k) + s.b * p.k_sb + s.h * p.k_sh;
  const T* vb = static_cast<const T*>(p.v) + s.b * p.v_sb + s.h * p.v_sh;
  const T* kp[W];
  const T* vp[W];
  for (int64_t i0 = 0; i0 < s.count; i0 += W) {
    const int nb = int(s.count - i0 < W ? s.count - i0 : W);
    block_rows<W>(s, i0, nb, kb, p.k_sl, kp);
    block_rows<W>(s, i0, nb, vb, p.v_sl, vp);
    int64_t n = 0;
    if (W > 1 && N >= 4) {
      // Many queries per history: transpose the key block once (kt_buf[d][j]), then score four
      // queries per pass with broadcast FMAs, and stream each value row once for all four.
      for (int j = 0; j < W; ++j)
        for (int64_t c = 0; c < nck; ++c) load_chunk<V>(kp[j], c, nck - 1, kt).store(rows_buf + j * Dkp + c * W);
      for (int64_t d = 0; d < Dk; ++d)
        for (int j = 0; j < W; ++j) kt_buf[d * W + j] = rows_buf[j * Dkp + d];
      for (; n + 4 <= N; n += 4) {
        const A* q0 = qs + n * Dkp;
        V s0 = V::zero(), s1 = V::zero(), s2 = V::zero(), s3 = V::zero();
        for (int64_t d = 0; d < Dk; ++d) {
          const V kd = V::load(kt_buf + d * W);
          s0 = V::fma(V::set1(q0[d]), kd, s0);
          s1 = V::fma(V::set1(q0[Dkp + d]), kd, s1);
          s2 = V::fma(V::set1(q0[2 * Dkp + d]), kd, s2);
          s3 = V::fma(V::set1(q0[3 * Dkp + d]), kd, s3);
        }
        A alpha[4];
        alpha[0] = softmax_step<V>(s0.mask_tail(nb), mm + n, ll + n, p4);
        alpha[1] = softmax_step<V>(s1.mask_tail(nb), mm + n + 1, ll + n + 1, p4 + W);
        alpha[2] = softmax_step<V>(s2.mask_tail(nb), mm + n + 2, ll + n + 2, p4 + 2 * W);
        alpha[3] = softmax_step<V>(s3.mask_tail(nb), mm + n + 3, ll + n + 3, p4 + 3 * W);
        A* accs[4] = {acc + n * Dvp, acc + (n + 1) * Dvp, acc + (n + 2) * Dvp, acc + (n + 3) * Dvp};
        const int64_t nfull = vt == W ? ncv : ncv - 1;
        int64_t c = 0;
        for (; c + 4 <= nfull; c += 4) pv4_chunks<V, T, 4>(accs, alpha, p4, vp, nb, c, W);
        for (; c < nfull; ++c) pv4_chunks<V, T, 1>(accs, alpha, p4, vp, nb, c, W);
        if (c < ncv) pv4_chunks<V, T, 1>(accs, alpha, p4, vp, nb, c, vt);
      }
    }
    for (; n < N; ++n) {
      const V sc = block_dots<V, T>(qs + n * Dkp, kp, nck, kt).mask_tail(nb);
      const A alpha = softmax_step<V>(sc, mm + n, ll + n, pb);
      block_axpy_rows<V, T>(acc + n * Dvp, pb, vp, nb, ncv, vt, alpha);
    }
  }
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t d = 0; d < Dv; ++d) acc_out[n * Dv + d] = acc[n * Dvp + d];
    m_out[n] = mm[n];
    l_out[n] = ll[n];
  }
}

// Writes one gradient row (fp32/64 workspace -> dtype T). Whole, aligned rows use streaming
// stores: the gradients are written once and not read back soon, so skipping the
// read-for-ownership of each line saves a third of the backward's memory traffic.
template <class V, class T>
inline void store_row(T* dst, const typename V::A* src, int64_t nch, int tail) {
  constexpr int W = V::W;
  if (tail == W && (reinterpret_cast<uintptr_t>(dst) % (W * sizeof(T))) == 0) {
    for (int64_t c = 0; c < nch; ++c) V::load(src + c * W).stream(dst + c * W);
    return;
  }
  for (int64_t c = 0; c + 1 < nch; ++c) V::load(src + c * W).store(dst + c * W);
  const V x = V::load(src + (nch - 1) * W);
  if (tail == W) x.store(dst + (nch - 1) * W); else x.store_partial(dst + (nch - 1) * W, tail);
}

template <class V, class T>
void bwd_span(const BwdParams& p, const Span& s, typename V::A* ws, typename V::A* dq_out) {
  using A = typename V::A;
  constexpr int W = V::W;
  const int64_t N = p.N, H = p.H, Dk = p.Dk, Dv = p.Dv;
  const int64_t nck = ceil_div(Dk, W), ncv = ceil_div(Dv, W);
  const int64_t Dkp = nck * W, Dvp = ncv * W;
  const int kt = int(Dk - (nck - 1) * W), vt = int(Dv - (ncv - 1) * W);
  A* qf = ws;               // q, fp32/64, padded
  A* dof = qf + N * Dkp;    // grad_out
  A* dqa = dof + N * Dvp;   // dq accumulator
  A* dkb = dqa + N * Dkp;   // dk of the current block [W, Dkp]
  A* dvb = dkb + W * Dkp;   // dv of the current block [W, Dvp]
  A* lse2 = dvb + W * Dvp;  // lse in log2 units
  A* dl = lse2 + N;         // delta
  A* pb = dl + N;           // probabilities of the block
  A* dsb = pb + W;          // scale * ds of the block

  const T* q = static_cast<const T*>(p.q) + s.b * p.q_sb + s.h * p.q_sh;
  const T* go = static_cast<const T*>(p.go) + s.b * p.go_sb + s.h * p.go_sh;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < nck; ++c) {
      load_chunk<V>(q + n * p.q_sn, c, nck - 1, kt).store(qf + n * Dkp + c * W);
      V::zero().store(dqa + n * Dkp + c * W);
    }
    for (int64_t c = 0; c < ncv; ++c) load_chunk<V>(go + n * p.go_sn, c, ncv - 1, vt).store(dof + n * Dvp + c * W);
    const int64_t r = (s.b * N + n) * H + s.h;
    lse2[n] = A(p.lse[r]) * A(kLog2e);
    dl[n] = p.delta64 ? A(p.delta64[r]) : A(p.delta[r]);
  }
  const V c2 = V::set1(A(p.scale * kLog2e));
  const A scale = A(p.scale);

  const T* kb = static_cast<const T*>(p.k) + s.b * p.k_sb + s.h * p.k_sh;
  const T* vb = static_cast<const T*>(p.v) + s.b * p.v_sb + s.h * p.v_sh;
  T* gkb = static_cast<T*>(p.gk) + s.b * p.gk_sb + s.h * p.gk_sh;
  T* gvb = static_cast<T*>(p.gv) + s.b * p.gv_sb + s.h * p.gv_sh;
  const T* kp[W];
  const T* vp[W];
  int64_t posb[W];
  if constexpr (sizeof(A) == 8) {
    // float64: the saved lse is float32, which alone would cap the gradients at ~1e-7
    // relative accuracy; one extra pass refines it to double (float64 is for gradcheck).
    for (int64_t n = 0; n < N; ++n) dqa[n * Dkp] = A(0);
    for (int64_t i0 = 0; i0 < s.count; i0 += W) {
      const int nb = int(s.count - i0 < W ? s.count - i0 : W);
      for (int j = 0; j < W; ++j) {
        const int64_t i = i0 + (j < nb ? j : nb - 1);
        kp[j] = kb + (s.start + (s.idx ? int64_t(s.idx[i]) : i)) * p.k_sl;
      }
      for (int64_t n = 0; n < N; ++n) {
        const V sc = (block_dots<V, T>(qf + n * Dkp, kp, nck, kt) * c2).mask_tail(nb);
        dqa[n * Dkp] += V::exp2(sc - V::set1(lse2[n])).reduce_add();
      }
    }
    for (int64_t n = 0; n < N; ++n) {
      if (dqa[n * Dkp] > A(0)) lse2[n] += __builtin_log2(dqa[n * Dkp]);
      dqa[n * Dkp] = A(0);
    }
  }
  for (int64_t i0 = 0; i0 < s.count; i0 += W) {
    const int nb = int(s.count - i0 < W ? s.count - i0 : W);
    for (int j = 0; j < W; ++j) {
      const int64_t i = i0 + (j < nb ? j : nb - 1);
      const int64_t pos = s.start + (s.idx ? int64_t(s.idx[i]) : i);
      posb[j] = pos;
      kp[j] = kb + pos * p.k_sl;
      vp[j] = vb + pos * p.v_sl;
    }
    for (int j = 0; j < nb; ++j) {
      for (int64_t c = 0; c < nck; ++c) V::zero().store(dkb + j * Dkp + c * W);
      for (int64_t c = 0; c < ncv; ++c) V::zero().store(dvb + j * Dvp + c * W);
    }
    for (int64_t n = 0; n < N; ++n) {
      const V sc = (block_dots<V, T>(qf + n * Dkp, kp, nck, kt) * c2).mask_tail(nb);
      const V pr = V::exp2(sc - V::set1(lse2[n]));  // masked lanes: exactly 0
      const V dp = block_dots<V, T>(dof + n * Dvp, vp, ncv, vt);
      const V ds = pr * (dp - V::set1(dl[n])) * V::set1(scale);
      pr.store(pb);
      ds.store(dsb);
      const A* qn = qf + n * Dkp;
      const A* don = dof + n * Dvp;
      for (int j = 0; j < nb; ++j) {
        const V pj = V::set1(pb[j]);
        const V dsj = V::set1(dsb[j]);
        A* dvj = dvb + j * Dvp;
        A* dkj = dkb + j * Dkp;
        for (int64_t c = 0; c < ncv; ++c) V::fma(pj, V::load(don + c * W), V::load(dvj + c * W)).store(dvj + c * W);
        for (int64_t c = 0; c < nck; ++c) V::fma(dsj, V::load(qn + c * W), V::load(dkj + c * W)).store(dkj + c * W);
      }
      block_axpy_rows<V, T>(dqa + n * Dkp, dsb, kp, nb, nck, kt, A(1));
    }
    for (int j = 0; j < nb; ++j) {
      store_row<V>(gkb + posb[j] * p.gk_sl, dkb + j * Dkp, nck, kt);
      store_row<V>(gvb + posb[j] * p.gv_sl, dvb + j * Dvp, ncv, vt);
    }
  }
  V::fence();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t d = 0; d < Dk; ++d) dq_out[n * Dk + d] = dqa[n * Dkp + d];
}

// Type-erased entry points for the KernelTable of a V: a float V serves float32/16/bfloat16,
// a double V float64.
template <class V>
void fwd_entry(const FwdParams& p, const Span& s, void* ws, void* acc, void* m, void* l) {
  using A = typename V::A;
  A* w = static_cast<A*>(ws);
  A* a = static_cast<A*>(acc);
  A* mm = static_cast<A*>(m);
  A* ll = static_cast<A*>(l);
  if constexpr (sizeof(A) == 8) {
    fwd_span<V, double>(p, s, w, a, mm, ll);
  } else {
    switch (p.dtype) {
      case kF16: fwd_span<V, fp16_t>(p, s, w, a, mm, ll); break;
      case kBF16: fwd_span<V, bf16_t>(p, s, w, a, mm, ll); break;
      default: fwd_span<V, float>(p, s, w, a, mm, ll); break;
    }
  }
}

template <class V>
void bwd_entry(const BwdParams& p, const Span& s, void* ws, void* dq) {
  using A = typename V::A;
  A* w = static_cast<A*>(ws);
  A* d = static_cast<A*>(dq);
  if constexpr (sizeof(A) == 8) {
    bwd_span<V, double>(p, s, w, d);
  } else {
    switch (p.dtype) {
      case kF16: bwd_span<V, fp16_t>(p, s, w, d); break;
      case kBF16: bwd_span<V, bf16_t>(p, s, w, d); break;
      default: bwd_span<V, float>(p, s, w, d); break;
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace attnkern
