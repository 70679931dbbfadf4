// The AVX-512 (F/BW/VL/DQ) vector type (16 fp32 lanes) of the AVX-512 kernels of every op family
// (attention_pool_avx512.cpp, attention_pool_tile_avx512*.cpp, attention_pool_tile_amx.cpp,
// activation_unit_avx512.cpp): the interface of vec_common.h. Each includes it after
// avx512_target_push.h (and so, in the emulation build, after avx512_emulation.h), so each gets
// its own copy (internal linkage).
// With ATTNKERN_AVX512_BF16 defined it also has the bf16 pair products of AVX512-BF16
// (vdpbf16ps): kPairDot, load_bits, set1_bits, join_pairs, dot_pairs.
#pragma once

#include "vec_avx2.h"  // AVX2 is part of every AVX-512 target: its fp16 element conversions

namespace attnkern {
namespace cpu {
namespace {

typedef uint32_t U32x16 __attribute__((vector_size(64)));

inline __mmask16 lanes(int n) { return n <= 0 ? __mmask16(0) : n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u); }

struct Vec512 {
  using A = float;
  using M = __mmask16;
  static constexpr int W = 16;
  static constexpr bool kScalar = false;
#if defined(ATTNKERN_AVX512_BF16)
  static constexpr bool kPairDot = true;
#else
  static constexpr bool kPairDot = false;
#endif
  __m512 v;

  static Vec512 zero() { return {_mm512_setzero_ps()}; }
  static Vec512 set1(float a) { return {_mm512_set1_ps(a)}; }
  static Vec512 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec512 load(const bf16_t* p) { return from_bf16(_mm256_loadu_si256((const __m256i*)p)); }
  static Vec512 load(const fp16_t* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p))}; }
  static Vec512 load_partial(const float* p, int n) { return {_mm512_maskz_loadu_ps(lanes(n), p)}; }
  static Vec512 load_partial(const bf16_t* p, int n) { return from_bf16(_mm256_maskz_loadu_epi16(lanes(n), p)); }
  static Vec512 load_partial(const fp16_t* p, int n) {
    return {_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes(n), p))};
  }
  // 32 bfloat16 elements as two fp32 vectors, lane l of even holding element 2l and of odd
  // element 2l + 1: a shift and a mask within each 32-bit lane, where widening 16 elements
  // in order takes a lane-crossing vpmovzxwd.
  static void load_pairs(const bf16_t* p, Vec512& even, Vec512& odd) {
    const __m512i x = _mm512_loadu_si512(p);
    even.v = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
    odd.v = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(int(0xffff0000u))));
  }
  // even and odd as load_pairs leaves them -> the 32 elements in order, 0..15 in lo.
  static void interleave_pairs(Vec512 even, Vec512 odd, Vec512& lo, Vec512& hi) {
    const __m512i i0 = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i i1 = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    lo.v = _mm512_permutex2var_ps(even.v, i0, odd.v);
    hi.v = _mm512_permutex2var_ps(even.v, i1, odd.v);
  }
  static Vec512 from_bf16(__m256i h) {
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
  }
  __m256i to_bf16() const {
    U32x16 u;
    __builtin_memcpy(&u, &v, 64);
    bf16_round_bits(u);
    __m512i r;
    __builtin_memcpy(&r, &u, 64);
    return _mm512_cvtepi32_epi16(r);
  }
  __m256i to_fp16() const { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store(bf16_t* p) const { _mm256_storeu_si256((__m256i*)p, to_bf16()); }
  void store(fp16_t* p) const { _mm256_storeu_si256((__m256i*)p, to_fp16()); }
  // Streaming (non-temporal) stores; p is aligned to the full vector width.
  void stream(float* p) const { _mm512_stream_ps(p, v); }
  void stream(bf16_t* p) const { _mm256_stream_si256((__m256i*)p, to_bf16()); }
  void stream(fp16_t* p) const { _mm256_stream_si256((__m256i*)p, to_fp16()); }
  static void fence() { _mm_sfence(); }
  void store_partial(float* p, int n) const { _mm512_mask_storeu_ps(p, lanes(n), v); }
  void store_partial(bf16_t* p, int n) const { _mm256_mask_storeu_epi16(p, lanes(n), to_bf16()); }
  void store_partial(fp16_t* p, int n) const { _mm256_mask_storeu_epi16(p, lanes(n), to_fp16()); }

  Vec512 operator+(Vec512 b) const { return {_mm512_add_ps(v, b.v)}; }
  Vec512 operator-(Vec512 b) const { return {_mm512_sub_ps(v, b.v)}; }
  Vec512 operator*(Vec512 b) const { return {_mm512_mul_ps(v, b.v)}; }
  Vec512 operator/(Vec512 b) const { return {_mm512_div_ps(v, b.v)}; }
  static Vec512 fma(Vec512 a, Vec512 b, Vec512 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  static Vec512 max(Vec512 a, Vec512 b) { return {_mm512_max_ps(a.v, b.v)}; }
  static Vec512 min(Vec512 a, Vec512 b) { return {_mm512_min_ps(a.v, b.v)}; }
  // GCC's order (avx512_emulation.h repeats it): halves, quarters, lanes (0, 2) and (1, 3), the
  // two; the tree transpose_reduce sums each vector in (the single-query forward relies on it).
  float reduce_add() const { return _mm512_reduce_add_ps(v); }
  float reduce_max() const { return _mm512_reduce_max_ps(v); }
  static M lt(Vec512 a, Vec512 b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ); }
  static M ge(Vec512 a, Vec512 b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_GE_OQ); }
  static M gt(Vec512 a, Vec512 b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ); }
  static M unord(Vec512 a, Vec512 b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_UNORD_Q); }
  static Vec512 select(M m, Vec512 a, Vec512 b) { return {_mm512_mask_blend_ps(m, b.v, a.v)}; }
  static Vec512 round(Vec512 x) { return {_mm512_roundscale_ps(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
  static Vec512 scale_pow2(Vec512 y, Vec512 n) { return {_mm512_scalef_ps(y.v, n.v)}; }
  Vec512 mask_tail(int n) const { return {_mm512_mask_blend_ps(lanes(n), _mm512_set1_ps(-__builtin_inff()), v)}; }

  // Lanes 0..7 of a then lanes 0..7 of b (concat_lo); lanes 8..15 of both (concat_hi).
  static Vec512 concat_lo(Vec512 a, Vec512 b) { return {_mm512_shuffle_f32x4(a.v, b.v, 0x44)}; }
  static Vec512 concat_hi(Vec512 a, Vec512 b) { return {_mm512_shuffle_f32x4(a.v, b.v, 0xEE)}; }

  // 16 vectors -> one whose lane j is the sum of a[j]: four rounds of pairwise lane shuffles.
  static Vec512 transpose_reduce(const Vec512* a) {
    __m512 c[8], e[4], g[2];
    for (int i = 0; i < 8; ++i)
      c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i].v, a[2 * i + 1].v, 0x44),
                           _mm512_shuffle_f32x4(a[2 * i].v, a[2 * i + 1].v, 0xEE));
    for (int i = 0; i < 4; ++i)
      e[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                           _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; ++i)
      g[i] = _mm512_add_ps(_mm512_shuffle_ps(e[2 * i], e[2 * i + 1], 0x44),
                           _mm512_shuffle_ps(e[2 * i], e[2 * i + 1], 0xEE));
    const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(g[0], g[1], 0x88), _mm512_shuffle_ps(g[0], g[1], 0xDD));
    // r[4l + i] holds key 4i + l; put key j in lane j.
    const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return {_mm512_permutexvar_ps(idx, r)};
  }
  // dst[d * NR + j] = rows[j * rs + d] for the W rows j and d < D (rows readable up to D
  // rounded up to 8), as two 8-row halves.
  template <int NR>
  static void transpose_rows(const float* rows, int64_t rs, int64_t D, float* dst) {
    transpose8_rows(rows, rs, D, dst, NR);
    transpose8_rows(rows + 8 * rs, rs, D, dst + 8, NR);
  }

