// Sequence self-attention kernels over a vector type V (vec_scalar.h, vec_avx2.h, vec_avx512.h),
// included once per instruction set. The math is attnkern.reference.sequence_attention_ref;
// the layout docs/sequence_attention.md.
//
// Tiling: a query block (kSeqBQ positions of one row) against the key blocks of the same row,
// all heads. A block pair no query of which attends any key is skipped before any arithmetic
// (the rows' key intervals below); one every pair of which is attended runs without a mask;
// only the others evaluate the mask per element. Both products of a block pair are one
// register-blocked kernel, `gemm_acc`: scores against K^T (transposed once per block), the
// output / gradients against V, dO, Q or K rows.
//
// The relative bias is read from the tables per element of the block pairs that run: the time
// bucket of a pair is the number of time_bounds <= |dt| (a binary search, the same for every
// head, so computed once per block pair), the position index min(|i - j|, P - 1).
//
// The backward runs one row per task: the row's dQ, dK, dV and its partial table sums are
// written by that task alone, in a fixed order, so the result does not depend on the threads.
#pragma once

#include <stdint.h>

#include "sequence_attention_kernels.h"
#include "vec_common.h"

namespace attnkern {
namespace cpu {
namespace {

// C[M, N] (+)= A[M, K] B[K, N]: A read through strides (sam, sak), B and C row-major (ldb, ldc).
// MR rows by NV vectors of C stay in registers over the whole K loop; the last vector holds
// nlast valid lanes.
template <class V, int MR, int NV>
inline void gemm_micro(int64_t K, const typename V::A* a, int64_t sam, int64_t sak,
                       const typename V::A* b, int64_t ldb, typename V::A* c, int64_t ldc, int nlast,
                       bool accumulate) {
  constexpr int W = V::W;
  V r[MR][NV];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      if (!accumulate)
        r[i][j] = V::zero();
      else if (j == NV - 1 && nlast < W)
        r[i][j] = V::load_partial(c + i * ldc + j * W, nlast);
      else
        r[i][j] = V::load(c + i * ldc + j * W);
    }
  for (int64_t k = 0; k < K; ++k) {
    V bv[NV];
    const typename V::A* bk = b + k * ldb;
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      bv[j] = (j == NV - 1 && nlast < W) ? V::load_partial(bk + j * W, nlast) : V::load(bk + j * W);
    const typename V::A* ak = a + k * sak;
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      const V ai = V::set1(ak[i * sam]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) r[i][j] = V::fma(ai, bv[j], r[i][j]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      if (j == NV - 1 && nlast < W)
        r[i][j].store_partial(c + i * ldc + j * W, nlast);
      else
        r[i][j].store(c + i * ldc + j * W);
    }
}

// Vectors of C per micro tile: 4 x 4 accumulators on AVX-512 (32 registers), 4 x 2 on AVX2
// (16 registers), 4 x 4 lanes on the one-lane type.
template <class V>
constexpr int seq_nv() {
  return V::W == 8 ? 2 : 4;
}

template <class V, int MR>
inline void gemm_rows(int64_t N, int64_t K, const typename V::A* a, int64_t sam, int64_t sak,
                      const typename V::A* b, int64_t ldb, typename V::A* c, int64_t ldc, bool acc) {
  constexpr int W = V::W, NV = seq_nv<V>();
  for (int64_t n0 = 0; n0 < N; n0 += NV * W) {
    const int64_t rest = N - n0 < NV * W ? N - n0 : NV * W;
    const int nv = int((rest + W - 1) / W);
    const int nlast = int(rest - (nv - 1) * W);
    switch (nv) {
      case 1: gemm_micro<V, MR, 1>(K, a, sam, sak, b + n0, ldb, c + n0, ldc, nlast, acc); break;
      case 2: gemm_micro<V, MR, 2>(K, a, sam, sak, b + n0, ldb, c + n0, ldc, nlast, acc); break;
      case 3:
        if constexpr (NV >= 3) gemm_micro<V, MR, 3>(K, a, sam, sak, b + n0, ldb, c + n0, ldc, nlast, acc);
        break;
      default:
        if constexpr (NV >= 4) gemm_micro<V, MR, 4>(K, a, sam, sak, b + n0, ldb, c + n0, ldc, nlast, acc);
        break;
    }
  }
}

template <class V>
inline void gemm_acc(int64_t M, int64_t N, int64_t K, const typename V::A* a, int64_t sam, int64_t sak,
                     const typename V::A* b, int64_t ldb, typename V::A* c, int64_t ldc, bool acc) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) gemm_rows<V, 4>(N, K, a + m * sam, sam, sak, b, ldb, c + m * ldc, ldc, acc);
  const typename V::A* am = a + m * sam;
  typename V::A* cm = c + m * ldc;
  switch (M - m) {
    case 3: gemm_rows<V, 3>(N, K, am, sam, sak, b, ldb, cm, ldc, acc); break;
    case 2: gemm_rows<V, 2>(N, K, am, sam, sak, b, ldb, cm, ldc, acc); break;
    case 1: gemm_rows<V, 1>(N, K, am, sam, sak, b, ldb, cm, ldc, acc); break;
    default: break;
  }
}

// dst[d * kSeqBK + j] = rows[j * ld + d] for j < n, 0 for n <= j < kSeqBK.
template <class A>
inline void transpose_block(const A* rows, int64_t ld, int64_t n, int64_t D, A* dst) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < D; ++d) dst[d * kSeqBK + j] = rows[j * ld + d];
  for (int64_t d = 0; d < D; ++d)
    for (int64_t j = n; j < kSeqBK; ++j) dst[d * kSeqBK + j] = A(0);
}

