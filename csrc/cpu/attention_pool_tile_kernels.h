// Plain-data interface of the tiled (GEMM-like) CPU kernels for many queries per history.
// Same rules as attention_pool_kernels.h: no torch/STL headers, no inline functions (this header is
// included by translation units compiled for AVX2 / AVX-512).
#pragma once

#include <stdint.h>

#include "attention_pool_kernels.h"

namespace attnkern {
namespace cpu {

// Queries per (row, head) from which the launcher runs the tiled kernels (float32, float16,
// bfloat16; float64 keeps the general kernels).
constexpr int64_t kTileMinQueries = 16;

// Whether the launcher's forward splits each (row, head) task's queries into chunks (> 1) rather
// than its keys (1) when there are few tasks: a shape-only rule (at least 64 queries a chunk, 128
// from N = 256 on, about 64 work items in all), as the key split's merge rounds differently.
int64_t tile_query_chunks(int64_t N, int64_t ntasks);
// Where it does chunk the queries, the chunks per task it runs on `threads` threads: a query's
// arithmetic is the same in any chunk, so this may follow the thread count.
int64_t tile_chunks_for_threads(int64_t N, int64_t Dk, int64_t Dv, int64_t ntasks, int64_t threads);

// Same contracts as FwdFn/BwdFn/StatsFn/WorkspaceFn in attention_pool_kernels.h (float accumulators
// only): logits s = scale * <q, k> in natural units, the forward's m and the backward's
// BwdParams::shift in those units. The stats kernels score exactly as the tiled backward does,
// so the launcher recomputes a row's shift with them for the tasks that take the tiled path.
void tile_fwd_generic(const FwdParams& p, const Span& s, void* ws, void* acc, void* m, void* l);
void tile_bwd_generic(const BwdParams& p, const Span& s, void* ws, void* dq);
void tile_stats_generic(const FwdParams& p, const Span& s, void* ws, void* m, void* l);
int64_t tile_workspace_generic(int64_t N, int64_t Dk, int64_t Dv);
#if defined(__x86_64__) || defined(_M_X64)
void tile_fwd_avx2(const FwdParams& p, const Span& s, void* ws, void* acc, void* m, void* l);
void tile_bwd_avx2(const BwdParams& p, const Span& s, void* ws, void* dq);
void tile_stats_avx2(const FwdParams& p, const Span& s, void* ws, void* m, void* l);
int64_t tile_workspace_avx2(int64_t N, int64_t Dk, int64_t Dv);
void tile_fwd_avx512(const FwdParams& p, const Span& s, void* ws, void* acc, void* m, void* l);
void tile_bwd_avx512(const BwdParams& p, const Span& s, void* ws, void* dq);
void tile_stats_avx512(const FwdParams& p, const Span& s, void* ws, void* m, void* l);
int64_t tile_workspace_avx512(int64_t N, int64_t Dk, int64_t Dv);
// AVX-512 with AVX512-BF16: bf16 scored on element pairs (vdpbf16ps), other dtypes as avx512.
void tile_fwd_avx512_bf16(const FwdParams& p, const Span& s, void* ws, void* acc, void* m, void* l);
void tile_bwd_avx512_bf16(const BwdParams& p, const Span& s, void* ws, void* dq);
void tile_stats_avx512_bf16(const FwdParams& p, const Span& s, void* ws, void* m, void* l);
int64_t tile_workspace_avx512_bf16(int64_t N, int64_t Dk, int64_t Dv);
// AVX-512 with AMX-TILE/AMX-BF16: bf16 matrix products on the tile unit (attention_pool_tile_amx.cpp), other
// dtypes as avx512_bf16. The calling thread's tiles are configured and released inside.
void tile_fwd_amx(const FwdParams& p, const Span& s, void* ws, void* acc, void* m, void* l);
void tile_bwd_amx(const BwdParams& p, const Span& s, void* ws, void* dq);
void tile_stats_amx(const FwdParams& p, const Span& s, void* ws, void* m, void* l);
int64_t tile_workspace_amx(int64_t N, int64_t Dk, int64_t Dv);
#endif

}  // namespace cpu
}  // namespace attnkern
