// The interface between the top-k launcher (attention_topk_launch.cpp) and its per-ISA kernels
// (attention_topk_{generic,avx2,avx512}.cpp over attention_topk_impl.h). No torch/STL header:
// the kernel files are compiled for AVX2 / AVX-512 by target pragmas.
#pragma once

#include <stdint.h>

namespace attnkern {
namespace cpu {

// The query rows are padded to a multiple of the widest vector (16 fp32 lanes).
constexpr int64_t kTopkQueryAlign = 16;

// One call. The query and the bias are contiguous in the accumulator type A (float, or double
// for float64 inputs); the key is contiguous in its own dtype and read as it is.
struct TopkParams {
  const void* q;  // [B, N, H, Dkp]: Dk padded with zeros to whole vectors of every width (Dkp)
  const void* k;  // [rows, Hkv, Dk]: padded rows b * L + l, jagged rows starts[b] + l
  int64_t B, N, H, Hkv, Dk, Dkp, L, K;
  const int64_t* starts;  // [B]: the first key row of row b
  const int64_t* lens;    // [B]: the positions of row b that may take part
  const uint8_t* mask;    // [B, L] (padded with a mask) or null: position l takes part iff set
  double scale;
  const void* bias;  // [B, Nb, Hb, L] padded or [T, Nb, Hb] jagged, or null
  int64_t Nb, Hb;
  bool jagged;
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
