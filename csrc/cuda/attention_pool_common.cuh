// Device helpers shared by the attnkern CUDA kernels (forward, stats, dq, dk/dv): the lane layout
// of a head-dim bucket, 16-byte vector loads, row-range clamping, the dtype/bucket dispatch, the
// work decode every kernel asks (a warp's lanes, its work item, its row's K/V span, its key
// tiles and split blocks, written once here as FlashAttention's block info is) and the logit
// and softmax-statistics arithmetic (natural units, see "logits" below).
//
// Lane layout. A warp works on one (row, head, ...) item. The head dims are covered by
// "key groups" of LPK lanes: lane j of a group owns the 16-byte vectors j, j + LPK, ... of a
// head vector (EPL elements in all), so one group reads a whole K or V row with coalesced
// 16-byte loads. When a row needs fewer than 32 lanes (small heads, 2-byte dtypes), the warp
// holds KPS = 32 / LPK groups that take different key positions at once, so no lane idles on
// the decode shapes this library is for (a few queries, short-to-medium histories).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "attention_pool_kernels.h"

namespace attnkern {
namespace cuda {
namespace detail {

constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = 32 * kWarpsPerBlock;
// At least 16 resident warps per SM for the main kernels (<= 128 registers a thread): these
// kernels are bound by memory latency, so occupancy matters more than a few spared registers.
constexpr int kMinBlocksPerSM = 4;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// Grid-stride loops take every warp index beyond this; keeps the grid legal for any size.
constexpr int64_t kMaxBlocks = int64_t(1) << 30;

// ------------------------------------------------------------------ lane layout
struct LaneLayout {
  int vec;  // elements per 16-byte vector
  int lpk;  // lanes per key group
  int vpl;  // vectors per lane
  int kps;  // key groups per warp (= key positions processed at once)
  int epl;  // elements per lane
};

constexpr LaneLayout lane_layout(int elem_bytes, int bucket) {
  // bucket >= 32 and elem_bytes in {2, 4}: nv = bucket / vec >= 4, a power of two.
  return LaneLayout{16 / elem_bytes,
                    (bucket / (16 / elem_bytes)) < 32 ? bucket / (16 / elem_bytes) : 32,
                    (bucket / (16 / elem_bytes)) < 32 ? 1 : (bucket / (16 / elem_bytes)) / 32,
                    (bucket / (16 / elem_bytes)) < 32 ? 32 / (bucket / (16 / elem_bytes)) : 1,
                    (bucket / (16 / elem_bytes)) < 32 ? (16 / elem_bytes)
                                                      : (bucket / (16 / elem_bytes)) / 32 *
                                                            (16 / elem_bytes)};
}

template <typename T, int DB>
struct Lanes {
  static constexpr LaneLayout lay = lane_layout(int(sizeof(T)), DB);
  static constexpr int VEC = lay.vec;
  static constexpr int LPK = lay.lpk;
  static constexpr int VPL = lay.vpl;
  static constexpr int KPS = lay.kps;
  static constexpr int EPL = lay.epl;
  static_assert(LPK * KPS == 32, "lane layout must cover the warp");
  static_assert(EPL * LPK == DB, "lane layout must cover the bucket");
};

inline int head_bucket(int64_t dk, int64_t dv) {
  const int64_t d = dk > dv ? dk : dv;
  return d <= 32 ? 32 : d <= 64 ? 64 : d <= 128 ? 128 : 256;
}

inline int elem_bytes(DType t) { return t == DType::kFloat32 ? 4 : 2; }

inline bool aligned16(const void* ptr) {
  return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0;
}

// Whether a kernel may move its rows in 16-byte vectors (its ALIGNED argument): every stride and
// head dim it reads a multiple of a vector, every base pointer 16-byte aligned (null pointers,
// tensors a kernel does not touch, pass).
inline bool vectors_aligned(DType t, std::initializer_list<int64_t> strides_and_dims,
                            std::initializer_list<const void*> ptrs) {
  const int64_t vec = 16 / elem_bytes(t);
  for (int64_t s : strides_and_dims) {
    if (s % vec != 0) return false;
  }
  for (const void* ptr : ptrs) {
    if (!aligned16(ptr)) return false;
  }
  return true;
}

// The backward's grad-query and grad-key/value passes read q, k, v and grad_out and write one or
// two gradients (g2 null for the dq pass).
inline bool bwd_aligned(const PoolProblem& p, const BwdInputs& in, const void* g1,
                        const void* g2) {
  return vectors_aligned(p.dtype,
                         {p.q_sb, p.q_sn, p.q_sh, p.k_sb, p.k_sl, p.k_sh, p.v_sb, p.v_sl, p.v_sh,
                          in.go_sb, in.go_sn, in.go_sh, p.Dk, p.Dv},
                         {p.query, p.key, p.value, in.grad_out, g1, g2});
}

// ------------------------------------------------------------------ dispatch
template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
void dispatch_dtype(DType t, F&& f) {
  switch (t) {
    case DType::kFloat32:
      f(TypeTag<float>{});
      break;
    case DType::kFloat16:
      f(TypeTag<__half>{});
      break;
    case DType::kBFloat16:
      f(TypeTag<__nv_bfloat16>{});
      break;
  }
}

template <typename F>
void dispatch_bucket(int bucket, F&& f) {
  switch (bucket) {
    case 32:
      f(std::integral_constant<int, 32>{});
      break;
    case 64:
      f(std::integral_constant<int, 64>{});
      break;
    case 128:
      f(std::integral_constant<int, 128>{});
      break;
    default:
      f(std::integral_constant<int, 256>{});
      break;
  }
}

template <typename F>
void dispatch_bool(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// The template arguments of a row kernel: calls f(TypeTag<T>, DB, ALIGNED, QG) (the last three as
// std::integral_constant) for the problem's dtype, the bucket of its head dims (it fixes the
// lane slices, and so the order of the logits' sums, alike in every kernel), `aligned`, and a
// query group of 1 (qg == 1) or QG_MAX.
template <int QG_MAX, typename F>
void dispatch_row_kernel(const PoolProblem& p, bool aligned, int qg, F&& f) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    dispatch_bucket(head_bucket(p.Dk, p.Dv), [&](auto bucket) {
      dispatch_bool(aligned, [&](auto al) {
        if (qg == 1) {
          f(tag, bucket, al, std::integral_constant<int, 1>{});
        } else {
          f(tag, bucket, al, std::integral_constant<int, QG_MAX>{});
        }
      });
    });
  });
}

inline unsigned grid_blocks(int64_t warps) {
  int64_t blocks = (warps + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks < 1) blocks = 1;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  return static_cast<unsigned>(blocks);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A host-side estimate of the longest row, used only to size launches (never for bounds).
inline int64_t longest_row_estimate(const PoolProblem& p) {
  if (p.rows.mode != RowMode::kJagged) return p.L;
  if (p.rows.max_length >= 0) return p.rows.max_length < p.L ? p.rows.max_length : p.L;
  // Unknown: the mean row length. Longer rows stay correct (the kernels loop); only the
  // load balance suffers, which max_length fixes.
  return p.B > 0 ? ceil_div(p.L, p.B) : 0;
}

// ------------------------------------------------------------------ conversions
template <typename T>
__device__ __forceinline__ float to_float(T x) {
  if constexpr (std::is_same<T, __half>::value) return __half2float(x);
  else if constexpr (std::is_same<T, __nv_bfloat16>::value) return __bfloat162float(x);
  else return x;
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same<T, __half>::value) return __float2half_rn(x);
  else if constexpr (std::is_same<T, __nv_bfloat16>::value) return __float2bfloat16_rn(x);
  else return x;
}

// 16 bytes at a 16-byte aligned address -> 16 / sizeof(T) floats.
template <typename T>
__device__ __forceinline__ void load16(const T* ptr, float* out) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(ptr));
  if constexpr (std::is_same<T, float>::value) {
    out[0] = __uint_as_float(raw.x);
    out[1] = __uint_as_float(raw.y);
    out[2] = __uint_as_float(raw.z);
    out[3] = __uint_as_float(raw.w);
  } else {
    const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (std::is_same<T, __half>::value) {
        __half2 h2;
        memcpy(&h2, &words[i], sizeof(h2));
        const float2 f = __half22float2(h2);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
      } else {
        __nv_bfloat162 h2;
        memcpy(&h2, &words[i], sizeof(h2));
        const float2 f = __bfloat1622float2(h2);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ void store16(T* ptr, const float* in) {
  uint4 raw;
  if constexpr (std::is_same<T, float>::value) {
    raw.x = __float_as_uint(in[0]);
    raw.y = __float_as_uint(in[1]);
    raw.z = __float_as_uint(in[2]);
    raw.w = __float_as_uint(in[3]);
  } else {
    unsigned words[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (std::is_same<T, __half>::value) {
        const __half2 h2 = __floats2half2_rn(in[2 * i], in[2 * i + 1]);
        memcpy(&words[i], &h2, sizeof(h2));
      } else {
        const __nv_bfloat162 h2 = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);
        memcpy(&words[i], &h2, sizeof(h2));
      }
    }
    raw = make_uint4(words[0], words[1], words[2], words[3]);
  }
  *reinterpret_cast<uint4*>(ptr) = raw;
}

// This lane's slice of a head vector of length d (<= the bucket) starting at `row`: vector i
// of the lane covers elements (i * LPK + j) * VEC + [0, VEC). Elements >= d read as 0, and
// nothing at or beyond d is ever touched. ALIGNED (checked at launch) means: d % VEC == 0,
// row 16-byte aligned, so a vector is either fully inside or fully outside the row.
template <typename T, int DB, bool ALIGNED>
__device__ __forceinline__ void load_slice(const T* row, int d, int j,
                                           float (&out)[Lanes<T, DB>::EPL]) {
  using LN = Lanes<T, DB>;
#pragma unroll
  for (int i = 0; i < LN::VPL; ++i) {
    const int e0 = (i * LN::LPK + j) * LN::VEC;
    if constexpr (ALIGNED) {
      if (e0 < d) {
        load16<T>(row + e0, out + i * LN::VEC);
      } else {
#pragma unroll
        for (int e = 0; e < LN::VEC; ++e) out[i * LN::VEC + e] = 0.f;
      }
    } else {
#pragma unroll
      for (int e = 0; e < LN::VEC; ++e) {
        out[i * LN::VEC + e] = (e0 + e < d) ? to_float<T>(row[e0 + e]) : 0.f;
      }
    }
  }
}

template <typename T, int DB, bool ALIGNED>
__device__ __forceinline__ void store_slice(T* row, int d, int j,
                                            const float (&in)[Lanes<T, DB>::EPL]) {
  using LN = Lanes<T, DB>;
#pragma unroll
  for (int i = 0; i < LN::VPL; ++i) {
    const int e0 = (i * LN::LPK + j) * LN::VEC;
    if constexpr (ALIGNED) {
      if (e0 < d) store16<T>(row + e0, in + i * LN::VEC);
    } else {
#pragma unroll
      for (int e = 0; e < LN::VEC; ++e) {
        if (e0 + e < d) row[e0 + e] = from_float<T>(in[i * LN::VEC + e]);
      }
    }
  }
}

// fp32 slice store (split-L partials); the layout of T decides which elements a lane owns.
template <typename T, int DB>
__device__ __forceinline__ void store_slice_f32(float* row, int d, int j,
                                                const float (&in)[Lanes<T, DB>::EPL]) {
  using LN = Lanes<T, DB>;
#pragma unroll
  for (int i = 0; i < LN::VPL; ++i) {
    const int e0 = (i * LN::LPK + j) * LN::VEC;
#pragma unroll
    for (int e = 0; e < LN::VEC; ++e) {
      if (e0 + e < d) row[e0 + e] = in[i * LN::VEC + e];
    }
  }
}

// Sum over the WIDTH lanes of an aligned lane group (butterfly: every lane gets the sum, in
// the same order on every run, so results are deterministic).
template <int WIDTH>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int off = WIDTH / 2; off > 0; off /= 2) x += __shfl_xor_sync(kFullMask, x, off);
  return x;
}

