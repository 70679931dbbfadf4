// Backward, pass 2 of 3: grad_query, recomputing the probabilities from each query's softmax
// anchors.
//
// One warp per (row, head, query group, split), laid out like the forward: the warp streams the
// row's valid keys once for its QG queries and accumulates, per query,
//   dq = scale * sum_l p_l (dO . v_l - delta) k_l,   p_l = e^((s_l - a) - c),
//   s_l = scale * q.k_l (natural units, logit_of: the forward's logits, computed the same way),
// in fp32 registers, e^x as exp2(x * log2(e)). The anchors (a, c) are (lse, 0) from the saved
// lse, or, for a query with a large lse, its max and log sum from the stats pass's split
// statistics, merged here in split order (attention_pool_common.cuh says why); the split-0
// warps store them for the dk/dv pass. Split-L (few rows x heads, long rows) writes fp32 partials that a reduce
// pass sums in split order, so the result is deterministic. Every grad_query element is
// written, zeros included (empty rows).
#include "attention_pool_common.cuh"

#include <cmath>

namespace attnkern {
namespace cuda {
namespace detail {
namespace {

struct DqKernelArgs {
  PoolProblem p;
  BwdInputs in;
  void* grad_query;         // [B, N, H, Dk] contiguous, used when num_splits == 1
  float* part_dq;           // [S, B * N * H, Dk] fp32, used when num_splits > 1
  const float* part_stats;  // [S, 2, B * N * H], the stats pass's (read where needs_restat)
  float* anchors;           // [2, B * N * H], written here for the dk/dv pass
  int64_t num_qgroups;
  int64_t num_splits;
  int64_t split_block;
  int64_t total_warps;
};

// The anchors (a, c) of query row r: from its lse, or, where that needs_restat, from the stats
// pass's statistics merged in split order (the same anchors in every split's warp). Not
// inlined: it runs once per query, and inlined it raised the kernel's register count (by up to
// 21 on sm_90, one query in 16-bit dtypes), which costs resident warps.
__device__ __noinline__ float2 query_anchors(const float* lse_in, const float* part_stats,
                                             int64_t splits, int64_t rows, int64_t r) {
  const float lse = lse_in[r];
  float2 an;
  if (needs_restat(lse)) {
    float m = part_stats[r];
    float l = part_stats[rows + r];
    for (int64_t sp = 1; sp < splits; ++sp) {
      const float* st = part_stats + 2 * sp * rows;
      stats_merge(m, l, st[r], st[rows + r]);
    }
    anchors_of(m, l, an.x, an.y);
  } else {
    an.x = lse;  // -inf: no finite logit in the row, every p is 0 (see the callers)
    an.y = 0.f;
  }
  return an;
}

template <typename T, int DB, bool ALIGNED, int QG>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    attention_pool_bwd_dq_kernel(const DqKernelArgs a) {
  using LN = Lanes<T, DB>;
  constexpr int LPK = LN::LPK;
  constexpr int KPS = LN::KPS;
  constexpr int EPL = LN::EPL;
  constexpr int U = EPL <= 4 ? 2 : 1;

  const PoolProblem& p = a.p;
  const int lane = threadIdx.x & 31;
  const int j = lane % LPK;
  const int g = lane / LPK;
  const int dk = static_cast<int>(p.Dk);
  const int dv = static_cast<int>(p.Dv);
  const int64_t rows = p.B * p.N * p.H;

  for (int64_t w = first_warp(); w < a.total_warps; w += warp_stride()) {
    const auto [b, h, split, qgrp] = warp_item(p, w, a.num_qgroups, a.num_splits);
    const auto [rr, kbase, vbase] = row_span<T>(p, b, h);

    float q[QG][EPL];   // unscaled: the logits are scale * q.k
    float go[QG][EPL];  // grad_out
    float dq[QG][EPL];
    float anc_a[QG];  // the anchors (a, c), natural units: p = e^((s - a) - c)
    float anc_c[QG];
    float delta[QG];
#pragma unroll
    for (int qi = 0; qi < QG; ++qi) {
      const int64_t n = qgrp * QG + qi;
      if (n < p.N) {
        load_slice<T, DB, ALIGNED>(query_row<T>(p, b, n, h), dk, j, q[qi]);
        load_slice<T, DB, ALIGNED>(static_cast<const T*>(a.in.grad_out) + b * a.in.go_sb +
                                       n * a.in.go_sn + h * a.in.go_sh,
                                   dv, j, go[qi]);
        const int64_t r = (b * p.N + n) * p.H + h;
        const float2 an = query_anchors(a.in.lse, a.part_stats, a.num_splits, rows, r);
        anc_a[qi] = an.x;
        anc_c[qi] = an.y;
        if (split == 0 && lane == 0) {
          a.anchors[r] = anc_a[qi];
          a.anchors[rows + r] = anc_c[qi];
        }
        delta[qi] = a.in.delta[r];
      } else {
#pragma unroll
        for (int e = 0; e < EPL; ++e) {
          q[qi][e] = 0.f;
          go[qi][e] = 0.f;
        }
        anc_a[qi] = 0.f;
        anc_c[qi] = 0.f;
        delta[qi] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < EPL; ++e) dq[qi][e] = 0.f;
    }

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
          if (ok[u]) {
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
#pragma unroll
          for (int u = 0; u < U; ++u) {
            float dot = 0.f;
            float dp = 0.f;
#pragma unroll
            for (int e = 0; e < EPL; ++e) {
              dot = fmaf(q[qi][e], kf[u][e], dot);
              dp = fmaf(go[qi][e], vf[u][e], dp);
            }
            const float s = logit_of<LPK>(dot, p.scale);
            dp = group_sum<LPK>(dp);
            // Invalid positions contribute exactly 0 (and never evaluate exp2 of garbage).
            // a == -inf: lse = -inf, no finite logit in the row (all -inf), every p is 0.
            const float pr =
                (ok[u] && anc_a[qi] != -INFINITY) ? exp_nat((s - anc_a[qi]) - anc_c[qi]) : 0.f;
            const float ds = pr * (dp - delta[qi]);
#pragma unroll
            for (int e = 0; e < EPL; ++e) dq[qi][e] = fmaf(ds, kf[u][e], dq[qi][e]);
          }
        }
      }
    }

