// Tiled kernels (attention_pool_tile_impl.h) for AVX-512 with AVX512-BF16: bf16 inputs are scored on pairs of
// elements with vdpbf16ps (half the multiply-add instructions of converting to fp32 first, and
// no conversion of the key block), and on the inference path (FwdParams::round_p) P V too, with
// P rounded to bf16; fp32 and fp16 inputs run attention_pool_tile_avx512.cpp's kernels. Compiled
// for that ISA by avx512_target_push.h, never by a global flag; the launcher calls in only after
// checking the CPU. No torch/STL header here (see attention_pool_kernels.h for why).
#if defined(__x86_64__) || defined(_M_X64)

#define ATTNKERN_AVX512_BF16 1  // the target below adds AVX512-BF16; vec_avx512.h the pair ops
#include "avx512_target_push.h"

#include "vec_avx512.h"
#include "attention_pool_tile_impl.h"

namespace attnkern {
namespace cpu {

void tile_fwd_avx512_bf16(const FwdParams& p, const Span& s, void* ws, void* acc, void* m, void* l) {
  if (p.dtype != kBF16) return tile_fwd_avx512(p, s, ws, acc, m, l);
  float *w = static_cast<float*>(ws), *a = static_cast<float*>(acc);
  float *mm = static_cast<float*>(m), *ll = static_cast<float*>(l);
  if (p.round_p)
    tile_fwd_span<Vec512, bf16_t, true, true>(p, s, w, a, mm, ll);
  else
    tile_fwd_span<Vec512, bf16_t, true>(p, s, w, a, mm, ll);
}
void tile_bwd_avx512_bf16(const BwdParams& p, const Span& s, void* ws, void* dq) {
  if (p.dtype != kBF16) return tile_bwd_avx512(p, s, ws, dq);
  tile_bwd_span<Vec512, bf16_t>(p, s, static_cast<float*>(ws), static_cast<float*>(dq));
}
void tile_stats_avx512_bf16(const FwdParams& p, const Span& s, void* ws, void* m, void* l) {
  if (p.dtype != kBF16) return tile_stats_avx512(p, s, ws, m, l);
  tile_fwd_span<Vec512, bf16_t, false>(p, s, static_cast<float*>(ws), nullptr, static_cast<float*>(m),
                                           static_cast<float*>(l));
}
// At least tile_workspace_avx512's (its kernels serve fp32/fp16 here): the same layout plus the
// query pairs.
int64_t tile_workspace_avx512_bf16(int64_t N, int64_t Dk, int64_t Dv) { return tile_ws_elems<Vec512>(N, Dk, Dv); }

}  // namespace cpu
}  // namespace attnkern

#include "target_pop.h"

#endif  // x86-64
