// Portable quantized-K/V attention-pool kernel (one lane): CPUs without AVX2 and
// ATTNKERN_CPU_ISA=generic. Compiled with the extension's baseline flags.
#include "attention_pool_quant_kernels.h"

// As attention_pool_generic.cpp: the one-lane path gains nothing from the loop vectoriser,
// which GCC 12 has miscompiled on such code.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-tree-vectorize")
#endif

#define ATTNKERN_QUANT_ISA 0
#include "vec_scalar.h"
#include "attention_pool_quant_impl.h"

namespace attnkern {
namespace cpu {

QuantFwdFn quant_generic_kernel() { return &quant_fwd_entry<VecScalar<float, true>>; }

}  // namespace cpu
}  // namespace attnkern
