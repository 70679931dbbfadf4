// Launch function of the CUDA top-k by score (attnkern::attention_topk_fwd, the math of
// attnkern.reference.attention_topk_ref): raw pointers, element strides and sizes, as
// attention_pool_kernels.h; the torch glue (attention_topk_cuda.cpp) checks the inputs and
// allocates the outputs.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "attention_pool_kernels.h"

namespace attnkern {
namespace cuda {

// The largest k of the CUDA kernel: each query's running top-k lives in shared memory (two
// buffers of k (score, position) pairs per query of a block). attnkern/topk.py CUDA_TOPK_MAX_K.
constexpr int64_t kTopkMaxK = 256;

// Query [B, N, H, Dk]; key padded [B, L, Hkv, Dk] (rows.mode kAll / kLengths / kMask) or jagged
// [T, Hkv, Dk] with L = T and k_sb = 0 (rows.mode kJagged); query head h reads K/V head
// h / (H / Hkv). Innermost strides 1. Rows are clamped on the device (RowSpec).
struct TopkProblem {
  DType dtype = DType::kFloat32;
  int64_t B = 0, N = 0, H = 0, Hkv = 1, Dk = 0, L = 0, K = 0;
  const void* query = nullptr;
  int64_t q_sb = 0, q_sn = 0, q_sh = 0;
  const void* key = nullptr;
  int64_t k_sb = 0, k_sl = 0, k_sh = 0;
  RowSpec rows;
  float scale = 1.f;
  // Optional float32 score bias: query n of row b, head h, key row r (padded: the position;
  // jagged: the row's start plus the position) reads bias[b * bias_sb + (n % bias_nb) * bias_sn
  // + h * bias_sh + r * bias_sl] (bias_sh = 0: one bias for every head). Read at valid
  // positions only.
  const float* bias = nullptr;
  int64_t bias_nb = 1, bias_sb = 0, bias_sn = 0, bias_sh = 0, bias_sl = 0;
  // [B, N, H, K] contiguous, every slot written: the best first, then score -inf / index -1.
  float* scores = nullptr;
  int64_t* indices = nullptr;
};

cudaError_t launch_topk_fwd(const TopkProblem& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace attnkern