// ------------------------------------------------------------------ rows
struct RowRange {
  int64_t start;  // jagged: first key row; padded: 0
  int64_t len;    // positions [0, len) may take part
};

__device__ __forceinline__ int64_t read_index(const RowSpec& r, int64_t i) {
  return r.index_is_int64
             ? static_cast<const int64_t*>(r.index)[i * r.index_stride]
             : static_cast<int64_t>(static_cast<const int32_t*>(r.index)[i * r.index_stride]);
}

__device__ __forceinline__ int64_t clamp64(int64_t x, int64_t lo, int64_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// Clamped on the device (the rule of RowSpec, attention_pool_kernels.h): whatever
// lengths/offsets hold, [start, start + len) lies inside [0, L).
__device__ __forceinline__ RowRange row_range(const RowSpec& r, int64_t b, int64_t L) {
  switch (r.mode) {
    case RowMode::kLengths:
      return RowRange{0, clamp64(read_index(r, b), 0, L)};
    case RowMode::kJagged: {
      const int64_t start = clamp64(read_index(r, b), 0, L);
      int64_t end = clamp64(read_index(r, b + 1), start, L);
      if (r.max_length >= 0 && end - start > r.max_length) end = start + r.max_length;
      return RowRange{start, end - start};
    }
    default:
      return RowRange{0, L};
  }
}

// Position l (< the row's len) of row b takes part.
__device__ __forceinline__ bool position_valid(const RowSpec& r, int64_t b, int64_t l) {
  if (r.mode != RowMode::kMask) return true;
  const unsigned char m =
      reinterpret_cast<const unsigned char*>(r.mask)[b * r.mask_stride_b + l * r.mask_stride_l];
  return m != 0;
}

// ------------------------------------------------------------------ work items
// Every attention-pool kernel hands out work to warps with the same grid-stride loop
// (w = first_warp(); w < items; w += warp_stride()), so the grid stays legal for any size.
__device__ __forceinline__ int64_t first_warp() {
  return int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
}
__device__ __forceinline__ int64_t warp_stride() { return int64_t(gridDim.x) * kWarpsPerBlock; }

// Work item w of a row kernel, decoded innermost first: `inner` (the query group in the forward,
// stats and dq passes, so that the warps of a block take consecutive query groups of one (row,
// head, split) and share its K/V lines through L1; the tile slot in the dk/dv pass), then the
// split, the head and the row. The stats and dq passes launch the same items, so the
// statistics one stores for a (query, split) are where the other looks.
struct WarpItem {
  int64_t b, h, split, inner;
};

__device__ __forceinline__ WarpItem warp_item(const PoolProblem& p, int64_t w, int64_t inner,
                                              int64_t splits) {
  const int64_t in = w % inner;
  w /= inner;
  const int64_t split = w % splits;
  w /= splits;
  return WarpItem{w / p.H, w % p.H, split, in};
}

// Row b's valid key positions (clamped, row_range) and the K and V rows of its position 0 for
// head h (jagged: the row's first key row), so that position l is at key + l * k_sl.
template <typename T>
struct RowSpan {
  RowRange rr;
  const T* key;
  const T* value;
};

template <typename T>
__device__ __forceinline__ RowSpan<T> row_span(const PoolProblem& p, int64_t b, int64_t h) {
  const RowRange rr = row_range(p.rows, b, p.L);
  return RowSpan<T>{rr,
                    static_cast<const T*>(p.key) + b * p.k_sb + h * p.k_sh + rr.start * p.k_sl,
                    static_cast<const T*>(p.value) + b * p.v_sb + h * p.v_sh + rr.start * p.v_sl};
}

// Query n of row b, head h.
template <typename T>
__device__ __forceinline__ const T* query_row(const PoolProblem& p, int64_t b, int64_t n,
                                              int64_t h) {
  return static_cast<const T*>(p.query) + b * p.q_sb + n * p.q_sn + h * p.q_sh;
}

// Row r of the [B, N, H] query rows (out, lse, delta, anchors): query n of row b, head h.
__device__ __forceinline__ int64_t query_index(const PoolProblem& p, int64_t b, int64_t n,
                                               int64_t h) {
  return (b * p.N + n) * p.H + h;
}

// Calls f(qi, r) for each query qi of query group qgrp of (row b, head h) that exists (its
// n = qgrp * QG + qi < N), r its query_index.
template <int QG, typename F>
__device__ __forceinline__ void for_each_query(const PoolProblem& p, int64_t b, int64_t h,
                                               int64_t qgrp, F&& f) {
#pragma unroll
  for (int qi = 0; qi < QG; ++qi) {
    const int64_t n = qgrp * QG + qi;
    if (n >= p.N) break;
    f(qi, query_index(p, b, n, h));
  }
}

template <typename T>
__device__ __forceinline__ const T* grad_out_row(const BwdInputs& in, int64_t b, int64_t n,
                                                 int64_t h) {
  return static_cast<const T*>(in.grad_out) + b * in.go_sb + n * in.go_sn + h * in.go_sh;
}

// A warp's place in the lane layout, asked once by every row kernel: its lane, its key group g
// and its lane j within that group (LPK lanes a group), the head dims, and the B * N * H query
// rows.
struct WarpLanes {
  int lane, j, g;
  int dk, dv;
  int64_t rows;
};

template <int LPK>
__device__ __forceinline__ WarpLanes warp_lanes(const PoolProblem& p) {
  const int lane = threadIdx.x & 31;
  return WarpLanes{lane, lane % LPK, lane / LPK, static_cast<int>(p.Dk), static_cast<int>(p.Dv),
                   p.B * p.N * p.H};
}

// This lane's slices of the QG queries of query group qgrp of (row b, head h): queries past N
// read as zeros.
template <typename T, int DB, bool ALIGNED, int QG>
__device__ __forceinline__ void load_queries(const PoolProblem& p, const WarpLanes& wl,
                                             int64_t b, int64_t h, int64_t qgrp,
                                             float (&q)[QG][Lanes<T, DB>::EPL]) {
#pragma unroll
  for (int qi = 0; qi < QG; ++qi) {
    const int64_t n = qgrp * QG + qi;
    if (n < p.N) {
      load_slice<T, DB, ALIGNED>(query_row<T>(p, b, n, h), wl.dk, wl.j, q[qi]);
    } else {
#pragma unroll
      for (int e = 0; e < Lanes<T, DB>::EPL; ++e) q[qi][e] = 0.f;
    }
  }
}

// The score bias of query n of row b, head h at key row `key_row` (PoolProblem::bias), 0
// without one. Called at valid positions only: the bias is never read elsewhere.
template <typename T>
__device__ __forceinline__ float bias_at(const PoolProblem& p, int64_t b, int64_t n, int64_t h,
                                         int64_t key_row) {
  if (p.bias == nullptr) return 0.f;
  const int64_t off =
      b * p.bias_sb + (n % p.bias_nb) * p.bias_sn + h * p.bias_sh + key_row * p.bias_sl;
  return p.bias_f32 ? static_cast<const float*>(p.bias)[off]
                    : to_float<T>(static_cast<const T*>(p.bias)[off]);
}

// The U key positions pos = base + u * KPS + g of the lane's key group (u < U): ok[u] whether
// pos < end and it takes part, and this lane's slices of their K (and, WITH_V, V) rows; zeros
// at the others, which are never read.
template <typename T, int DB, bool ALIGNED, int U, bool WITH_V>
struct KeyTile {
  static constexpr int EPL = Lanes<T, DB>::EPL;
  static constexpr int KEYS = U;
  float k[U][EPL];
  float v[WITH_V ? U : 1][EPL];
  bool ok[U];
  int64_t key_row0;  // the key row of position u = 0 (jagged: the row's start plus base + g)

  // The bias of query n (of row b, head h) at position u: 0 where it takes no part (not read).
  __device__ __forceinline__ float bias(const PoolProblem& p, int64_t b, int64_t n, int64_t h,
                                        int u) const {
    return ok[u] ? bias_at<T>(p, b, n, h, key_row0 + int64_t(u) * Lanes<T, DB>::KPS) : 0.f;
  }

  __device__ __forceinline__ KeyTile(const PoolProblem& p, const WarpLanes& wl, int64_t b,
                                     const RowSpan<T>& row, int64_t base, int64_t end)
      : key_row0(row.rr.start + base + wl.g) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t pos = base + u * Lanes<T, DB>::KPS + wl.g;
      ok[u] = pos < end && position_valid(p.rows, b, pos);
      if (ok[u]) {  // only valid positions are read
        load_slice<T, DB, ALIGNED>(row.key + pos * p.k_sl, wl.dk, wl.j, k[u]);
        if constexpr (WITH_V) {
          load_slice<T, DB, ALIGNED>(row.value + pos * p.v_sl, wl.dv, wl.j, v[u]);
        }
      } else {
#pragma unroll
        for (int e = 0; e < EPL; ++e) {
          k[u][e] = 0.f;
          if constexpr (WITH_V) v[u][e] = 0.f;
        }
      }
    }
  }
};

