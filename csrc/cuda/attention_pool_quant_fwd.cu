// Quantized-K/V attention-pool forward: the decode-style forward of attention_pool_fwd.cu (one
// warp per (row, head, query group), an fp32 online softmax in natural units over the row's
// valid keys, KPS key positions at a time) reading int8 / uint8 / float8 rows and dequantizing
// them in registers: element = stored * scale + bias per (position, head) row, rounded as the
// reference rounds it (the product, then the sum). The lane layout is float32's (4 elements a
// lane vector), so a lane reads 4 bytes of a row at a time and the query, converted to float32
// by the launcher, is held as in the float kernels, and the online softmax is the float
// forward's (OnlineSoftmax). float8_e4m3fn bytes are widened through the float16 bits that hold
// them exactly (value / 256, then the exact factor 256), float8_e5m2 bytes are the upper half of
// a float16.
//
// No split-L: a (row, head, query group) is one warp, so the long-history serving shapes (few
// rows, N = 1) fill the GPU only through B * H.
#include "attention_pool_common.cuh"
#include "attention_pool_quant_kernels.h"

#include <cstring>

namespace attnkern {
namespace cuda {
namespace detail {
namespace {

__device__ __forceinline__ float half_bits_to_float(uint16_t bits) {
  __half h;
  memcpy(&h, &bits, sizeof(h));
  return __half2float(h);
}

template <QuantType QT>
__device__ __forceinline__ float widen(uint8_t x) {
  if constexpr (QT == QuantType::kInt8) {
    return float(static_cast<int8_t>(x));
  } else if constexpr (QT == QuantType::kUInt8) {
    return float(x);
  } else if constexpr (QT == QuantType::kFp8E5M2) {
    return half_bits_to_float(static_cast<uint16_t>(uint16_t(x) << 8));
  } else {
    // e4m3fn's only NaN, S.1111.111, becomes a float16 NaN; it has no infinities.
    const uint16_t sign = static_cast<uint16_t>(uint16_t(x & 0x80) << 8);
    const uint16_t em = x & 0x7f;
    const uint16_t bits = em == 0x7f ? uint16_t(sign | 0x7e00) : uint16_t(sign | (em << 7));
    return half_bits_to_float(bits) * 256.f;
  }
}

// This lane's slice (the float32 lane layout of bucket DB) of a stored row of length d,
// dequantized; elements >= d read as 0 and are never touched.
template <QuantType QT, int DB>
__device__ __forceinline__ void load_quant_slice(const uint8_t* row, int d, int j, float s, float c,
                                                 float (&out)[Lanes<float, DB>::EPL]) {
  using LN = Lanes<float, DB>;
#pragma unroll
  for (int i = 0; i < LN::VPL; ++i) {
    const int e0 = (i * LN::LPK + j) * LN::VEC;
#pragma unroll
    for (int e = 0; e < LN::VEC; ++e) {
      out[i * LN::VEC + e] =
          e0 + e < d ? __fadd_rn(__fmul_rn(widen<QT>(__ldg(row + e0 + e)), s), c) : 0.f;
    }
  }
}

template <QuantType QT, int DB, int QG>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    attention_pool_quant_fwd_kernel(const PoolProblem p, const QuantRows qr, float* out, float* lse,
                                    int64_t num_qgroups, int64_t total_warps) {
  using LN = Lanes<float, DB>;
  constexpr int LPK = LN::LPK;
  constexpr int KPS = LN::KPS;
  constexpr int EPL = LN::EPL;
  constexpr int U = fwd_keys_per_group(EPL, QG);

  const WarpLanes wl = warp_lanes<LPK>(p);
  for (int64_t w = first_warp(); w < total_warps; w += warp_stride()) {
    const auto [b, h, split, qgrp] = warp_item(p, w, num_qgroups, 1);
    const RowSpan<uint8_t> row = row_span<uint8_t>(p, b, h);
    // The (scale, bias) of position pos: prow + pos * H.
    const int64_t prow = b * qr.p_sb + row.rr.start * p.H + h;

    float q[QG][EPL];
    load_queries<float, DB, false, QG>(p, wl, b, h, qgrp, q);
    OnlineSoftmax<LPK, EPL, QG> sm;
    for (int64_t base = 0; base < row.rr.len; base += KPS * U) {
      // KeyTile's fields, loaded here: built as a KeyTile (with these loads), the kernels with 4
      // queries and head dims <= 64 spilled 192 bytes under the register cap (sm_90); so, none.
      float k[U][EPL];
      float v[U][EPL];
      bool ok[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t pos = base + u * KPS + wl.g;
        ok[u] = pos < row.rr.len && position_valid(p.rows, b, pos);
        if (ok[u]) {  // only valid positions (and their row parameters) are read
          const int64_t pr = prow + pos * p.H;
          load_quant_slice<QT, DB>(row.key + pos * p.k_sl, wl.dk, wl.j, qr.k_scale[pr],
                                   qr.k_bias != nullptr ? qr.k_bias[pr] : 0.f, k[u]);
          load_quant_slice<QT, DB>(row.value + pos * p.v_sl, wl.dv, wl.j, qr.v_scale[pr],
                                   qr.v_bias != nullptr ? qr.v_bias[pr] : 0.f, v[u]);
        } else {
#pragma unroll
          for (int e = 0; e < EPL; ++e) {
            k[u][e] = 0.f;
            v[u][e] = 0.f;
          }
        }
      }
      sm.add_keys(p.scale, q, k, v, ok, [&](int qi, int u) {
        return ok[u] ? bias_at<float>(p, b, qgrp * QG + qi, h, row.rr.start + base + u * KPS + wl.g)
                     : 0.f;
      });
    }
    sm.finish();
    if (wl.g == 0) {
      for_each_query<QG>(p, b, h, qgrp, [&](int qi, int64_t r) {
        store_slice_f32<float, DB>(out + r * wl.dv, wl.dv, wl.j, sm.acc[qi]);
        if (wl.j == 0) lse[r] = sm.lse(qi);
      });
    }
  }
}

template <typename F>
void dispatch_quant(QuantType t, F&& f) {
  switch (t) {
    case QuantType::kInt8:
      f(std::integral_constant<QuantType, QuantType::kInt8>{});
      break;
    case QuantType::kUInt8:
      f(std::integral_constant<QuantType, QuantType::kUInt8>{});
      break;
    case QuantType::kFp8E4M3:
      f(std::integral_constant<QuantType, QuantType::kFp8E4M3>{});
      break;
    case QuantType::kFp8E5M2:
      f(std::integral_constant<QuantType, QuantType::kFp8E5M2>{});
      break;
  }
}

}  // namespace
}  // namespace detail

cudaError_t launch_quant_fwd(const PoolProblem& p, const QuantRows& qr, float* out, float* lse,
                             cudaStream_t stream) {
  using namespace detail;
  if (p.B == 0 || p.N == 0 || p.H == 0) return cudaSuccess;
  const int qg = fwd_query_group(p.N);
  const int64_t num_qgroups = ceil_div(p.N, qg);
  const int64_t total_warps = p.B * p.H * num_qgroups;
  const unsigned blocks = grid_blocks(total_warps);
  dispatch_quant(qr.type, [&](auto qt) {
    dispatch_bucket(head_bucket(p.Dk, p.Dv), [&](auto db) {
      auto launch = [&](auto qgc) {
        attention_pool_quant_fwd_kernel<decltype(qt)::value, decltype(db)::value, decltype(qgc)::value>
            <<<blocks, kThreads, 0, stream>>>(p, qr, out, lse, num_qgroups, total_warps);
      };
      if (qg == 1) {
        launch(std::integral_constant<int, 1>{});
      } else {
        launch(std::integral_constant<int, 4>{});
      }
    });
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace attnkern
