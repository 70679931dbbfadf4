// Plain-data interface of the tiled (GEMM-like) CPU kernels for many queries per history.
// Same rules as kernel_common.h: no torch/STL headers, no inline functions (this header is
// included by translation units compiled for AVX2 / AVX-512).
#pragma once

#include <stdint.h>

#include "kernel_common.h"

namespace attnkern {
namespace cpu {

// Queries per (row, head) from which the launcher runs the tiled kernels (float32, float16,
// bfloat16; float64 keeps the general kernels).
constexpr int64_t kTileMinQueries = 16;

// Query chunks per (row, head) task for the launcher's forward split when there are few tasks
// (1: split the keys instead). Chunks of at least 64 queries keep the per-chunk K/V packing
// small next to the arithmetic; about 64 work items in all.
int64_t tile_query_chunks(int64_t N, int64_t ntasks);

// Workspace (float elements) the tiled kernels need, forward and backward, on every ISA.
int64_t tile_workspace_elems(int64_t N, int64_t Dk, int64_t Dv);

// Same contracts as FwdFn/BwdFn in kernel_common.h (float accumulators only).
void tile_fwd_generic(const FwdParams& p, const Span& s, void* ws, void* acc, void* m, void* l);
void tile_bwd_generic(const BwdParams& p, const Span& s, void* ws, void* dq);
#if defined(__x86_64__) || defined(_M_X64)
void tile_fwd_avx2(const FwdParams& p, const Span& s, void* ws, void* acc, void* m, void* l);
void tile_bwd_avx2(const BwdParams& p, const Span& s, void* ws, void* dq);
void tile_fwd_avx512(const FwdParams& p, const Span& s, void* ws, void* acc, void* m, void* l);
void tile_bwd_avx512(const BwdParams& p, const Span& s, void* ws, void* dq);
#endif

}  // namespace cpu
}  // namespace attnkern
