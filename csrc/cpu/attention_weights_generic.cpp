// Portable attention-weights kernels (one lane): float64 on every CPU, every dtype on CPUs without AVX2.
// Compiled with the extension's baseline flags.
#include "attention_weights_kernels.h"

// As attention_pool_generic.cpp: the one-lane path gains nothing from the loop vectoriser,
// which GCC 12 has miscompiled on such code.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-tree-vectorize")
#endif

#include "vec_scalar.h"
#include "attention_weights_impl.h"

namespace attnkern {
namespace cpu {

WeightsKernels weights_generic_kernels() { return weights_kernels_of<VecScalar<float, true>>(); }

WeightsFn weights_generic_f64_kernel() { return &weights_fwd_entry<VecScalar<double, true>, double>; }

WeightsBwdFn weights_generic_f64_bwd_kernel() { return &weights_bwd_entry<VecScalar<double, true>, double>; }

}  // namespace cpu
}  // namespace attnkern
