// Portable tiled kernels (attention_pool_tile_impl.h over one fp32 lane): tiles of 4 queries x 4 keys in
// scalar registers. They serve CPUs without AVX2 (and aarch64), and ATTNKERN_CPU_ISA=generic.
// Compiled with the extension's baseline flags, so torch/c10 headers are safe here.
#include "vec_scalar.h"
#include "attention_pool_tile_impl.h"

namespace attnkern {
namespace cpu {
namespace {
// One rounding per fma, as the vector FMA instructions: forward and backward score identically.
using TileScalar = VecScalar<float, /*kFusedFma=*/true>;
}  // namespace

int64_t tile_query_chunks(int64_t N, int64_t ntasks) {
  // From 256 queries on, chunks of at least 128: the inference path's arithmetic per key is short
  // enough that repacking K/V for every 64 queries took about 8% of its time at D = 32. Below 256
  // the 64 of old, so that the queries are chunked (never the keys split) exactly where they were.
  const int64_t by_size = N >= 256 ? N / 128 : N / 64, by_items = (64 + ntasks - 1) / (ntasks > 0 ? ntasks : 1);
  const int64_t c = by_size < by_items ? by_size : by_items;
  return c > 1 ? c : 1;
}

void tile_fwd_generic(const FwdParams& p, const Span& s, void* ws, void* acc, void* m, void* l) {
  tile_fwd_entry<TileScalar>(p, s, ws, acc, m, l);
}
void tile_bwd_generic(const BwdParams& p, const Span& s, void* ws, void* dq) {
  tile_bwd_entry<TileScalar>(p, s, ws, dq);
}
void tile_stats_generic(const FwdParams& p, const Span& s, void* ws, void* m, void* l) {
  tile_stats_entry<TileScalar>(p, s, ws, m, l);
}
int64_t tile_workspace_generic(int64_t N, int64_t Dk, int64_t Dv) { return tile_ws_elems<TileScalar>(N, Dk, Dv); }

}  // namespace cpu
}  // namespace attnkern
