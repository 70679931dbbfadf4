// The interface between the attention-weights launcher (attention_weights_launch.cpp) and its
// per-ISA kernels (attention_weights_{generic,avx2,avx512}.cpp over attention_weights_impl.h).
// No torch/STL header: the kernel files are compiled for AVX2 / AVX-512 by target pragmas.
#pragma once

#include <stdint.h>

#include "score_rows.h"

namespace attnkern {
namespace cpu {

// One call: the rows to score (score_rows.h; the ops see one query head per K/V head, Hkv = H),
// the query block size and the outputs.
struct WeightsParams : ScoreRows {
  int64_t QB;  // queries (n, h) per work item
  void* w;     // padded [B, N, H, L], jagged [T, N, H], in A; every entry of a row written once
  void* lse;   // [B, N, H] in A
};

// The items [begin, end): item = (b * H + h) * blocks + block, a block of QB queries n of row b
// and head h. scratch: L (padded) or the longest row's length (jagged) values of A.
using WeightsFn = void (*)(const WeightsParams&, int64_t begin, int64_t end, void* scratch);

// The backward of one call (no bias: its gradient is dS itself): with dW the gradient of the
// weights w and dlse that of lse, per query dS_l = w_l (dW_l - sum_l' dW_l' w_l' + dlse) over the
// positions that take part (the softmax's backward: lse's own gradient is w), then
// dq = scale dS K and dk = scale dS^T Q. Positions outside the row are never read.
struct WeightsBwdParams : ScoreRows {
  const void* dw;    // like w, in A
  const void* w;     // the forward's weights
  const void* dlse;  // [B, N, H] in A, or null (no gradient of lse)
  void* dq;          // [B, N, H, Dk] in A
  void* dk;          // [rows, H, Dk] in A: every row of the item's rows written (0 outside the row)
  void* ds;          // like w, in A (0 outside the row), or null: dS is not wanted
};

// The (row, head) items [begin, end): item = b * H + h, all N queries of the row. scratch: N *
// (the longest row + Dkp) values of A.
using WeightsBwdFn = void (*)(const WeightsBwdParams&, int64_t begin, int64_t end, void* scratch);

// One function per key element type.
struct WeightsKernels {
  WeightsFn f32, bf16, f16;
  WeightsBwdFn bwd_f32, bwd_bf16, bwd_f16;
};

WeightsKernels weights_generic_kernels();
WeightsFn weights_generic_f64_kernel();  // float64 inputs on every instruction set
WeightsBwdFn weights_generic_f64_bwd_kernel();
WeightsKernels weights_avx2_kernels();
WeightsKernels weights_avx512_kernels();

}  // namespace cpu
}  // namespace attnkern
