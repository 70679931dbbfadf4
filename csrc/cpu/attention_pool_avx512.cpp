// AVX-512 kernels (16 fp32 lanes). The whole translation unit is compiled for AVX-512 by
// avx512_target_push.h, never by a global -mavx512 flag, so the extension still loads on any x86-64 CPU:
// the launcher calls into this file only after checking the CPU at run time. No torch/STL
// header is included here (see attention_pool_kernels.h for why).
#if defined(__x86_64__) || defined(_M_X64)

#include "avx512_target_push.h"

#include "attention_pool_kernels.h"
#include "attention_pool_impl.h"

namespace attnkern {
namespace cpu {
namespace {

inline __mmask16 lanes(int n) { return (__mmask16)((1u << n) - 1u); }

struct Vec512 {
  using A = float;
  static constexpr int W = 16;
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
  static Vec512 from_bf16(__m256i h) {
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
  }
  // Round to nearest even (the conversion torch uses); NaN stays NaN.
  __m256i to_bf16() const {
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
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
  static Vec512 fma(Vec512 a, Vec512 b, Vec512 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  float reduce_add() const { return _mm512_reduce_add_ps(v); }
  float reduce_max() const { return _mm512_reduce_max_ps(v); }

  // 2^x: round-to-nearest split x = n + f, |f| <= 1/2, exp2_poly(f) (attention_pool_impl.h) scaled by
  // 2^n. Below -126 (incl. -inf): exactly 0; from 128 up: +inf; NaN stays NaN (max/min return
  // their second operand, x, when it is NaN).
  static Vec512 exp2(Vec512 x) {
    const __m512 xc = _mm512_min_ps(_mm512_set1_ps(127.f), _mm512_max_ps(_mm512_set1_ps(-126.f), x.v));
    const __m512 n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 y = exp2_poly(Vec512{_mm512_sub_ps(xc, n)}).v;
    __m512 r = _mm512_scalef_ps(y, n);
    r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x.v, _mm512_set1_ps(-126.f), _CMP_NLT_UQ), r);  // NaN: kept
    return {_mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(x.v, _mm512_set1_ps(128.f), _CMP_GE_OQ),
                               _mm512_set1_ps(__builtin_inff()))};
  }
  // Lanes 0..7 of a then lanes 0..7 of b (concat_lo); lanes 8..15 of both (concat_hi).
  static Vec512 concat_lo(Vec512 a, Vec512 b) { return {_mm512_shuffle_f32x4(a.v, b.v, 0x44)}; }
  static Vec512 concat_hi(Vec512 a, Vec512 b) { return {_mm512_shuffle_f32x4(a.v, b.v, 0xEE)}; }
  Vec512 mask_tail(int nb) const { return {_mm512_mask_blend_ps(lanes(nb), _mm512_set1_ps(-__builtin_inff()), v)}; }

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
};

void zero_avx512(void* p, int64_t bytes) {
  char* c = static_cast<char*>(p);
  for (; bytes > 0 && (reinterpret_cast<uintptr_t>(c) & 63); --bytes) *c++ = 0;
  const __m512i z = _mm512_setzero_si512();
  for (; bytes >= 64; bytes -= 64, c += 64) _mm512_stream_si512(reinterpret_cast<__m512i*>(c), z);
  for (; bytes > 0; --bytes) *c++ = 0;
  _mm_sfence();
}

}  // namespace

KernelTable avx512_kernels() {
  return {&fwd_entry<Vec512>, &bwd_entry<Vec512>, &stats_entry<Vec512>, &zero_avx512, &workspace_entry<Vec512>};
}

}  // namespace cpu
}  // namespace attnkern

#include "target_pop.h"

#endif  // x86-64
