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
  SplitWork work;
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
  const WarpLanes wl = warp_lanes<LPK>(p);

  for (int64_t w = first_warp(); w < a.work.total_warps; w += warp_stride()) {
    const auto [b, h, split, qgrp] = warp_item(p, w, a.work.num_qgroups, a.work.num_splits);
    const RowSpan<T> row = row_span<T>(p, b, h);

    float q[QG][EPL];   // unscaled: the logits are scale * q.k
    float go[QG][EPL];  // grad_out
    float dq[QG][EPL];
    float anc_a[QG];  // the anchors (a, c), natural units: p = e^((s - a) - c)
    float anc_c[QG];
    float delta[QG];
    load_queries<T, DB, ALIGNED, QG>(p, wl, b, h, qgrp, q);
#pragma unroll
    for (int qi = 0; qi < QG; ++qi) {
      const int64_t n = qgrp * QG + qi;
      if (n < p.N) {
        load_slice<T, DB, ALIGNED>(grad_out_row<T>(a.in, b, n, h), wl.dv, wl.j, go[qi]);
        const int64_t r = query_index(p, b, n, h);
        const float2 an =
            query_anchors(a.in.lse, a.part_stats, a.work.num_splits, wl.rows, r);
        anc_a[qi] = an.x;
        anc_c[qi] = an.y;
        if (split == 0 && wl.lane == 0) {
          a.anchors[r] = anc_a[qi];
          a.anchors[wl.rows + r] = anc_c[qi];
        }
        delta[qi] = a.in.delta[r];
      } else {
#pragma unroll
        for (int e = 0; e < EPL; ++e) go[qi][e] = 0.f;
        anc_a[qi] = 0.f;
        anc_c[qi] = 0.f;
        delta[qi] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < EPL; ++e) dq[qi][e] = 0.f;
    }

    for (SplitKeys<KPS * U> it(a.work, split, row.rr.len); it.next();) {
      const KeyTile<T, DB, ALIGNED, U, true> t(p, wl, b, row, it.base, it.end);
#pragma unroll
      for (int qi = 0; qi < QG; ++qi) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const BwdProb pb =
              bwd_prob<LPK, EPL>(q[qi], go[qi], t.k[u], t.v[u], t.ok[u], anc_a[qi], anc_c[qi],
                                 delta[qi], p.scale, t.bias(p, b, qgrp * QG + qi, h, u));
#pragma unroll
          for (int e = 0; e < EPL; ++e) dq[qi][e] = fmaf(pb.ds, t.k[u][e], dq[qi][e]);
        }
      }
    }

    // Sum the key groups' partial dq (fixed butterfly order), then store.
#pragma unroll
    for (int qi = 0; qi < QG; ++qi) {
#pragma unroll
      for (int e = 0; e < EPL; ++e) dq[qi][e] = cross_group_sum<LPK>(dq[qi][e]) * p.scale;
    }
    if (wl.g == 0) {
      for_each_query<QG>(p, b, h, qgrp, [&](int qi, int64_t r) {
        if (a.work.num_splits == 1) {
          store_slice<T, DB, ALIGNED>(static_cast<T*>(a.grad_query) + r * wl.dk, wl.dk, wl.j,
                                      dq[qi]);
        } else {
          store_slice_f32<T, DB>(a.part_dq + (split * wl.rows + r) * wl.dk, wl.dk, wl.j, dq[qi]);
        }
      });
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

}  // namespace

cudaError_t launch_bwd_dq(const PoolProblem& p, const BwdInputs& in, const BwdPlan& plan,
                          void* grad_query, const BwdScratch& ws, cudaStream_t stream) {
  const int64_t rows = p.B * p.N * p.H;
  const int qg = dq_query_group(p.N);
  DqKernelArgs a;
  a.p = p;
  a.in = in;
  a.grad_query = grad_query;
  a.work = split_work(p, qg, plan.dq_splits, plan.dq_split_block);
  a.part_dq = a.work.num_splits > 1 ? ws.part_dq : nullptr;
  a.part_stats = ws.part_stats;
  a.anchors = ws.anchors;
  const unsigned blocks = grid_blocks(a.work.total_warps);
  const bool aligned = bwd_aligned(p, in, grad_query, nullptr);

  dispatch_row_kernel<2>(p, aligned, qg, [&](auto tag, auto db, auto al, auto qgc) {
    attention_pool_bwd_dq_kernel<typename decltype(tag)::type, decltype(db)::value,
                                 decltype(al)::value, decltype(qgc)::value>
        <<<blocks, kThreads, 0, stream>>>(a);
  });
  if (a.work.num_splits > 1) {
    dispatch_dtype(p.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      const int64_t elems = rows * p.Dk;
      int64_t nblocks = ceil_div(elems, kThreads);
      if (nblocks > kMaxBlocks) nblocks = kMaxBlocks;
      attention_pool_bwd_dq_reduce_kernel<T>
          <<<static_cast<unsigned>(nblocks), kThreads, 0, stream>>>(
              a.part_dq, a.work.num_splits, elems, static_cast<T*>(grad_query));
    });
  }
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace cuda
}  // namespace attnkern
