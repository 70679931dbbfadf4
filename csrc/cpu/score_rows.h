// What the kernels that score each query against the keys of its own row share
// (attention_topk_* and attention_weights_*): the problem's layout as the launchers pass it. No
// torch/STL header: the kernel files are compiled for AVX2 / AVX-512 by target pragmas.
#pragma once

#include <stdint.h>

namespace attnkern {
namespace cpu {

// The query rows are padded to a multiple of the widest vector (16 fp32 lanes).
constexpr int64_t kScoreQueryAlign = 16;

// The query and the bias are contiguous in the accumulator type A (float, or double for float64
// inputs); the key is contiguous in its own dtype and read as it is.
struct ScoreRows {
  const void* q;  // [B, N, H, Dkp]: Dk padded with zeros to whole vectors of every width (Dkp)
  const void* k;  // [rows, Hkv, Dk]: padded rows b * L + l, jagged rows starts[b] + l
  int64_t B, N, H, Hkv, Dk, Dkp, L;
  const int64_t* starts;  // [B]: the first key row of row b
  const int64_t* lens;    // [B]: the positions of row b that may take part
  const uint8_t* mask;    // [B, L] (padded with a mask) or null: position l takes part iff set
  double scale;
  const void* bias;  // [B, Nb, Hb, L] padded or [T, Nb, Hb] jagged, or null
  int64_t Nb, Hb;
  bool jagged;

  // bias[*base + l * *stride] is position l's term for query n, head h of row b.
  void bias_offsets(int64_t b, int64_t n, int64_t h, int64_t* base, int64_t* stride) const {
    const int64_t nb = n % Nb, hb = h % Hb;
    if (jagged) {
      *base = (starts[b] * Nb + nb) * Hb + hb;
      *stride = Nb * Hb;
    } else {
      *base = ((b * Nb + nb) * Hb + hb) * L;
      *stride = 1;
    }
  }
};

}  // namespace cpu
}  // namespace attnkern
