// Tiled kernels (tile_impl.h) for AVX-512 (F/BW/VL/DQ): 16 fp32 lanes, tiles of 8 queries x
// 32 keys (16 score accumulators of the 32 registers). Compiled for AVX-512 by the pragma
// below, never by a global flag; the launcher calls in only after checking the CPU. No
// torch/STL header here (see kernel_common.h for why).
#if defined(__x86_64__) || defined(_M_X64)

#if defined(ATTNKERN_EMULATE_AVX512)
// Test build: the AVX-512 intrinsics are portable functions (avx512_emulation.h), run on AVX2.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#include "avx512_emulation.h"
#else
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif
#include <immintrin.h>
#endif

#include "tile_impl.h"

namespace attnkern {
namespace cpu {
namespace {

struct TileVec512 {
  static constexpr int W = 16, MR = 8, NV = 2, CG = 2, KB = 64;
  __m512 v;

  static TileVec512 zero() { return {_mm512_setzero_ps()}; }
  static TileVec512 set1(float a) { return {_mm512_set1_ps(a)}; }
  static TileVec512 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static TileVec512 load(const bf16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
  }
  static TileVec512 load(const fp16_t* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p))}; }
  void store(float* p) const { _mm512_storeu_ps(p, v); }

  static float to_f32(float x) { return x; }
  static float to_f32(bf16_t x) {
    const uint32_t u = uint32_t(x.x) << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
  }
  static float to_f32(fp16_t x) { return _cvtsh_ss(x.x); }
  static void from_f32(float x, float* d) { *d = x; }
  static void from_f32(float x, bf16_t* d) {  // round to nearest even; NaN stays NaN
    uint32_t u;
    __builtin_memcpy(&u, &x, 4);
    d->x = x != x ? uint16_t(0x7fc0) : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  static void from_f32(float x, fp16_t* d) { d->x = _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

  TileVec512 operator+(TileVec512 b) const { return {_mm512_add_ps(v, b.v)}; }
  TileVec512 operator-(TileVec512 b) const { return {_mm512_sub_ps(v, b.v)}; }
  TileVec512 operator*(TileVec512 b) const { return {_mm512_mul_ps(v, b.v)}; }
  static TileVec512 fma(TileVec512 a, TileVec512 b, TileVec512 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  static TileVec512 max(TileVec512 a, TileVec512 b) { return {_mm512_max_ps(a.v, b.v)}; }
  float hmax() const { return _mm512_reduce_max_ps(v); }
  float hsum() const { return _mm512_reduce_add_ps(v); }
  TileVec512 mask_tail(int n) const {
    const __mmask16 keep = n <= 0 ? __mmask16(0) : n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u);
    return {_mm512_mask_blend_ps(keep, _mm512_set1_ps(-__builtin_inff()), v)};
  }
  // 2^x as in tile_avx2.cpp (degree-5 polynomial), with the 2^n scaling done by vscalefps;
  // NaN stays NaN, lanes below -125 (incl. -inf) are exactly 0, from 128 up (incl. +inf) +inf.
  static TileVec512 exp2(TileVec512 x) {
    const __m512 xc = _mm512_min_ps(_mm512_set1_ps(127.f), _mm512_max_ps(_mm512_set1_ps(-125.f), x.v));
    const __m512 n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(xc, n);
    __m512 y = _mm512_set1_ps(1.326460061769931e-03f);
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(9.671514518998413e-03f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.550734171906474e-02f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.4022242044256292e-01f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.931469772847576e-01f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f));
    const __m512 r = _mm512_scalef_ps(y, n);
    const __m512 z = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(x.v, _mm512_set1_ps(-125.f), _CMP_LT_OQ), _mm512_setzero_ps());
    return {_mm512_mask_mov_ps(z, _mm512_cmp_ps_mask(x.v, _mm512_set1_ps(128.f), _CMP_GE_OQ),
                               _mm512_set1_ps(__builtin_inff()))};
  }
  // dst[d * NR + j] = rows[j * rs + d] for the W rows j and d < D.
  template <int NR>
  static void transpose_rows(const float* rows, int64_t rs, int64_t D, float* dst) {
    for (int j = 0; j < W; ++j)
      for (int64_t d = 0; d < D; ++d) dst[d * NR + j] = rows[j * rs + d];
  }
};

}  // namespace

void tile_fwd_avx512(const FwdParams& p, const Span& s, void* ws, void* acc, void* m, void* l) {
  tile_fwd_entry<TileVec512>(p, s, ws, acc, m, l);
}
void tile_bwd_avx512(const BwdParams& p, const Span& s, void* ws, void* dq) {
  tile_bwd_entry<TileVec512>(p, s, ws, dq);
}
void tile_stats_avx512(const FwdParams& p, const Span& s, void* ws, void* m, void* l) {
  tile_stats_entry<TileVec512>(p, s, ws, m, l);
}
int64_t tile_workspace_avx512(int64_t N, int64_t Dk, int64_t Dv) { return tile_ws_elems<TileVec512>(N, Dk, Dv); }

}  // namespace cpu
}  // namespace attnkern

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // x86-64
