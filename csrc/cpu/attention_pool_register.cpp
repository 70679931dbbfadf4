// Registration of the four attention-pool ops' CPU launchers and the two inference ops' (attention_pool_launch.h), under
// the CPU key and under the sparse, mkldnn and nested CPU keys (register_attention_pool.h says
// why those too).
#include "attention_pool_launch.h"
#include "register_attention_pool.h"

#define ATTNKERN_CPU_POOL(KEY)                                                            \
  ATTNKERN_REGISTER_POOL(KEY, ATTNKERN_OP_NAME, attnkern::attention_pool_fwd_cpu,          \
                         attnkern::attention_pool_bwd_cpu,                                 \
                         attnkern::jagged_attention_pool_fwd_cpu,                          \
                         attnkern::jagged_attention_pool_bwd_cpu)
ATTNKERN_CPU_POOL(CPU)
ATTNKERN_CPU_POOL(SparseCPU)
ATTNKERN_CPU_POOL(SparseCsrCPU)
ATTNKERN_CPU_POOL(MkldnnCPU)
ATTNKERN_CPU_POOL(NestedTensorCPU)
#undef ATTNKERN_CPU_POOL

// The inference ops have CPU kernels only (the public function calls them for the cpu backend);
// under the same keys as the four ops, for the same refusals.
#define ATTNKERN_CPU_INFER(KEY)                                                      \
  TORCH_LIBRARY_IMPL(attnkern, KEY, m) {                                             \
    m.impl("attention_pool_infer", &attnkern::attention_pool_infer_cpu);             \
    m.impl("jagged_attention_pool_infer", &attnkern::jagged_attention_pool_infer_cpu); \
  }
ATTNKERN_CPU_INFER(CPU)
ATTNKERN_CPU_INFER(SparseCPU)
ATTNKERN_CPU_INFER(SparseCsrCPU)
ATTNKERN_CPU_INFER(MkldnnCPU)
ATTNKERN_CPU_INFER(NestedTensorCPU)
#undef ATTNKERN_CPU_INFER
