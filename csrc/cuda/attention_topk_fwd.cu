// Top-k by score: one block per (row, query head, block of kTopkQueries queries), the rule of
// attnkern.reference.attention_topk_ref (the best first; equal scores keep the lower position
// first; NaN above every number; a -inf score is never kept).
//
// The block walks its row's positions in tiles of kTopkTile (one position a thread): each thread
// scores its position for the block's queries (fp32 dot of the unscaled q and k, one rounded
// product with the scale, one rounded sum with the bias) into shared memory, dropping at once
// every score that cannot enter a full list (not better than its k-th). The survivors of a tile
// are sorted by rank (a survivor's rank = how many survivors beat it, or tie it from a lower
// position), then merged with the query's running list by rank again: a list entry moves down
// by the survivors that beat it, a survivor lands behind the list entries it does not beat
// (every list entry comes from an earlier tile, so it wins ties). Ranks are computed, never
// raced for: the result is deterministic, and no [.., L] score row is ever formed. The running
// lists (two buffers of k (score, position) pairs a query, swapped per merge) limit k to
// kTopkMaxK.
#include "attention_pool_common.cuh"
#include "attention_topk_kernels.h"

namespace attnkern {
namespace cuda {
namespace detail {
namespace {

constexpr int kTopkThreads = 128;
constexpr int kTopkTile = kTopkThreads;  // positions per tile: one a thread
constexpr int kTopkQueries = 4;          // queries per block, sharing each key row read

// torch.topk's order: a NaN beats every number, numbers by value.
__device__ __forceinline__ bool topk_better(float a, float b) {
  return a > b || (isnan(a) && !isnan(b));
}

// The first i in [0, n) whose list[i] fails pred (list sorted best first, pred true on a prefix).
template <typename F>
__device__ __forceinline__ int prefix_length(int n, F&& pred) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (pred(mid)) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Shared memory of a block, in 4-byte words: the queries, the tile's scores, its sorted
// survivors, the two list buffers of each query, and each query's list length, current buffer
// and survivor count.
struct TopkSmem {
  float* q;         // [QB, Dk]
  float* tile;      // [QB, TL]: -inf = no candidate
  float* sorted_s;  // [QB, TL]: the survivors, best first
  int* sorted_i;
  float* list_s;    // [2, QB, K]
  int* list_i;
  int* count;       // [QB]
  int* buf;         // [QB]
  int* passed;      // [QB]

