// Portable top-k kernels (one lane): float64 on every CPU, every dtype on CPUs without AVX2.
// Compiled with the extension's baseline flags.
#include "attention_topk_kernels.h"

// As attention_pool_generic.cpp: the one-lane path gains nothing from the loop vectoriser,
// which GCC 12 has miscompiled on such code.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-tree-vectorize")
#endif

#include "vec_scalar.h"
#include "attention_topk_impl.h"

namespace attnkern {
namespace cpu {

TopkKernels topk_generic_kernels() { return topk_kernels_of<VecScalar<float, true>>(); }

TopkFn topk_generic_f64_kernel() { return &topk_fwd_entry<VecScalar<double, true>, double>; }

}  // namespace cpu
}  // namespace attnkern