// The mask of one row (attnkern/reference.py's section comment): ids, the key intervals of a
// query and the per-pair rule.
struct RowMask {
  int64_t n, off, idmax, c, m;
  bool causal, targets;

  RowMask(const SeqParams& p, int64_t b) {
    n = p.lengths[b];
    c = p.contextual_len;
    m = p.max_attn_len;
    off = c > 0 ? c - 1 : 0;
    const int64_t nt = p.num_targets ? p.num_targets[b] : 0;
    idmax = n - nt - off;
    causal = p.causal;
    targets = nt > 0;
  }
  int64_t id(int64_t pos) const {
    const int64_t x = pos - off > 0 ? pos - off : 0;
    return x < idmax ? x : idmax;
  }
  // The first position whose id is >= x (n if none).
  int64_t first(int64_t x) const {
    if (n == 0 || x > id(n - 1)) return n;
    if (x <= id(0)) return 0;
    return x + off;
  }
  bool valid(int64_t i, int64_t j) const {
    if (i == j) return true;
    const int64_t di = id(i), dj = id(j), d = di - dj;
    if ((causal ? d > 0 : d != 0) && (m == 0 || (d < 0 ? -d : d) <= m)) return true;
    return c > 0 && di == 0 && dj < idmax;
  }
  // Query i's keys lie in [iv[0], iv[1]) u {i} u [iv[2], iv[3]).
  void intervals(int64_t i, int64_t* iv) const {
    const int64_t di = id(i);
    if (causal) {
      iv[0] = m > 0 ? first(di - m) : 0;
      iv[1] = first(di);
    } else {
      iv[0] = m > 0 ? first(di - m) : 0;
      iv[1] = m > 0 ? first(di + m + 1) : n;
    }
    if (c > 0 && di == 0) {
      iv[2] = 0;
      iv[3] = first(idmax);
    } else {
      iv[2] = iv[3] = 0;
    }
  }
  // Whether the pairs of a block have equal ids besides i == j (the non-causal rule excludes them).
  bool shared_ids() const { return c > 1 || targets; }
};

enum BlockState { kEmpty = 0, kFull = 1, kPartial = 2 };

inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// The state of queries [i0, i0 + nq) against keys [j0, j0 + nk), from the queries' intervals.
inline BlockState block_state(const RowMask& rm, const int64_t* iv, int64_t i0, int64_t nq, int64_t j0,
                              int64_t nk) {
  const int64_t j1 = j0 + nk;
  bool any = false, all = true;
  for (int64_t r = 0; r < nq; ++r) {
    const int64_t* w = iv + 4 * r;
    const int64_t i = i0 + r;
    const bool hit1 = imax(w[0], j0) < imin(w[1], j1), hit3 = imax(w[2], j0) < imin(w[3], j1);
    const bool self = i >= j0 && i < j1;
    any = any || hit1 || hit3 || self;
    const bool cover1 = w[0] <= j0 && j1 <= w[1] && (rm.causal || !rm.shared_ids());
    const bool cover3 = w[2] <= j0 && j1 <= w[3];
    all = all && (cover1 || cover3);
  }
  return !any ? kEmpty : (all ? kFull : kPartial);
}

