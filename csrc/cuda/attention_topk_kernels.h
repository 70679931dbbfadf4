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

// The attention pool's problem (query [B, N, H, Dk]; key padded [B, L, Hkv, Dk] with rows.mode
// kAll / kLengths / kMask, or jagged [T, Hkv, Dk] with L = T and k_sb = 0; the score bias; rows
// clamped on the device, innermost strides 1) with the value unused, and query head h reading
// key head h / (H / Hkv).
struct TopkProblem : PoolProblem {
  int64_t Hkv = 1, K = 0;
  // [B, N, H, K] contiguous, every slot written: the best first, then score -inf / index -1.
  float* scores = nullptr;
  int64_t* indices = nullptr;
};

cudaError_t launch_topk_fwd(const TopkProblem& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace attnkern
