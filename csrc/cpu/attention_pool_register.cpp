// Registration of the four attention-pool ops' CPU launchers (attention_pool_launch.h).
#include <torch/library.h>

#include "attention_pool_launch.h"

TORCH_LIBRARY_IMPL(attnkern, CPU, m) {
  m.impl("attention_pool_fwd", &attnkern::attention_pool_fwd_cpu);
  m.impl("attention_pool_bwd", &attnkern::attention_pool_bwd_cpu);
  m.impl("jagged_attention_pool_fwd", &attnkern::jagged_attention_pool_fwd_cpu);
  m.impl("jagged_attention_pool_bwd", &attnkern::jagged_attention_pool_bwd_cpu);
}

// Sparse, mkldnn and nested CPU tensors dispatch to these keys; the launchers' first checks
// (check_dense) turn them into a TypeError that names the argument, instead of the
// dispatcher's "could not run ... with arguments from the SparseCPU backend".
#define ATTNKERN_REJECT_LAYOUT(KEY)                                                       \
  TORCH_LIBRARY_IMPL(attnkern, KEY, m) {                                                 \
    m.impl("attention_pool_fwd", &attnkern::attention_pool_fwd_cpu);                     \
    m.impl("attention_pool_bwd", &attnkern::attention_pool_bwd_cpu);                     \
    m.impl("jagged_attention_pool_fwd", &attnkern::jagged_attention_pool_fwd_cpu);       \
    m.impl("jagged_attention_pool_bwd", &attnkern::jagged_attention_pool_bwd_cpu);       \
  }
ATTNKERN_REJECT_LAYOUT(SparseCPU)
ATTNKERN_REJECT_LAYOUT(SparseCsrCPU)
ATTNKERN_REJECT_LAYOUT(MkldnnCPU)
ATTNKERN_REJECT_LAYOUT(NestedTensorCPU)
#undef ATTNKERN_REJECT_LAYOUT
