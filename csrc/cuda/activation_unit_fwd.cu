// Forward kernel of activation-unit pooling: one block per (row, query).
//
// The block builds c_q and M_q once (the first-layer split), then streams the row's valid keys
// in tiles of TL positions: the key tile is staged in shared memory with 16-byte loads, the
// first hidden layer of the tile is the [TL, H1] product of the tile with M_q^T (each thread a
// few (position, unit) pairs), the optional second layer a [TL, H2] product with W2^T, and the
// scores warp-wide dots with w_out. Raw weights add s_l v_l; softmax keeps an fp32 online
// softmax in the log2 domain, computed redundantly (and identically) by every thread so that no
// extra barrier is needed. Each thread owns Dv elements d = tid, tid + kThreads of the output.
#include "activation_unit_common.cuh"

#include <cmath>

namespace attnkern {
namespace cuda {
namespace detail {
namespace {

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) au_fwd_kernel(const AuProblem p, float* out,
                                                          float* lse, int tl, bool m_smem,
                                                          const AuScores sc) {
  extern __shared__ float4 au_fwd_smem[];
  AuFwdSmem s;
  au_fwd_layout(p, tl, m_smem, reinterpret_cast<float*>(au_fwd_smem), &s);
  const bool two = p.H2 > 0;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;

  // Phase 0: the query-independent parameters, staged once per block.
  au_stage_act<T>(p, p.act1, p.H1, s.a1);
  if (two) {
    au_stage_act<T>(p, p.act2, p.H2, s.a2);
    for (int64_t o = threadIdx.x; o < p.H2; o += blockDim.x) s.b2[o] = au_ld<T>(p.b2, o);
  }
  for (int64_t j = threadIdx.x; j < au_hlast(p); j += blockDim.x) s.wo[j] = au_ld<T>(p.w_out, j);
  const float bout = au_ld<T>(p.b_out, 0);
  const T* key = static_cast<const T*>(p.key);
  const T* value = static_cast<const T*>(p.value);

  for (int64_t item = blockIdx.x; item < p.B * p.N; item += gridDim.x) {
    const int64_t b = item / p.N, n = item % p.N;
    const RowRange rr = row_range(p.rows, b, p.L);
    __syncthreads();  // the previous item is done with the shared buffers
    // Phase 1: this query's c_q and M_q.
    au_first_layer<T>(p, b, n, s.q, s.c, s.m, m_smem);

    float m_run = -INFINITY, l_run = 0.f;
    float acc[kAuMaxDvPerThread];
#pragma unroll
    for (int i = 0; i < kAuMaxDvPerThread; ++i) acc[i] = 0.f;

    const T* kbase = key + b * p.k_sb;
    const T* vbase = value + b * p.v_sb + rr.start * p.v_sl;
    // Phase 2: the row's key tiles.
    for (int64_t t0 = 0; t0 < rr.len; t0 += tl) {
      au_valid_flags(p, b, rr.len, t0, tl, s.valid);
      __syncthreads();
      au_load_tile<T, VEC>(kbase, p.k_sl, rr.start, t0, tl, p.E, s.valid, s.k);
      __syncthreads();
      au_layer1<T>(p, tl, s.k, s.valid, s.q, s.c, s.m, m_smem, s.a1, nullptr, s.z1);
      __syncthreads();
      const float* hl = s.z1;
      if (two) {
        au_layer2<T>(p, tl, s.z1, s.b2, s.a2, nullptr, s.z2);
        __syncthreads();
        hl = s.z2;
      }
      for (int64_t l = warp; l < tl; l += nwarps) {
        const float sc = au_score_warp(p, hl, l, s.wo, bout);
        if (lane == 0) s.s[l] = sc;
      }
      __syncthreads();
      if (sc.ptr != nullptr) {
        float* srow = sc.ptr + b * sc.sb + n * sc.sn + (rr.start + t0) * sc.sl;
        for (int l = threadIdx.x; l < tl; l += blockDim.x)
          if (s.valid[l] != 0.f) srow[l * sc.sl] = s.s[l];
      }

      // Phase 3: pool the tile's values (read straight from global memory, coalesced over d).
      if (p.softmax) {
        float tmax = -INFINITY;
        for (int l = 0; l < tl; ++l) {
          if (s.valid[l] != 0.f) tmax = fmaxf(tmax, s.s[l] * kLog2e);
        }
        const float m_new = fmaxf(m_run, tmax);
        // An all-masked prefix keeps m = -inf; shifting by 0 keeps exp2 free of NaN.
        const float shift = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = exp2f(m_run - shift);
        l_run *= alpha;
#pragma unroll
        for (int i = 0; i < kAuMaxDvPerThread; ++i) acc[i] *= alpha;
        for (int l = 0; l < tl; ++l) {
          if (s.valid[l] == 0.f) continue;
          const float pl = exp2f(s.s[l] * kLog2e - shift);
          l_run += pl;
          const T* vr = vbase + (t0 + l) * p.v_sl;
#pragma unroll
          for (int i = 0; i < kAuMaxDvPerThread; ++i) {
            const int64_t d = threadIdx.x + int64_t(i) * blockDim.x;
            if (d < p.Dv) acc[i] += pl * to_float<T>(vr[d]);
          }
        }
        m_run = m_new;
      } else {
        for (int l = 0; l < tl; ++l) {
          if (s.valid[l] == 0.f) continue;
          const float w = s.s[l];
          const T* vr = vbase + (t0 + l) * p.v_sl;
#pragma unroll
          for (int i = 0; i < kAuMaxDvPerThread; ++i) {
            const int64_t d = threadIdx.x + int64_t(i) * blockDim.x;
            if (d < p.Dv) acc[i] += w * to_float<T>(vr[d]);
          }
        }
      }
      __syncthreads();  // s.valid / s.s are rewritten by the next tile
    }

    // Phase 4: normalise and store; an empty row gives out = 0 (lse = -inf with softmax). A NaN
    // sum (a non-finite value at a valid position) is not empty: it propagates.
    float inv = 1.f, row_lse = 0.f;
    if (p.softmax) {
      const bool nonempty = l_run != 0.f;
      inv = nonempty ? 1.f / l_run : 0.f;
      row_lse = nonempty ? (m_run + log2f(l_run)) * kLn2 : -INFINITY;
    }
    float* o = out + item * p.Dv;
#pragma unroll
    for (int i = 0; i < kAuMaxDvPerThread; ++i) {
      const int64_t d = threadIdx.x + int64_t(i) * blockDim.x;
      if (d < p.Dv) o[d] = acc[i] * inv;
    }
    if (threadIdx.x == 0) lse[item] = row_lse;
    if (sc.ptr != nullptr && p.softmax) {
      // Phase 5 (scores with softmax): the row's written scores become their weights. The
      // barrier makes every thread's stores of phase 2 visible to the whole block.
      __syncthreads();
      const float shift = m_run == -INFINITY ? 0.f : m_run;
      float* srow = sc.ptr + b * sc.sb + n * sc.sn + rr.start * sc.sl;
      for (int64_t pos = threadIdx.x; pos < rr.len; pos += blockDim.x) {
        if (!position_valid(p.rows, b, pos)) continue;
        float& x = srow[pos * sc.sl];
        x = inv != 0.f ? exp2f(x * kLog2e - shift) * inv : 0.f;
      }
    }
  }
}

}  // namespace
}  // namespace detail

cudaError_t launch_au_fwd(const AuProblem& p, float* out, float* lse, int64_t max_smem,
                          int num_sms, cudaStream_t stream, const AuScores& scores) {
  using namespace detail;
  if (p.B * p.N == 0) return cudaSuccess;
  AuLaunch l;
  auto floats = [&](int t, bool ms) { return au_fwd_layout(p, t, ms, nullptr, nullptr); };
  if (!au_launch_plan(floats, max_smem, &l)) return cudaErrorInvalidConfiguration;
  // Enough blocks to fill the GPU several times over; the kernel strides over the rest.
  int64_t blocks = p.B * p.N;
  const int64_t cap = int64_t(num_sms > 0 ? num_sms : 1) * 64;
  if (blocks > cap) blocks = cap;
  cudaError_t err = cudaSuccess;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    decltype(&au_fwd_kernel<T, 1>) kernel = nullptr;
    err = au_pick_kernel<T>(p, l, &au_fwd_kernel<T, 16 / int(sizeof(T))>, &au_fwd_kernel<T, 1>,
                            &kernel);
    if (err != cudaSuccess) return;
    kernel<<<static_cast<unsigned>(blocks), kThreads, l.bytes, stream>>>(p, out, lse, l.tl,
                                                                          l.m_smem, scores);
    err = cudaGetLastError();
  });
  return err;
}

}  // namespace cuda
}  // namespace attnkern
