// Portable tiled kernels (attention_pool_tile_impl.h over one fp32 lane): tiles of 4 queries x 4 keys in
// scalar registers. They serve CPUs without AVX2 (and aarch64), and ATTNKERN_CPU_ISA=generic.
// Compiled with the extension's baseline flags, so torch/c10 headers are safe here.
#include <algorithm>

#include "vec_scalar.h"
#include "attention_pool_tile_impl.h"

namespace attnkern {
namespace cpu {
namespace {
// One rounding per fma, as the vector FMA instructions: forward and backward score identically.
using TileScalar = VecScalar<float, /*kFusedFma=*/true>;
}  // namespace

int64_t tile_query_chunks(int64_t N, int64_t ntasks) {
  // Kept as it was when it also fixed the chunk size, so that the queries are chunked (never the
  // keys split) exactly where they were; the chunks themselves: tile_chunks_for_threads.
  const int64_t by_size = N >= 256 ? N / 128 : N / 64, by_items = (64 + ntasks - 1) / (ntasks > 0 ? ntasks : 1);
  const int64_t c = by_size < by_items ? by_size : by_items;
  return c > 1 ? c : 1;
}

int64_t tile_chunks_for_threads(int64_t N, int64_t Dk, int64_t Dv, int64_t ntasks, int64_t threads) {
  // Each chunk packs its task's K/V again, which at 128 queries a chunk took about a tenth of
  // the bf16 inference path's time at D = 32: so as few chunks as give every thread the same
  // number of them, each at most about 512 KiB of query rows and output accumulators (4 bytes
  // an element of Dk + Dv a query), which stay in L2 while the key blocks stream past.
  const int64_t cap = std::max<int64_t>(128, (int64_t(1) << 17) / std::max<int64_t>(1, Dk + Dv));
  const int64_t c0 = std::max<int64_t>(1, (N + cap - 1) / cap);
  for (int64_t c = c0; c < c0 + threads; ++c)
    if ((ntasks * c) % threads == 0) return std::min(c, N);
  return std::min(c0, N);
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
