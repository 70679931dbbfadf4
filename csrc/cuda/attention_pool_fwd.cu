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
  int64_t num_qgroups;
  int64_t num_splits;
  int64_t split_block;
  int64_t total_warps;
};

template <typename T, int DB, bool ALIGNED, int QG>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    attention_pool_fwd_kernel(const FwdKernelArgs a) {
  using LN = Lanes<T, DB>;
  constexpr int LPK = LN::LPK;
  constexpr int KPS = LN::KPS;
  constexpr int EPL = LN::EPL;
  // Keys per group per pass: enough 16-byte loads in flight to cover HBM latency without
  // spilling under the 128-register cap (the K and V slices of U keys live in registers; with
  // 4 queries of 8 elements a lane, q and acc already take 64).
  constexpr int U = EPL <= 4 ? 4 : (QG >= 4 ? 1 : 2);

  const PoolProblem& p = a.p;
  const int lane = threadIdx.x & 31;
  const int j = lane % LPK;  // lane within its key group
  const int g = lane / LPK;  // key group within the warp
  const int dk = static_cast<int>(p.Dk);
  const int dv = static_cast<int>(p.Dv);
  const int64_t rows = p.B * p.N * p.H;

  for (int64_t w = first_warp(); w < a.total_warps; w += warp_stride()) {
    const auto [b, h, split, qgrp] = warp_item(p, w, a.num_qgroups, a.num_splits);
    const auto [rr, kbase, vbase] = row_span<T>(p, b, h);

    float q[QG][EPL];
    float m[QG];  // running max of the logits (natural units)
    float l[QG];  // running sum of e^(logit - m)
    float acc[QG][EPL];
#pragma unroll
    for (int qi = 0; qi < QG; ++qi) {
      const int64_t n = qgrp * QG + qi;
      if (n < p.N) {
        load_slice<T, DB, ALIGNED>(query_row<T>(p, b, n, h), dk, j, q[qi]);
      } else {
#pragma unroll
        for (int e = 0; e < EPL; ++e) q[qi][e] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < EPL; ++e) acc[qi][e] = 0.f;
      m[qi] = -INFINITY;
      l[qi] = 0.f;
    }

    // Loop bounds depend only on the row: uniform over the warp, as the shuffles need.
    const int64_t block_stride = a.num_splits * a.split_block;
    for (int64_t blk = split * a.split_block; blk < rr.len; blk += block_stride) {
      const int64_t blk_end = blk + a.split_block < rr.len ? blk + a.split_block : rr.len;
      for (int64_t base = blk; base < blk_end; base += KPS * U) {
        float kf[U][EPL];
        float vf[U][EPL];
        bool ok[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t pos = base + u * KPS + g;
          ok[u] = pos < blk_end && position_valid(p.rows, b, pos);
          if (ok[u]) {  // only valid positions are read
            load_slice<T, DB, ALIGNED>(kbase + pos * p.k_sl, dk, j, kf[u]);
            load_slice<T, DB, ALIGNED>(vbase + pos * p.v_sl, dv, j, vf[u]);
          } else {
#pragma unroll
            for (int e = 0; e < EPL; ++e) {
              kf[u][e] = 0.f;
              vf[u][e] = 0.f;
            }
          }
        }
#pragma unroll
        for (int qi = 0; qi < QG; ++qi) {
          float s[U];
          float mx = m[qi];
#pragma unroll
          for (int u = 0; u < U; ++u) {
            float dot = 0.f;
#pragma unroll
            for (int e = 0; e < EPL; ++e) dot = fmaf(q[qi][e], kf[u][e], dot);
            s[u] = logit_of<LPK>(dot, p.scale);
            // fmaxf drops NaN: a NaN logit at a valid position makes the max NaN instead, so
            // that it reaches l and acc (and so out and lse) rather than vanishing.
            if (ok[u]) mx = isnan(s[u]) ? s[u] : fmaxf(mx, s[u]);
          }
          // mx == -inf: this group has seen no valid key yet; skipping avoids inf - inf.
          if (mx != -INFINITY) {
            const float corr = exp_nat(m[qi] - mx);  // m == -inf gives 0
            l[qi] *= corr;
#pragma unroll
            for (int e = 0; e < EPL; ++e) acc[qi][e] *= corr;
#pragma unroll
            for (int u = 0; u < U; ++u) {
              const float pu = ok[u] ? exp_nat(s[u] - mx) : 0.f;
              l[qi] += pu;
#pragma unroll
              for (int e = 0; e < EPL; ++e) acc[qi][e] = fmaf(pu, vf[u][e], acc[qi][e]);
            }
            m[qi] = mx;
          }
        }
      }
    }

    // Merge the KPS key groups (they hold the same head slice for different keys). All lanes
    // take part in every shuffle; the stores come after, in a separate loop.
    float mrow[QG];  // the max and sum of the warp's keys, for the lse or the split combine
    float lrow[QG];
#pragma unroll
    for (int qi = 0; qi < QG; ++qi) {
      float mx = m[qi];
#pragma unroll
      for (int off = LPK; off < 32; off *= 2) mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, off));
      const float f = (m[qi] == -INFINITY) ? 0.f : exp_nat(m[qi] - mx);
      float lsum = l[qi] * f;
#pragma unroll
      for (int off = LPK; off < 32; off *= 2) lsum += __shfl_xor_sync(kFullMask, lsum, off);
      // No valid key with a finite logit: out = 0, lse = -inf. A NaN sum propagates.
      const bool empty = lsum == 0.f;
      const float inv = empty ? 0.f : 1.f / lsum;
#pragma unroll
      for (int e = 0; e < EPL; ++e) {
        float x = acc[qi][e] * f;
#pragma unroll
        for (int off = LPK; off < 32; off *= 2) x += __shfl_xor_sync(kFullMask, x, off);
        acc[qi][e] = x * inv;
      }
      mrow[qi] = mx;
      lrow[qi] = lsum;
    }
    if (g == 0) {
#pragma unroll
      for (int qi = 0; qi < QG; ++qi) {
        const int64_t n = qgrp * QG + qi;
        if (n >= p.N) break;
        const int64_t r = (b * p.N + n) * p.H + h;
        if (a.num_splits == 1) {
          // Unrounded: out is float32 for every input dtype (delta = sum(grad_out * out)).
          store_slice_f32<T, DB>(static_cast<float*>(a.out) + r * dv, dv, j, acc[qi]);
          // No valid key with a finite logit (lrow == 0): lse = -inf. NaN/inf propagate.
          if (j == 0) a.lse[r] = lrow[qi] == 0.f ? -INFINITY : mrow[qi] + logf(lrow[qi]);
        } else {
          // An empty split stores (-inf, 0) and zeros, and weighs 0 in the combine.
          store_slice_f32<T, DB>(a.part_o + (split * rows + r) * dv, dv, j, acc[qi]);
          if (j == 0) {
            a.part_ml[(2 * split) * rows + r] = mrow[qi];
            a.part_ml[(2 * split + 1) * rows + r] = lrow[qi];
          }
        }
      }
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
  const int64_t vec = 16 / elem_bytes(p.dtype);
  const int64_t strides[] = {p.q_sb, p.q_sn, p.q_sh, p.k_sb, p.k_sl,
                             p.k_sh, p.v_sb, p.v_sl, p.v_sh};
  for (int64_t s : strides) {
    if (s % vec != 0) return false;
  }
  return p.Dk % vec == 0 && p.Dv % vec == 0 && aligned16(p.query) && aligned16(p.key) &&
         aligned16(p.value) && aligned16(out);
}

}  // namespace
}  // namespace detail