  __device__ TopkSmem(float* base, int64_t dk, int64_t k) {
    q = base;
    tile = q + kTopkQueries * dk;
    sorted_s = tile + kTopkQueries * kTopkTile;
    sorted_i = reinterpret_cast<int*>(sorted_s + kTopkQueries * kTopkTile);
    list_s = reinterpret_cast<float*>(sorted_i + kTopkQueries * kTopkTile);
    list_i = reinterpret_cast<int*>(list_s + 2 * kTopkQueries * k);
    count = list_i + 2 * kTopkQueries * k;
    buf = count + kTopkQueries;
    passed = buf + kTopkQueries;
  }
};

int64_t topk_smem_words(int64_t dk, int64_t k) {
  return kTopkQueries * (dk + 3 * kTopkTile + 4 * k + 3);
}

template <typename T>
__global__ void __launch_bounds__(kTopkThreads) attention_topk_fwd_kernel(const TopkProblem p,
                                                                          int64_t qblocks) {
  extern __shared__ float topk_smem[];
  const TopkSmem sm(topk_smem, p.Dk, p.K);
  const int tid = threadIdx.x;
  const int K = static_cast<int>(p.K);
  const int Dk = static_cast<int>(p.Dk);
  const int64_t items = p.B * p.H * qblocks;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t qb = item % qblocks;
    const int64_t h = (item / qblocks) % p.H;
    const int64_t b = item / (qblocks * p.H);
    const int64_t n0 = qb * kTopkQueries;
    const int nq = static_cast<int>(p.N - n0 < kTopkQueries ? p.N - n0 : kTopkQueries);
    const RowRange rr = row_range(p.rows, b, p.L);
    const T* key = static_cast<const T*>(p.key) + b * p.k_sb + (h / (p.H / p.Hkv)) * p.k_sh +
                   rr.start * p.k_sl;
    for (int i = tid; i < kTopkQueries * Dk; i += kTopkThreads) {
      const int qi = i / Dk;
      float x = 0.f;  // queries past N score as zeros, never stored
      if (qi < nq) {
        x = to_float<T>(query_row<T>(p, b, n0 + qi, h)[i % Dk]);
      }
      sm.q[i] = x;
    }
    if (tid < kTopkQueries) {
      sm.count[tid] = 0;
      sm.buf[tid] = 0;
    }
    __syncthreads();

    for (int64_t base = 0; base < rr.len; base += kTopkTile) {
      // Score this thread's position; keep only what may enter the query's list.
      const int64_t l = base + tid;
      const bool ok = l < rr.len && position_valid(p.rows, b, l);
      float dot[kTopkQueries];
#pragma unroll
      for (int qi = 0; qi < kTopkQueries; ++qi) dot[qi] = 0.f;
      if (ok) {  // invalid positions are never read
        const T* krow = key + l * p.k_sl;
        for (int d = 0; d < Dk; ++d) {
          const float kd = to_float<T>(krow[d]);
#pragma unroll
          for (int qi = 0; qi < kTopkQueries; ++qi) dot[qi] = fmaf(sm.q[qi * Dk + d], kd, dot[qi]);
        }
      }
#pragma unroll
      for (int qi = 0; qi < kTopkQueries; ++qi) {
        float s = -INFINITY;
        if (ok && qi < nq) {
          s = __fmul_rn(dot[qi], p.scale);
          if (p.bias != nullptr) s = __fadd_rn(s, bias_at<T>(p, b, n0 + qi, h, rr.start + l));
          const int c = sm.count[qi];
          if (c == K && !topk_better(s, sm.list_s[(sm.buf[qi] * kTopkQueries + qi) * K + K - 1])) {
            s = -INFINITY;
          }
        }
        sm.tile[qi * kTopkTile + tid] = s;
      }
      __syncthreads();

      // Sort the survivors by rank; one thread a query counts them.
#pragma unroll
      for (int qi = 0; qi < kTopkQueries; ++qi) {
        const float* row = sm.tile + qi * kTopkTile;
        const float s = row[tid];
        if (s != -INFINITY) {
          int rank = 0;
          for (int j = 0; j < kTopkTile; ++j) {
            const float o = row[j];
            rank += o != -INFINITY && (topk_better(o, s) || (j < tid && !topk_better(s, o)));
          }
          sm.sorted_s[qi * kTopkTile + rank] = s;
          sm.sorted_i[qi * kTopkTile + rank] = static_cast<int>(l);
        }
      }
      if (tid < kTopkQueries) {
        int n = 0;
        for (int j = 0; j < kTopkTile; ++j) n += sm.tile[tid * kTopkTile + j] != -INFINITY;
        sm.passed[tid] = n;
      }
      __syncthreads();

      // Merge each query's list and its survivors into the other buffer, by rank.
      for (int qi = 0; qi < kTopkQueries; ++qi) {
        const int P = sm.passed[qi];
        if (P == 0) continue;  // uniform: read by every thread after the barrier
        const int c = sm.count[qi];
        const int src = (sm.buf[qi] * kTopkQueries + qi) * K;
        const int dst = ((sm.buf[qi] ^ 1) * kTopkQueries + qi) * K;
        const float* ss = sm.sorted_s + qi * kTopkTile;
        const int* si = sm.sorted_i + qi * kTopkTile;
        for (int r = tid; r < c; r += kTopkThreads) {
          const float x = sm.list_s[src + r];
          const int at = r + prefix_length(P, [&](int m) { return topk_better(ss[m], x); });
          if (at < K) {
            sm.list_s[dst + at] = x;
            sm.list_i[dst + at] = sm.list_i[src + r];
          }
        }
        for (int t = tid; t < P; t += kTopkThreads) {
          const float x = ss[t];
          const int at =
              t + prefix_length(c, [&](int m) { return !topk_better(x, sm.list_s[src + m]); });
          if (at < K) {
            sm.list_s[dst + at] = x;
            sm.list_i[dst + at] = si[t];
          }
        }
      }
      __syncthreads();
      if (tid < kTopkQueries && sm.passed[tid] > 0) {
        const int c = sm.count[tid] + sm.passed[tid];
        sm.count[tid] = c < K ? c : K;
        sm.buf[tid] ^= 1;
      }
      __syncthreads();
    }

    // Every slot of the block's queries: the list, then -inf / -1.
    for (int qi = 0; qi < nq; ++qi) {
      const int64_t out = ((b * p.N + n0 + qi) * p.H + h) * p.K;
      const int c = sm.count[qi];
      const int src = (sm.buf[qi] * kTopkQueries + qi) * K;
      for (int j = tid; j < K; j += kTopkThreads) {
        p.scores[out + j] = j < c ? sm.list_s[src + j] : -INFINITY;
        p.indices[out + j] = j < c ? int64_t(sm.list_i[src + j]) : int64_t(-1);
      }
    }
    __syncthreads();  // the next item rewrites the shared memory
  }
}

}  // namespace
}  // namespace detail

cudaError_t launch_topk_fwd(const TopkProblem& p, cudaStream_t stream) {
  using namespace detail;
  if (p.B == 0 || p.N == 0 || p.H == 0 || p.K == 0) return cudaSuccess;
  const int64_t qblocks = ceil_div(p.N, kTopkQueries);
  int64_t blocks = p.B * p.H * qblocks;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  const size_t smem = size_t(topk_smem_words(p.Dk, p.K)) * 4;
  dispatch_dtype(p.dtype, [&](auto tag) {
    attention_topk_fwd_kernel<typename decltype(tag)::type>
        <<<static_cast<unsigned>(blocks), kTopkThreads, smem, stream>>>(p, qblocks);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace attnkern
