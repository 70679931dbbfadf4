// AVX2 kernels (8 fp32 lanes), for x86-64 CPUs without AVX-512. Compiled for AVX2/FMA/F16C by
// avx2_target_push.h, never by a global flag; the launcher checks the CPU before calling in.
// No torch/STL header is included here (see attention_pool_kernels.h for why).
#if defined(__x86_64__) || defined(_M_X64)

#include "avx2_target_push.h"

#include "attention_pool_kernels.h"
#include "attention_pool_impl.h"

namespace attnkern {
namespace cpu {
namespace {

struct Vec256 {
  using A = float;
  static constexpr int W = 8;
  __m256 v;

  static Vec256 zero() { return {_mm256_setzero_ps()}; }
  static Vec256 set1(float a) { return {_mm256_set1_ps(a)}; }
  static Vec256 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec256 load(const bf16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
  }
  static Vec256 load(const fp16_t* p) { return {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p))}; }
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
    const __m256i b = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
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
  static Vec256 fma(Vec256 a, Vec256 b, Vec256 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
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

  // 2^x: round-to-nearest split x = n + f, |f| <= 1/2, exp2_poly(f) (attention_pool_impl.h) scaled by
  // 2^n built in the exponent field. Below -126 (incl. -inf): exactly 0; from 128 up: +inf;
  // NaN stays NaN (max/min return their second operand, x, when it is NaN).
  static Vec256 exp2(Vec256 x) {
    const __m256 xc = _mm256_min_ps(_mm256_set1_ps(127.f), _mm256_max_ps(_mm256_set1_ps(-126.f), x.v));
    const __m256 n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 y = exp2_poly(Vec256{_mm256_sub_ps(xc, n)}).v;
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 r = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    r = _mm256_and_ps(r, _mm256_cmp_ps(x.v, _mm256_set1_ps(-126.f), _CMP_NLT_UQ));  // NaN: kept
    return {_mm256_blendv_ps(r, _mm256_set1_ps(__builtin_inff()), _mm256_cmp_ps(x.v, _mm256_set1_ps(128.f), _CMP_GE_OQ))};
  }
  Vec256 mask_tail(int nb) const {
    const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(nb), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
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
};

void zero_avx2(void* p, int64_t bytes) {
  char* c = static_cast<char*>(p);
  for (; bytes > 0 && (reinterpret_cast<uintptr_t>(c) & 31); --bytes) *c++ = 0;
  const __m256i z = _mm256_setzero_si256();
  for (; bytes >= 32; bytes -= 32, c += 32) _mm256_stream_si256(reinterpret_cast<__m256i*>(c), z);
  for (; bytes > 0; --bytes) *c++ = 0;
  _mm_sfence();
}

}  // namespace

KernelTable avx2_kernels() {
  return {&fwd_entry<Vec256>, &bwd_entry<Vec256>, &stats_entry<Vec256>, &zero_avx2, &workspace_entry<Vec256>};
}

}  // namespace cpu
}  // namespace attnkern

#include "target_pop.h"

#endif  // x86-64
