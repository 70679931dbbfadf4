// Device helpers of the sequence-attention kernels (sequence_attention_fwd.cu, _bwd.cu): the work
// decode every kernel asks (which row and tile a CTA takes), the mask of a row, the relative
// bias of a pair, tile loads into shared memory and the scores / probabilities of a tile pair.
// Conversions and warp reductions come from attention_pool_common.cuh.
//
// Shared memory holds float32 tiles, so 16-bit inputs are converted once on load and every
// product and sum is accumulated in float32.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "attention_pool_common.cuh"
#include "sequence_attention_kernels.h"

namespace attnkern {
namespace cuda {
namespace seq {

using detail::from_float;
using detail::to_float;

static_assert(kSeqTile == 32, "the softmax gives one warp lane to each key column of a tile");
constexpr int kWarps = kSeqThreads / 32;
constexpr int kRowsPerWarp = kSeqTile / kWarps;
constexpr float kNegInf = -INFINITY;

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
__device__ __forceinline__ int64_t iabs(int64_t a) { return a < 0 ? -a : a; }

// ------------------------------------------------------------------ work decode
// CTA x takes tile `tile` (positions [pos0, pos0 + count)) of row b, tokens [start, start + n).
struct SeqWork {
  int64_t b, start, n, nt, pos0, count;
};

// False when x lies past the last tile of the batch (the grid is an upper bound).
__device__ __forceinline__ bool decode_tile(const SeqProblem& p, int64_t x, SeqWork& w) {
  const int64_t* cum = p.rows + 3 * p.B;
  int64_t lo = 0, hi = p.B;  // the first row whose running tile count exceeds x
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (cum[mid] > x) hi = mid;
    else lo = mid + 1;
  }
  if (lo >= p.B) return false;
  w.b = lo;
  w.start = p.rows[lo];
  w.n = p.rows[p.B + lo];
  w.nt = p.rows[2 * p.B + lo];
  const int64_t first_tile = cum[lo] - (w.n + kSeqTile - 1) / kSeqTile;
  w.pos0 = (x - first_tile) * kSeqTile;
  w.count = imin(kSeqTile, w.n - w.pos0);
  return w.count > 0;
}

// ------------------------------------------------------------------ mask
// The rules of attnkern/reference.py's mask section by position within a row: ids (the
// contextual prefix counts as one position, the targets sit right after the history), the key
// intervals of a query and the per-pair rule. The same statement as the CPU kernels' RowMask.
struct SeqMask {
  int64_t n, off, idmax, c, m;
  bool causal;

