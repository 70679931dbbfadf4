// The AVX-512 vector class of the tiled kernels (attention_pool_tile_impl.h), shared by attention_pool_tile_avx512.cpp and
// attention_pool_tile_avx512_bf16.cpp: each includes it after avx512_target_push.h (and so, in the emulation
// build, after avx512_emulation.h), so each gets its own copy (internal linkage).
// With ATTNKERN_AVX512_BF16 defined (attention_pool_tile_avx512_bf16.cpp) it also scores bf16 inputs on
// pairs of elements with vdpbf16ps (AVX512-BF16): kPairDot, load_bits, set1_bits, dot_pairs.
#pragma once

#include "attention_pool_tile_impl.h"
#include "transpose8_avx2.h"

namespace attnkern {
namespace cpu {
namespace {

struct TileVec512 {
  static constexpr int W = 16, MR = 8, NV = 2, CG = 2, KB = 64;
#if defined(ATTNKERN_AVX512_BF16)
  static constexpr bool kPairDot = true;
#else
  static constexpr bool kPairDot = false;
#endif
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
  // 2^x as in attention_pool_tile_avx2.cpp (degree-5 polynomial), with the 2^n scaling done by vscalefps;
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
  // dst[d * NR + j] = rows[j * rs + d] for the W rows j and d < D (rows readable up to D
  // rounded up to 8: they are Dp = D rounded up to W long), as two 8-row halves.
  template <int NR>
  static void transpose_rows(const float* rows, int64_t rs, int64_t D, float* dst) {
    transpose8_rows(rows, rs, D, dst, NR);
    transpose8_rows(rows + 8 * rs, rs, D, dst + 8, NR);
  }

#if defined(ATTNKERN_AVX512_BF16)
  // Raw 32-bit lanes (two bf16 elements each, element 2i in the low half) carried in a vector.
  static TileVec512 load_bits(const uint32_t* p) { return {_mm512_castsi512_ps(_mm512_loadu_si512(p))}; }
  static TileVec512 set1_bits(uint32_t a) { return {_mm512_castsi512_ps(_mm512_set1_epi32(int(a)))}; }
  // Pair lanes from two vectors of fp32 values that are bf16 values (low halves zero): even's
  // bf16 bits in the low half, odd's in the high half (the halves do not overlap: + is |).
  static TileVec512 join_pairs(TileVec512 even, TileVec512 odd) {
    const __m512i lo = _mm512_srli_epi32(_mm512_castps_si512(even.v), 16);
    const __m512i hi = _mm512_and_si512(_mm512_castps_si512(odd.v), _mm512_set1_epi32(int(0xffff0000u)));
    return {_mm512_castsi512_ps(_mm512_add_epi32(lo, hi))};
  }
  // acc + a.lo * b.lo + a.hi * b.hi per lane (vdpbf16ps: exact bf16 products, fp32 sums).
  static TileVec512 dot_pairs(TileVec512 acc, TileVec512 a, TileVec512 b) {
    return {_mm512_dpbf16_ps(acc.v, (__m512bh)_mm512_castps_si512(a.v), (__m512bh)_mm512_castps_si512(b.v))};
  }
#endif
#if defined(ATTNKERN_AMX)
  // The W lanes as bf16 bit patterns at d (round to nearest even, NaN stays NaN, as from_f32).
  void store_bf16(uint16_t* d) const {
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    _mm256_storeu_si256((__m256i*)d, _mm512_cvtepi32_epi16(r));
  }
#endif
};

}  // namespace
}  // namespace cpu
}  // namespace attnkern