// Sum and max over the KPS key groups of a warp (lanes LPK apart; every lane gets the result, in
// a fixed butterfly order, so results are deterministic). All 32 lanes must take part.
template <int LPK>
__device__ __forceinline__ float cross_group_sum(float x) {
#pragma unroll
  for (int off = LPK; off < 32; off *= 2) x += __shfl_xor_sync(kFullMask, x, off);
  return x;
}

template <int LPK>
__device__ __forceinline__ float cross_group_max(float x) {
#pragma unroll
  for (int off = LPK; off < 32; off *= 2) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, off));
  return x;
}

// Keys per key group per pass of the forward kernels (float and quantized): enough loads in
// flight to cover HBM latency without spilling under the 128-register cap (the K and V slices of
// that many keys live in registers; with 4 queries of 8 elements a lane, q and acc already take 64).
constexpr int fwd_keys_per_group(int epl, int qg) { return epl <= 4 ? 4 : (qg >= 4 ? 1 : 2); }

// ------------------------------------------------------------------ split work
// The work of a split row kernel (forward, stats, dq): one warp per (row, head, split, query
// group), each (row, head)'s keys cut into blocks of split_block positions that the splits take
// round-robin.
struct SplitWork {
  int64_t num_qgroups = 1;
  int64_t num_splits = 1;
  int64_t split_block = 64;
  int64_t total_warps = 0;
};

