// AVX-512 quantized-K/V attention-pool kernel (16 fp32 lanes), compiled for AVX-512 by
// avx512_target_push.h (AVX2 over avx512_emulation.h in the emulation test build) and called
// only after isa_dispatch.h has checked the CPU. avx512_bf16 and amx run it too: the stored
// rows are widened to fp32 and scored against the fp32 query, so neither the bf16 pair
// products nor VNNI's int8 ones apply without rounding the query.
#if defined(__x86_64__) || defined(_M_X64)

#include "avx512_target_push.h"

#define ATTNKERN_QUANT_ISA 2
#include "attention_pool_quant_kernels.h"
#include "vec_avx512.h"
#include "attention_pool_quant_impl.h"

namespace attnkern {
namespace cpu {

QuantFwdFn quant_avx512_kernel() { return &quant_fwd_entry<Vec512>; }

}  // namespace cpu
}  // namespace attnkern

#include "target_pop.h"

#endif  // x86-64
