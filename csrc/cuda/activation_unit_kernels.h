// Launch functions of the activation-unit (DIN) CUDA kernels: raw pointers, element strides,
// sizes and a cudaStream_t; no torch headers (the torch glue is activation_unit_cuda.cpp).
//
// Math: activation_unit_pool_ref (attnkern/reference.py). Per query q of row b and valid
// position l, an MLP over [q, k_l, q - k_l, q * k_l] scores the position; the first layer is
// applied through its exact split W1 x_l + b1 = c_q + M_q k_l (c_q = (Wa + Wc) q + b1,
// M_q = (Wb - Wc) + Wd diag(q)), so the concatenation is never formed.
//
// query/key/value/grad_out need a unit innermost stride (other strides are free); the MLP
// parameters are contiguous. Row bounds come from the shared RowSpec (attention_pool_kernels.h)
// and are clamped on the device, so no lengths/offsets value can make a kernel read out of
// bounds.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "attention_pool_kernels.h"

namespace attnkern {
namespace cuda {

enum class AuAct : int { kRelu = 0, kSigmoid = 1, kPrelu = 2, kDice = 3 };

struct AuProblem {
  DType dtype = DType::kFloat32;
  int64_t B = 0, N = 0, L = 0, E = 0, Dv = 0;
  int64_t H1 = 0, H2 = 0;  // H2 = 0: one hidden layer
  AuAct act = AuAct::kRelu;
  int64_t act_rows = 0;    // rows of act1/act2: 0, 1 (prelu) or 3 (dice)
  bool softmax = false;
  const void* query = nullptr;  // [B, N, E]
  int64_t q_sb = 0, q_sn = 0;
  const void* key = nullptr;  // padded [B, L, E] / jagged [T, E] (k_sb = 0)
  int64_t k_sb = 0, k_sl = 0;
  const void* value = nullptr;  // padded [B, L, Dv] / jagged [T, Dv] (v_sb = 0)
  int64_t v_sb = 0, v_sl = 0;
  RowSpec rows;
  // Contiguous MLP parameters in the query dtype.
  const void* w1 = nullptr;    // [H1, 4E]
  const void* b1 = nullptr;    // [H1]
  const void* w2 = nullptr;    // [H2, H1] or null
  const void* b2 = nullptr;    // [H2] or null
  const void* w_out = nullptr;  // [H_last]
  const void* b_out = nullptr;  // [1]
  const void* act1 = nullptr;  // [act_rows, H1] or null
  const void* act2 = nullptr;  // [act_rows, H2] or null
};

// out [B, N, Dv] contiguous float32 (unrounded: the autograd forms delta from it); lse [B, N]
// contiguous float32 (log-sum-exp of the scores with softmax, -inf on empty rows; 0 without).
// max_smem: the device's opt-in shared memory per block in bytes.
// Scores mode (attnkern::activation_unit_scores_fwd): ptr null = pooling. Otherwise the block
// writes each valid position's weight (raw score, or with softmax exp(s - lse)) to
// ptr[b * sb + n * sn + pos * sl] (pos: the key row, jagged sb = 0) instead of pooling values;
// p.Dv must be 0 (out is not written) and the caller zero-fills the other positions.
struct AuScores {
  float* ptr = nullptr;
  int64_t sb = 0, sn = 0, sl = 0;
};

cudaError_t launch_au_fwd(const AuProblem& p, float* out, float* lse, int64_t max_smem,
                          int num_sms, cudaStream_t stream, const AuScores& scores = AuScores());

// Scratch of the backward: per-block partial weight gradients (fp32), summed by the caller
// over blocks in a fixed order. Layout (blocks G = au_bwd_blocks()):
//   dm  [G, H1, E]  sum dz1^T k             dmq [G, H1, E]  sum (dz1^T k) * q
//   dcq [G, H1, E]  sum (sum_l dz1) q^T     dc  [G, H1]
//   dw2 [G, H2, H1], db2 [G, H2], dwo [G, H_last], dbo [G], da1 [G, 3, H1], da2 [G, 3, H2]
struct AuBwdScratch {
  float* dm = nullptr;
  float* dmq = nullptr;
  float* dcq = nullptr;
  float* dc = nullptr;
  float* dw2 = nullptr;
  float* db2 = nullptr;
  float* dwo = nullptr;
  float* dbo = nullptr;
  float* da1 = nullptr;
  float* da2 = nullptr;
};

int64_t au_bwd_blocks(const AuProblem& p, int num_sms);

struct AuBwdInputs {
  const void* grad_out = nullptr;  // [B, N, Dv], innermost stride 1
  int64_t go_sb = 0, go_sn = 0;
  const float* lse = nullptr;    // [B, N] contiguous
  const float* delta = nullptr;  // [B, N] contiguous (read only with softmax)
  // The values are the keys (value None): the value gradient is added into grad_key and
  // grad_value is not written.
  bool shared_value = false;
};

// grad_query32 [B, N, E] fp32 contiguous, ZERO-FILLED by the caller (each row's block adds
// into it; the caller converts). grad_key / grad_value contiguous, shaped like key / value,
// ZERO-FILLED by the caller: only valid positions are written, each by exactly one block. The
// scratch buffers must be zero-filled too.
cudaError_t launch_au_bwd(const AuProblem& p, const AuBwdInputs& in, float* grad_query32,
                          void* grad_key, void* grad_value, const AuBwdScratch& s, int64_t blocks,
                          int64_t max_smem, cudaStream_t stream);

}  // namespace cuda
}  // namespace attnkern