inline SplitWork split_work(const PoolProblem& p, int qg, int splits, int64_t split_block) {
  SplitWork w;
  w.num_splits = splits > 1 ? splits : 1;
  w.split_block = split_block > 0 ? split_block : 64;
  w.num_qgroups = ceil_div(p.N, qg);
  w.total_warps = p.B * p.H * w.num_qgroups * w.num_splits;
  return w;
}

// The key passes of one split over a row of len positions: STEP positions at [base, base + STEP)
// a pass, clipped to end (its block's end). `for (SplitKeys<STEP> it(w, split, len); it.next();)`
// walks blocks split, split + num_splits, ... of the row. The bounds depend only on the row:
// uniform over the warp, as the shuffles need.
template <int STEP>
struct SplitKeys {
  int64_t len, block, stride, blk, end, base;

  __device__ __forceinline__ SplitKeys(const SplitWork& w, int64_t split, int64_t row_len)
      : len(row_len),
        block(w.split_block),
        stride(w.num_splits * w.split_block),
        blk(split * w.split_block),
        end(blk + block < len ? blk + block : len),
        base(blk - STEP) {}

  __device__ __forceinline__ bool next() {
    base += STEP;
    while (base >= end) {
      blk += stride;
      if (blk >= len) return false;
      end = blk + block < len ? blk + block : len;
      base = blk;
    }
    return true;
  }
};

