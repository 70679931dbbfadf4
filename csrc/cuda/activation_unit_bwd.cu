// Backward kernel of activation-unit pooling: one block per group of rows (rows blockIdx.x,
// blockIdx.x + gridDim.x, ...), so that the weight gradients accumulate per block and only
// gridDim.x partials are summed at the end (in a fixed order by the caller: deterministic).
//
// Per key tile (K and V staged once in shared memory) the block loops over the row's queries
// and recomputes the MLP (nothing [B, L, units] is saved by the forward): scores, pooling
// weights w and ds = dL/ds (raw: dO.v; softmax: p (dO.v - delta)), then back through the
// hidden layers and the first-layer split:
//   dM_q = dz1^T K, dc_q = sum_l dz1, dK += dz1 M_q,
//   dWa += dc q^T, dWb += dM, dWc += dc q^T - dM, dWd += dM diag(q), db1 += dc,
//   dq = (Wa + Wc)^T dc + sum_h dM * Wd.
// dK/dV of the tile are complete after the query loop and written once. Every accumulator has a
// fixed owner thread (the same index mapping on every pass), so the read-modify-writes of the
// block-private partials and of dq need no atomics and give the same bits on every run.
#include "activation_unit_common.cuh"

#include <cmath>

namespace attnkern {
namespace cuda {
namespace detail {
namespace {

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) au_bwd_kernel(const AuProblem p, const AuBwdInputs in,
                                                          float* dq32, void* grad_key,
                                                          void* grad_value, const AuBwdScratch g,
                                                          int tl, bool m_smem) {
  extern __shared__ float4 au_bwd_smem[];
  AuBwdSmem s;
  au_bwd_layout(p, tl, m_smem, reinterpret_cast<float*>(au_bwd_smem), &s);
  const bool two = p.H2 > 0;
  const int64_t H1 = p.H1, H2 = p.H2, E = p.E, Dv = p.Dv, HL = au_hlast(p);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int64_t blk = blockIdx.x;

  // Phase 0: stage the query-independent parameters; zero the block's small accumulators.
  au_stage_act<T>(p, p.act1, H1, s.a1);
  if (two) {
    au_stage_act<T>(p, p.act2, H2, s.a2);
    for (int64_t o = threadIdx.x; o < H2; o += blockDim.x) s.b2[o] = au_ld<T>(p.b2, o);
  }
  for (int64_t j = threadIdx.x; j < HL; j += blockDim.x) s.wo[j] = au_ld<T>(p.w_out, j);
  for (int64_t i = threadIdx.x; i < 3 * H1; i += blockDim.x) s.g_a1[i] = 0.f;
  for (int64_t i = threadIdx.x; i < 3 * (two ? H2 : 1); i += blockDim.x) s.g_a2[i] = 0.f;
  for (int64_t i = threadIdx.x; i < (two ? H2 : 1); i += blockDim.x) s.g_b2[i] = 0.f;
  for (int64_t i = threadIdx.x; i < HL; i += blockDim.x) s.g_wo[i] = 0.f;
  for (int64_t i = threadIdx.x; i < H1; i += blockDim.x) s.g_c[i] = 0.f;
  if (threadIdx.x == 0) s.g_bo[0] = 0.f;
  const float bout = au_ld<T>(p.b_out, 0);
  const T* key = static_cast<const T*>(p.key);
  const T* value = static_cast<const T*>(p.value);
  const T* gout = static_cast<const T*>(in.grad_out);
  T* dkey = static_cast<T*>(grad_key);
  T* dval = static_cast<T*>(grad_value);
  float* p_dm = g.dm + blk * H1 * E;
  float* p_dmq = g.dmq + blk * H1 * E;
  float* p_dcq = g.dcq + blk * H1 * E;
  float* p_dw2 = two ? g.dw2 + blk * H2 * H1 : nullptr;

  for (int64_t b = blockIdx.x; b < p.B; b += gridDim.x) {
    const RowRange rr = row_range(p.rows, b, p.L);
    // dK/dV rows of this row: contiguous outputs, padded [B, L, D] or jagged [T, D].
    const int64_t out_row0 = (p.rows.mode == RowMode::kJagged ? 0 : b * p.L) + rr.start;
    for (int64_t t0 = 0; t0 < rr.len; t0 += tl) {
      __syncthreads();  // the previous tile is done with the shared buffers
      // Phase 1: the tile's K/V (once for all queries) and zeroed dK/dV tiles.
      au_valid_flags(p, b, rr.len, t0, tl, s.valid);
      for (int64_t i = threadIdx.x; i < tl * E; i += blockDim.x) s.dk[i] = 0.f;
      for (int64_t i = threadIdx.x; i < tl * Dv; i += blockDim.x) s.dv[i] = 0.f;
      __syncthreads();
      au_load_tile<T, VEC>(key + b * p.k_sb, p.k_sl, rr.start, t0, tl, E, s.valid, s.k);
      au_load_tile<T, 1>(value + b * p.v_sb, p.v_sl, rr.start, t0, tl, Dv, s.valid, s.v);

      for (int64_t n = 0; n < p.N; ++n) {
        __syncthreads();
        // Phase 2: recompute this query's MLP on the tile.
        const T* go = gout + b * in.go_sb + n * in.go_sn;
        for (int64_t d = threadIdx.x; d < Dv; d += blockDim.x) s.dout[d] = to_float<T>(go[d]);
        au_first_layer<T>(p, b, n, s.q, s.c, s.m, m_smem);  // ends with a barrier
        au_layer1<T>(p, tl, s.k, s.valid, s.q, s.c, s.m, m_smem, s.a1, s.z1, s.h1);
        __syncthreads();
        const float* hl = s.h1;
        if (two) {
          au_layer2<T>(p, tl, s.h1, s.b2, s.a2, s.z2, s.h2);
          __syncthreads();
          hl = s.h2;
        }

        // Phase 3: pooling weight w and ds = dL/ds per position (a warp per position). An
        // empty row never gets here; lse = -inf cannot meet a valid position.
        const int64_t row_n = b * p.N + n;
        const float lse = p.softmax ? in.lse[row_n] : 0.f;
        const float delta = p.softmax ? in.delta[row_n] : 0.f;
        for (int64_t l = warp; l < tl; l += nwarps) {
          const float sc = au_score_warp(p, hl, l, s.wo, bout);
          float dw = 0.f;
          for (int64_t d = lane; d < Dv; d += 32) dw += s.v[l * Dv + d] * s.dout[d];
          dw = group_sum<32>(dw);
          if (lane == 0) {
            float w = 0.f, ds = 0.f;
            if (s.valid[l] != 0.f) {
              if (p.softmax) {
                w = expf(sc - lse);
                ds = w * (dw - delta);
              } else {
                w = sc;
                ds = dw;
              }
            }
            s.w[l] = w;
            s.ds[l] = ds;
          }
        }
        __syncthreads();

        // Phase 4: dV, the output layer and the last hidden layer's activation (a thread per
        // unit, looping over the tile's positions: the parameter gradients need no reduction).
        for (int64_t i = threadIdx.x; i < tl * Dv; i += blockDim.x) {
          s.dv[i] += s.w[i / Dv] * s.dout[i % Dv];
        }
        if (threadIdx.x == 0) {
          float acc = 0.f;
          for (int l = 0; l < tl; ++l) acc += s.ds[l];
          s.g_bo[0] += acc;
        }
        if (two) {
          for (int64_t o = threadIdx.x; o < H2; o += blockDim.x) {
            float gwo = 0.f, gb = 0.f, g0 = 0.f, g1 = 0.f, g2 = 0.f;
            for (int l = 0; l < tl; ++l) {
              const float ds = s.ds[l];
              gwo += ds * s.h2[l * H2 + o];
              const float dz = au_act_bwd(p.act, s.z2[l * H2 + o], ds * s.wo[o], s.a2, H2, o,
                                          g0, g1, g2);
              s.z2[l * H2 + o] = dz;  // z2 is not needed any more: it now holds dz2
              gb += dz;
            }
            s.g_wo[o] += gwo;
            s.g_b2[o] += gb;
            s.g_a2[o] += g0;
            s.g_a2[H2 + o] += g1;
            s.g_a2[2 * H2 + o] += g2;
          }
          __syncthreads();
          // dW2 (block-private partial, fixed owner per element) and dh1 = dz2 W2.
          for (int64_t i = threadIdx.x; i < H2 * H1; i += blockDim.x) {
            const int64_t o = i / H1, h = i % H1;
            float acc = 0.f;
            for (int l = 0; l < tl; ++l) acc += s.z2[l * H2 + o] * s.h1[l * H1 + h];
            p_dw2[i] += acc;
          }
          for (int64_t i = threadIdx.x; i < tl * H1; i += blockDim.x) {
            const int64_t l = i / H1, h = i % H1;
            float acc = 0.f;
            for (int64_t o = 0; o < H2; ++o) acc += s.z2[l * H2 + o] * au_ld<T>(p.w2, o * H1 + h);
            s.dh[i] = acc;
          }
          __syncthreads();
        }
        // The first hidden layer's activation: dz1 (into s.dh), its parameters and dc_q.
        for (int64_t h = threadIdx.x; h < H1; h += blockDim.x) {
          float gwo = 0.f, dc = 0.f, g0 = 0.f, g1 = 0.f, g2 = 0.f;
          for (int l = 0; l < tl; ++l) {
            float dh;
            if (two) {
              dh = s.dh[l * H1 + h];
            } else {
              gwo += s.ds[l] * s.h1[l * H1 + h];
              dh = s.ds[l] * s.wo[h];
            }
            const float dz = au_act_bwd(p.act, s.z1[l * H1 + h], dh, s.a1, H1, h, g0, g1, g2);
            s.dh[l * H1 + h] = dz;
            dc += dz;
          }
          if (!two) s.g_wo[h] += gwo;
          s.dc[h] = dc;
          s.g_c[h] += dc;
          s.g_a1[h] += g0;
          s.g_a1[H1 + h] += g1;
          s.g_a1[2 * H1 + h] += g2;
        }
        __syncthreads();

        // Phase 5: through the first-layer split. A thread per feature e loops over the units
        // (dM column e, the W1 partials, dq_e); then dK += dz1 M_q.
        for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
          const float qe = s.q[e];
          float dq = 0.f;
          for (int64_t h = 0; h < H1; ++h) {
            float dm = 0.f;
            for (int l = 0; l < tl; ++l) dm += s.dh[l * H1 + h] * s.k[l * E + e];
            const float dc = s.dc[h];
            const int64_t r = h * 4 * E;
            p_dm[h * E + e] += dm;
            p_dmq[h * E + e] += dm * qe;
            p_dcq[h * E + e] += dc * qe;
            dq += (au_ld<T>(p.w1, r + e) + au_ld<T>(p.w1, r + 2 * E + e)) * dc +
                  dm * au_ld<T>(p.w1, r + 3 * E + e);
          }
          dq32[row_n * E + e] += dq;
        }
        for (int64_t i = threadIdx.x; i < tl * E; i += blockDim.x) {
          const int64_t l = i / E, e = i % E;
          float acc = 0.f;
          for (int64_t h = 0; h < H1; ++h) {
            acc += s.dh[l * H1 + h] * au_m<T>(p, s.m, s.q, m_smem, h, e);
          }
          s.dk[i] += acc;
        }
      }
      __syncthreads();
      // Phase 6: the tile's dK/dV, written once at its valid positions.
      for (int64_t i = threadIdx.x; i < tl * E; i += blockDim.x) {
        const int64_t l = i / E, e = i % E;
        // Shared keys/values (Dv = E): one gradient holding both contributions.
        const float g_kv = in.shared_value ? s.dk[i] + s.dv[i] : s.dk[i];
        if (s.valid[l] != 0.f) dkey[(out_row0 + t0 + l) * E + e] = from_float<T>(g_kv);
      }
      for (int64_t i = threadIdx.x; i < (in.shared_value ? 0 : tl * Dv); i += blockDim.x) {
        const int64_t l = i / Dv, d = i % Dv;
        if (s.valid[l] != 0.f) dval[(out_row0 + t0 + l) * Dv + d] = from_float<T>(s.dv[i]);
      }
    }
  }

