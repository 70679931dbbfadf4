// Launch functions of the attnkern CUDA kernels: raw pointers, element strides, sizes and a
// cudaStream_t. No torch headers here, so the .cu files compile fast and stay reusable; the
// torch glue (attention_pool_cuda.cpp) checks inputs, allocates outputs and scratch, and calls
// these.
//
// Every tensor's innermost (head-dim) stride must be 1; all other strides are free (stride 0
// for expanded tensors included). All index math on the device is int64.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace attnkern {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// How the valid key positions of row b are found. The kernels clamp every value they read,
// so malformed lengths/offsets can never make them read out of bounds:
//   kAll:     positions [0, L)
//   kLengths: positions [0, clamp(lengths[b], 0, L))
//   kMask:    positions l in [0, L) with mask[b, l] != 0
//   kJagged:  key rows [start, end), start = clamp(offsets[b], 0, T),
//             end = clamp(offsets[b + 1], start, T), and end <= start + max_length when
//             max_length >= 0.
enum class RowMode : int { kAll = 0, kLengths = 1, kMask = 2, kJagged = 3 };

struct RowSpec {
  RowMode mode = RowMode::kAll;
  const void* index = nullptr;  // lengths [B] or offsets [B + 1]
  bool index_is_int64 = false;
  int64_t index_stride = 1;
  const bool* mask = nullptr;  // [B, L]
  int64_t mask_stride_b = 0;
  int64_t mask_stride_l = 0;
  int64_t max_length = -1;  // jagged only; -1 = unknown
};

// Shapes and strides shared by the forward and the backward launchers. Strides are in elements.
// Padded: key [B, L, H, Dk], value [B, L, H, Dv]. Jagged: key [T, H, Dk], value [T, H, Dv],
// with L = T and the batch strides of key/value ignored (set them to 0).
struct PoolProblem {
  DType dtype = DType::kFloat32;
  int64_t B = 0, N = 0, H = 0, L = 0, Dk = 0, Dv = 0;
  const void* query = nullptr;  // [B, N, H, Dk]
  int64_t q_sb = 0, q_sn = 0, q_sh = 0;
  const void* key = nullptr;
  int64_t k_sb = 0, k_sl = 0, k_sh = 0;
  const void* value = nullptr;
  int64_t v_sb = 0, v_sl = 0, v_sh = 0;
  RowSpec rows;
  float scale = 1.f;
  // Optional score bias added to each logit, never read at positions that take part in no
  // row: query n of row b, head h, key row r (padded: the position; jagged: the row's start
  // plus the position) reads bias[b * bias_sb + (n % bias_nb) * bias_sn + h * bias_sh +
  // r * bias_sl], float32 (bias_f32) or the inputs' dtype; bias_sh = 0 shares it by the heads.
  const void* bias = nullptr;
  bool bias_f32 = true;
  int64_t bias_nb = 1, bias_sb = 0, bias_sn = 0, bias_sh = 0, bias_sl = 0;
};

// ---------------------------------------------------------------- forward
struct FwdPlan {
  int num_splits = 1;     // > 1: partial results into scratch, then a combine pass
  int64_t split_block = 0;  // keys per split block (splits take blocks round-robin)
};

// Picks the split-L factor so that B * H * query-groups * splits fills the GPU.
FwdPlan plan_fwd(const PoolProblem& p, int num_sms);

// Scratch floats the forward needs for a plan: partial outputs and each split's (max, sum).
int64_t fwd_scratch_floats(const PoolProblem& p, const FwdPlan& plan);

// out: [B, N, H, Dv] contiguous float32 (unrounded, for every input dtype); lse: [B, N, H]
// contiguous float32.
// scratch: fwd_scratch_floats() floats (may be null when that is 0).
cudaError_t launch_fwd(const PoolProblem& p, const FwdPlan& plan, void* out, float* lse,
                       float* scratch, cudaStream_t stream);

// ---------------------------------------------------------------- backward
struct BwdInputs {
  const void* grad_out = nullptr;  // [B, N, H, Dv], innermost stride 1
  int64_t go_sb = 0, go_sn = 0, go_sh = 0;
  const float* lse = nullptr;    // [B, N, H] contiguous
  const float* delta = nullptr;  // [B, N, H] contiguous
  // With a bias: float32 accumulators of its gradient, shaped and indexed as the bias
  // (PoolProblem; gb_sh = 0 when one bias serves every head), ZERO-FILLED by the caller. The
  // dk/dv pass adds each logit's gradient, in head then query order, at its (row,
  // query % bias_nb, head, key row): one warp owns every entry (with gb_sh = 0 a warp takes
  // all heads of its positions), so the sums are deterministic without atomics.
  float* grad_bias = nullptr;
  int64_t gb_sb = 0, gb_sn = 0, gb_sh = 0, gb_sl = 0;
};

struct BwdPlan {
  int dq_splits = 1;          // split-L of the dq pass (> 1: fp32 partials + a reduce pass)
  int64_t dq_split_block = 0;
  int64_t kv_tile_slots = 1;  // warps per (row, head) in the dk/dv pass
};

BwdPlan plan_bwd(const PoolProblem& p, int num_sms);
// Scratch floats the backward needs for a plan (> 0 whenever B * N * H > 0): each query's
// softmax anchors and its per-split statistics (the probabilities are recomputed from those,
// not from the float32 lse alone, where |lse| is large: attention_pool_common.cuh), plus the
// split partials of grad_query when the dq pass is split.
int64_t bwd_scratch_floats(const PoolProblem& p, const BwdPlan& plan);

// grad_query: [B, N, H, Dk] contiguous, fully written here.
// grad_key / grad_value: contiguous, shaped like key / value, ZERO-FILLED by the caller: only
// valid positions are written (each by exactly one warp, no atomics), so every position that
// takes part in no row stays exactly zero.
// scratch: bwd_scratch_floats() floats, uninitialised (every float is written before it is read).
cudaError_t launch_bwd(const PoolProblem& p, const BwdInputs& in, const BwdPlan& plan,
                       void* grad_query, void* grad_key, void* grad_value, float* scratch,
                       cudaStream_t stream);

}  // namespace cuda
}  // namespace attnkern
