// Forward kernels: decode-style attention pooling, one warp per (row, head, query group, split).
//
// Each warp holds QG queries in registers and streams the row's valid keys once for all of
// them, KPS key positions at a time (one per key group, see attention_pool_common.cuh), with
// an fp32 online softmax in natural units: logits s = scale * q.k (the dot of the unscaled q
// and k, then the scale), max m and sum l of e^(s - m) = exp2((s - m) * log2(e)), so s - m is
// exact near the max at any magnitude of the logits; lse = m + ln l. Warps of a block take
// consecutive query groups of the same (row, head, split), so with many queries the K/V lines
// they stream are shared through L1 rather than re-read from HBM.
//
// Split-L: when rows x heads x query groups cannot fill the GPU, each (row, head) is cut into
// `num_splits` interleaved blocks of keys; the split warps write normalised partial outputs and
// their (max, sum) (fp32 scratch), and a combine pass merges them in a fixed order
// (deterministic). Partial (max, sum) rather than a partial lse: a float32 lse is only good to
// ~1 ulp of the logits, which the split weights e^(lse_s - lse) would inherit.
#include "attention_pool_common.cuh"

#include <cmath>

namespace attnkern {
namespace cuda {
namespace detail {
namespace {

struct FwdKernelArgs {
  PoolProblem p;
  void* out;        // [B, N, H, Dv] contiguous, used when num_splits == 1
  float* lse;       // [B, N, H], used when num_splits == 1
  float* part_o;    // [S, B * N * H, Dv] fp32, used when num_splits > 1
  float* part_ml;   // [S, 2, B * N * H] fp32: each split's max, then its sum (natural units)
  SplitWork work;
};

template <typename T, int DB, bool ALIGNED, int QG>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    attention_pool_fwd_kernel(const FwdKernelArgs a) {
  using LN = Lanes<T, DB>;
  constexpr int LPK = LN::LPK;
  constexpr int KPS = LN::KPS;
  constexpr int EPL = LN::EPL;
  constexpr int U = fwd_keys_per_group(EPL, QG);

  const PoolProblem& p = a.p;
  const WarpLanes wl = warp_lanes<LPK>(p);

  for (int64_t w = first_warp(); w < a.work.total_warps; w += warp_stride()) {
    const auto [b, h, split, qgrp] = warp_item(p, w, a.work.num_qgroups, a.work.num_splits);
    const RowSpan<T> row = row_span<T>(p, b, h);

    float q[QG][EPL];
    load_queries<T, DB, ALIGNED, QG>(p, wl, b, h, qgrp, q);
    OnlineSoftmax<LPK, EPL, QG> sm;
    for (SplitKeys<KPS * U> it(a.work, split, row.rr.len); it.next();) {
      sm.add(p, KeyTile<T, DB, ALIGNED, U, true>(p, wl, b, row, it.base, it.end), b, h, qgrp, q);
    }
    sm.finish();  // the max and sum of the warp's keys: for the lse or the split combine
    if (wl.g == 0) {
      for_each_query<QG>(p, b, h, qgrp, [&](int qi, int64_t r) {
        if (a.work.num_splits == 1) {
          // Unrounded: out is float32 for every input dtype (delta = sum(grad_out * out)).
          store_slice_f32<T, DB>(static_cast<float*>(a.out) + r * wl.dv, wl.dv, wl.j, sm.acc[qi]);
          if (wl.j == 0) a.lse[r] = sm.lse(qi);
        } else {
          // An empty split stores (-inf, 0) and zeros, and weighs 0 in the combine.
          store_slice_f32<T, DB>(a.part_o + (split * wl.rows + r) * wl.dv, wl.dv, wl.j, sm.acc[qi]);
          if (wl.j == 0) {
            a.part_ml[(2 * split) * wl.rows + r] = sm.m[qi];
            a.part_ml[(2 * split + 1) * wl.rows + r] = sm.l[qi];
          }
        }
      });
    }
  }
}

// Merges the split partials of one (row, query, head) per warp, in split order, into the
// float32 out: split s weighs l_s * e^(m_s - max), with m_s - max exact near the max.
__global__ void __launch_bounds__(kThreads)
    attention_pool_fwd_combine_kernel(const float* __restrict__ part_o,
                                      const float* __restrict__ part_ml, int64_t splits,
                                      int64_t rows, int dv, float* __restrict__ out,
                                      float* __restrict__ lse) {
  const int lane = threadIdx.x & 31;
  for (int64_t r = first_warp(); r < rows; r += warp_stride()) {
    float mx = -INFINITY;
    for (int64_t s = 0; s < splits; ++s) {
      const float x = part_ml[2 * s * rows + r];
      mx = (isnan(x) || isnan(mx)) ? NAN : fmaxf(mx, x);  // a NaN split keeps the row NaN
    }
    // Shifted by finite_or_zero: every split empty ((-inf, 0) each) gives total = 0; a NaN sum
    // (a NaN logit, also behind a max of -inf) or a max of +inf (whose split's sum is NaN)
    // makes total, out and lse NaN.
    const float sh = finite_or_zero(mx);
    float total = 0.f;
    for (int64_t s = 0; s < splits; ++s) {
      total += rescale(part_ml[(2 * s + 1) * rows + r], part_ml[2 * s * rows + r] - sh);
    }
    if (total == 0.f) {  // empty row: out = 0, lse = -inf
      for (int e = lane; e < dv; e += 32) out[r * dv + e] = 0.f;
      if (lane == 0) lse[r] = -INFINITY;
      continue;
    }
    const float inv = 1.f / total;
    for (int e = lane; e < dv; e += 32) {
      float x = 0.f;
      for (int64_t s = 0; s < splits; ++s) {
        // 0 for an empty split (-inf, 0), whose partial out is 0 too.
        const float ws = rescale(part_ml[(2 * s + 1) * rows + r], part_ml[2 * s * rows + r] - sh);
        x = fmaf(ws, part_o[(s * rows + r) * dv + e], x);
      }
      out[r * dv + e] = x * inv;
    }
    if (lane == 0) lse[r] = sh + logf(total);
  }
}

bool fwd_aligned(const PoolProblem& p, const void* out) {
  return vectors_aligned(p.dtype,
                         {p.q_sb, p.q_sn, p.q_sh, p.k_sb, p.k_sl, p.k_sh, p.v_sb, p.v_sl, p.v_sh,
                          p.Dk, p.Dv},
                         {p.query, p.key, p.value, out});
}

}  // namespace
}  // namespace detail

FwdPlan plan_fwd(const PoolProblem& p, int num_sms) {
  using namespace detail;
  FwdPlan plan;
  plan_splits(p, fwd_query_group(p.N), num_sms, &plan.num_splits, &plan.split_block);
  return plan;
}

int64_t fwd_scratch_floats(const PoolProblem& p, const FwdPlan& plan) {
  if (plan.num_splits <= 1) return 0;
  const int64_t rows = p.B * p.N * p.H;
  return int64_t(plan.num_splits) * rows * (p.Dv + 2);  // partial out, then (max, sum)
}

cudaError_t launch_fwd(const PoolProblem& p, const FwdPlan& plan, void* out, float* lse,
                       float* scratch, cudaStream_t stream) {
  using namespace detail;
  if (p.B == 0 || p.N == 0 || p.H == 0) return cudaSuccess;
  const int64_t rows = p.B * p.N * p.H;
  const int qg = fwd_query_group(p.N);
  FwdKernelArgs a;
  a.p = p;
  a.out = out;
  a.lse = lse;
  a.work = split_work(p, qg, plan.num_splits, plan.split_block);
  const int64_t splits = a.work.num_splits;
  a.part_o = splits > 1 ? scratch : nullptr;
  a.part_ml = splits > 1 ? scratch + splits * rows * p.Dv : nullptr;
  const unsigned blocks = grid_blocks(a.work.total_warps);

  dispatch_row_kernel<4>(p, fwd_aligned(p, out), qg, [&](auto tag, auto db, auto al, auto qgc) {
    attention_pool_fwd_kernel<typename decltype(tag)::type, decltype(db)::value,
                              decltype(al)::value, decltype(qgc)::value>
        <<<blocks, kThreads, 0, stream>>>(a);
  });
  if (splits > 1) {
    attention_pool_fwd_combine_kernel<<<grid_blocks(rows), kThreads, 0, stream>>>(
        a.part_o, a.part_ml, splits, rows, static_cast<int>(p.Dv), static_cast<float*>(out),
        lse);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace attnkern
