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
  SplitWork work;
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
  const WarpLanes wl = warp_lanes<LPK>(p);

  for (int64_t w = first_warp(); w < a.work.total_warps; w += warp_stride()) {
    const auto [b, h, split, qgrp] = warp_item(p, w, a.work.num_qgroups, a.work.num_splits);

    // Every lane reads the same lse values, so `any` (and the skip) is uniform over the warp.
    bool need[QG];
    bool any = false;
#pragma unroll
    for (int qi = 0; qi < QG; ++qi) {
      const int64_t n = qgrp * QG + qi;
      need[qi] = n < p.N && needs_restat(a.lse[query_index(p, b, n, h)]);
      any = any || need[qi];
    }
    if (!any) continue;

    const RowSpan<T> row = row_span<T>(p, b, h);  // K only
    float q[QG][EPL];  // unscaled, as in the dq and dk/dv kernels
    load_queries<T, DB, ALIGNED, QG>(p, wl, b, h, qgrp, q);
    RowStats<LPK, EPL, QG> st;
    for (SplitKeys<KPS * U> it(a.work, split, row.rr.len); it.next();) {
      st.add(p, KeyTile<T, DB, ALIGNED, U, false>(p, wl, b, row, it.base, it.end), b, h, qgrp, q);
    }
    // Every lane ends with the same statistics; lane 0 writes this split's.
    st.merge_groups();
    if (wl.lane == 0) {
#pragma unroll
      for (int qi = 0; qi < QG; ++qi) {
        if (!need[qi]) continue;
        const int64_t r = query_index(p, b, qgrp * QG + qi, h);
        a.part_stats[(2 * split) * wl.rows + r] = st.m[qi];
        a.part_stats[(2 * split + 1) * wl.rows + r] = st.l[qi];
      }
    }
  }
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
  a.work = split_work(p, qg, plan.dq_splits, plan.dq_split_block);
  const unsigned blocks = grid_blocks(a.work.total_warps);
  // The kernel reads only q and k.
  const bool aligned = vectors_aligned(
      p.dtype, {p.q_sb, p.q_sn, p.q_sh, p.k_sb, p.k_sl, p.k_sh, p.Dk}, {p.query, p.key});

  dispatch_row_kernel<2>(p, aligned, qg, [&](auto tag, auto db, auto al, auto qgc) {
    attention_pool_bwd_stats_kernel<typename decltype(tag)::type, decltype(db)::value,
                                    decltype(al)::value, decltype(qgc)::value>
        <<<blocks, kThreads, 0, stream>>>(a);
  });
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace cuda
}  // namespace attnkern
