// 8 x 8 fp32 transposes in AVX registers, for the tiled kernels' key panels
// (attention_pool_tile_impl.h's pack_block, through transpose_rows): vec_avx2.h and vec_avx512.h
// include this inside their target regions (every one of them, the emulation build's too,
// enables AVX2), so each translation unit gets its own copy.
#pragma once

#include <stdint.h>

namespace attnkern {
namespace cpu {
namespace {

// dst[d * ds + j] = rows[j * rs + d] for the 8 rows j < 8 and d < D; the rows must be readable
// up to D rounded up to 8.
inline void transpose8_rows(const float* rows, int64_t rs, int64_t D, float* dst, int64_t ds) {
  for (int64_t d = 0; d < D; d += 8) {
    __m256 r[8];
    for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_ps(rows + j * rs + d);
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    __m256 c[8];
    c[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
    c[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    c[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
    c[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    c[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
    c[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    c[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
    c[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
    const int64_t n = D - d < 8 ? D - d : 8;
    for (int64_t i = 0; i < n; ++i) _mm256_storeu_ps(dst + (d + i) * ds, c[i]);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace attnkern
