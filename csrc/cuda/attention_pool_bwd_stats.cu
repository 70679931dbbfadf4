// Backward, pass 1 of 3: the softmax statistics of the queries whose saved lse is too coarse
// for their probabilities (|lse| >= kRestatAbove, see attention_pool_common.cuh), for the dq
// kernel to turn into their anchors.
//
// One warp per (row, head, query group, split), the dq pass's layout and split blocks, so a few
// long rows are still spread over the GPU. A warp whose queries all have a small lse only reads
// the lse and stops: that is the common case, and it costs one short launch. Otherwise the warp
// streams its split's valid keys (K only) and keeps, per query and key group, the running max
// and sum of the logits (stats_merge, natural units), computed exactly as the dq and dk/dv
// kernels compute them (logit_of: scale times the dot of the unscaled q and k, the same lane
// slices, fma order and group sum), so that s - max is exact at the max. The key groups are then merged by a butterfly and the split's
// (max, sum) written to part_stats [S, 2, B * N * H] for each such query; the dq kernel merges
// the splits in split order (deterministic).
#include "attention_pool_common.cuh"

#include <cmath>

namespace attnkern {
namespace cuda {
namespace detail {
namespace {

struct StatsKernelArgs {
  PoolProblem p;
  const float* lse;   // [B, N, H] contiguous
  float* part_stats;  // [S, 2, B * N * H]
  int64_t num_qgroups;
  int64_t num_splits;
  int64_t split_block;
  int64_t total_warps;
};

template <typename T, int DB, bool ALIGNED, int QG>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    attention_pool_bwd_stats_kernel(const StatsKernelArgs a) {
  using LN = Lanes<T, DB>;
  constexpr int LPK = LN::LPK;
  constexpr int KPS = LN::KPS;
  constexpr int EPL = LN::EPL;
  // Only K is streamed: twice the dq pass's keys per group in flight, in the same registers.
  constexpr int U = EPL <= 4 ? 4 : 2;

  const PoolProblem& p = a.p;
  const int lane = threadIdx.x & 31;
  const int j = lane % LPK;
  const int g = lane / LPK;
  const int dk = static_cast<int>(p.Dk);
  const int64_t rows = p.B * p.N * p.H;

  for (int64_t w = first_warp(); w < a.total_warps; w += warp_stride()) {
    const auto [b, h, split, qgrp] = warp_item(p, w, a.num_qgroups, a.num_splits);

    // Every lane reads the same lse values, so `any` (and the skip) is uniform over the warp.
    bool need[QG];
    bool any = false;
#pragma unroll
    for (int qi = 0; qi < QG; ++qi) {
      const int64_t n = qgrp * QG + qi;
      need[qi] = n < p.N && needs_restat(a.lse[(b * p.N + n) * p.H + h]);
      any = any || need[qi];
    }
    if (!any) continue;

    const RowSpan<T> row = row_span<T>(p, b, h);  // K only
    const RowRange& rr = row.rr;
    const T* kbase = row.key;

    float q[QG][EPL];  // unscaled, as in the dq and dk/dv kernels
    float m[QG];
    float l[QG];
#pragma unroll
    for (int qi = 0; qi < QG; ++qi) {
      const int64_t n = qgrp * QG + qi;
      if (n < p.N) {
        load_slice<T, DB, ALIGNED>(query_row<T>(p, b, n, h), dk, j, q[qi]);
      } else {
#pragma unroll
        for (int e = 0; e < EPL; ++e) q[qi][e] = 0.f;
      }
      m[qi] = -INFINITY;
      l[qi] = 0.f;
    }

    // Loop bounds depend only on the row: uniform over the warp, as the shuffles need.
    const int64_t block_stride = a.num_splits * a.split_block;
    for (int64_t blk = split * a.split_block; blk < rr.len; blk += block_stride) {
      const int64_t blk_end = blk + a.split_block < rr.len ? blk + a.split_block : rr.len;
      for (int64_t base = blk; base < blk_end; base += KPS * U) {
        float kf[U][EPL];
        bool ok[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t pos = base + u * KPS + g;
          ok[u] = pos < blk_end && position_valid(p.rows, b, pos);
          if (ok[u]) {  // only valid positions are read
            load_slice<T, DB, ALIGNED>(kbase + pos * p.k_sl, dk, j, kf[u]);
          } else {
#pragma unroll
            for (int e = 0; e < EPL; ++e) kf[u][e] = 0.f;
          }
        }
#pragma unroll
        for (int qi = 0; qi < QG; ++qi) {
#pragma unroll
          for (int u = 0; u < U; ++u) {
            float dot = 0.f;
#pragma unroll
            for (int e = 0; e < EPL; ++e) dot = fmaf(q[qi][e], kf[u][e], dot);
            const float s = logit_of<LPK>(dot, p.scale);
            if (ok[u]) stats_merge(m[qi], l[qi], s, 1.f);
          }
        }
      }
    }

    // Merge the KPS key groups (all lanes take part in every shuffle; stats_merge is symmetric,
    // so every lane ends with the same statistics), then lane 0 writes this split's.
#pragma unroll
    for (int qi = 0; qi < QG; ++qi) {
#pragma unroll
      for (int off = LPK; off < 32; off *= 2) {
        const float mo = __shfl_xor_sync(kFullMask, m[qi], off);
        const float lo = __shfl_xor_sync(kFullMask, l[qi], off);
        stats_merge(m[qi], l[qi], mo, lo);
      }
    }
    if (lane == 0) {
#pragma unroll
      for (int qi = 0; qi < QG; ++qi) {
        if (!need[qi]) continue;
        const int64_t r = (b * p.N + qgrp * QG + qi) * p.H + h;
        a.part_stats[(2 * split) * rows + r] = m[qi];
        a.part_stats[(2 * split + 1) * rows + r] = l[qi];
      }
    }
  }
}

// The kernel reads only q and k.
bool stats_aligned(const PoolProblem& p) {
  const int64_t vec = 16 / elem_bytes(p.dtype);
  const int64_t strides[] = {p.q_sb, p.q_sn, p.q_sh, p.k_sb, p.k_sl, p.k_sh};
  for (int64_t s : strides) {
    if (s % vec != 0) return false;
  }
  return p.Dk % vec == 0 && aligned16(p.query) && aligned16(p.key);
}

}  // namespace

cudaError_t launch_bwd_stats(const PoolProblem& p, const BwdInputs& in, const BwdPlan& plan,
                             float* part_stats, cudaStream_t stream) {
  const int qg = dq_query_group(p.N);
  StatsKernelArgs a;
  a.p = p;
  a.lse = in.lse;
  a.part_stats = part_stats;
  // The dq pass's splits: the dq kernel merges exactly these num_splits partials.
  a.num_splits = plan.dq_splits > 1 ? plan.dq_splits : 1;
  a.split_block = plan.dq_split_block > 0 ? plan.dq_split_block : 64;
  a.num_qgroups = ceil_div(p.N, qg);
  a.total_warps = p.B * p.H * a.num_qgroups * a.num_splits;
  const unsigned blocks = grid_blocks(a.total_warps);
  const bool aligned = stats_aligned(p);

  // The bucket of both head dims, as in the dq and dk/dv kernels: it fixes the lane slices and
  // so the order of the logits' sums.
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_bucket(head_bucket(p.Dk, p.Dv), [&](auto bucket) {
      constexpr int DB = decltype(bucket)::value;
      dispatch_bool(aligned, [&](auto al) {
        constexpr bool AL = decltype(al)::value;
        if (qg == 1) {
          attention_pool_bwd_stats_kernel<T, DB, AL, 1><<<blocks, kThreads, 0, stream>>>(a);
        } else {
          attention_pool_bwd_stats_kernel<T, DB, AL, 2><<<blocks, kThreads, 0, stream>>>(a);
        }
      });
    });
  });
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace cuda
}  // namespace attnkern