// ------------------------------------------------------------------ logits
// Every kernel computes a logit as s = scale * <q, k> in natural units, like the reference and
// the CPU backend: the fp32 dot of the unscaled q and k (fma over the lane's slice, then
// group_sum), then one rounded product with the scale. Not folding scale * log2(e) into q keeps
// what the dot of the unscaled inputs resolves (rounding the scaled q to fp32 cost up to ~1 ulp
// of each large logit); only the small differences s - m go to base 2 (exp_nat), where they
// are exact near the max. The stats, dq and dk/dv kernels compute the same s bit for bit (same
// slices, fma order, group sum and product), as the anchors need.
template <int LPK>
__device__ __forceinline__ float logit_of(float dot, float scale) {
  // __fmul_rn: never contracted into a following subtraction, so s is the same rounded value
  // wherever it is used.
  return __fmul_rn(group_sum<LPK>(dot), scale);
}

// e^d as exp2(d * log2(e)), d a difference of natural-unit logits (or -inf: 0).
__device__ __forceinline__ float exp_nat(float d) { return exp2f(d * kLog2e); }

// The logit of a query and a key from this lane's slices of both (fma over the slice, in
// order), plus the score bias (KeyTile::bias; 0 without one) in one rounded sum, as every
// kernel adds it: a -inf bias drops the position, NaN propagates.
template <int LPK, int EPL>
__device__ __forceinline__ float logit(const float (&q)[EPL], const float (&k)[EPL], float scale,
                                       float bias) {
  float dot = 0.f;
#pragma unroll
  for (int e = 0; e < EPL; ++e) dot = fmaf(q[e], k[e], dot);
  return __fadd_rn(logit_of<LPK>(dot, scale), bias);
}

