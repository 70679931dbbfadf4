// Launch function of the CUDA quantized-K/V attention-pool forward (attnkern::attention_pool_quant_fwd,
// the math of attnkern.reference.attention_pool_quant_ref): raw pointers and strides, as
// attention_pool_kernels.h; the torch glue (attention_pool_quant_cuda.cpp) checks the inputs,
// converts the query and the score bias to float32 and allocates the outputs.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "attention_pool_kernels.h"

namespace attnkern {
namespace cuda {

// The stored element type of the key and value rows.
enum class QuantType : int { kInt8 = 0, kUInt8 = 1, kFp8E4M3 = 2, kFp8E5M2 = 3 };

// The per-row dequantization, element = stored * scale + bias (bias null: 0), one (scale, bias)
// per (position, head): [B, L, H] padded (p_sb = L * H) or [T, H] jagged (p_sb = 0), contiguous
// float32.
struct QuantRows {
  QuantType type = QuantType::kInt8;
  const float* k_scale = nullptr;
  const float* k_bias = nullptr;
  const float* v_scale = nullptr;
  const float* v_bias = nullptr;
  int64_t p_sb = 0;
};

// p: the problem as the float kernels see it, with p.dtype kFloat32 and p.query float32 (the
// launcher converts it), p.key / p.value the stored bytes (strides in elements, i.e. bytes), and
// p.bias float32 or null. out [B, N, H, Dv] and lse [B, N, H]: contiguous float32.
cudaError_t launch_quant_fwd(const PoolProblem& p, const QuantRows& qr, float* out, float* lse,
                             cudaStream_t stream);

}  // namespace cuda
}  // namespace attnkern
