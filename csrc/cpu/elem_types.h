// The 16-bit input element types as the CPU kernels see them: tags only, the kernels do their
// own conversions (vec_common.h). No torch/STL header (see attention_pool_kernels.h for why).
#pragma once

#include <stdint.h>

namespace attnkern {
namespace cpu {

struct bf16_t {
  uint16_t x;
};
struct fp16_t {
  uint16_t x;
};

}  // namespace cpu
}  // namespace attnkern