// The backward's view of one query and one key, from this lane's slices of q, grad_out and the
// key's K and V rows and the query's anchors (a, c) and delta: the probability
// pr = e^((s - a) - c) (0 at an invalid position, never exp2 of garbage, and where a == -inf:
// lse = -inf, no finite logit in the row, every p is 0) and ds = pr * (dO . v - delta).
struct BwdProb {
  float pr, ds;
};

template <int LPK, int EPL>
__device__ __forceinline__ BwdProb bwd_prob(const float (&q)[EPL], const float (&go)[EPL],
                                            const float (&k)[EPL], const float (&v)[EPL],
                                            bool ok, float anc_a, float anc_c, float delta,
                                            float scale, float bias) {
  float dot = 0.f;
  float dp = 0.f;
#pragma unroll
  for (int e = 0; e < EPL; ++e) {
    dot = fmaf(q[e], k[e], dot);
    dp = fmaf(go[e], v[e], dp);
  }
  const float s = __fadd_rn(logit_of<LPK>(dot, scale), bias);  // as logit()
  dp = group_sum<LPK>(dp);
  const float pr = (ok && anc_a != -INFINITY) ? exp_nat((s - anc_a) - anc_c) : 0.f;
  return BwdProb{pr, pr * (dp - delta)};
}

// ------------------------------------------------------------------ softmax of a warp's queries
// The forward's online softmax of a warp's QG queries, per lane: the running max m of the
// logits (natural units), the sum l of e^(s - m) and this lane's slice acc of sum e^(s - m) v,
// over the keys of this lane's key group. add() takes a key tile (KeyTile with V), add_keys() a
// kernel's own (the quantized forward's); finish() merges the KPS key groups (every lane in
// every shuffle) and normalises acc, leaving the max and sum of the warp's keys in m and l, for
// the lse or a split combine.
template <int LPK, int EPL, int QG>
struct OnlineSoftmax {
  float m[QG];
  float l[QG];
  float acc[QG][EPL];

  __device__ __forceinline__ OnlineSoftmax() {
#pragma unroll
    for (int qi = 0; qi < QG; ++qi) {
#pragma unroll
      for (int e = 0; e < EPL; ++e) acc[qi][e] = 0.f;
      m[qi] = -INFINITY;
      l[qi] = 0.f;
    }
  }

  // The tile's keys for the queries of query group qgrp (q: their slices) of row b, head h.
  template <typename Tile>
  __device__ __forceinline__ void add(const PoolProblem& p, const Tile& t, int64_t b, int64_t h,
                                      int64_t qgrp, const float (&q)[QG][EPL]) {
    add_keys(p.scale, q, t.k, t.v, t.ok,
             [&](int qi, int u) { return t.bias(p, b, qgrp * QG + qi, h, u); });
  }

