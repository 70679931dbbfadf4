// Large CPU output tensors (the key/value gradients) backed by transparent huge pages and a
// small reuse cache. A fresh multi-megabyte allocation otherwise costs one page fault per 4 KiB
// page on first touch, which on small machines takes longer than the whole backward kernel.
#pragma once

#include <ATen/ATen.h>

namespace attnkern {
namespace cpu {

// An uninitialised contiguous tensor like at::empty(sizes, options). Sizes of 4 MiB and more are
// mapped with MADV_HUGEPAGE (Linux) and, once freed, kept for reuse by the next request of the
// same size (at most ATTNKERN_CPU_BUFFER_CACHE_MB, default 256; 0 disables the cache).
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace cpu
}  // namespace attnkern
