// Portable kernels: one lane, plain C++ the compiler may auto-vectorise. They serve float64
// on every CPU, and every dtype on CPUs without AVX2 (and on aarch64). Compiled with the
// extension's baseline flags, so torch/c10 headers are safe here.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>

#include "attention_pool_kernels.h"

// GCC 12's loop vectoriser miscompiled an earlier form of block_dots for this one-lane vector
// (a chained in-order reduction); the portable path gains nothing from it, so it is off here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-tree-vectorize")
#endif

#include "vec_scalar.h"
#include "attention_pool_impl.h"

namespace attnkern {
namespace cpu {
namespace {

void fwd_generic(const FwdParams& p, const Span& s, void* ws, void* acc, void* m, void* l) {
  if (p.dtype == kF64)
    fwd_entry<VecScalar<double>>(p, s, ws, acc, m, l);
  else
    fwd_entry<VecScalar<float>>(p, s, ws, acc, m, l);
}

void bwd_generic(const BwdParams& p, const Span& s, void* ws, void* dq) {
  if (p.dtype == kF64)
    bwd_entry<VecScalar<double>>(p, s, ws, dq);
  else
    bwd_entry<VecScalar<float>>(p, s, ws, dq);
}

void stats_generic(const FwdParams& p, const Span& s, void* ws, void* m, void* l) {
  if (p.dtype == kF64)
    stats_entry<VecScalar<double>>(p, s, ws, m, l);
  else
    stats_entry<VecScalar<float>>(p, s, ws, m, l);
}

void zero_generic(void* p, int64_t bytes) { std::memset(p, 0, size_t(bytes)); }

}  // namespace

void prefetch_span_head(const FwdParams& p, const Span& s) {
  if (p.prefetch <= 0) return;
  switch (p.dtype) {
    case kF64: prefetch_head<double>(p, s); break;
    case kF32: prefetch_head<float>(p, s); break;
    default: prefetch_head<uint16_t>(p, s); break;
  }
}

// workspace_entry depends only on the lane count (1 here), not on the accumulator type.
KernelTable generic_kernels() {
  return {&fwd_generic, &bwd_generic, &stats_generic, &zero_generic, &workspace_entry<VecScalar<float>>};
}

}  // namespace cpu
}  // namespace attnkern