inline int64_t time_bucket(const SeqParams& p, int64_t dt) {
  const uint64_t a = dt < 0 ? uint64_t(0) - uint64_t(dt) : uint64_t(dt);
  int64_t lo = 0, hi = p.NB - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (uint64_t(p.time_bounds[mid]) <= a)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// Per block pair: the flags valid[r * BK + c] (partial blocks) and the time buckets.
struct BlockInfo {
  BlockState state;
  uint8_t* valid;
  int32_t* bucket;
};

inline void fill_block(const SeqParams& p, const RowMask& rm, int64_t s0, int64_t i0, int64_t nq, int64_t j0,
                       int64_t nk, BlockInfo& bi) {
  if (bi.state == kPartial)
    for (int64_t r = 0; r < nq; ++r)
      for (int64_t c = 0; c < nk; ++c) bi.valid[r * kSeqBK + c] = rm.valid(i0 + r, j0 + c);
  if (p.time_table)
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t qt = p.query_times[s0 + i0 + r];
      for (int64_t c = 0; c < nk; ++c) bi.bucket[r * kSeqBK + c] = int32_t(time_bucket(p, qt - p.key_times[s0 + j0 + c]));
    }
}

// S (nq x kSeqBK, the raw products) -> the logits of head h: scaled, biased, -inf where the
// pair is not attended (and past the block's nk keys).
template <class V>
inline void block_logits(const SeqParams& p, const BlockInfo& bi, int64_t b, int64_t h, int64_t i0, int64_t nq,
                         int64_t j0, int64_t nk, typename V::A* S) {
  using A = typename V::A;
  const A ninf = -__builtin_inf();
  const A scale = A(p.scale);
  const int64_t hb = p.Hb == p.H ? h : 0;
  const A* tt = static_cast<const A*>(p.time_table);
  const A* pt = static_cast<const A*>(p.position_table);
  const A* bias = p.bias ? static_cast<const A*>(p.bias) + ((b * p.Hb + hb) * p.L + i0) * p.L + j0 : nullptr;
  const bool plain = !tt && !pt && !bias;
  for (int64_t r = 0; r < nq; ++r) {
    A* s = S + r * kSeqBK;
    if (plain && bi.state == kFull) {
      const V sc = V::set1(scale);
      for (int64_t c = 0; c < kSeqBK; c += V::W) (V::load(s + c) * sc).store(s + c);
    } else {
      const int64_t i = i0 + r;
      for (int64_t c = 0; c < nk; ++c) {
        if (bi.state == kPartial && !bi.valid[r * kSeqBK + c]) {
          s[c] = ninf;
          continue;
        }
        A x = s[c] * scale;
        if (pt) {
          int64_t d = i - (j0 + c);
          d = d < 0 ? -d : d;
          x += pt[(d < p.P - 1 ? d : p.P - 1) * p.Hb + hb];
        }
        if (tt) x += tt[int64_t(bi.bucket[r * kSeqBK + c]) * p.Hb + hb];
        if (bias) x += bias[r * p.L + c];
        s[c] = x;
      }
    }
    for (int64_t c = nk; c < kSeqBK; ++c) s[c] = ninf;
  }
}

template <class V>
inline V seq_exp(V x) {
  // e^x = 2^(x log2 e)
  return exp2_accurate(x * V::set1(typename V::A(1.4426950408889634)));
}

template <class V>
inline V seq_sigmoid(V x) {
  return V::set1(typename V::A(1)) / (V::set1(typename V::A(1)) + exp_clamped(V::zero() - x));
}

template <class A>
inline A attn_scale_of(const SeqParams& p, int64_t t) {
  return p.attn_scale ? static_cast<const A*>(p.attn_scale)[t] : A(p.attn_scale_value);
}