  // U keys: this lane's slices of their K and V, whether each takes part (ok), and bias(qi, u),
  // the score bias of query qi at key u (0 where !ok[u]).
  template <int U, typename Bias>
  __device__ __forceinline__ void add_keys(float scale, const float (&q)[QG][EPL],
                                           const float (&k)[U][EPL], const float (&v)[U][EPL],
                                           const bool (&ok)[U], Bias&& bias) {
#pragma unroll
    for (int qi = 0; qi < QG; ++qi) {
      float s[U];
      float mx = m[qi];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        s[u] = logit<LPK, EPL>(q[qi], k[u], scale, bias(qi, u));
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
          for (int e = 0; e < EPL; ++e) acc[qi][e] = fmaf(pu, v[u][e], acc[qi][e]);
        }
        m[qi] = mx;
      }
    }
  }

  __device__ __forceinline__ void finish() {
#pragma unroll
    for (int qi = 0; qi < QG; ++qi) {
      const float mx = cross_group_max<LPK>(m[qi]);
      const float f = (m[qi] == -INFINITY) ? 0.f : exp_nat(m[qi] - mx);
      const float lsum = cross_group_sum<LPK>(l[qi] * f);
      // No valid key with a finite logit: out = 0, lse = -inf. A NaN sum propagates.
      const float inv = lsum == 0.f ? 0.f : 1.f / lsum;
#pragma unroll
      for (int e = 0; e < EPL; ++e) acc[qi][e] = cross_group_sum<LPK>(acc[qi][e] * f) * inv;
      m[qi] = mx;
      l[qi] = lsum;
    }
  }

  // After finish(): query qi's lse (-inf without a valid key with a finite logit; NaN/inf
  // propagate).
  __device__ __forceinline__ float lse(int qi) const {
    return l[qi] == 0.f ? -INFINITY : m[qi] + logf(l[qi]);
  }
};

// ------------------------------------------------------------------ softmax anchors
// The backward recomputes p = exp_nat((s - a) - c) from per-query anchors (a, c), natural units
// (as the Triton backward). Normally (a, c) = (lse, 0). But a float32 lse is only good to about
// one ulp of its own size, which p inherits as a relative error (5e-4 at logits of 1e4, all of
// it by 1e7), so where |lse| reaches kRestatAbove (as in the CPU and Triton backends: below it
// the rounding costs p less than 1e-6) the backward recomputes the row's max m and the sum l of
// e^(s - m) from its own logits and takes (a, c) = (m, ln l): s - a is exact near the max and
// c is small (0 <= c <= ln L). lse = -inf (no finite logit, or an empty row) keeps a = -inf:
// the kernels then give p = 0 at every position. NaN and +inf lse are recomputed, as on the CPU.
constexpr float kRestatAbove = 16.f;

__device__ __forceinline__ bool needs_restat(float lse) {
  return !(fabsf(lse) < kRestatAbove) && lse != -INFINITY;
}

// The shift subtracted from the logits before exp_nat: the max, or 0 where it is infinite (no
// finite logit yet, or a +inf one, which then turns the sum, and p, into inf/NaN as in the
// reference instead of vanishing). As shift_of (CPU) and _finite_or_zero (Triton).
__device__ __forceinline__ float finite_or_zero(float m) {
  return (m == INFINITY || m == -INFINITY) ? 0.f : m;
}

// l * e^d; exactly l where d == 0 (the common case, no reliance on the approximate exp2 there).
__device__ __forceinline__ float rescale(float l, float d) {
  return d == 0.f ? l : __fmul_rn(l, exp_nat(d));
}

// Softmax statistics (m, l): m the max of the logits seen (natural units; fmaxf skips NaN, so m
// is -inf only while every logit seen is -inf or NaN) and l the sum of e^(s - finite_or_zero(m))
// over them (NaN once a NaN logit was seen, else 0 while m == -inf). Merges (m2, l2) into
// (m, l); one logit s is (s, 1). Rounded products and a plain sum (no fma contraction), so
// that merge(x, y) == merge(y, x) bit for bit and the lanes of a butterfly all agree.
__device__ __forceinline__ void stats_merge(float& m, float& l, float m2, float l2) {
  const float mn = fmaxf(m, m2);
  const float sh = finite_or_zero(mn);
  // m == -inf: l is 0 (or NaN) and e^-inf = 0, so it adds 0 (or keeps the NaN).
  l = __fadd_rn(rescale(l, m - sh), rescale(l2, m2 - sh));
  m = mn;
}

// The anchors of statistics (m, l). l == 0 (no finite logit): (0, 0), so p = e^s = 0 at every
// valid position (all -inf there). l NaN/inf propagate to c and so to p.
__device__ __forceinline__ void anchors_of(float m, float l, float& a, float& c) {
  a = finite_or_zero(m);
  c = l == 0.f ? 0.f : logf(l);
}

