// AVX-512 quantized-K/V attention-pool kernel with AVX512-VNNI (attention_pool_quant_vnni.h:
// one query of int8/uint8 rows scored and summed in integer dot products), compiled for
// AVX-512 + VNNI by avx512_target_push.h (AVX2 over avx512_emulation.h in the emulation test
// build) and chosen by the launcher for the avx512_bf16 and amx paths. Everything else is the
// avx512 kernel's code (attention_pool_quant_impl.h).
#if defined(__x86_64__) || defined(_M_X64)

#define ATTNKERN_AVX512_VNNI
#include "avx512_target_push.h"

#define ATTNKERN_QUANT_ISA 3
#include "attention_pool_quant_kernels.h"
#include "vec_avx512.h"
#include "attention_pool_quant_impl.h"

namespace attnkern {
namespace cpu {

QuantFwdFn quant_avx512_vnni_kernel() { return &quant_fwd_entry<Vec512>; }

}  // namespace cpu
}  // namespace attnkern

#include "target_pop.h"

#endif  // x86-64
