// Device helpers of the activation-unit kernels (forward and backward): shared-memory layout,
// activations, the per-query first layer (c_q, M_q), the key-tile loader and the MLP passes.
//
// A block of kThreads threads works on one (row, query) in the forward and on whole rows in the
// backward. Keys go through in tiles of TL positions staged in shared memory (fp32), so each
// valid key row is read from global memory once per tile and query block; the hidden
// activations of a tile ([TL, units]) live in shared memory, never in global memory.
#pragma once

#include "activation_unit_kernels.h"
#include "attention_pool_common.cuh"
#include "op_limits.h"

namespace attnkern {
namespace cuda {
namespace detail {

// Most value elements a thread owns in the forward's accumulator (Dv <= 256).
constexpr int kAuMaxDvPerThread = (kMaxUnits + kThreads - 1) / kThreads;
// Values (elements of dq) a thread owns in the backward's dq pass (E <= 256).
constexpr int kAuMaxEPerThread = (kMaxUnits + kThreads - 1) / kThreads;

__host__ __device__ inline int64_t au_pad4(int64_t n) { return (n + 3) / 4 * 4; }
__host__ __device__ inline int64_t au_hlast(const AuProblem& p) { return p.H2 > 0 ? p.H2 : p.H1; }
// Row stride of M_q in shared memory: E + 1 floats, so that threads of a warp reading the
// same column e of consecutive units h hit different banks.
__host__ __device__ inline int64_t au_m_stride(const AuProblem& p) { return p.E + 1; }

// Shared-memory carve-up (in floats, each piece 16-byte aligned). The host sizes the launch
// with the same function the kernel uses to find its pieces.
struct AuFwdSmem {
  float *q, *c, *a1, *a2, *b2, *wo, *m, *k, *z1, *z2, *s, *valid;
};

struct AuBwdSmem {
  float *q, *dout, *c, *dc, *a1, *a2, *b2, *wo, *m, *k, *v, *dk, *dv, *z1, *h1, *z2, *h2, *dh;
  float *w, *ds, *valid, *g_a1, *g_a2, *g_b2, *g_wo, *g_c, *g_bo;
};

// Carves the pieces off in order: take(&piece, n) points piece at the next n floats (padded to
// 16 bytes) of base; with no base it only counts, for the host's sizing.
struct AuSmemCarve {
  float* base;
  int64_t off = 0;
  __host__ __device__ void take(float** dst, int64_t n) {
    if (dst != nullptr && base != nullptr) *dst = base + off;
    off += au_pad4(n);
  }
};

// The pieces both directions stage the same way: the layers' activation parameters, the second
// layer's bias, the output weights and M_q (staged only with m_smem).
template <typename S>
__host__ __device__ inline void au_take_params(const AuProblem& p, bool m_smem, AuSmemCarve& c,
                                               S& s) {
  const int64_t h2 = p.H2 > 0 ? p.H2 : 1;
  c.take(&s.a1, 3 * p.H1);
  c.take(&s.a2, 3 * h2);
  c.take(&s.b2, h2);
  c.take(&s.wo, au_hlast(p));
  c.take(&s.m, m_smem ? p.H1 * au_m_stride(p) : 0);
}

// Runs fill(carve, pieces, h2) over base (h2: the second layer's width, 1 without one) and hands
// back the pieces (when out is given) and the floats they take.
template <typename S, typename F>
__host__ __device__ inline int64_t au_carve(const AuProblem& p, float* base, S* out, F&& fill) {
  AuSmemCarve c{base};
  S s{};
  fill(c, s, p.H2 > 0 ? p.H2 : int64_t(1));
  if (out != nullptr) *out = s;
  return c.off;
}

__host__ __device__ inline int64_t au_fwd_layout(const AuProblem& p, int tl, bool m_smem,
                                                 float* base, AuFwdSmem* out) {
  return au_carve(p, base, out, [&](AuSmemCarve& c, AuFwdSmem& s, int64_t h2) {
    c.take(&s.q, p.E);
    c.take(&s.c, p.H1);
    au_take_params(p, m_smem, c, s);
    c.take(&s.k, tl * p.E);
    c.take(&s.z1, tl * p.H1);
    c.take(&s.z2, tl * h2);
    c.take(&s.s, tl);
    c.take(&s.valid, tl);
  });
}

__host__ __device__ inline int64_t au_bwd_layout(const AuProblem& p, int tl, bool m_smem,
                                                 float* base, AuBwdSmem* out) {
  return au_carve(p, base, out, [&](AuSmemCarve& c, AuBwdSmem& s, int64_t h2) {
    c.take(&s.q, p.E);
    c.take(&s.dout, p.Dv);
    c.take(&s.c, p.H1);
    c.take(&s.dc, p.H1);
    au_take_params(p, m_smem, c, s);
    c.take(&s.k, tl * p.E);
    c.take(&s.v, tl * p.Dv);
    c.take(&s.dk, tl * p.E);
    c.take(&s.dv, tl * p.Dv);
    c.take(&s.z1, tl * p.H1);
    c.take(&s.h1, tl * p.H1);
    c.take(&s.z2, tl * h2);
    c.take(&s.h2, tl * h2);
    c.take(&s.dh, tl * p.H1);
    c.take(&s.w, tl);
    c.take(&s.ds, tl);
    c.take(&s.valid, tl);
    c.take(&s.g_a1, 3 * p.H1);
    c.take(&s.g_a2, 3 * h2);
    c.take(&s.g_b2, h2);
    c.take(&s.g_wo, au_hlast(p));
    c.take(&s.g_c, p.H1);
    c.take(&s.g_bo, 1);
  });
}

// ------------------------------------------------------------------ loads
template <typename T>
__device__ __forceinline__ float au_ld(const void* ptr, int64_t i) {
  return to_float<T>(static_cast<const T*>(ptr)[i]);
}

// Parameters of one hidden layer's activation as three fp32 rows [3, H] (unused rows 0).
template <typename T>
__device__ __forceinline__ void au_stage_act(const AuProblem& p, const void* act, int64_t H,
                                             float* dst) {
  for (int64_t i = threadIdx.x; i < 3 * H; i += blockDim.x) {
    const int64_t r = i / H;
    dst[i] = (act != nullptr && r < p.act_rows) ? au_ld<T>(act, i) : 0.f;
  }
}

// ------------------------------------------------------------------ activations
// y = act(x) for unit h of a layer with H units; prm = that layer's [3, H] parameter rows.
__device__ __forceinline__ float au_act(AuAct a, float x, const float* prm, int64_t H, int64_t h) {
  switch (a) {
    case AuAct::kRelu:
      return x < 0.f ? 0.f : x;  // a NaN x stays NaN: it must reach the score
    case AuAct::kSigmoid:
      return 1.f / (1.f + expf(-x));
    case AuAct::kPrelu:
      return x > 0.f ? x : prm[h] * x;
    default: {
      const float alpha = prm[h];
      const float sg = 1.f / (1.f + expf(-(prm[H + h] * x + prm[2 * H + h])));
      return x * (alpha + (1.f - alpha) * sg);
    }
  }
}

// dx of the activation at x given dy; the parameter gradients are added to g (rows as prm).
// relu's gradient at x = 0 is 0, as torch.relu's.
__device__ __forceinline__ float au_act_bwd(AuAct a, float x, float dy, const float* prm,
                                            int64_t H, int64_t h, float& g0, float& g1,
                                            float& g2) {
  switch (a) {
    case AuAct::kRelu:
      return x > 0.f ? dy : 0.f;
    case AuAct::kSigmoid: {
      const float sg = 1.f / (1.f + expf(-x));
      return dy * sg * (1.f - sg);
    }
    case AuAct::kPrelu:
      if (x > 0.f) return dy;
      g0 += dy * x;
      return prm[h] * dy;
    default: {
      const float alpha = prm[h], scale = prm[H + h];
      const float sg = 1.f / (1.f + expf(-(scale * x + prm[2 * H + h])));
      const float dz = dy * x * (1.f - alpha) * sg * (1.f - sg);
      g0 += dy * x * (1.f - sg);
      g1 += dz * x;
      g2 += dz;
      return dy * (alpha + (1.f - alpha) * sg) + dz * scale;
    }
  }
}

// ------------------------------------------------------------------ rows and tiles
// Positions [t0, t0 + tl) of a row of `len` positions: 1 where the position takes part.
__device__ __forceinline__ void au_valid_flags(const AuProblem& p, int64_t b, int64_t len,
                                               int64_t t0, int tl, float* valid) {
  for (int l = threadIdx.x; l < tl; l += blockDim.x) {
    const int64_t pos = t0 + l;
    valid[l] = (pos < len && position_valid(p.rows, b, pos)) ? 1.f : 0.f;
  }
}

// A [tl, D] tile of a key-like tensor (row pointer = base + (start + pos) * stride_l) into
// fp32 shared memory; positions that take no part read as 0 and are never loaded. VEC > 1:
// 16-byte loads (the host checked D % VEC == 0 and 16-byte aligned rows).
template <typename T, int VEC>
__device__ __forceinline__ void au_load_tile(const T* base, int64_t stride_l, int64_t start,
                                             int64_t t0, int tl, int64_t D, const float* valid,
                                             float* dst) {
  const int64_t nv = D / VEC;
  for (int64_t i = threadIdx.x; i < tl * nv; i += blockDim.x) {
    const int64_t l = i / nv;
    const int64_t c = (i % nv) * VEC;
    float* d = dst + l * D + c;
    if (valid[l] != 0.f) {
      const T* src = base + (start + t0 + l) * stride_l + c;
      if constexpr (VEC > 1) {
        load16<T>(src, d);
      } else {
        d[0] = to_float<T>(src[0]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) d[e] = 0.f;
    }
  }
}

// ------------------------------------------------------------------ first layer
// s_q (query as fp32), then c_q = (Wa + Wc) q + b1 (a warp per unit, lanes over E) and, when
// staged, M_q = (Wb - Wc) + Wd diag(q) in shared memory. Ends with a barrier.
template <typename T>
__device__ __forceinline__ void au_first_layer(const AuProblem& p, int64_t b, int64_t n,
                                               float* sq, float* sc, float* sm, bool m_smem) {
  const T* q = static_cast<const T*>(p.query) + b * p.q_sb + n * p.q_sn;
  for (int64_t e = threadIdx.x; e < p.E; e += blockDim.x) sq[e] = to_float<T>(q[e]);
  __syncthreads();
  const int64_t E = p.E, E4 = 4 * p.E;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int64_t h = warp; h < p.H1; h += nwarps) {
    float acc = 0.f;
    for (int64_t e = lane; e < E; e += 32) {
      acc += (au_ld<T>(p.w1, h * E4 + e) + au_ld<T>(p.w1, h * E4 + 2 * E + e)) * sq[e];
    }
    acc = group_sum<32>(acc);
    if (lane == 0) sc[h] = acc + au_ld<T>(p.b1, h);
  }
  if (m_smem) {
    const int64_t ms = au_m_stride(p);
    for (int64_t i = threadIdx.x; i < p.H1 * E; i += blockDim.x) {
      const int64_t h = i / E, e = i % E;
      const int64_t r = h * E4;
      sm[h * ms + e] = au_ld<T>(p.w1, r + E + e) - au_ld<T>(p.w1, r + 2 * E + e) +
                       au_ld<T>(p.w1, r + 3 * E + e) * sq[e];
    }
  }
  __syncthreads();
}

// Element (h, e) of M_q: from shared memory when staged, else recomputed from W1 (wide layers
// whose M_q does not fit in shared memory).
template <typename T>
__device__ __forceinline__ float au_m(const AuProblem& p, const float* sm, const float* sq,
                                      bool m_smem, int64_t h, int64_t e) {
  if (m_smem) return sm[h * au_m_stride(p) + e];
  const int64_t r = h * 4 * p.E;
  return au_ld<T>(p.w1, r + p.E + e) - au_ld<T>(p.w1, r + 2 * p.E + e) +
         au_ld<T>(p.w1, r + 3 * p.E + e) * sq[e];
}

// z1 = c_q + M_q k and h1 = act(z1) of a tile (z1 may be null: the forward keeps only h1).
// Positions that take no part get z1 = 0 (their pooling weight and gradient are 0 anyway).
template <typename T>
__device__ __forceinline__ void au_layer1(const AuProblem& p, int tl, const float* sk,
                                          const float* valid, const float* sq, const float* sc,
                                          const float* sm, bool m_smem, const float* a1,
                                          float* z1, float* h1) {
  for (int64_t i = threadIdx.x; i < tl * p.H1; i += blockDim.x) {
    const int64_t l = i / p.H1, h = i % p.H1;
    float z = 0.f;
    if (valid[l] != 0.f) {
      z = sc[h];
      const float* kr = sk + l * p.E;
      for (int64_t e = 0; e < p.E; ++e) z += kr[e] * au_m<T>(p, sm, sq, m_smem, h, e);
    }
    if (z1 != nullptr) z1[i] = z;
    h1[i] = au_act(p.act, z, a1, p.H1, h);
  }
}

// z2 = W2 h1 + b2 and h2 = act(z2) of a tile (z2 may be null).
template <typename T>
__device__ __forceinline__ void au_layer2(const AuProblem& p, int tl, const float* h1,
                                          const float* b2, const float* a2, float* z2,
                                          float* h2) {
  for (int64_t i = threadIdx.x; i < tl * p.H2; i += blockDim.x) {
    const int64_t l = i / p.H2, o = i % p.H2;
    float z = b2[o];
    const float* hr = h1 + l * p.H1;
    for (int64_t h = 0; h < p.H1; ++h) z += hr[h] * au_ld<T>(p.w2, o * p.H1 + h);
    if (z2 != nullptr) z2[i] = z;
    h2[i] = au_act(p.act, z, a2, p.H2, o);
  }
}

// Score of position l: a warp-wide dot of the last hidden layer with w_out, plus b_out.
__device__ __forceinline__ float au_score_warp(const AuProblem& p, const float* hl, int64_t l,
                                               const float* wo, float bout) {
  const int64_t H = au_hlast(p);
  const int lane = threadIdx.x & 31;
  float acc = 0.f;
  for (int64_t j = lane; j < H; j += 32) acc += hl[l * H + j] * wo[j];
  return group_sum<32>(acc) + bout;
}

// Tile size and whether M_q is staged, for a layout function and a shared-memory budget:
// M_q staged with a tile of 16 or 8 keys when that fits, else the largest tile without it.
template <typename F>
inline bool au_plan(F&& layout_floats, int64_t max_smem, int* tl, bool* m_smem) {
  const int tiles[] = {16, 8, 16, 8, 4, 2, 1};
  const bool staged[] = {true, true, false, false, false, false, false};
  for (int i = 0; i < 7; ++i) {
    if (layout_floats(tiles[i], staged[i]) * int64_t(sizeof(float)) <= max_smem) {
      *tl = tiles[i];
      *m_smem = staged[i];
      return true;
    }
  }
  return false;
}

template <typename T>
inline int au_vec(const void* base, int64_t stride_b, int64_t stride_l, int64_t D) {
  constexpr int V = 16 / int(sizeof(T));
  const bool ok = D % V == 0 && stride_l % V == 0 && stride_b % V == 0 && aligned16(base);
  return ok ? V : 1;
}

// How a launcher runs an activation-unit kernel: the tile and M_q staging that au_plan picks for
// its shared-memory layout, and the dynamic shared memory that layout takes.
struct AuLaunch {
  int tl = 0;
  bool m_smem = false;
  size_t bytes = 0;
};

template <typename F>
inline bool au_launch_plan(F&& layout_floats, int64_t max_smem, AuLaunch* l) {
  if (!au_plan(layout_floats, max_smem, &l->tl, &l->m_smem)) return false;
  l->bytes = size_t(layout_floats(l->tl, l->m_smem)) * sizeof(float);
  return true;
}

// The variant of a kernel that reads the keys in 16-byte vectors where their layout allows
// (au_vec), else the element-wise one, in *kernel, with its dynamic shared-memory limit raised to
// the launch's bytes.
template <typename T, typename K>
inline cudaError_t au_pick_kernel(const AuProblem& p, const AuLaunch& l, K vec_kernel,
                                  K scalar_kernel, K* kernel) {
  *kernel = au_vec<T>(p.key, p.k_sb, p.k_sl, p.E) > 1 ? vec_kernel : scalar_kernel;
  return cudaFuncSetAttribute(*kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(l.bytes));
}

}  // namespace detail
}  // namespace cuda
}  // namespace attnkern
