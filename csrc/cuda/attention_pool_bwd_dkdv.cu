// Backward, pass 3 of 3: grad_key and grad_value, and the backward entry point.
//
// One warp per (row, head, tile slot). A tile is KPS * KG consecutive key positions: each key
// group holds KG keys (K and V slices, dk/dv accumulators) in registers and loops over the
// row's N queries, recomputing p = e^((s - a) - c), s = scale * q.k (natural units, logit_of:
// the same logits as the forward's and the dq pass's, computed the same way), from the anchors
// (a, c) the dq pass stored, and
//   dv_l += p dO,   dk_l += p (dO . v_l - delta) q   (times scale at the end).
// Each valid key position belongs to exactly one warp, which writes it once: no atomics, so
// the result is deterministic; positions that take part in no row are never written and stay
// at the caller's zeros. A slot walks the tiles slot, slot + slots, ... so rows longer than
// the launch estimate (jagged without max_length) are still covered.
// With a score bias, each logit's gradient (ds) is added to the bias-gradient accumulator of
// its (row, query % Nb, head, position) by the key group that owns the position, in query
// order; a bias shared by the heads makes each warp take every head of its tile slot, so that
// entry still has one owner.
#include "attention_pool_common.cuh"

#include <cmath>

namespace attnkern {
namespace cuda {
namespace detail {
namespace {

struct DkdvKernelArgs {
  PoolProblem p;
  BwdInputs in;
  const float* anchors;  // [2, B * N * H]: a, then c (the dq pass's)
  void* grad_key;        // contiguous, shaped like key
  void* grad_value;      // contiguous, shaped like value
  int64_t gk_sb, gk_sl, gk_sh;
  int64_t gv_sb, gv_sl, gv_sh;
  int64_t slots;
  int64_t heads_per_warp;  // 1, or H when the bias gradient sums over the heads
  int64_t total_warps;
};

template <typename T, int DB, bool ALIGNED>
// 3 blocks/SM (<= 168 registers): the two keys' K, V, dK, dV slices per lane do not fit 128
// without spilling.
__global__ void __launch_bounds__(kThreads, 3)
    attention_pool_bwd_dkdv_kernel(const DkdvKernelArgs a) {
  using LN = Lanes<T, DB>;
  constexpr int LPK = LN::LPK;
  constexpr int KPS = LN::KPS;
  constexpr int EPL = LN::EPL;
  constexpr int KG = kDkdvKeysPerGroup;
  constexpr int TILE = KPS * KG;

  const PoolProblem& p = a.p;
  const WarpLanes wl = warp_lanes<LPK>(p);

  for (int64_t w = first_warp(); w < a.total_warps; w += warp_stride()) {
    // Items (row, head group, tile slot), the slot innermost (as warp_item, no splits).
    const int64_t slot = w % a.slots;
    const int64_t hgroups = p.H / a.heads_per_warp;
    const int64_t h0 = (w / a.slots) % hgroups * a.heads_per_warp;
    const int64_t b = w / a.slots / hgroups;
    for (int64_t h = h0; h < h0 + a.heads_per_warp; ++h) {
      const RowSpan<T> row = row_span<T>(p, b, h);
      const int64_t kpos0 = row.rr.start;  // jagged: key row of position 0

      for (int64_t tile = slot * TILE; tile < row.rr.len; tile += a.slots * TILE) {
        const KeyTile<T, DB, ALIGNED, KG, true> t(p, wl, b, row, tile, row.rr.len);
        float gk[KG][EPL];
        float gv[KG][EPL];
#pragma unroll
        for (int u = 0; u < KG; ++u) {
#pragma unroll
          for (int e = 0; e < EPL; ++e) {
            gk[u][e] = 0.f;
            gv[u][e] = 0.f;
          }
        }

        // The N loop is uniform over the warp (shuffles inside).
        for (int64_t n = 0; n < p.N; ++n) {
          float q[EPL];
          float go[EPL];
          load_slice<T, DB, ALIGNED>(query_row<T>(p, b, n, h), wl.dk, wl.j, q);
          load_slice<T, DB, ALIGNED>(grad_out_row<T>(a.in, b, n, h), wl.dv, wl.j, go);
          const int64_t r = query_index(p, b, n, h);
          const float anc_a = a.anchors[r];
          const float anc_c = a.anchors[wl.rows + r];
          const float delta = a.in.delta[r];
#pragma unroll
          for (int u = 0; u < KG; ++u) {
            const BwdProb pb = bwd_prob<LPK, EPL>(q, go, t.k[u], t.v[u], t.ok[u], anc_a, anc_c,
                                                  delta, p.scale, t.bias(p, b, n, h, u));
#pragma unroll
            for (int e = 0; e < EPL; ++e) {
              gv[u][e] = fmaf(pb.pr, go[e], gv[u][e]);
              gk[u][e] = fmaf(pb.ds, q[e], gk[u][e]);
            }
            // Every lane of the key group holds the same ds; its lane 0 adds it.
            if (a.in.grad_bias != nullptr && t.ok[u] && wl.j == 0) {
              a.in.grad_bias[b * a.in.gb_sb + (n % p.bias_nb) * a.in.gb_sn + h * a.in.gb_sh +
                             (t.key_row0 + u * KPS) * a.in.gb_sl] += pb.ds;
            }
          }
        }

        // dk = scale * sum ds q (q unscaled in the loop, as the logits need it).
#pragma unroll
        for (int u = 0; u < KG; ++u) {
          if (!t.ok[u]) continue;
          const int64_t pos = tile + u * KPS + wl.g;
#pragma unroll
          for (int e = 0; e < EPL; ++e) gk[u][e] *= p.scale;
          store_slice<T, DB, ALIGNED>(
              static_cast<T*>(a.grad_key) + b * a.gk_sb + (kpos0 + pos) * a.gk_sl + h * a.gk_sh,
              wl.dk, wl.j, gk[u]);
          store_slice<T, DB, ALIGNED>(
              static_cast<T*>(a.grad_value) + b * a.gv_sb + (kpos0 + pos) * a.gv_sl + h * a.gv_sh,
              wl.dv, wl.j, gv[u]);
        }
      }
    }
  }
}

int dkdv_tile(const PoolProblem& p) {
  const LaneLayout lay = lane_layout(elem_bytes(p.dtype), head_bucket(p.Dk, p.Dv));
  return lay.kps * kDkdvKeysPerGroup;
}

}  // namespace

cudaError_t launch_bwd_dkdv(const PoolProblem& p, const BwdInputs& in, const BwdPlan& plan,
                            const float* anchors, void* grad_key, void* grad_value,
                            cudaStream_t stream) {
  DkdvKernelArgs a;
  a.p = p;
  a.in = in;
  a.anchors = anchors;
  a.grad_key = grad_key;
  a.grad_value = grad_value;
  // grad_key / grad_value are contiguous: padded [B, L, H, D], jagged [T, H, D].
  const bool jagged = p.rows.mode == RowMode::kJagged;
  a.gk_sh = p.Dk;
  a.gk_sl = p.H * p.Dk;
  a.gk_sb = jagged ? 0 : p.L * p.H * p.Dk;
  a.gv_sh = p.Dv;
  a.gv_sl = p.H * p.Dv;
  a.gv_sb = jagged ? 0 : p.L * p.H * p.Dv;
  a.slots = plan.kv_tile_slots > 0 ? plan.kv_tile_slots : 1;
  a.heads_per_warp = (in.grad_bias != nullptr && in.gb_sh == 0) ? p.H : 1;
  a.total_warps = p.B * (p.H / a.heads_per_warp) * a.slots;
  const unsigned blocks = grid_blocks(a.total_warps);
  const bool aligned = bwd_aligned(p, in, grad_key, grad_value);

  // No query groups: every warp loops over all N queries.
  dispatch_row_kernel<1>(p, aligned, 1, [&](auto tag, auto db, auto al, auto) {
    attention_pool_bwd_dkdv_kernel<typename decltype(tag)::type, decltype(db)::value,
                                   decltype(al)::value><<<blocks, kThreads, 0, stream>>>(a);
  });
  return cudaGetLastError();
}

}  // namespace detail

BwdPlan plan_bwd(const PoolProblem& p, int num_sms) {
  using namespace detail;
  BwdPlan plan;
  plan_splits(p, dq_query_group(p.N), num_sms, &plan.dq_splits, &plan.dq_split_block);
  const int64_t lmax = longest_row_estimate(p);
  // Enough warps to fill the GPU twice over, no more: a slot past its row's end costs a launch
  // and a length read, so padded batches of short rows in a long L must not get L / TILE slots.
  const int64_t target = int64_t(num_sms > 0 ? num_sms : 1) * 128;
  const int64_t heads = p.B * p.H > 0 ? p.B * p.H : 1;
  int64_t slots = ceil_div(lmax, dkdv_tile(p));
  const int64_t fill = ceil_div(target, heads);
  if (slots > fill) slots = fill;
  plan.kv_tile_slots = slots > 0 ? slots : 1;
  return plan;
}

namespace {

// The scratch layout (detail::BwdScratch) in floats from `base`, and its size: one function for
// the size and the carving, so the two cannot disagree.
int64_t bwd_scratch_layout(const PoolProblem& p, const BwdPlan& plan, float* base,
                           detail::BwdScratch* ws) {
  const int64_t rows = p.B * p.N * p.H;
  const int64_t splits = plan.dq_splits > 1 ? plan.dq_splits : 1;
  const int64_t anchors = 0;
  const int64_t part_stats = anchors + 2 * rows;
  const int64_t part_dq = part_stats + 2 * splits * rows;
  const int64_t total = part_dq + (splits > 1 ? splits * rows * p.Dk : 0);
  if (ws != nullptr) {
    ws->anchors = base + anchors;
    ws->part_stats = base + part_stats;
    ws->part_dq = splits > 1 ? base + part_dq : nullptr;
  }
  return total;
}

}  // namespace

int64_t bwd_scratch_floats(const PoolProblem& p, const BwdPlan& plan) {
  return bwd_scratch_layout(p, plan, nullptr, nullptr);
}

cudaError_t launch_bwd(const PoolProblem& p, const BwdInputs& in, const BwdPlan& plan,
                       void* grad_query, void* grad_key, void* grad_value, float* scratch,
                       cudaStream_t stream) {
  if (p.B == 0 || p.N == 0 || p.H == 0) return cudaSuccess;
  detail::BwdScratch ws;
  bwd_scratch_layout(p, plan, scratch, &ws);
  // In stream order: the stats pass, then dq (which stores the anchors), then dk/dv.
  cudaError_t err = detail::launch_bwd_stats(p, in, plan, ws.part_stats, stream);
  if (err != cudaSuccess) return err;
  err = detail::launch_bwd_dq(p, in, plan, grad_query, ws, stream);
  if (err != cudaSuccess) return err;
  if (p.L == 0) return cudaSuccess;  // no key positions: grad_key / grad_value stay zero
  return detail::launch_bwd_dkdv(p, in, plan, ws.anchors, grad_key, grad_value, stream);
}

}  // namespace cuda
}  // namespace attnkern