// The workspace of one thread, carved from ws (elements of A).
template <class A>
struct SeqWork {
  A *KT, *VT, *S, *dP, *m, *l;
  int32_t* bucket;
  uint8_t* valid;
  int64_t* iv;
  SeqWork(const SeqParams& p, void* ws) {
    A* w = static_cast<A*>(ws);
    const int64_t D = p.Dk > p.Dv ? p.Dk : p.Dv;
    KT = w;
    VT = KT + D * kSeqBK;
    S = VT + D * kSeqBK;
    dP = S + kSeqBQ * kSeqBK;
    bucket = reinterpret_cast<int32_t*>(dP + kSeqBQ * kSeqBK);
    valid = reinterpret_cast<uint8_t*>(dP + 2 * kSeqBQ * kSeqBK);
    m = dP + 3 * kSeqBQ * kSeqBK;
    l = m + p.H * kSeqBQ;
    // 8-byte aligned: every offset above is a multiple of 8 elements
    iv = reinterpret_cast<int64_t*>(l + p.H * kSeqBQ + 8);
    iv = reinterpret_cast<int64_t*>((reinterpret_cast<uintptr_t>(iv) + 7) & ~uintptr_t(7));
  }
};

template <class V>
void seq_fwd_entry(const SeqParams& p, const int64_t* rows, const int64_t* q0s, int64_t begin, int64_t end,
                   void* ws) {
  using A = typename V::A;
  constexpr int W = V::W;
  const A ninf = -__builtin_inf();
  SeqWork<A> w(p, ws);
  const A* q = static_cast<const A*>(p.q);
  const A* k = static_cast<const A*>(p.k);
  const A* v = static_cast<const A*>(p.v);
  A* out = static_cast<A*>(p.out);
  A* lse = static_cast<A*>(p.lse);
  const int64_t G = p.H / p.Hkv;
  const int64_t qs = p.H * p.Dk, ks = p.Hkv * p.Dk, vs = p.Hkv * p.Dv, os = p.H * p.Dv;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = rows[t], i0 = q0s[t], s0 = p.starts[b];
    const RowMask rm(p, b);
    const int64_t nq = imin(kSeqBQ, rm.n - i0);
    if (nq <= 0) continue;
    for (int64_t r = 0; r < nq; ++r) rm.intervals(i0 + r, w.iv + 4 * r);
    for (int64_t x = 0; x < p.H * kSeqBQ; ++x) {
      w.m[x] = ninf;
      w.l[x] = A(0);
    }
    for (int64_t j0 = 0; j0 < rm.n; j0 += kSeqBK) {
      const int64_t nk = imin(kSeqBK, rm.n - j0);
      BlockInfo bi{block_state(rm, w.iv, i0, nq, j0, nk), w.valid, w.bucket};
      if (bi.state == kEmpty) continue;
      fill_block(p, rm, s0, i0, nq, j0, nk, bi);
      for (int64_t h = 0; h < p.H; ++h) {
        const int64_t g = h / G;
        transpose_block(k + (s0 + j0) * ks + g * p.Dk, ks, nk, p.Dk, w.KT);
        gemm_acc<V>(nq, kSeqBK, p.Dk, q + (s0 + i0) * qs + h * p.Dk, qs, 1, w.KT, kSeqBK, w.S, kSeqBK, false);
        block_logits<V>(p, bi, b, h, i0, nq, j0, nk, w.S);
        A* orow0 = out + (s0 + i0) * os + h * p.Dv;
        for (int64_t r = 0; r < nq; ++r) {
          A* s = w.S + r * kSeqBK;
          if (p.silu) {
            const V a = V::set1(attn_scale_of<A>(p, s0 + i0 + r));
            for (int64_t c = 0; c < kSeqBK; c += W) {
              const V x = V::load(s + c);
              const V y = V::select(V::gt(x, V::set1(ninf)), x * seq_sigmoid(x) * a, V::zero());
              y.store(s + c);
            }
            continue;
          }
          V mx = V::set1(ninf);
          for (int64_t c = 0; c < kSeqBK; c += W) mx = V::max(mx, V::load(s + c));
          A* mrow = w.m + h * kSeqBQ + r;
          A* lrow = w.l + h * kSeqBQ + r;
          const A mnew = *mrow > mx.reduce_max() ? *mrow : mx.reduce_max();
          if (mnew == ninf) {
            for (int64_t c = 0; c < kSeqBK; c += W) V::zero().store(s + c);
            continue;
          }
          const V mv = V::set1(mnew);
          V sum = V::zero();
          for (int64_t c = 0; c < kSeqBK; c += W) {
            const V e = seq_exp(V::load(s + c) - mv);
            e.store(s + c);
            sum = sum + e;
          }
          const A alpha = *mrow == ninf ? A(0) : seq_exp(V::set1(*mrow - mnew)).reduce_max();
          if (alpha != A(1)) {
            A* o = orow0 + r * os;
            for (int64_t d = 0; d < p.Dv; ++d) o[d] *= alpha;
          }
          *lrow = *lrow * alpha + sum.reduce_add();
          *mrow = mnew;
        }
        gemm_acc<V>(nq, p.Dv, nk, w.S, kSeqBK, 1, v + (s0 + j0) * vs + g * p.Dv, vs, orow0, os, true);
      }
    }
    for (int64_t h = 0; h < p.H; ++h)
      for (int64_t r = 0; r < nq; ++r) {
        const int64_t tok = s0 + i0 + r;
        if (p.silu) {
          lse[tok * p.H + h] = A(0);
          continue;
        }
        const A l = w.l[h * kSeqBQ + r], m = w.m[h * kSeqBQ + r];
        A* o = out + tok * os + h * p.Dv;
        if (l > A(0)) {
          const A inv = A(1) / l;
          for (int64_t d = 0; d < p.Dv; ++d) o[d] *= inv;
          lse[tok * p.H + h] = m + A(__builtin_log(double(l)));
        } else {
          for (int64_t d = 0; d < p.Dv; ++d) o[d] = A(0);
          lse[tok * p.H + h] = ninf;
        }
      }
  }
}