// The softmax statistics (stats_merge) of a warp's QG queries over the keys of this lane's key
// group: add() takes a key tile (KeyTile, K only), merge_groups() merges the KPS key groups in a
// butterfly (all lanes in every shuffle; stats_merge is symmetric, so every lane ends with the
// same statistics). Used where the max and sum must be exact for the logits themselves (the
// weights, the backward's restatement), which a float32 lse is not.
template <int LPK, int EPL, int QG>
struct RowStats {
  float m[QG];
  float l[QG];

  __device__ __forceinline__ RowStats() {
#pragma unroll
    for (int qi = 0; qi < QG; ++qi) {
      m[qi] = -INFINITY;
      l[qi] = 0.f;
    }
  }

  template <typename Tile>
  __device__ __forceinline__ void add(const PoolProblem& p, const Tile& t, int64_t b, int64_t h,
                                      int64_t qgrp, const float (&q)[QG][EPL]) {
#pragma unroll
    for (int qi = 0; qi < QG; ++qi) {
#pragma unroll
      for (int u = 0; u < Tile::KEYS; ++u) {
        const float s = logit<LPK, EPL>(q[qi], t.k[u], p.scale, t.bias(p, b, qgrp * QG + qi, h, u));
        if (t.ok[u]) stats_merge(m[qi], l[qi], s, 1.f);
      }
    }
  }

  __device__ __forceinline__ void merge_groups() {
#pragma unroll
    for (int qi = 0; qi < QG; ++qi) {
#pragma unroll
      for (int off = LPK; off < 32; off *= 2) {
        const float m2 = __shfl_xor_sync(kFullMask, m[qi], off);
        const float l2 = __shfl_xor_sync(kFullMask, l[qi], off);
        stats_merge(m[qi], l[qi], m2, l2);
      }
    }
  }
};

// ------------------------------------------------------------------ internal launchers
// Scratch of the backward (floats, carved by launch_bwd): the anchors [2, B * N * H] (a then
// c; written by the dq kernel, read by the dk/dv kernel), the statistics of each dq split
// [S, 2, B * N * H] (max then sum; written by the stats kernel for the queries that
// needs_restat, merged in split order by the dq kernel) and, for S > 1, the dq partials.
struct BwdScratch {
  float* anchors = nullptr;
  float* part_stats = nullptr;
  float* part_dq = nullptr;
};

cudaError_t launch_bwd_stats(const PoolProblem& p, const BwdInputs& in, const BwdPlan& plan,
                             float* part_stats, cudaStream_t stream);
cudaError_t launch_bwd_dq(const PoolProblem& p, const BwdInputs& in, const BwdPlan& plan,
                          void* grad_query, const BwdScratch& ws, cudaStream_t stream);
cudaError_t launch_bwd_dkdv(const PoolProblem& p, const BwdInputs& in, const BwdPlan& plan,
                            const float* anchors, void* grad_key, void* grad_value,
                            cudaStream_t stream);

// Query-group sizes (queries held in registers per warp, sharing each K/V load).
inline int fwd_query_group(int64_t n) { return n == 1 ? 1 : 4; }
inline int dq_query_group(int64_t n) { return n == 1 ? 1 : 2; }
// Keys per group per pass in the dk/dv kernel.
constexpr int kDkdvKeysPerGroup = 2;

// Split-L factor for a pass with `work` warps over rows of about `lmax` keys.
inline int choose_splits(int64_t work, int64_t lmax, int num_sms) {
  const int64_t target = int64_t(num_sms > 0 ? num_sms : 1) * 32;
  if (work >= target || lmax < 256) return 1;
  int64_t s = ceil_div(target, work > 0 ? work : 1);
  const int64_t by_len = ceil_div(lmax, 128);  // at least ~128 keys per split
  if (s > by_len) s = by_len;
  if (s > 32) s = 32;
  return s < 1 ? 1 : static_cast<int>(s);
}

// Keys per split block: a multiple of 64 (every layout's keys-per-pass divides it).
inline int64_t split_block_for(int64_t lmax, int splits) {
  int64_t blk = ceil_div(lmax > 0 ? lmax : 1, splits);
  return ceil_div(blk, 64) * 64;
}

// The split-L plan of a pass with query groups of qg over the problem's rows: the split count
// and the keys per split block.
inline void plan_splits(const PoolProblem& p, int qg, int num_sms, int* splits, int64_t* block) {
  const int64_t lmax = longest_row_estimate(p);
  *splits = choose_splits(p.B * p.H * ceil_div(p.N, qg), lmax, num_sms);
  *block = split_block_for(lmax, *splits);
}

}  // namespace detail
}  // namespace cuda
}  // namespace attnkern
