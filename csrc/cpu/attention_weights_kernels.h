// The interface between the attention-weights launcher (attention_weights_launch.cpp) and its
// per-ISA kernels (attention_weights_{generic,avx2,avx512}.cpp over attention_weights_impl.h).
// No torch/STL header: the kernel files are compiled for AVX2 / AVX-512 by target pragmas.
#pragma once

#include <stdint.h>

namespace attnkern {
namespace cpu {

// The query rows are padded to a multiple of the widest vector (16 fp32 lanes).
constexpr int64_t kWeightsQueryAlign = 16;

// One call. The query and the bias are contiguous in the accumulator type A (float, or double
// for float64 inputs); the key is contiguous in its own dtype and read as it is.
struct WeightsParams {
  const void* q;  // [B, N, H, Dkp]: Dk padded with zeros to whole vectors of every width (Dkp)
  const void* k;  // [rows, H, Dk]: padded rows b * L + l, jagged rows starts[b] + l
  int64_t B, N, H, Dk, Dkp, L;
  int64_t QB;             // queries (n, h) per work item
  const int64_t* starts;  // [B]: the first key row of row b
  const int64_t* lens;    // [B]: the positions of row b that may take part
  const uint8_t* mask;    // [B, L] (padded with a mask) or null: position l takes part iff set
  double scale;
  const void* bias;  // [B, Nb, Hb, L] padded or [T, Nb, Hb] jagged, or null
  int64_t Nb, Hb;
  bool jagged;
  void* w;    // padded [B, N, H, L], jagged [T, N, H], in A; every entry of a row written once
  void* lse;  // [B, N, H] in A
};

// The items [begin, end): item = (b * H + h) * blocks + block, a block of QB queries n of row b
// and head h. scratch: L (padded) or the longest row's length (jagged) values of A.
using WeightsFn = void (*)(const WeightsParams&, int64_t begin, int64_t end, void* scratch);

// One function per key element type.
struct WeightsKernels {
  WeightsFn f32, bf16, f16;
};

WeightsKernels weights_generic_kernels();
WeightsFn weights_generic_f64_kernel();  // float64 inputs on every instruction set
WeightsKernels weights_avx2_kernels();
WeightsKernels weights_avx512_kernels();

}  // namespace cpu
}  // namespace attnkern