FwdPlan plan_fwd(const PoolProblem& p, int num_sms) {
  using namespace detail;
  FwdPlan plan;
  const int64_t lmax = longest_row_estimate(p);
  const int64_t work = p.B * p.H * ceil_div(p.N, fwd_query_group(p.N));
  plan.num_splits = choose_splits(work, lmax, num_sms);
  plan.split_block = split_block_for(lmax, plan.num_splits);
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
  a.num_splits = plan.num_splits > 1 ? plan.num_splits : 1;
  a.split_block = plan.split_block > 0 ? plan.split_block : 64;
  a.part_o = a.num_splits > 1 ? scratch : nullptr;
  a.part_ml = a.num_splits > 1 ? scratch + a.num_splits * rows * p.Dv : nullptr;
  a.num_qgroups = ceil_div(p.N, qg);
  a.total_warps = p.B * p.H * a.num_qgroups * a.num_splits;
  const unsigned blocks = grid_blocks(a.total_warps);
  const bool aligned = fwd_aligned(p, out);

  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_bucket(head_bucket(p.Dk, p.Dv), [&](auto bucket) {
      constexpr int DB = decltype(bucket)::value;
      dispatch_bool(aligned, [&](auto al) {
        constexpr bool AL = decltype(al)::value;
        if (qg == 1) {
          attention_pool_fwd_kernel<T, DB, AL, 1><<<blocks, kThreads, 0, stream>>>(a);
        } else {
          attention_pool_fwd_kernel<T, DB, AL, 4><<<blocks, kThreads, 0, stream>>>(a);
        }
      });
    });
  });
  if (a.num_splits > 1) {
    attention_pool_fwd_combine_kernel<<<grid_blocks(rows), kThreads, 0, stream>>>(
        a.part_o, a.part_ml, a.num_splits, rows, static_cast<int>(p.Dv), static_cast<float*>(out),
        lse);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace attnkern
