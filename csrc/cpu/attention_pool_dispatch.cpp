// Which attention-pool kernel table a call runs: the one of the instruction set the dispatcher
// (isa_dispatch.h) selected, with its tiled kernels for many queries per history; the generic
// kernels for float64.
#include <algorithm>
#include <cstdlib>

#include "attention_pool_kernels.h"
#include "attention_pool_tile_kernels.h"
#include "isa_dispatch.h"

namespace attnkern {
namespace cpu {
namespace {

// ATTNKERN_CPU_TILES=0 turns the tiled kernels off (read at every call, so that a benchmark can
// compare both paths in one process).
bool tiles_enabled() {
  const char* e = std::getenv("ATTNKERN_CPU_TILES");
  return !(e && e[0] == '0');
}

KernelTable with_tiles(KernelTable t, FwdFn fwd, BwdFn bwd, StatsFn stats, WorkspaceFn workspace) {
  t.fwd_tile = fwd;
  t.bwd_tile = bwd;
  t.stats_tile = stats;
  t.workspace_tile = workspace;
  return t;
}

const KernelTable& simd_kernels() {
  static const KernelTable table = [] {
    switch (selected_isa()) {
#if defined(__x86_64__) || defined(_M_X64)
      case Isa::kAmx:
        return with_tiles(avx512_kernels(), &tile_fwd_amx, &tile_bwd_amx, &tile_stats_amx, &tile_workspace_amx);
      case Isa::kAvx512Bf16:
        return with_tiles(avx512_kernels(), &tile_fwd_avx512_bf16, &tile_bwd_avx512_bf16, &tile_stats_avx512_bf16,
                          &tile_workspace_avx512_bf16);
      case Isa::kAvx512:
        return with_tiles(avx512_kernels(), &tile_fwd_avx512, &tile_bwd_avx512, &tile_stats_avx512,
                          &tile_workspace_avx512);
      case Isa::kAvx2:
        return with_tiles(avx2_kernels(), &tile_fwd_avx2, &tile_bwd_avx2, &tile_stats_avx2, &tile_workspace_avx2);
#endif
      default:
        return with_tiles(generic_kernels(), &tile_fwd_generic, &tile_bwd_generic, &tile_stats_generic,
                          &tile_workspace_generic);
    }
  }();
  return table;
}

}  // namespace

const KernelTable& kernels_for(int dtype) {
  static const KernelTable generic = generic_kernels();
  return dtype == kF64 ? generic : simd_kernels();
}

bool use_tiles(const KernelTable& kt, int64_t N) { return N >= kTileMinQueries && kt.fwd_tile && tiles_enabled(); }

int64_t workspace_for(const KernelTable& kt, bool tiles, int64_t N, int64_t Dk, int64_t Dv) {
  const int64_t w = kt.workspace(N, Dk, Dv);
  return tiles ? std::max(w, kt.workspace_tile(N, Dk, Dv)) : w;
}

}  // namespace cpu
}  // namespace attnkern
