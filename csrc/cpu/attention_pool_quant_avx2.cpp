// AVX2 quantized-K/V attention-pool kernel (8 fp32 lanes), compiled for AVX2/FMA/F16C by
// avx2_target_push.h and called only after isa_dispatch.h has checked the CPU.
#if defined(__x86_64__) || defined(_M_X64)

#include "avx2_target_push.h"

#define ATTNKERN_QUANT_ISA 1
#include "attention_pool_quant_kernels.h"
#include "vec_avx2.h"
#include "attention_pool_quant_impl.h"

namespace attnkern {
namespace cpu {

QuantFwdFn quant_avx2_kernel() { return &quant_fwd_entry<Vec256>; }

}  // namespace cpu
}  // namespace attnkern

#include "target_pop.h"

#endif  // x86-64
