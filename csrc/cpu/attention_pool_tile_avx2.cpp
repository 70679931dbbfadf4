// Tiled kernels (attention_pool_tile_impl.h) for AVX2/FMA/F16C: 8 fp32 lanes, tiles of 6 queries x 16 keys
// (12 score accumulators in registers). Compiled for AVX2 by avx2_target_push.h, never by a
// global flag; the launcher checks the CPU before calling in. No torch/STL header here (see
// attention_pool_kernels.h for why).
#if defined(__x86_64__) || defined(_M_X64)

#include "avx2_target_push.h"

#include "vec_avx2.h"
#include "attention_pool_tile_impl.h"

namespace attnkern {
namespace cpu {
void tile_fwd_avx2(const FwdParams& p, const Span& s, void* ws, void* acc, void* m, void* l) {
  tile_fwd_entry<Vec256>(p, s, ws, acc, m, l);
}
void tile_bwd_avx2(const BwdParams& p, const Span& s, void* ws, void* dq) { tile_bwd_entry<Vec256>(p, s, ws, dq); }
void tile_stats_avx2(const FwdParams& p, const Span& s, void* ws, void* m, void* l) {
  tile_stats_entry<Vec256>(p, s, ws, m, l);
}
int64_t tile_workspace_avx2(int64_t N, int64_t Dk, int64_t Dv) { return tile_ws_elems<Vec256>(N, Dk, Dv); }

}  // namespace cpu
}  // namespace attnkern

#include "target_pop.h"

#endif  // x86-64
