// Registration of the four attention-pool ops' CPU launchers (attention_pool_launch.h), under
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
