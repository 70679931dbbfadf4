// The interface between the top-k launcher (attention_topk_launch.cpp) and its per-ISA kernels
// (attention_topk_{generic,avx2,avx512}.cpp over attention_topk_impl.h). No torch/STL header:
// the kernel files are compiled for AVX2 / AVX-512 by target pragmas.
#pragma once

#include <stdint.h>

#include "score_rows.h"

namespace attnkern {
namespace cpu {

// One call: the rows to score (score_rows.h) and the k best of each query.
struct TopkParams : ScoreRows {
  int64_t K;
  void* scores;      // [B, N, H, K] in A: -inf filled by the launcher
  int64_t* indices;  // [B, N, H, K]: -1 filled by the launcher
};

// The items [begin, end) of b * Hkv + g: every query head of K/V head g of row b.
using TopkFn = void (*)(const TopkParams&, int64_t begin, int64_t end);

// One function per key element type.
struct TopkKernels {
  TopkFn f32, bf16, f16;
};

TopkKernels topk_generic_kernels();
TopkFn topk_generic_f64_kernel();  // float64 inputs on every instruction set
TopkKernels topk_avx2_kernels();
TopkKernels topk_avx512_kernels();

}  // namespace cpu
}  // namespace attnkern