  __device__ __forceinline__ SeqMask(const SeqProblem& p, const SeqWork& w) {
    n = w.n;
    c = p.contextual_len;
    m = p.max_attn_len;
    off = c > 0 ? c - 1 : 0;
    idmax = n - w.nt - off;
    causal = p.causal;
  }
  __device__ __forceinline__ int64_t id(int64_t pos) const { return imin(imax(pos - off, 0), idmax); }
  // The first position whose id is >= x (n if none).
  __device__ __forceinline__ int64_t first(int64_t x) const {
    if (n == 0 || x > id(n - 1)) return n;
    if (x <= id(0)) return 0;
    return x + off;
  }
  __device__ __forceinline__ bool valid(int64_t i, int64_t j) const {
    if (i == j) return true;
    const int64_t di = id(i), dj = id(j), d = di - dj;
    if ((causal ? d > 0 : d != 0) && (m == 0 || iabs(d) <= m)) return true;
    return c > 0 && di == 0 && dj < idmax;
  }
  // Whether query i attends any key in [j0, j1): its keys lie in [a, b) u {i} u [e, f).
  __device__ __forceinline__ bool hits(int64_t i, int64_t j0, int64_t j1) const {
    const int64_t di = id(i);
    const int64_t a = m > 0 ? first(di - m) : 0;
    const int64_t b = causal ? first(di) : (m > 0 ? first(di + m + 1) : n);
    if (imax(a, j0) < imin(b, j1) || (i >= j0 && i < j1)) return true;
    return c > 0 && di == 0 && j0 < first(idmax);
  }
};

// Whether any query of [i0, i0 + nq) attends any key of [j0, j0 + nk): each of the first
// kSeqTile threads tests one query, every thread reads all flags. Every thread must call it.
__device__ __forceinline__ bool tile_pair_live(const SeqMask& mask, int64_t i0, int64_t nq, int64_t j0,
                                               int64_t nk, int* flags) {
  const int t = threadIdx.x;
  if (t < kSeqTile) flags[t] = (t < nq && mask.hits(i0 + t, j0, j0 + nk)) ? 1 : 0;
  __syncthreads();
  bool any = false;
  for (int r = 0; r < kSeqTile; ++r) any = any || flags[r] != 0;
  __syncthreads();  // the flags are rewritten by the next call
  return any;
}

// ------------------------------------------------------------------ tiles
// rows[r * D + d] = src[(token0 + r) * ld + d] for r < count, 0 for count <= r < kSeqTile.
template <typename T>
__device__ __forceinline__ void load_tile(const T* src, int64_t ld, int64_t token0, int64_t count, int64_t D,
                                          float* rows) {
  for (int64_t e = threadIdx.x; e < kSeqTile * D; e += kSeqThreads) {
    const int64_t r = e / D, d = e % D;
    rows[e] = r < count ? to_float<T>(src[(token0 + r) * ld + d]) : 0.f;
  }
}

// The key tiles of the row that the query tile [i0, i0 + nq) attends, K/V head g loaded into
// K and V: body(j0, nk) for each, in order, between barriers. Every thread must call it.
template <typename T, typename F>
__device__ __forceinline__ void for_each_key_tile(const SeqProblem& p, const SeqWork& w, const SeqMask& mask,
                                                  int64_t g, int64_t i0, int64_t nq, float* K, float* V,
                                                  int* flags, F&& body) {
  for (int64_t j0 = 0; j0 < w.n; j0 += kSeqTile) {
    const int64_t nk = imin(kSeqTile, w.n - j0);
    if (!tile_pair_live(mask, i0, nq, j0, nk, flags)) continue;
    load_tile(static_cast<const T*>(p.k) + g * p.Dk, p.Hkv * p.Dk, w.start + j0, nk, p.Dk, K);
    load_tile(static_cast<const T*>(p.v) + g * p.Dv, p.Hkv * p.Dv, w.start + j0, nk, p.Dv, V);
    __syncthreads();
    body(j0, nk);
    __syncthreads();  // before the next tile overwrites K, V and what body left in shared memory
  }
}

// ------------------------------------------------------------------ relative bias
// The number of time_bounds <= |dt| (a binary search over the NB - 1 bounds).
__device__ __forceinline__ int64_t time_bucket(const SeqProblem& p, int64_t dt) {
  const uint64_t a = dt < 0 ? uint64_t(0) - uint64_t(dt) : uint64_t(dt);
  int64_t lo = 0, hi = p.NB - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (uint64_t(p.time_bounds[mid]) <= a) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

__device__ __forceinline__ int64_t position_index(const SeqProblem& p, int64_t i, int64_t j) {
  return imin(iabs(i - j), p.P - 1);
}

__device__ __forceinline__ int64_t table_head(const SeqProblem& p, int64_t h) { return p.Hb == p.H ? h : 0; }

// ------------------------------------------------------------------ tile pairs
__device__ __forceinline__ float dot(const float* a, const float* b, int64_t D) {
  float s = 0.f;
  for (int64_t d = 0; d < D; ++d) s = fmaf(a[d], b[d], s);
  return s;
}

// The logit of pair (query r of the tile at i0, key c of the tile at j0) of head h, or -inf when
// the pair is not attended; *bucket its time bucket (-1 without a time table or when masked).
template <typename T>
__device__ __forceinline__ float pair_logit(const SeqProblem& p, const SeqWork& w, const SeqMask& mask, int64_t h,
                                            int64_t i0, int64_t nq, int64_t j0, int64_t nk, int r, int c,
                                            const float* Qs, const float* Ks, int* bucket) {
  *bucket = -1;
  const int64_t i = i0 + r, j = j0 + c;
  if (r >= nq || c >= nk || !mask.valid(i, j)) return kNegInf;
  float s = dot(Qs + r * p.Dk, Ks + c * p.Dk, p.Dk) * p.scale;
  const int64_t hb = table_head(p, h);
  if (p.position_table) s += p.position_table[position_index(p, i, j) * p.Hb + hb];
  if (p.time_table) {
    const int64_t bk = time_bucket(p, p.query_times[w.start + i] - p.key_times[w.start + j]);
    *bucket = int(bk);
    s += p.time_table[bk * p.Hb + hb];
  }
  if (p.bias) s += to_float<T>(static_cast<const T*>(p.bias)[((w.b * p.Hb + hb) * p.L + i) * p.L + j]);
  return s;
}

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// The per-query factors of a query tile: "softmax": lse and delta; "silu": attn_scale. Rows past
// nq get values that make every pair of theirs 0.
struct RowStats {
  float* lse;
  float* delta;
  float* ascale;
};

__device__ __forceinline__ void load_row_stats(const SeqProblem& p, const SeqWork& w, int64_t h, int64_t i0,
                                               int64_t nq, const float* lse, const float* delta,
                                               const RowStats& st) {
  for (int r = threadIdx.x; r < kSeqTile; r += kSeqThreads) {
    const int64_t tok = w.start + i0 + r;
    const bool in = r < nq;
    st.ascale[r] = in && p.silu ? p.attn_scale[tok * p.attn_scale_stride] : 0.f;
    st.lse[r] = in && lse ? lse[tok * p.H + h] : kNegInf;
    st.delta[r] = in && delta ? delta[tok * p.H + h] : 0.f;
  }
}

// Backward of a tile pair: S = the attention weights P, dS = the logits' gradient (unscaled,
// what the tables and the dense bias receive), from Q, K, V and dO in shared memory;
// `buckets` (optional) the pairs' time buckets. Masked pairs give exactly 0.
template <typename T>
__device__ __forceinline__ void backward_pairs(const SeqProblem& p, const SeqWork& w, const SeqMask& mask,
                                               int64_t h, int64_t i0, int64_t nq, int64_t j0, int64_t nk,
                                               const float* Qs, const float* Ks, const float* Vs,
                                               const float* dOs, const RowStats& st, float* S, float* dS,
                                               int* buckets) {
  for (int e = threadIdx.x; e < kSeqTile * kSeqTile; e += kSeqThreads) {
    const int r = e / kSeqTile, c = e % kSeqTile;
    int bk;
    const float s = pair_logit<T>(p, w, mask, h, i0, nq, j0, nk, r, c, Qs, Ks, &bk);
    if (buckets) buckets[e] = bk;
    float pr = 0.f, ds = 0.f;
    if (s != kNegInf) {
      const float dp = dot(dOs + r * p.Dv, Vs + c * p.Dv, p.Dv);
      if (p.silu) {
        const float sg = sigmoid(s), a = st.ascale[r];
        pr = s * sg * a;
        ds = dp * a * sg * (1.f + s * (1.f - sg));
      } else if (st.lse[r] != kNegInf) {
        pr = expf(s - st.lse[r]);
        ds = pr * (dp - st.delta[r]);
      }
    }
    S[e] = pr;
    dS[e] = ds;
  }
}

}  // namespace seq
}  // namespace cuda
}  // namespace attnkern
