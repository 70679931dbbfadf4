// Quantized-K/V attention-pool forward: the decode-style forward of attention_pool_fwd.cu (one
// warp per (row, head, query group), an fp32 online softmax in natural units over the row's
// valid keys, KPS key positions at a time) reading int8 / uint8 / float8 rows and dequantizing
// them in registers: element = stored * scale + bias per (position, head) row, rounded as the
// reference rounds it (the product, then the sum). The lane layout is float32's (4 elements a
// lane vector), so a lane reads 4 bytes of a row at a time and the query, converted to float32
// by the launcher, is held as in the float kernels. float8_e4m3fn bytes are widened through the
// float16 bits that hold them exactly (value / 256, then the exact factor 256), float8_e5m2
// bytes are the upper half of a float16.
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
  // As the float forward: enough loads in flight without spilling under the register cap.
  constexpr int U = EPL <= 4 ? 4 : (QG >= 4 ? 1 : 2);

  const WarpLanes wl = warp_lanes<LPK>(p);
  for (int64_t w = first_warp(); w < total_warps; w += warp_stride()) {
    const auto [b, h, split, qgrp] = warp_item(p, w, num_qgroups, 1);
    const RowRange rr = row_range(p.rows, b, p.L);
    const uint8_t* key = static_cast<const uint8_t*>(p.key) + b * p.k_sb + h * p.k_sh + rr.start * p.k_sl;
    const uint8_t* value = static_cast<const uint8_t*>(p.value) + b * p.v_sb + h * p.v_sh + rr.start * p.v_sl;
    // The (scale, bias) of position pos: prow + pos * H.
    const int64_t prow = b * qr.p_sb + rr.start * p.H + h;

    float q[QG][EPL];
    float m[QG];
    float l[QG];
    float acc[QG][EPL];
    load_queries<float, DB, false, QG>(p, wl, b, h, qgrp, q);
#pragma unroll
    for (int qi = 0; qi < QG; ++qi) {
#pragma unroll
      for (int e = 0; e < EPL; ++e) acc[qi][e] = 0.f;
      m[qi] = -INFINITY;
      l[qi] = 0.f;
    }

    for (int64_t base = 0; base < rr.len; base += KPS * U) {
      float k[U][EPL];
      float v[U][EPL];
      bool ok[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t pos = base + u * KPS + wl.g;
        ok[u] = pos < rr.len && position_valid(p.rows, b, pos);
        if (ok[u]) {  // only valid positions (and their row parameters) are read
          const int64_t pr = prow + pos * p.H;
          load_quant_slice<QT, DB>(key + pos * p.k_sl, wl.dk, wl.j, qr.k_scale[pr],
                                   qr.k_bias != nullptr ? qr.k_bias[pr] : 0.f, k[u]);
          load_quant_slice<QT, DB>(value + pos * p.v_sl, wl.dv, wl.j, qr.v_scale[pr],
                                   qr.v_bias != nullptr ? qr.v_bias[pr] : 0.f, v[u]);
        } else {
#pragma unroll
          for (int e = 0; e < EPL; ++e) {
            k[u][e] = 0.f;
            v[u][e] = 0.f;
          }
        }
      }
#pragma unroll
      for (int qi = 0; qi < QG; ++qi) {
        float s[U];
        float mx = m[qi];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const float bias =
              ok[u] ? bias_at<float>(p, b, qgrp * QG + qi, h, rr.start + base + u * KPS + wl.g) : 0.f;
          s[u] = logit<LPK, EPL>(q[qi], k[u], p.scale, bias);
          // A NaN logit at a valid position makes the max NaN, so that it reaches out and lse.
          if (ok[u]) mx = isnan(s[u]) ? s[u] : fmaxf(mx, s[u]);
        }
        if (mx != -INFINITY) {  // no valid key yet: skipping avoids inf - inf
          const float corr = exp_nat(m[qi] - mx);
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

    // Merge the key groups (every lane in every shuffle), then store.
    float lrow[QG];
    float mrow[QG];
#pragma unroll
    for (int qi = 0; qi < QG; ++qi) {
      const float mx = cross_group_max<LPK>(m[qi]);
      const float f = (m[qi] == -INFINITY) ? 0.f : exp_nat(m[qi] - mx);
      const float lsum = cross_group_sum<LPK>(l[qi] * f);
      const float inv = lsum == 0.f ? 0.f : 1.f / lsum;  // empty row: out 0, lse -inf
#pragma unroll
      for (int e = 0; e < EPL; ++e) acc[qi][e] = cross_group_sum<LPK>(acc[qi][e] * f) * inv;
      mrow[qi] = mx;
      lrow[qi] = lsum;
    }
    if (wl.g == 0) {
      for_each_query<QG>(p, b, h, qgrp, [&](int qi, int64_t r) {
        store_slice_f32<float, DB>(out + r * wl.dv, wl.dv, wl.j, acc[qi]);
        if (wl.j == 0) lse[r] = lrow[qi] == 0.f ? -INFINITY : mrow[qi] + logf(lrow[qi]);
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
