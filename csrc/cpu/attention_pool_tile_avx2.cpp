// Tiled kernels (attention_pool_tile_impl.h) for AVX2/FMA/F16C: 8 fp32 lanes, tiles of 6 queries x 16 keys
// (12 score accumulators in registers). Compiled for AVX2 by avx2_target_push.h, never by a
// global flag; the launcher checks the CPU before calling in. No torch/STL header here (see
// attention_pool_kernels.h for why).
#if defined(__x86_64__) || defined(_M_X64)

#include "avx2_target_push.h"

#include "attention_pool_tile_impl.h"
#include "transpose8_avx2.h"

namespace attnkern {
namespace cpu {
namespace {

struct TileVec256 {
  static constexpr int W = 8, MR = 6, NV = 2, CG = 2, KB = 64;
  static constexpr bool kPairDot = false;  // no bf16 pair dot products (attention_pool_tile_avx512_vec.h)
  __m256 v;

  static TileVec256 zero() { return {_mm256_setzero_ps()}; }
  static TileVec256 set1(float a) { return {_mm256_set1_ps(a)}; }
  static TileVec256 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static TileVec256 load(const bf16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
  }
  static TileVec256 load(const fp16_t* p) { return {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p))}; }
  void store(float* p) const { _mm256_storeu_ps(p, v); }

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

  TileVec256 operator+(TileVec256 b) const { return {_mm256_add_ps(v, b.v)}; }
  TileVec256 operator-(TileVec256 b) const { return {_mm256_sub_ps(v, b.v)}; }
  TileVec256 operator*(TileVec256 b) const { return {_mm256_mul_ps(v, b.v)}; }
  static TileVec256 fma(TileVec256 a, TileVec256 b, TileVec256 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  static TileVec256 max(TileVec256 a, TileVec256 b) { return {_mm256_max_ps(a.v, b.v)}; }
  float hmax() const {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  float hsum() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  TileVec256 mask_tail(int n) const {
    const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return {_mm256_blendv_ps(_mm256_set1_ps(-__builtin_inff()), v, _mm256_castsi256_ps(keep))};
  }
  // 2^x: x = n + f (round to nearest, |f| <= 1/2), a degree-5 minimax polynomial of 2^f
  // (relative error 1e-7, below the rounding of an fp32 logit), times 2^n added into the
  // exponent field. max()/min() take x as their second operand, so a NaN lane stays NaN; lanes
  // below -125 (incl. -inf) are set to exactly 0, lanes from 128 up (incl. +inf) to +inf (a
  // +inf logit must show in the result, as in the reference).
  static TileVec256 exp2(TileVec256 x) {
    const __m256 xc = _mm256_min_ps(_mm256_set1_ps(127.f), _mm256_max_ps(_mm256_set1_ps(-125.f), x.v));
    const __m256 n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(xc, n);
    __m256 y = _mm256_set1_ps(1.326460061769931e-03f);
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(9.671514518998413e-03f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(5.550734171906474e-02f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(2.4022242044256292e-01f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(6.931469772847576e-01f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
    const __m256 r = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(y), e));
    const __m256 z = _mm256_blendv_ps(r, _mm256_setzero_ps(), _mm256_cmp_ps(x.v, _mm256_set1_ps(-125.f), _CMP_LT_OQ));
    return {_mm256_blendv_ps(z, _mm256_set1_ps(__builtin_inff()), _mm256_cmp_ps(x.v, _mm256_set1_ps(128.f), _CMP_GE_OQ))};
  }
  // dst[d * NR + j] = rows[j * rs + d] for the W rows j < 8 and d < D (rows readable up to
  // D rounded up to 8).
  template <int NR>
  static void transpose_rows(const float* rows, int64_t rs, int64_t D, float* dst) {
    transpose8_rows(rows, rs, D, dst, NR);
  }
};

}  // namespace

void tile_fwd_avx2(const FwdParams& p, const Span& s, void* ws, void* acc, void* m, void* l) {
  tile_fwd_entry<TileVec256>(p, s, ws, acc, m, l);
}
void tile_bwd_avx2(const BwdParams& p, const Span& s, void* ws, void* dq) { tile_bwd_entry<TileVec256>(p, s, ws, dq); }
void tile_stats_avx2(const FwdParams& p, const Span& s, void* ws, void* m, void* l) {
  tile_stats_entry<TileVec256>(p, s, ws, m, l);
}
int64_t tile_workspace_avx2(int64_t N, int64_t Dk, int64_t Dv) { return tile_ws_elems<TileVec256>(N, Dk, Dv); }

}  // namespace cpu
}  // namespace attnkern

#include "target_pop.h"

#endif  // x86-64