template <class V>
void seq_bwd_entry(const SeqParams& p, int64_t begin, int64_t end, void* ws) {
  using A = typename V::A;
  constexpr int W = V::W;
  const A ninf = -__builtin_inf();
  SeqWork<A> w(p, ws);
  const A* q = static_cast<const A*>(p.q);
  const A* k = static_cast<const A*>(p.k);
  const A* v = static_cast<const A*>(p.v);
  const A* go = static_cast<const A*>(p.grad_out);
  const A* lse = static_cast<const A*>(p.lse);
  const A* delta = static_cast<const A*>(p.delta);
  A* dq = static_cast<A*>(p.grad_q);
  A* dk = static_cast<A*>(p.grad_k);
  A* dv = static_cast<A*>(p.grad_v);
  const int64_t G = p.H / p.Hkv;
  const int64_t qs = p.H * p.Dk, ks = p.Hkv * p.Dk, vs = p.Hkv * p.Dv, os = p.H * p.Dv;
  const A scale = A(p.scale);
  for (int64_t b = begin; b < end; ++b) {
    const RowMask rm(p, b);
    const int64_t s0 = p.starts[b];
    A* gt = p.grad_time ? static_cast<A*>(p.grad_time) + b * p.NB * p.Hb : nullptr;
    A* gp = p.grad_position ? static_cast<A*>(p.grad_position) + b * p.P * p.Hb : nullptr;
    for (int64_t i0 = 0; i0 < rm.n; i0 += kSeqBQ) {
      const int64_t nq = imin(kSeqBQ, rm.n - i0);
      for (int64_t r = 0; r < nq; ++r) rm.intervals(i0 + r, w.iv + 4 * r);
      for (int64_t j0 = 0; j0 < rm.n; j0 += kSeqBK) {
        const int64_t nk = imin(kSeqBK, rm.n - j0);
        BlockInfo bi{block_state(rm, w.iv, i0, nq, j0, nk), w.valid, w.bucket};
        if (bi.state == kEmpty) continue;
        fill_block(p, rm, s0, i0, nq, j0, nk, bi);
        for (int64_t h = 0; h < p.H; ++h) {
          const int64_t g = h / G, hb = p.Hb == p.H ? h : 0;
          transpose_block(k + (s0 + j0) * ks + g * p.Dk, ks, nk, p.Dk, w.KT);
          transpose_block(v + (s0 + j0) * vs + g * p.Dv, vs, nk, p.Dv, w.VT);
          const A* qrow = q + (s0 + i0) * qs + h * p.Dk;
          const A* gorow = go + (s0 + i0) * os + h * p.Dv;
          gemm_acc<V>(nq, kSeqBK, p.Dk, qrow, qs, 1, w.KT, kSeqBK, w.S, kSeqBK, false);
          block_logits<V>(p, bi, b, h, i0, nq, j0, nk, w.S);
          gemm_acc<V>(nq, kSeqBK, p.Dv, gorow, os, 1, w.VT, kSeqBK, w.dP, kSeqBK, false);
          // S -> P (the attention weights), dP -> dS (the logits' gradient)
          for (int64_t r = 0; r < nq; ++r) {
            const int64_t tok = s0 + i0 + r;
            A* s = w.S + r * kSeqBK;
            A* ds = w.dP + r * kSeqBK;
            if (p.silu) {
              const V a = V::set1(attn_scale_of<A>(p, tok));
              for (int64_t c = 0; c < kSeqBK; c += W) {
                const V x = V::load(s + c);
                const auto keep = V::gt(x, V::set1(ninf));
                const V sg = seq_sigmoid(x);
                const V one = V::set1(A(1));
                const V dsilu = sg * (one + x * (one - sg));
                V::select(keep, x * sg * a, V::zero()).store(s + c);
                V::select(keep, V::load(ds + c) * a * dsilu, V::zero()).store(ds + c);
              }
            } else {
              const A l = lse[tok * p.H + h];
              if (l == ninf) {
                for (int64_t c = 0; c < kSeqBK; c += W) {
                  V::zero().store(s + c);
                  V::zero().store(ds + c);
                }
                continue;
              }
              const V lv = V::set1(l), dl = V::set1(delta[tok * p.H + h]);
              for (int64_t c = 0; c < kSeqBK; c += W) {
                const V pr = seq_exp(V::load(s + c) - lv);
                pr.store(s + c);
                (pr * (V::load(ds + c) - dl)).store(ds + c);
              }
            }
          }
          // the tables' and the dense bias's gradients: dS summed by the index each pair read
          if (gt || gp || p.grad_bias) {
            A* gb = p.grad_bias ? static_cast<A*>(p.grad_bias) + ((b * p.Hb + hb) * p.L + i0) * p.L + j0 : nullptr;
            for (int64_t r = 0; r < nq; ++r) {
              const A* ds = w.dP + r * kSeqBK;
              for (int64_t c = 0; c < nk; ++c) {
                if (bi.state == kPartial && !bi.valid[r * kSeqBK + c]) continue;
                const A x = ds[c];
                if (gp) {
                  int64_t d = (i0 + r) - (j0 + c);
                  d = d < 0 ? -d : d;
                  gp[(d < p.P - 1 ? d : p.P - 1) * p.Hb + hb] += x;
                }
                if (gt) gt[int64_t(bi.bucket[r * kSeqBK + c]) * p.Hb + hb] += x;
                if (gb) gb[r * p.L + c] += x;
              }
            }
          }
          for (int64_t r = 0; r < nq; ++r) {
            A* ds = w.dP + r * kSeqBK;
            for (int64_t c = 0; c < kSeqBK; c += W) (V::load(ds + c) * V::set1(scale)).store(ds + c);
          }
          // dV += P^T dO, dK += dS^T Q, dQ += dS K
          gemm_acc<V>(nk, p.Dv, nq, w.S, 1, kSeqBK, gorow, os, dv + (s0 + j0) * vs + g * p.Dv, vs, true);
          gemm_acc<V>(nk, p.Dk, nq, w.dP, 1, kSeqBK, qrow, qs, dk + (s0 + j0) * ks + g * p.Dk, ks, true);
          gemm_acc<V>(nq, p.Dk, nk, w.dP, kSeqBK, 1, k + (s0 + j0) * ks + g * p.Dk, ks,
                      dq + (s0 + i0) * qs + h * p.Dk, qs, true);
        }
      }
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace attnkern
