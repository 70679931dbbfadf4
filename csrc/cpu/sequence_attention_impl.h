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
// The relative bias is formed per block pair as one tile (once for all heads when the tables
// have one column, else per head) and added to the scores with vector loads: the time bucket of
// a pair is the number of time_bounds <= |dt| (the same for every head, so found once per block
// pair), and the position term depends only on i - j, so it is read from the block's
// kSeqBQ + kSeqBK - 1 diagonals: row r of the tile is a contiguous slice of that vector. The
// backward sums dS back the same ways: along the diagonals (vector adds, then one table add per
// diagonal) and by runs of equal time buckets along each row.
//
// The backward runs one task per (row, group of query heads sharing a K/V head): the task's dQ,
// dK, dV columns and its partial table sums are written by that task alone, in a fixed order,
// so the result does not depend on the threads; the launcher adds the partial sums in task
// order.
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

// bucket(dt) of a gap |dt| = a: the number of time_bounds <= a, between the buckets of a's
// cell and of the next one (one compare for the log buckets, a short binary search where a
// cell spans several buckets).
inline int32_t time_bucket(const SeqParams& p, uint64_t a) {
  const int64_t cell = seq_time_cell(a);
  int32_t lo = p.time_cells[cell], hi = p.time_cells[cell + 1];
  if (hi - lo <= 1) return lo + int32_t(p.time_ubounds[lo] <= a);
  while (lo < hi) {
    const int32_t mid = (lo + hi) >> 1;
    if (p.time_ubounds[mid] <= a)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// |qt - kt| with the int64 difference wrapping as in the reference.
inline uint64_t time_gap(int64_t qt, int64_t kt) {
  const uint64_t d = uint64_t(qt) - uint64_t(kt);
  return int64_t(d) < 0 ? uint64_t(0) - d : d;
}

// Whether qt - kt is exact in int64 (no wraparound).
inline bool gap_fits(int64_t qt, int64_t kt) {
  const __int128 d = __int128(qt) - __int128(kt);
  return d > -(__int128(1) << 63) && d < (__int128(1) << 63);
}

// The time buckets of one query against a block's keys, as runs of keys sharing a bucket:
// runs[2 x] = the run's end (exclusive; the last ends at nk), runs[2 x + 1] = its bucket. The
// bias and its gradient then cost a few vector operations per run, not one gather per pair.
// Keys sorted by time with gaps fitting int64: |qt - kt| does not increase up to the last key
// at or before qt and increases after it, so each run ends where a binary search over the
// keys' times says; otherwise the keys are walked one by one.
inline void bucket_runs(const SeqParams& p, const int64_t* kt, int64_t nk, int64_t qt, bool sorted, int32_t* runs) {
  using I = __int128;
  int64_t c = 0, x = 0;
  if (!sorted) {
    int32_t cur = time_bucket(p, time_gap(qt, kt[0]));
    for (c = 1; c < nk; ++c) {
      const int32_t b = time_bucket(p, time_gap(qt, kt[c]));
      if (b != cur) {
        runs[2 * x] = int32_t(c);
        runs[2 * x + 1] = cur;
        ++x;
        cur = b;
      }
    }
    runs[2 * x] = int32_t(nk);
    runs[2 * x + 1] = cur;
    return;
  }
  while (c < nk) {
    const int64_t dt = qt - kt[c];
    const int32_t b = time_bucket(p, time_gap(qt, kt[c]));
    // the run: keys with kt <= lim (before qt: |dt| stays >= the bucket's lower bound) or
    // kt < lim (after qt: |dt| stays below its upper bound)
    const bool before = dt >= 0;
    I lim;
    if (before)
      lim = I(qt) - (b > 0 ? I(p.time_bounds[b - 1]) : I(0));
    else
      lim = b < p.NB - 1 ? I(qt) + I(p.time_bounds[b]) : (I(1) << 64);
    int64_t lo = c + 1, hi = nk;
    while (lo < hi) {
      const int64_t mid = (lo + hi) >> 1;
      if (before ? I(kt[mid]) <= lim : I(kt[mid]) < lim)
        lo = mid + 1;
      else
        hi = mid;
    }
    runs[2 * x] = int32_t(lo);
    runs[2 * x + 1] = b;
    ++x;
    c = lo;
  }
}

// Per block pair: the flags valid[r * BK + c] (1 or 0, partial blocks only) and each row's
// time-bucket runs at runs + r * 2 * kSeqBK.
template <class A>
struct BlockInfo {
  BlockState state;
  A* valid;
  int32_t* runs;
};

template <class A>
inline void fill_block(const SeqParams& p, const RowMask& rm, int64_t s0, int64_t i0, int64_t nq, int64_t j0,
                       int64_t nk, BlockInfo<A>& bi) {
  if (bi.state == kPartial)
    for (int64_t r = 0; r < nq; ++r)
      for (int64_t c = 0; c < nk; ++c) bi.valid[r * kSeqBK + c] = rm.valid(i0 + r, j0 + c) ? A(1) : A(0);
  if (!p.time_table || nk <= 0) return;
  const int64_t* kt = p.key_times + s0 + j0;
  bool sorted = true;
  for (int64_t c = 1; c < nk; ++c) sorted = sorted && kt[c - 1] <= kt[c];
  for (int64_t r = 0; r < nq; ++r) {
    const int64_t qt = p.query_times[s0 + i0 + r];
    const bool fits = gap_fits(qt, kt[0]) && gap_fits(qt, kt[nk - 1]);
    bucket_runs(p, kt, nk, qt, sorted && fits, bi.runs + r * 2 * kSeqBK);
  }
}

// The lanes of vector c0 / W.. inside [c0, c1) (idx: 0, 1, .., kSeqBK - 1 as A) of v, 0 elsewhere.
template <class V>
inline V in_run(const typename V::A* idx, int64_t c, int64_t c0, int64_t c1, V v) {
  using A = typename V::A;
  const V i = V::load(idx + c);
  return V::select(V::ge(i, V::set1(A(c0))), V::select(V::lt(i, V::set1(A(c1))), v, V::zero()), V::zero());
}

inline int64_t table_head(const SeqParams& p, int64_t h) { return p.Hb == p.H ? h : 0; }

inline bool has_tables(const SeqParams& p) { return p.time_table || p.position_table; }

// The tables' bias of head column hb for a block pair: BT[r * kSeqBK + c] for r < nq (columns
// past nk hold finite filler, masked later); diag holds the kSeqBQ + kSeqBK - 1 position terms,
// diag[c - r + kSeqBQ - 1] that of pair (r, c).
template <class V>
inline void bias_tile(const SeqParams& p, const BlockInfo<typename V::A>& bi, int64_t hb, int64_t i0, int64_t nq,
                      int64_t j0, int64_t nk, const typename V::A* idx, typename V::A* diag, typename V::A* BT) {
  using A = typename V::A;
  const A* tt = static_cast<const A*>(p.time_table);
  const A* pt = static_cast<const A*>(p.position_table);
  if (pt)
    for (int64_t x = 0; x < kSeqBQ + kSeqBK - 1; ++x) {
      int64_t d = (i0 - j0) + (kSeqBQ - 1) - x;
      d = d < 0 ? -d : d;
      diag[x] = pt[(d < p.P - 1 ? d : p.P - 1) * p.Hb + hb];
    }
  for (int64_t r = 0; r < nq; ++r) {
    A* row = BT + r * kSeqBK;
    if (pt) {
      const A* dr = diag + (kSeqBQ - 1 - r);
      for (int64_t c = 0; c < kSeqBK; c += V::W) V::load(dr + c).store(row + c);
    } else {
      for (int64_t c = 0; c < kSeqBK; c += V::W) V::zero().store(row + c);
    }
    if (tt) {
      const int32_t* runs = bi.runs + r * 2 * kSeqBK;
      for (int64_t c0 = 0, x = 0; c0 < nk; c0 = runs[2 * x], ++x) {
        const int64_t c1 = runs[2 * x];
        const V t = V::set1(tt[int64_t(runs[2 * x + 1]) * p.Hb + hb]);
        for (int64_t c = c0 - c0 % V::W; c < c1; c += V::W) {
          const bool whole = c >= c0 && c + V::W <= c1;
          (V::load(row + c) + (whole ? t : in_run<V>(idx, c, c0, c1, t))).store(row + c);
        }
      }
    }
  }
}

// S (nq x kSeqBK, the raw products) -> the logits of head h: scaled, biased (BT: the tables'
// tile or null), -inf where the pair is not attended (and past the block's nk keys).
template <class V>
inline void block_logits(const SeqParams& p, const BlockInfo<typename V::A>& bi, const typename V::A* BT, int64_t b,
                         int64_t h, int64_t i0, int64_t nq, int64_t j0, int64_t nk, typename V::A* S) {
  using A = typename V::A;
  constexpr int W = V::W;
  const A ninf = -__builtin_inf();
  const V sc = V::set1(A(p.scale)), vninf = V::set1(ninf), half = V::set1(A(0.5));
  const int64_t hb = table_head(p, h);
  const A* bias = p.bias ? static_cast<const A*>(p.bias) + ((b * p.Hb + hb) * p.L + i0) * p.L + j0 : nullptr;
  for (int64_t r = 0; r < nq; ++r) {
    A* s = S + r * kSeqBK;
    const A* bt = BT ? BT + r * kSeqBK : nullptr;
    const A* vf = bi.valid + r * kSeqBK;
    for (int64_t c = 0; c < kSeqBK; c += W) {
      V x = V::load(s + c) * sc;
      if (bt) x = x + V::load(bt + c);
      x.store(s + c);
    }
    // the dense bias: a row of the [L, L] slice, read only below nk
    if (bias)
      for (int64_t c = 0; c < nk; ++c) s[c] += bias[r * p.L + c];
    if (bi.state == kPartial)
      for (int64_t c = 0; c < kSeqBK; c += W)
        V::select(V::gt(V::load(vf + c), half), V::load(s + c), vninf).store(s + c);
    for (int64_t c = nk; c < kSeqBK; ++c) s[c] = ninf;
  }
}

// The tables' gradients of one block pair: dS (nq x kSeqBK, zero where not attended and past
// nk) summed into gt / gp (this task's partial sums) at head column hb.
template <class V>
inline void scatter_tables(const SeqParams& p, const BlockInfo<typename V::A>& bi, const typename V::A* dS,
                           int64_t hb, int64_t i0, int64_t nq, int64_t j0, int64_t nk, const typename V::A* idx,
                           typename V::A* diag, typename V::A* gt, typename V::A* gp) {
  using A = typename V::A;
  constexpr int W = V::W;
  if (gp) {
    // Consecutive rows add into different copies of the diagonals: row r + 1's loads, one
    // element off row r's stores, would otherwise wait for those stores (no store forwarding).
    constexpr int64_t DL = kSeqBQ + kSeqBK;
    for (int64_t x = 0; x < kSeqDiagCopies * DL; x += W) V::zero().store(diag + x);
    for (int64_t r = 0; r < nq; ++r) {
      A* dr = diag + (r % kSeqDiagCopies) * DL + (kSeqBQ - 1 - r);
      for (int64_t c = 0; c < kSeqBK; c += W) (V::load(dr + c) + V::load(dS + r * kSeqBK + c)).store(dr + c);
    }
    for (int64_t x = 0; x < DL; x += W) {
      V sum = V::load(diag + x);
      for (int64_t k = 1; k < kSeqDiagCopies; ++k) sum = sum + V::load(diag + k * DL + x);
      sum.store(diag + x);
    }
    for (int64_t x = 0; x < DL - 1; ++x) {
      int64_t d = (i0 - j0) + (kSeqBQ - 1) - x;
      d = d < 0 ? -d : d;
      gp[(d < p.P - 1 ? d : p.P - 1) * p.Hb + hb] += diag[x];
    }
  }
  if (gt)
    for (int64_t r = 0; r < nq; ++r) {
      // one table add per run of keys sharing a bucket
      const int32_t* runs = bi.runs + r * 2 * kSeqBK;
      const A* ds = dS + r * kSeqBK;
      for (int64_t c0 = 0, x = 0; c0 < nk; c0 = runs[2 * x], ++x) {
        const int64_t c1 = runs[2 * x];
        V sum = V::zero();
        for (int64_t c = c0 - c0 % W; c < c1; c += W) {
          const V v = V::load(ds + c);
          sum = sum + (c >= c0 && c + W <= c1 ? v : in_run<V>(idx, c, c0, c1, v));
        }
        gt[int64_t(runs[2 * x + 1]) * p.Hb + hb] += sum.reduce_add();
      }
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

// The workspace of one thread, carved from ws (elements of A), and the inputs with their token
// strides and query-head group size G.
template <class A>
struct SeqWork {
  A *KT, *VT, *S, *dP, *BT, *dsum, *diag, *valid, *m, *l, *idx;
  int32_t* runs;
  int64_t* iv;
  const A *q, *k, *v;
  int64_t G, qs, ks, vs, os;
  SeqWork(const SeqParams& p, void* ws)
      : q(static_cast<const A*>(p.q)),
        k(static_cast<const A*>(p.k)),
        v(static_cast<const A*>(p.v)),
        G(p.H / p.Hkv),
        qs(p.H * p.Dk),
        ks(p.Hkv * p.Dk),
        vs(p.Hkv * p.Dv),
        os(p.H * p.Dv) {
    constexpr int64_t tile = int64_t(kSeqBQ) * kSeqBK;
    A* w = static_cast<A*>(ws);
    const int64_t D = p.Dk > p.Dv ? p.Dk : p.Dv;
    KT = w;
    VT = KT + D * kSeqBK;
    S = VT + D * kSeqBK;
    dP = S + tile;
    BT = dP + tile;
    dsum = BT + tile;
    valid = dsum + tile;
    // two A-sized slots per pair for the runs (two int32 per run, at most kSeqBK runs a row)
    runs = reinterpret_cast<int32_t*>(valid + tile);
    diag = valid + 3 * tile;
    m = diag + kSeqDiagCopies * (kSeqBQ + kSeqBK);
    l = m + p.H * kSeqBQ;
    idx = l + p.H * kSeqBQ;
    for (int64_t c = 0; c < kSeqBK; ++c) idx[c] = A(c);
    iv = reinterpret_cast<int64_t*>(idx + kSeqBK + 8);
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
  const A *q = w.q, *k = w.k, *v = w.v;
  const int64_t G = w.G, qs = w.qs, ks = w.ks, vs = w.vs, os = w.os;
  A* out = static_cast<A*>(p.out);
  A* lse = static_cast<A*>(p.lse);
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
      BlockInfo<A> bi{block_state(rm, w.iv, i0, nq, j0, nk), w.valid, w.runs};
      if (bi.state == kEmpty) continue;
      fill_block(p, rm, s0, i0, nq, j0, nk, bi);
      const A* BT = has_tables(p) ? w.BT : nullptr;
      for (int64_t h = 0; h < p.H; ++h) {
        const int64_t g = h / G;
        if (BT && (h == 0 || p.Hb == p.H)) bias_tile<V>(p, bi, table_head(p, h), i0, nq, j0, nk, w.idx, w.diag, w.BT);
        transpose_block(k + (s0 + j0) * ks + g * p.Dk, ks, nk, p.Dk, w.KT);
        gemm_acc<V>(nq, kSeqBK, p.Dk, q + (s0 + i0) * qs + h * p.Dk, qs, 1, w.KT, kSeqBK, w.S, kSeqBK, false);
        block_logits<V>(p, bi, BT, b, h, i0, nq, j0, nk, w.S);
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
void seq_bwd_entry(const SeqParams& p, int64_t b, int64_t g0, int64_t g1, int64_t part, void* ws) {
  using A = typename V::A;
  constexpr int W = V::W;
  const A ninf = -__builtin_inf();
  SeqWork<A> w(p, ws);
  const A *q = w.q, *k = w.k, *v = w.v;
  const int64_t G = w.G, qs = w.qs, ks = w.ks, vs = w.vs, os = w.os;
  const A* go = static_cast<const A*>(p.grad_out);
  const A* lse = static_cast<const A*>(p.lse);
  const A* delta = static_cast<const A*>(p.delta);
  A* dq = static_cast<A*>(p.grad_q);
  A* dk = static_cast<A*>(p.grad_k);
  A* dv = static_cast<A*>(p.grad_v);
  const A scale = A(p.scale);
  const RowMask rm(p, b);
  const int64_t s0 = p.starts[b];
  A* gt = p.grad_time ? static_cast<A*>(p.grad_time) + part * p.NB * p.Hb : nullptr;
  A* gp = p.grad_position ? static_cast<A*>(p.grad_position) + part * p.P * p.Hb : nullptr;
  const bool tables = gt || gp;
  // one table column for every head: the heads' dS are summed first, scattered once
  const bool shared_column = p.Hb != p.H;
  const int64_t h0 = g0 * G, h1 = g1 * G;
  for (int64_t i0 = 0; i0 < rm.n; i0 += kSeqBQ) {
    const int64_t nq = imin(kSeqBQ, rm.n - i0);
    for (int64_t r = 0; r < nq; ++r) rm.intervals(i0 + r, w.iv + 4 * r);
    for (int64_t j0 = 0; j0 < rm.n; j0 += kSeqBK) {
      const int64_t nk = imin(kSeqBK, rm.n - j0);
      BlockInfo<A> bi{block_state(rm, w.iv, i0, nq, j0, nk), w.valid, w.runs};
      if (bi.state == kEmpty) continue;
      fill_block(p, rm, s0, i0, nq, j0, nk, bi);
      const A* BT = tables ? w.BT : nullptr;
      for (int64_t h = h0; h < h1; ++h) {
        const int64_t g = h / G, hb = table_head(p, h);
        if (BT && (h == h0 || !shared_column)) bias_tile<V>(p, bi, hb, i0, nq, j0, nk, w.idx, w.diag, w.BT);
        transpose_block(k + (s0 + j0) * ks + g * p.Dk, ks, nk, p.Dk, w.KT);
        transpose_block(v + (s0 + j0) * vs + g * p.Dv, vs, nk, p.Dv, w.VT);
        const A* qrow = q + (s0 + i0) * qs + h * p.Dk;
        const A* gorow = go + (s0 + i0) * os + h * p.Dv;
        gemm_acc<V>(nq, kSeqBK, p.Dk, qrow, qs, 1, w.KT, kSeqBK, w.S, kSeqBK, false);
        block_logits<V>(p, bi, BT, b, h, i0, nq, j0, nk, w.S);
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
              // exactly 0 where P is (not attended, past nk)
              V::select(V::gt(pr, V::zero()), pr * (V::load(ds + c) - dl), V::zero()).store(ds + c);
            }
          }
        }
        // The rows past nq hold stale values: the sums below read rows < nq only.
        if (p.grad_bias) {
          A* gb = static_cast<A*>(p.grad_bias) + ((b * p.Hb + hb) * p.L + i0) * p.L + j0;
          for (int64_t r = 0; r < nq; ++r)
            for (int64_t c = 0; c < nk; ++c) gb[r * p.L + c] += w.dP[r * kSeqBK + c];
        }
        if (tables) {
          if (!shared_column) {
            scatter_tables<V>(p, bi, w.dP, hb, i0, nq, j0, nk, w.idx, w.diag, gt, gp);
          } else if (h == h0) {
            for (int64_t x = 0; x < nq * kSeqBK; x += W) V::load(w.dP + x).store(w.dsum + x);
          } else {
            for (int64_t x = 0; x < nq * kSeqBK; x += W) (V::load(w.dsum + x) + V::load(w.dP + x)).store(w.dsum + x);
          }
        }
        const V sv = V::set1(scale);
        for (int64_t x = 0; x < nq * kSeqBK; x += W) (V::load(w.dP + x) * sv).store(w.dP + x);
        // dV += P^T dO, dK += dS^T Q, dQ += dS K
        gemm_acc<V>(nk, p.Dv, nq, w.S, 1, kSeqBK, gorow, os, dv + (s0 + j0) * vs + g * p.Dv, vs, true);
        gemm_acc<V>(nk, p.Dk, nq, w.dP, 1, kSeqBK, qrow, qs, dk + (s0 + j0) * ks + g * p.Dk, ks, true);
        gemm_acc<V>(nq, p.Dk, nk, w.dP, kSeqBK, 1, k + (s0 + j0) * ks + g * p.Dk, ks,
                    dq + (s0 + i0) * qs + h * p.Dk, qs, true);
      }
      if (tables && shared_column && h1 > h0) scatter_tables<V>(p, bi, w.dsum, 0, i0, nq, j0, nk, w.idx, w.diag, gt, gp);
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace attnkern