    // Sum the key groups' partial dq (fixed butterfly order), then store.
#pragma unroll
    for (int qi = 0; qi < QG; ++qi) {
#pragma unroll
      for (int e = 0; e < EPL; ++e) {
        float x = dq[qi][e];
#pragma unroll
        for (int off = LPK; off < 32; off *= 2) x += __shfl_xor_sync(kFullMask, x, off);
        dq[qi][e] = x * p.scale;
      }
    }
    if (g == 0) {
#pragma unroll
      for (int qi = 0; qi < QG; ++qi) {
        const int64_t n = qgrp * QG + qi;
        if (n >= p.N) break;
        const int64_t r = (b * p.N + n) * p.H + h;
        if (a.num_splits == 1) {
          store_slice<T, DB, ALIGNED>(static_cast<T*>(a.grad_query) + r * dk, dk, j, dq[qi]);
        } else {
          store_slice_f32<T, DB>(a.part_dq + (split * rows + r) * dk, dk, j, dq[qi]);
        }
      }
    }
  }
}

// Sums the split partials of grad_query in split order (deterministic); one thread per element.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    attention_pool_bwd_dq_reduce_kernel(const float* __restrict__ part, int64_t splits,
                                        int64_t elems, T* __restrict__ grad_query) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < elems; i += stride) {
    float x = 0.f;
    for (int64_t s = 0; s < splits; ++s) x += part[s * elems + i];
    grad_query[i] = from_float<T>(x);
  }
}

bool dq_aligned(const PoolProblem& p, const BwdInputs& in, const void* grad_query) {
  const int64_t vec = 16 / elem_bytes(p.dtype);
  const int64_t strides[] = {p.q_sb,  p.q_sn,  p.q_sh,  p.k_sb,  p.k_sl,  p.k_sh,
                             p.v_sb,  p.v_sl,  p.v_sh,  in.go_sb, in.go_sn, in.go_sh};
  for (int64_t s : strides) {
    if (s % vec != 0) return false;
  }
  return p.Dk % vec == 0 && p.Dv % vec == 0 && aligned16(p.query) && aligned16(p.key) &&
         aligned16(p.value) && aligned16(in.grad_out) && aligned16(grad_query);
}

}  // namespace

cudaError_t launch_bwd_dq(const PoolProblem& p, const BwdInputs& in, const BwdPlan& plan,
                          void* grad_query, const BwdScratch& ws, cudaStream_t stream) {
  const int64_t rows = p.B * p.N * p.H;
  const int qg = dq_query_group(p.N);
  DqKernelArgs a;
  a.p = p;
  a.in = in;
  a.grad_query = grad_query;
  a.num_splits = plan.dq_splits > 1 ? plan.dq_splits : 1;
  a.split_block = plan.dq_split_block > 0 ? plan.dq_split_block : 64;
  a.part_dq = a.num_splits > 1 ? ws.part_dq : nullptr;
  a.part_stats = ws.part_stats;
  a.anchors = ws.anchors;
  a.num_qgroups = ceil_div(p.N, qg);
  a.total_warps = p.B * p.H * a.num_qgroups * a.num_splits;
  const unsigned blocks = grid_blocks(a.total_warps);
  const bool aligned = dq_aligned(p, in, grad_query);

  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_bucket(head_bucket(p.Dk, p.Dv), [&](auto bucket) {
      constexpr int DB = decltype(bucket)::value;
      dispatch_bool(aligned, [&](auto al) {
        constexpr bool AL = decltype(al)::value;
        if (qg == 1) {
          attention_pool_bwd_dq_kernel<T, DB, AL, 1><<<blocks, kThreads, 0, stream>>>(a);
        } else {
          attention_pool_bwd_dq_kernel<T, DB, AL, 2><<<blocks, kThreads, 0, stream>>>(a);
        }
      });
    });
    if (a.num_splits > 1) {
      const int64_t elems = rows * p.Dk;
      int64_t nblocks = ceil_div(elems, kThreads);
      if (nblocks > kMaxBlocks) nblocks = kMaxBlocks;
      attention_pool_bwd_dq_reduce_kernel<T>
          <<<static_cast<unsigned>(nblocks), kThreads, 0, stream>>>(
              a.part_dq, a.num_splits, elems, static_cast<T*>(grad_query));
    }
  });
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace cuda
}  // namespace attnkern
