// Portable sequence-attention kernels (one lane): float64 on every CPU, every dtype on CPUs
// without AVX2. Compiled with the extension's baseline flags.
#include "sequence_attention_kernels.h"

// As attention_pool_generic.cpp: the one-lane path gains nothing from the loop vectoriser,
// which GCC 12 has miscompiled on such code.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-tree-vectorize")
#endif

#include "vec_scalar.h"
#include "sequence_attention_impl.h"

namespace attnkern {
namespace cpu {

SeqKernels seq_generic_kernels() {
  return {&seq_fwd_entry<VecScalar<float, true>>, &seq_bwd_entry<VecScalar<float, true>>};
}

SeqKernels seq_generic_f64_kernels() {
  return {&seq_fwd_entry<VecScalar<double, true>>, &seq_bwd_entry<VecScalar<double, true>>};
}

}  // namespace cpu
}  // namespace attnkern
