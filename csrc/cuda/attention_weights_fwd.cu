// Attention weights: one warp per (row, head, query group), in two passes over the row's valid
// keys with the lane layout and logits of the attention-pool kernels (attention_pool_common.cuh),
// so each weight is the softmax of exactly the logits attention_pool_fwd scores. Pass 1: the
// row's max m and sum l of e^(s - m) (the statistics of attention_pool_common.cuh's stats_merge).
// Pass 2: the same logits again, w = e^(s - m) / l, written at the valid positions only (the caller zero-fills
// the rest); s - m is exact near the max at any magnitude of the logits, which a float32 lse
// would not give. lse = m + ln l. A NaN logit makes its row NaN; a row without a finite logit
// is empty (weights 0, lse -inf). Nothing of [.., L] is kept beyond the output.
#include "attention_pool_common.cuh"
#include "attention_weights_kernels.h"

namespace attnkern {
namespace cuda {
namespace detail {
namespace {

template <typename T, int DB, bool ALIGNED, int QG>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    attention_weights_fwd_kernel(const PoolProblem p, const WeightsOut out, float* lse,
                                 int64_t num_qgroups, int64_t total_warps) {
  using LN = Lanes<T, DB>;
  constexpr int LPK = LN::LPK;
  constexpr int KPS = LN::KPS;
  constexpr int EPL = LN::EPL;
  // No value slices: more keys per pass than the forward for the same registers.
  constexpr int U = EPL <= 4 ? 4 : (QG >= 4 ? 2 : 4);

  const WarpLanes wl = warp_lanes<LPK>(p);
  for (int64_t w = first_warp(); w < total_warps; w += warp_stride()) {
    const auto [b, h, split, qgrp] = warp_item(p, w, num_qgroups, 1);
    const RowSpan<T> row = row_span<T>(p, b, h);
    float q[QG][EPL];
    load_queries<T, DB, ALIGNED, QG>(p, wl, b, h, qgrp, q);

    // Pass 1: the statistics (stats_merge: a NaN logit makes l NaN, a +inf one l = inf, as the
    // reference's softmax), then merged over the key groups in a butterfly every lane agrees on.
    RowStats<LPK, EPL, QG> st;
    for (int64_t base = 0; base < row.rr.len; base += KPS * U) {
      st.add(p, KeyTile<T, DB, ALIGNED, U, false>(p, wl, b, row, base, row.rr.len), b, h, qgrp, q);
    }
    st.merge_groups();

#pragma unroll
    for (int qi = 0; qi < QG; ++qi) {
      const int64_t n = qgrp * QG + qi;
      if (isnan(st.l[qi]) && n < p.N) {
        for (int64_t pos = wl.lane; pos < out.nan_fill; pos += 32) {
          out.w[b * out.sb + n * out.sn + h * out.sh + pos * out.sl] = NAN;
        }
      }
    }

    // Pass 2: the weights, by lane 0 of each key group (a NaN row: above, or NaN here).
    for (int64_t base = 0; base < row.rr.len; base += KPS * U) {
      const KeyTile<T, DB, ALIGNED, U, false> t(p, wl, b, row, base, row.rr.len);
#pragma unroll
      for (int qi = 0; qi < QG; ++qi) {
        const int64_t n = qgrp * QG + qi;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const float s = logit<LPK, EPL>(q[qi], t.k[u], p.scale, t.bias(p, b, n, h, u));
          if (t.ok[u] && wl.j == 0 && n < p.N && !(isnan(st.l[qi]) && out.nan_fill > 0)) {
            // An empty row (no finite logit, l = 0) keeps its zeros.
            const float wt = st.l[qi] == 0.f ? 0.f : exp_nat(s - finite_or_zero(st.m[qi])) / st.l[qi];
            out.w[b * out.sb + n * out.sn + h * out.sh + (t.key_row0 + int64_t(u) * KPS) * out.sl] = wt;
          }
        }
      }
    }
    if (wl.lane == 0) {
      for_each_query<QG>(p, b, h, qgrp, [&](int qi, int64_t r) {
        lse[r] = st.l[qi] == 0.f ? -INFINITY : finite_or_zero(st.m[qi]) + logf(st.l[qi]);
      });
    }
  }
}

}  // namespace
}  // namespace detail

cudaError_t launch_weights_fwd(const PoolProblem& p, const WeightsOut& out, float* lse, cudaStream_t stream) {
  using namespace detail;
  if (p.B == 0 || p.N == 0 || p.H == 0) return cudaSuccess;
  const int qg = fwd_query_group(p.N);
  const int64_t num_qgroups = ceil_div(p.N, qg);
  const int64_t total_warps = p.B * p.H * num_qgroups;
  const bool aligned = vectors_aligned(p.dtype, {p.q_sb, p.q_sn, p.q_sh, p.k_sb, p.k_sl, p.k_sh, p.Dk},
                                       {p.query, p.key});
  dispatch_row_kernel<4>(p, aligned, qg, [&](auto tag, auto db, auto al, auto qgc) {
    attention_weights_fwd_kernel<typename decltype(tag)::type, decltype(db)::value, decltype(al)::value,
                                 decltype(qgc)::value>
        <<<grid_blocks(total_warps), kThreads, 0, stream>>>(p, out, lse, num_qgroups, total_warps);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace attnkern
