// Tiled kernels (attention_pool_tile_impl.h) for AVX-512 (F/BW/VL/DQ): 16 fp32 lanes, tiles of 8 queries x
// 32 keys (16 score accumulators of the 32 registers). Compiled for AVX-512 by
// avx512_target_push.h, never by a global flag; the launcher calls in only after checking the CPU. No
// torch/STL header here (see attention_pool_kernels.h for why).
#if defined(__x86_64__) || defined(_M_X64)

#include "avx512_target_push.h"

#include "vec_avx512.h"
#include "attention_pool_tile_impl.h"

namespace attnkern {
namespace cpu {

void tile_fwd_avx512(const FwdParams& p, const Span& s, void* ws, void* acc, void* m, void* l) {
  tile_fwd_entry<Vec512>(p, s, ws, acc, m, l);
}
void tile_bwd_avx512(const BwdParams& p, const Span& s, void* ws, void* dq) {
  tile_bwd_entry<Vec512>(p, s, ws, dq);
}
void tile_stats_avx512(const FwdParams& p, const Span& s, void* ws, void* m, void* l) {
  tile_stats_entry<Vec512>(p, s, ws, m, l);
}
int64_t tile_workspace_avx512(int64_t N, int64_t Dk, int64_t Dv) { return tile_ws_elems<Vec512>(N, Dk, Dv); }

}  // namespace cpu
}  // namespace attnkern

#include "target_pop.h"

#endif  // x86-64
