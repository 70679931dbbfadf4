// Launch function of the CUDA attention weights (attnkern::attention_weights_fwd /
// jagged_attention_weights_fwd, the math of attnkern.reference.attention_weights_ref): raw
// pointers and strides, as attention_pool_kernels.h; the torch glue (attention_weights_cuda.cpp)
// checks the inputs and allocates the outputs.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "attention_pool_kernels.h"

namespace attnkern {
namespace cuda {

// Where the weight of query n of row b, head h at key row r (padded: the position; jagged: the
// row's start plus the position) goes: w[b * sb + n * sn + h * sh + r * sl], float32. The
// caller zero-fills w: only valid positions are written.
struct WeightsOut {
  float* w = nullptr;
  int64_t sb = 0, sn = 0, sh = 0, sl = 0;
  // Padded: L. A row whose sum is NaN (a NaN logit) is NaN at each of its L positions, valid or
  // not, as the reference's w = p / l gives it. Jagged: 0 (a row is its valid positions).
  int64_t nan_fill = 0;
};

// p as for launch_fwd, with the value unused (value = key, Dv = Dk). lse: [B, N, H] contiguous.
cudaError_t launch_weights_fwd(const PoolProblem& p, const WeightsOut& out, float* lse, cudaStream_t stream);

}  // namespace cuda
}  // namespace attnkern
