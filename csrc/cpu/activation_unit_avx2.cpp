// AVX2/FMA block kernels of the activation unit (8 fp32 lanes). Compiled for AVX2/FMA by the
// pragma below, never by a global flag; the launcher checks the CPU before calling in.
// No torch/STL header is included here (see activation_unit_kernels.h for why).
#if defined(__x86_64__) || defined(_M_X64)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#include <immintrin.h>

#include "activation_unit_kernels.h"
#include "activation_unit_impl.h"

namespace attnkern {
namespace cpu {
namespace {

struct AuVec256 {
  using A = float;
  static constexpr int W = 8;
  __m256 v;

  static AuVec256 zero() { return {_mm256_setzero_ps()}; }
  static AuVec256 set1(float a) { return {_mm256_set1_ps(a)}; }
  static AuVec256 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  AuVec256 operator+(AuVec256 b) const { return {_mm256_add_ps(v, b.v)}; }
  AuVec256 operator-(AuVec256 b) const { return {_mm256_sub_ps(v, b.v)}; }
  AuVec256 operator*(AuVec256 b) const { return {_mm256_mul_ps(v, b.v)}; }
  AuVec256 operator/(AuVec256 b) const { return {_mm256_div_ps(v, b.v)}; }
  static AuVec256 fma(AuVec256 a, AuVec256 b, AuVec256 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  static AuVec256 max(AuVec256 a, AuVec256 b) { return {_mm256_max_ps(a.v, b.v)}; }
  static AuVec256 min(AuVec256 a, AuVec256 b) { return {_mm256_min_ps(a.v, b.v)}; }
  static AuVec256 select_pos(AuVec256 z, AuVec256 a, AuVec256 b) {
    return {_mm256_blendv_ps(b.v, a.v, _mm256_cmp_ps(z.v, _mm256_setzero_ps(), _CMP_GT_OQ))};
  }
  float reduce_add() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  // e^x: x = n ln2 + f (|f| <= ln2 / 2, ln2 split in two for an exact product), e^f by a
  // degree-6 polynomial (relative error ~2e-7), 2^n built in the exponent field. Inputs are
  // clamped to [-87.3, 88.7]: e^x saturates at FLT_MAX-ish / ~1e-38 instead of inf / denormals,
  // which is what sigmoid needs (1 / (1 + e^-x) is then exactly 1 or ~1e-38). NaN propagates.
  static AuVec256 exp(AuVec256 x) {
    const __m256 xc = _mm256_min_ps(_mm256_max_ps(x.v, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.7f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.4426950408889634f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
    f = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), f);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(f, f), _mm256_add_ps(f, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 r = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    // NaN inputs: min/max above return the clamp bound, so put the NaN back.
    return {_mm256_blendv_ps(r, x.v, _mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q))};
  }
};

}  // namespace

AuKernels<float> au_avx2_f32() { return au_table<AuVec256>("avx2"); }

}  // namespace cpu
}  // namespace attnkern

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // x86-64