  // Phase 7: the block's small partials.
  __syncthreads();
  for (int64_t i = threadIdx.x; i < 3 * H1; i += blockDim.x) g.da1[blk * 3 * H1 + i] = s.g_a1[i];
  for (int64_t i = threadIdx.x; i < H1; i += blockDim.x) g.dc[blk * H1 + i] = s.g_c[i];
  for (int64_t i = threadIdx.x; i < HL; i += blockDim.x) g.dwo[blk * HL + i] = s.g_wo[i];
  if (two) {
    for (int64_t i = threadIdx.x; i < 3 * H2; i += blockDim.x) g.da2[blk * 3 * H2 + i] = s.g_a2[i];
    for (int64_t i = threadIdx.x; i < H2; i += blockDim.x) g.db2[blk * H2 + i] = s.g_b2[i];
  }
  if (threadIdx.x == 0) g.dbo[blk] = s.g_bo[0];
}

}  // namespace
}  // namespace detail

int64_t au_bwd_blocks(const AuProblem& p, int num_sms) {
  // Two blocks per SM keep the partial buffers small; each block takes B / blocks rows.
  int64_t blocks = int64_t(num_sms > 0 ? num_sms : 1) * 2;
  if (blocks > p.B) blocks = p.B;
  return blocks < 1 ? 1 : blocks;
}

cudaError_t launch_au_bwd(const AuProblem& p, const AuBwdInputs& in, float* grad_query32,
                          void* grad_key, void* grad_value, const AuBwdScratch& s, int64_t blocks,
                          int64_t max_smem, cudaStream_t stream) {
  using namespace detail;
  if (p.B == 0 || p.N == 0) return cudaSuccess;
  AuLaunch l;
  auto floats = [&](int t, bool ms) { return au_bwd_layout(p, t, ms, nullptr, nullptr); };
  if (!au_launch_plan(floats, max_smem, &l)) return cudaErrorInvalidConfiguration;
  cudaError_t err = cudaSuccess;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    decltype(&au_bwd_kernel<T, 1>) kernel = nullptr;
    err = au_pick_kernel<T>(p, l, &au_bwd_kernel<T, 16 / int(sizeof(T))>, &au_bwd_kernel<T, 1>,
                            &kernel);
    if (err != cudaSuccess) return;
    kernel<<<static_cast<unsigned>(blocks), kThreads, l.bytes, stream>>>(
        p, in, grad_query32, grad_key, grad_value, s, l.tl, l.m_smem);
    err = cudaGetLastError();
  });
  return err;
}

}  // namespace cuda
}  // namespace attnkern
