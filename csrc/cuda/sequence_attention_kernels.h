// Launch functions of the sequence-attention CUDA kernels (attnkern::sequence_attention_fwd /
// _bwd): raw pointers, sizes and a stream; no torch headers. The torch glue
// (sequence_attention_cuda.cpp) checks the inputs, clamps the rows, converts the small tables and
// allocates outputs and workspaces. The math is attnkern.reference.sequence_attention_ref; the
// op-level layout docs/sequence_attention.md.
//
// Work: a CTA takes one tile of kSeqTile positions of one row (its query block in the forward and
// the dq pass, its key block in the dk/dv pass) and walks the other side of the row tile by tile
// through shared memory; a tile pair no query of which attends any key is skipped.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "attention_pool_kernels.h"

namespace attnkern {
namespace cuda {

// Positions per tile on both sides. One warp lane per key column of a tile in the softmax
// (a warp reduces a score row with shuffles), so it is the warp size.
constexpr int kSeqTile = 32;
constexpr int kSeqThreads = 128;

struct SeqProblem {
  DType dtype = DType::kFloat32;
  int64_t B = 0, T = 0, H = 0, Hkv = 0, Dk = 0, Dv = 0;
  const void* q = nullptr;  // [T, H, Dk] contiguous
  const void* k = nullptr;  // [T, Hkv, Dk] contiguous
  const void* v = nullptr;  // [T, Hkv, Dv] contiguous
  // [4, B] int64, clamped by the launcher so that every row lies inside the T tokens: each row's
  // first token, length, number of targets (<= length) and the running sum of its tiles
  // (ceil(length / kSeqTile)), which the work decode searches.
  const int64_t* rows = nullptr;
  // CTAs along x: ceil(T / kSeqTile) + B covers every tile of disjoint rows.
  int64_t tiles = 0;
  int64_t contextual_len = 0, max_attn_len = 0;
  bool causal = true, silu = false;
  float scale = 1.f;
  // "silu": attn_scale[token * attn_scale_stride] (stride 0: one value for every query).
  const float* attn_scale = nullptr;
  int64_t attn_scale_stride = 0;
  const int64_t* query_times = nullptr;  // [T] (with time_table)
  const int64_t* key_times = nullptr;    // [T]
  const float* time_table = nullptr;     // [NB, Hb] float32
  const int64_t* time_bounds = nullptr;  // [NB - 1]: bucket(dt) = #bounds <= |dt|
  int64_t NB = 0;
  const float* position_table = nullptr;  // [P, Hb] float32
  int64_t P = 0;
  const void* bias = nullptr;  // [B, Hb, L, L] in the inputs' dtype; rows clamped to L
  int64_t L = 0;
  int64_t Hb = 1;
};

// out: [T, H, Dv] float32, lse: [T, H] float32, both pre-filled (0 / -inf) by the caller: only
// the rows' tokens are written. Dynamic shared memory bytes of the forward: seq_fwd_smem().
int64_t seq_fwd_smem(const SeqProblem& p);
cudaError_t launch_seq_fwd(const SeqProblem& p, float* out, float* lse, cudaStream_t stream);

struct SeqBwdIO {
  const void* grad_out = nullptr;  // [T, H, Dv] contiguous, the inputs' dtype
  const float* lse = nullptr;      // [T, H] (softmax)
  const float* delta = nullptr;    // [T, H] (softmax)
  void* grad_q = nullptr;          // [T, H, Dk], ZERO-FILLED: only the rows' tokens are written
  void* grad_k = nullptr;          // [T, Hkv, Dk], ZERO-FILLED
  void* grad_v = nullptr;          // [T, Hkv, Dv], ZERO-FILLED
  // Deterministic table gradients: each dk/dv CTA adds its pairs' logit gradients, in a fixed
  // order, into its own slice of these ZERO-FILLED float32 workspaces (seq_bwd_slices() slices
  // of [NB, Hb] / [P, Hb]); a second kernel sums the slices in slice order into grad_time /
  // grad_position ([NB, Hb] / [P, Hb] float32).
  float* time_ws = nullptr;
  float* position_ws = nullptr;
  float* grad_time = nullptr;
  float* grad_position = nullptr;
  // [B, Hb, L, L] float32, ZERO-FILLED: one CTA owns every entry it adds to (with Hb = 1 a CTA
  // takes every head of its key block).
  float* grad_bias = nullptr;
};

int64_t seq_bwd_slices(const SeqProblem& p);
int64_t seq_bwd_smem(const SeqProblem& p);
cudaError_t launch_seq_bwd(const SeqProblem& p, const SeqBwdIO& io, cudaStream_t stream);

}  // namespace cuda
}  // namespace attnkern
