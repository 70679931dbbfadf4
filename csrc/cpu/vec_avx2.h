// The AVX2/FMA/F16C vector type (8 fp32 lanes) of the AVX2 kernels of every op family
// (attention_pool_avx2.cpp, attention_pool_tile_avx2.cpp, activation_unit_avx2.cpp): the
// interface of vec_common.h. Included after avx2_target_push.h (and, in the emulation build,
// by the AVX-512 files too), so each translation unit gets its own copy (internal linkage).
#pragma once

#include "transpose8_avx2.h"
#include "vec_common.h"

namespace attnkern {
namespace cpu {
namespace {

typedef uint32_t U32x8 __attribute__((vector_size(32)));

inline float to_f32(fp16_t x) { return _cvtsh_ss(x.x); }
inline void from_f32(float x, fp16_t* d) { d->x = _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

struct Vec256 {
  using A = float;
  using M = __m256;
  static constexpr int W = 8;
  static constexpr bool kScalar = false, kPairDot = false;
  __m256 v;

  static Vec256 zero() { return {_mm256_setzero_ps()}; }
  static Vec256 set1(float a) { return {_mm256_set1_ps(a)}; }
  static Vec256 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec256 load(const bf16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
  }
  static Vec256 load(const fp16_t* p) { return {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p))}; }
  // As Vec512::load_pairs: 16 bfloat16 elements, element 2l in lane l of even, 2l + 1 of odd.
  static void load_pairs(const bf16_t* p, Vec256& even, Vec256& odd) {
    const __m256i x = _mm256_loadu_si256((const __m256i*)p);
    even.v = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
    odd.v = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(int(0xffff0000u))));
  }
  static void interleave_pairs(Vec256 even, Vec256 odd, Vec256& lo, Vec256& hi) {
    const __m256 a = _mm256_unpacklo_ps(even.v, odd.v);  // elements 0-3 | 8-11
    const __m256 b = _mm256_unpackhi_ps(even.v, odd.v);  // 4-7 | 12-15
    lo.v = _mm256_permute2f128_ps(a, b, 0x20);
    hi.v = _mm256_permute2f128_ps(a, b, 0x31);
  }
  // Tails go through a zeroed stack copy: never a read past the n valid elements.
  template <class T>
  static Vec256 load_partial(const T* p, int n) {
    T buf[W];
    for (int i = 0; i < W; ++i) buf[i] = T{};
    for (int i = 0; i < n; ++i) buf[i] = p[i];
    return load(buf);
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store(bf16_t* p) const {
    U32x8 u = (U32x8)_mm256_castps_si256(v);
    bf16_round_bits(u);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32((__m256i)u, (__m256i)u), 0x08);
    _mm_storeu_si128((__m128i*)p, _mm256_castsi256_si128(packed));
  }
  void store(fp16_t* p) const {
    _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // Streaming (non-temporal) stores; p is aligned to the full vector width.
  void stream(float* p) const { _mm256_stream_ps(p, v); }
  template <class T>
  void stream(T* p) const {
    T buf[W];
    store(buf);
    _mm_stream_si128((__m128i*)p, _mm_loadu_si128((const __m128i*)buf));
  }
  static void fence() { _mm_sfence(); }
  template <class T>
  void store_partial(T* p, int n) const {
    T buf[W];
    store(buf);
    for (int i = 0; i < n; ++i) p[i] = buf[i];
  }

  Vec256 operator+(Vec256 b) const { return {_mm256_add_ps(v, b.v)}; }
  Vec256 operator-(Vec256 b) const { return {_mm256_sub_ps(v, b.v)}; }
  Vec256 operator*(Vec256 b) const { return {_mm256_mul_ps(v, b.v)}; }
  Vec256 operator/(Vec256 b) const { return {_mm256_div_ps(v, b.v)}; }
  static Vec256 fma(Vec256 a, Vec256 b, Vec256 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  static Vec256 max(Vec256 a, Vec256 b) { return {_mm256_max_ps(a.v, b.v)}; }
  static Vec256 min(Vec256 a, Vec256 b) { return {_mm256_min_ps(a.v, b.v)}; }
  // The tree transpose_reduce sums each vector in (the single-query forward relies on it).
  float reduce_add() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  float reduce_max() const {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  static M lt(Vec256 a, Vec256 b) { return _mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ); }
  static M ge(Vec256 a, Vec256 b) { return _mm256_cmp_ps(a.v, b.v, _CMP_GE_OQ); }
  static M gt(Vec256 a, Vec256 b) { return _mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ); }
  static M unord(Vec256 a, Vec256 b) { return _mm256_cmp_ps(a.v, b.v, _CMP_UNORD_Q); }
  static Vec256 select(M m, Vec256 a, Vec256 b) { return {_mm256_blendv_ps(b.v, a.v, m)}; }
  static Vec256 round(Vec256 x) { return {_mm256_round_ps(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
  // 2^n built in the exponent field (n in [-126, 127]), then one exact multiply.
  static Vec256 scale_pow2(Vec256 y, Vec256 n) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)), 23);
    return {_mm256_mul_ps(y.v, _mm256_castsi256_ps(e))};
  }
  Vec256 mask_tail(int n) const {
    const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return {_mm256_blendv_ps(_mm256_set1_ps(-__builtin_inff()), v, _mm256_castsi256_ps(keep))};
  }

  // Lanes 0..3 of a then lanes 0..3 of b (concat_lo); lanes 4..7 of both (concat_hi).
  static Vec256 concat_lo(Vec256 a, Vec256 b) { return {_mm256_permute2f128_ps(a.v, b.v, 0x20)}; }
  static Vec256 concat_hi(Vec256 a, Vec256 b) { return {_mm256_permute2f128_ps(a.v, b.v, 0x31)}; }

  // 8 vectors -> one whose lane j is the sum of a[j]: three rounds of pairwise shuffles.
  static Vec256 transpose_reduce(const Vec256* a) {
    __m256 c[4], e[2];
    for (int i = 0; i < 4; ++i)
      c[i] = _mm256_add_ps(_mm256_permute2f128_ps(a[2 * i].v, a[2 * i + 1].v, 0x20),
                           _mm256_permute2f128_ps(a[2 * i].v, a[2 * i + 1].v, 0x31));
    for (int i = 0; i < 2; ++i)
      e[i] = _mm256_add_ps(_mm256_shuffle_ps(c[2 * i], c[2 * i + 1], 0x44),
                           _mm256_shuffle_ps(c[2 * i], c[2 * i + 1], 0xEE));
    const __m256 r = _mm256_add_ps(_mm256_shuffle_ps(e[0], e[1], 0x88), _mm256_shuffle_ps(e[0], e[1], 0xDD));
    // r[4l + i] holds key 2i + l; put key j in lane j.
    return {_mm256_permutevar8x32_ps(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))};
  }
  // dst[d * NR + j] = rows[j * rs + d] for the W rows j < 8 and d < D (rows readable up to
  // D rounded up to 8).
  template <int NR>
  static void transpose_rows(const float* rows, int64_t rs, int64_t D, float* dst) {
    transpose8_rows(rows, rs, D, dst, NR);
  }
};

}  // namespace
}  // namespace cpu
}  // namespace attnkern
