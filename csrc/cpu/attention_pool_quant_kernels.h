// The interface between the quantized-K/V attention-pool launcher
// (attention_pool_quant_launch.cpp) and its per-ISA kernels
// (attention_pool_quant_{generic,avx2,avx512,avx512_vnni}.cpp over attention_pool_quant_impl.h).
// As attention_pool_kernels.h: no torch/STL header and no inline function, because the kernel
// files are compiled for AVX2 / AVX-512 by target pragmas.
#pragma once

#include <stdint.h>

namespace attnkern {
namespace cpu {

// The stored element type of the quantized key and value rows.
enum QuantType : int { kQInt8 = 0, kQUInt8 = 1, kQFp8E4M3 = 2, kQFp8E5M2 = 3 };

// Positions per block of the online softmax; every vector width (1, 8, 16 lanes) divides it.
constexpr int kQuantBK = 32;
// Queries of one row per task: the query chunks of one row are independent tasks, so that a
// single long row with many queries still runs on every thread.
constexpr int64_t kQuantChunk = 32;
// From this many queries per task on, each key/value block is widened once into a float tile
// that every query reads; below it each query widens the rows itself (N = 1: no extra pass).
constexpr int64_t kQuantTileMin = 4;

// One call. Element = stored * scale + bias (bias null: 0), per (position, head) row. The
// query is float32 (the launcher converts it), out [B, N, H, Dv] and lse [B, N, H] are
// float32 contiguous. Strides in elements (bytes for K/V).
struct QuantParams {
  int qtype = kQInt8;
  const float* q = nullptr;  // [B, N, H, Dk] contiguous
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t k_sb = 0, k_sl = 0, k_sh = 0;
  int64_t v_sb = 0, v_sl = 0, v_sh = 0;
  // [B, L, H] padded (p_sb = L * H) or [T, H] jagged (p_sb = 0), contiguous; biases may be null.
  const float* k_scale = nullptr;
  const float* k_bias = nullptr;
  const float* v_scale = nullptr;
  const float* v_bias = nullptr;
  int64_t p_sb = 0;
  int64_t N = 1, H = 1, Dk = 1, Dv = 1;
  float scale = 1.f;
  // The query was bfloat16/float16 (converted to float32 by the launcher): the VNNI kernel
  // (attention_pool_quant_vnni.h) may then hold it as 15-bit integers.
  bool q_lowp = false;
  // Score bias (float32) or null: query n, head h, position pos reads
  // bias[b * bias_sb + pos * bias_sl + (n % bias_nb) * bias_sn + h * bias_sh].
  const float* bias = nullptr;
  int64_t bias_sb = 0, bias_sl = 0, bias_sn = 0, bias_sh = 0, bias_nb = 1;
  float* out = nullptr;
  float* lse = nullptr;
  // Software prefetch distance in positions (a multiple of kQuantBK; 0 = off).
  int64_t prefetch = 0;
};

// Queries [n0, n0 + nq) of row b against the row's valid positions: position i (0 <= i < count)
// is start + (idx ? idx[i] : i).
struct QuantSpan {
  int64_t b = 0, n0 = 0, nq = 0, start = 0, count = 0;
  const int64_t* idx = nullptr;
};

// Writes out/lse of the span's queries (every head); ws holds quant_workspace() floats.
typedef void (*QuantFwdFn)(const QuantParams& p, const QuantSpan& s, float* ws);

QuantFwdFn quant_generic_kernel();
#if defined(__x86_64__) || defined(_M_X64)
QuantFwdFn quant_avx2_kernel();
QuantFwdFn quant_avx512_kernel();
QuantFwdFn quant_avx512_vnni_kernel();
#endif

}  // namespace cpu
}  // namespace attnkern