#if defined(ATTNKERN_AVX512_BF16)
  // Raw 32-bit lanes (two bf16 elements each, element 2i in the low half) carried in a vector.
  static Vec512 load_bits(const uint32_t* p) { return {_mm512_castsi512_ps(_mm512_loadu_si512(p))}; }
  static Vec512 set1_bits(uint32_t a) { return {_mm512_castsi512_ps(_mm512_set1_epi32(int(a)))}; }
  // Pair lanes from two vectors of fp32 values that are bf16 values (low halves zero): even's
  // bf16 bits in the low half, odd's in the high half (the halves do not overlap: + is |).
  static Vec512 join_pairs(Vec512 even, Vec512 odd) {
    const __m512i lo = _mm512_srli_epi32(_mm512_castps_si512(even.v), 16);
    const __m512i hi = _mm512_and_si512(_mm512_castps_si512(odd.v), _mm512_set1_epi32(int(0xffff0000u)));
    return {_mm512_castsi512_ps(_mm512_add_epi32(lo, hi))};
  }
  // Both fp32 vectors rounded to bf16 (to nearest, ties away from zero: one integer add each)
  // and joined as join_pairs does, even's in the low halves. A NaN may come out as any value:
  // for the inference path's probabilities only, whose fp32 sum carries the NaN to the row.
  static Vec512 round_join_pairs(Vec512 even, Vec512 odd) {
    const __m512i half = _mm512_set1_epi32(0x8000);
    const __m512i lo = _mm512_srli_epi32(_mm512_add_epi32(_mm512_castps_si512(even.v), half), 16);
    const __m512i hi =
        _mm512_and_si512(_mm512_add_epi32(_mm512_castps_si512(odd.v), half), _mm512_set1_epi32(int(0xffff0000u)));
    return {_mm512_castsi512_ps(_mm512_add_epi32(lo, hi))};
  }
  // acc + a.lo * b.lo + a.hi * b.hi per lane (vdpbf16ps: exact bf16 products, fp32 sums).
  static Vec512 dot_pairs(Vec512 acc, Vec512 a, Vec512 b) {
    return {_mm512_dpbf16_ps(acc.v, (__m512bh)_mm512_castps_si512(a.v), (__m512bh)_mm512_castps_si512(b.v))};
  }
#endif
};

}  // namespace
}  // namespace cpu
}  // namespace attnkern
