// The one-query int8/uint8 kernel on AVX512-VNNI integer dot products (included by
// attention_pool_quant_impl.h into attention_pool_quant_avx512_vnni.cpp only; the avx512_bf16
// and amx paths run it, every CPU with AVX512-BF16 having AVX512-VNNI).
//
// Widening each stored byte to fp32 (two instructions per 16 elements, then the fp32 products
// and a 16-way transpose to sum each row) is what bounds the float kernel: it runs at about
// 2.5x the time of reading the bytes. Here the bytes stay 8-bit:
// - Keys: the query of each head is held as integers Q = 128 hi + lo (hi, lo signed bytes,
//   |Q| <= 16256) times a power of two, so that q = Q * step exactly wherever q has at most
//   15 significant bits below its largest element: every bf16/fp16 query element within 2^7
//   (bf16) / 2^4 (fp16) of the largest is exact, smaller ones are off by at most
//   step / 2 = |q|max / 2^15. <Q, x> is then exact integer arithmetic: vpdpbusd multiplies
//   4 unsigned bytes (x + 128 for int8) by 4 signed ones (hi, then lo), the row sums come from
//   a shuffle tree over 2-4 rows per vector, and the 128 sum(Q) that the offset added is
//   taken off. Float32 queries keep the float kernel (their 24 bits would not fit).
// - Values: each block's weights p * scale of one head are held as 16-bit integers of the
//   block's largest |weight| (an error of at most 2^-16 of it per weight: a 32-position block
//   is then within 2^-11 of its weight sum, below the bf16 rounding of P the inference path
//   makes), and two positions' value rows, widened to 16 bits and interleaved, are summed per
//   element by vpdpwssd into 32-bit lanes, converted once per block. A block whose weights
//   are not all finite (a NaN or infinite score) is summed by the float kernel, so that NaN
//   and inf reach the output exactly as there.
#pragma once

namespace attnkern {
namespace cpu {
namespace {

// The stored types this kernel reads, and whether they are signed (x + 128 is then multiplied).
template <class E>
constexpr bool kByteInt = false;
template <>
constexpr bool kByteInt<int8_t> = true;
template <>
constexpr bool kByteInt<uint8_t> = true;
template <class E>
constexpr bool kSignedByte = false;
template <>
constexpr bool kSignedByte<int8_t> = true;

// Pairs of adjacent 32-bit lanes, 64-bit lanes, then 128-bit quarters of two vectors added:
// the rounds of the shuffle tree that sums each row's lanes.
inline __m512i add_pairs32(__m512i a, __m512i b) {
  return _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
}
inline __m512i add_pairs64(__m512i a, __m512i b) {
  return _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
}
inline __m512i add_quarters(__m512i a, __m512i b) {
  return _mm512_add_epi32(_mm512_shuffle_i32x4(a, b, 0x88), _mm512_shuffle_i32x4(a, b, 0xdd));
}

// 16 / RPZ vectors of RPZ rows each (row t of vector z in its t-th 512 / RPZ bits: row z RPZ + t)
// -> lane j = the sum of row j's lanes.
template <int RPZ>
inline __m512i sum_rows(const __m512i* a) {
  if constexpr (RPZ == 4) {
    // quarter l of the result holds rows l, 4 + l, 8 + l, 12 + l
    const __m512i c = add_pairs64(add_pairs32(a[0], a[1]), add_pairs32(a[2], a[3]));
    return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), c);
  } else if constexpr (RPZ == 2) {
    // quarters: rows 0 2 4 6 | 1 3 5 7 | 8 10 12 14 | 9 11 13 15
    const __m512i c0 = add_pairs64(add_pairs32(a[0], a[1]), add_pairs32(a[2], a[3]));
    const __m512i c1 = add_pairs64(add_pairs32(a[4], a[5]), add_pairs32(a[6], a[7]));
    return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15),
                                    add_quarters(c0, c1));
  } else {
    __m512i c[4];
    for (int i = 0; i < 4; ++i)
      c[i] = add_pairs64(add_pairs32(a[4 * i], a[4 * i + 1]), add_pairs32(a[4 * i + 2], a[4 * i + 3]));
    return add_quarters(add_quarters(c[0], c[1]), add_quarters(c[2], c[3]));
  }
}

// 64 bytes holding RPZ rows of 64 / RPZ bytes: rows[t] for t < RPZ.
template <int RPZ>
inline __m512i load_rows(const uint8_t* const* rows) {
  if constexpr (RPZ == 1) {
    return _mm512_loadu_si512(rows[0]);
  } else if constexpr (RPZ == 2) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[0]))),
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[1])), 1);
  } else {
    __m512i r = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[0])));
    r = _mm512_inserti32x4(r, _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[1])), 1);
    r = _mm512_inserti32x4(r, _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[2])), 2);
    return _mm512_inserti32x4(r, _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[3])), 3);
  }
}

// dst[d] for d < 32 from the two vpdpwssd accumulators of interleaved rows: lo holds elements
// 8 l + i, hi elements 8 l + 4 + i, in lane 4 l + i (l the 128-bit quarter, i < 4).
inline void unpermute_pairs(__m512 lo, __m512 hi, __m512* d0, __m512* d1) {
  const __m512i i0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i i1 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  *d0 = _mm512_permutex2var_ps(lo, i0, hi);
  *d1 = _mm512_permutex2var_ps(lo, i1, hi);
}

template <class E, int RPZ, int NC>
struct VnniRows {
  static constexpr int W = 16;
  static constexpr int NCW = NC * W;
  static constexpr int NZ = 16 / RPZ;  // key vectors per 16 rows
  static constexpr bool kSigned = kSignedByte<E>;
  const QuantParams& p;
  const FloatRows<Vec512, E, NC>& fallback;
  alignas(64) int8_t qhi[NZ][64];
  alignas(64) int8_t qlo[NZ][64];
  alignas(64) int32_t off[W];  // 128 sum(Q) of the lane's head (int8: x + 128 was multiplied)
  bool int_values;  // Dv a multiple of 32: the values are summed in 16-bit integers
  bool contiguous;  // the rows of consecutive positions and heads follow each other in memory
  // Element e of a block's 32 16-bit weights in pair order: the weight of flat row
  // (2 (P / H) + e % 2) H + P % H, P = e / 2 (two positions of one head side by side).
  alignas(64) int16_t pair_idx[32];

  // Q of every head into the byte vectors; kf[lane] = scale log2(e) step of the lane's head.
  // False when a head's query is not finite (the float kernel then runs).
  VnniRows(const QuantParams& p_, const QuantSpan& sp, const FloatRows<Vec512, E, NC>& fb, float* kf)
      : p(p_), fallback(fb) {
    const int64_t H = p.H, Dk = p.Dk;
    int16_t Q[W][64];
    float step[W];
    for (int64_t h = 0; h < H; ++h) {
      const float* q = p.q + ((sp.b * p.N + sp.n0) * H + h) * Dk;
      float mx = 0.f;
      for (int64_t d = 0; d < Dk; ++d) mx = __builtin_fabsf(q[d]) > mx ? __builtin_fabsf(q[d]) : mx;
      // the smallest power of two with |q| / step <= 16256
      int e = 0;
      const float fr = mx > 0.f ? __builtin_frexpf(mx / 16256.f, &e) : 0.f;
      step[h] = mx > 0.f ? __builtin_ldexpf(1.f, fr == 0.5f ? e - 1 : e) : 0.f;
      int32_t sq = 0;
      for (int64_t d = 0; d < Dk; ++d) {
        const int v = mx > 0.f ? int(__builtin_nearbyintf(q[d] / step[h])) : 0;
        Q[h][d] = int16_t(v);
        sq += v;
      }
      for (int i = int(h); i < W; i += int(H)) {
        off[i] = kSigned ? 128 * sq : 0;
        kf[i] = p.scale * 1.4426950408889634f * step[h];
      }
    }
    for (int z = 0; z < NZ; ++z)
      for (int t = 0; t < RPZ; ++t) {
        const int h = int((z * RPZ + t) % H);
        for (int64_t d = 0; d < Dk; ++d) {
          const int v = Q[h][d], hi = (v + 64) >> 7;  // floor((v + 64) / 128): |hi| <= 127
          qhi[z][t * Dk + d] = int8_t(hi);
          qlo[z][t * Dk + d] = int8_t(v - 128 * hi);  // in [-64, 63]
        }
      }
    int_values = p.Dv % 32 == 0;
    contiguous = p.k_sh == Dk && p.k_sl == H * Dk;
    for (int e = 0; e < 32; ++e) pair_idx[e] = int16_t((2 * ((e / 2) / H) + e % 2) * H + (e / 2) % H);
  }

  // The dot products of flat rows [g, g + n) with Q, less the offsets, as floats.
  Vec512 dots(const E* kg, int n) const {
    __m512i a[NZ];
    if (contiguous && n == W) {  // the 16 rows are 16 Dk bytes one after the other
      const uint8_t* k = reinterpret_cast<const uint8_t*>(kg);
      for (int z = 0; z < NZ; ++z) a[z] = dot_bytes(_mm512_loadu_si512(k + 64 * z), z);
    } else {
      const int64_t Dk = p.Dk;
      alignas(64) uint8_t tail[16 * 64];
      const uint8_t* row[W];
      for (int j = 0; j < W; ++j) row[j] = reinterpret_cast<const uint8_t*>(kg + fallback.koff[j]);
      if (n < W) {  // the last rows of a span: copied after the valid ones (never read past them)
        for (int j = 0; j < W; ++j) {
          for (int64_t d = 0; d < Dk; ++d) tail[j * Dk + d] = j < n ? row[j][d] : 0;
          row[j] = tail + j * Dk;
        }
      }
      for (int z = 0; z < NZ; ++z) a[z] = dot_bytes(load_rows<RPZ>(row + z * RPZ), z);
    }
    const __m512i dot = _mm512_sub_epi32(sum_rows<RPZ>(a), _mm512_load_si512(off));
    return {_mm512_cvtepi32_ps(dot)};
  }
  // The RPZ rows in x times (hi, lo) of their heads: 128 (x . hi) + x . lo per 4 bytes.
  __m512i dot_bytes(__m512i x, int z) const {
    if constexpr (kSigned) x = _mm512_xor_si512(x, _mm512_set1_epi32(int(0x80808080u)));
    const __m512i t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), x, _mm512_load_si512(qhi[z]));
    return _mm512_dpbusd_epi32(_mm512_slli_epi32(t, 7), x, _mm512_load_si512(qlo[z]));
  }

  void accumulate(const E* Vb, int nb, const float* w, const float* corr, float* acc) const {
    if (!int_values) return fallback.accumulate(Vb, nb, w, corr, acc);
    const int64_t H = p.H, Dv = p.Dv;
    // The largest |weight| of each head: lane-wise, then over the lanes of the head.
    const int64_t nr = int64_t(nb) * H;
    // x * 0 is 0 for finite x and NaN otherwise: a NaN in chk marks a weight that is not finite.
    __m512 mx = _mm512_setzero_ps(), chk = _mm512_setzero_ps();
    for (int64_t g = 0; g < nr; g += W) {
      const __m512 x = _mm512_maskz_loadu_ps(lanes(int(nr - g)), w + g);
      mx = _mm512_max_ps(mx, _mm512_andnot_ps(_mm512_set1_ps(-0.f), x));
      chk = _mm512_fmadd_ps(x, _mm512_setzero_ps(), chk);
    }
    alignas(64) float lm[W], fq[W], lc[W];
    _mm512_store_ps(lm, mx);
    _mm512_store_ps(lc, chk);
    bool finite = true;
    for (int i = 0; i < W; ++i) finite = finite && lc[i] == 0.f;
    if (!finite) return fallback.accumulate(Vb, nb, w, corr, acc);
    for (int64_t h = 0; h < H; ++h) {
      float m = 0.f;
      for (int i = int(h); i < W; i += int(H)) m = lm[i] > m ? lm[i] : m;
      for (int i = int(h); i < W; i += int(H)) fq[i] = m > 0.f ? 32767.f / m : 0.f;
    }
    // The weights as 16-bit integers, then as the 32-bit pairs the value loop broadcasts:
    // wp[P] = w16 of position 2 (P / H), head P % H in the low half, of the next position in the
    // high half (0 past the block).
    alignas(64) int16_t w16[kQuantBK * W];
    alignas(64) int32_t wp[kQuantBK * W / 2];
    const __m512 f = _mm512_load_ps(fq);
    const int64_t nr32 = (nr + 31) / 32 * 32;
    for (int64_t g = 0; g < nr32; g += W) {
      const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(lanes(int(nr - g)), w + g), f));
      _mm256_store_si256(reinterpret_cast<__m256i*>(w16 + g), _mm512_cvtepi32_epi16(q));
    }
    const __m512i pi = _mm512_load_si512(pair_idx);
    for (int64_t g = 0; g < nr32; g += 32)
      _mm512_store_si512(wp + g / 2, _mm512_permutexvar_epi16(pi, _mm512_load_si512(w16 + g)));
    if (Dv == 32)
      sum_values<1>(Vb, nb, wp, fq, corr, acc);
    else
      sum_values<2>(Vb, nb, wp, fq, corr, acc);
  }

  // acc[h] = acc[h] corr[h] + the block's sum for each head h, NV vectors of 32 elements.
  template <int NV>
  void sum_values(const E* Vb, int nb, const int32_t* wp, const float* fq, const float* corr, float* acc) const {
    const int64_t H = p.H;
    for (int64_t h = 0; h < H; ++h) {
      const E* vh = Vb + h * p.v_sh;
      __m512i lo[NV], hi[NV];
      for (int c = 0; c < NV; ++c) lo[c] = hi[c] = _mm512_setzero_si512();
      const int32_t* wh = wp + h;
      for (int j = 0; j < nb; j += 2, wh += H) {
        const E* r0 = vh + j * p.v_sl;
        const E* r1 = j + 1 < nb ? r0 + p.v_sl : r0;  // its weight is 0 then
        const __m512i pw = _mm512_set1_epi32(*wh);
        for (int c = 0; c < NV; ++c) {
          const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + 32 * c));
          const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + 32 * c));
          const __m512i x0 = kSigned ? _mm512_cvtepi8_epi16(b0) : _mm512_cvtepu8_epi16(b0);
          const __m512i x1 = kSigned ? _mm512_cvtepi8_epi16(b1) : _mm512_cvtepu8_epi16(b1);
          lo[c] = _mm512_dpwssd_epi32(lo[c], _mm512_unpacklo_epi16(x0, x1), pw);
          hi[c] = _mm512_dpwssd_epi32(hi[c], _mm512_unpackhi_epi16(x0, x1), pw);
        }
      }
      float* a = acc + h * NCW;
      const __m512 inv = _mm512_set1_ps(fq[h] > 0.f ? 1.f / fq[h] : 0.f), hc = _mm512_set1_ps(corr[h]);
      for (int c = 0; c < NV; ++c) {
        __m512 d0, d1;
        unpermute_pairs(_mm512_cvtepi32_ps(lo[c]), _mm512_cvtepi32_ps(hi[c]), &d0, &d1);
        _mm512_storeu_ps(a + 32 * c, _mm512_fmadd_ps(d0, inv, _mm512_mul_ps(_mm512_loadu_ps(a + 32 * c), hc)));
        _mm512_storeu_ps(a + 32 * c + 16,
                         _mm512_fmadd_ps(d1, inv, _mm512_mul_ps(_mm512_loadu_ps(a + 32 * c + 16), hc)));
      }
      // NCW may exceed Dv (the padding of the float kernel's vectors): keep it scaled too.
      for (int64_t d = 32 * NV; d < NCW; ++d) a[d] *= corr[h];
    }
  }
};

// The VNNI one-query kernel where it applies: int8/uint8 rows, a bfloat16/float16 query
// (p.q_lowp), Dk of 16, 32 or 64, H dividing 16; false otherwise (the caller runs the float
// kernel).
template <int RPZ, class E, int NC>
void quant_single_vnni_run(const QuantParams& p, const QuantSpan& sp, float* ws) {
  // The float code sums the values of blocks with non-finite weights (and Dv = 16); its key
  // reads, the only ones that need q', never run here.
  const FloatRows<Vec512, E, NC> fb(p, nullptr);
  alignas(64) float kf[16];
  const VnniRows<E, RPZ, NC> rows(p, sp, fb, kf);
  quant_single_run<Vec512, E, NC>(p, sp, rows, kf, ws);
}

template <class E>
bool quant_single_vnni(const QuantParams& p, const QuantSpan& sp, float* ws) {
  if constexpr (!kByteInt<E>) {
    return false;
  } else {
    if (!p.q_lowp || sp.nq != 1 || sp.idx || 16 % p.H != 0 || p.Dv > 64) return false;
    for (int64_t h = 0; h < p.H; ++h) {  // a query that is not finite: the float kernel
      const float* q = p.q + ((sp.b * p.N + sp.n0) * p.H + h) * p.Dk;
      for (int64_t d = 0; d < p.Dk; ++d)
        if (!(__builtin_fabsf(q[d]) <= 3.4e38f)) return false;
    }
    const int64_t D = p.Dk > p.Dv ? p.Dk : p.Dv;
    switch (p.Dk) {
      case 16:
        if (D <= 16) return quant_single_vnni_run<4, E, 1>(p, sp, ws), true;
        if (D <= 32) return quant_single_vnni_run<4, E, 2>(p, sp, ws), true;
        return quant_single_vnni_run<4, E, 4>(p, sp, ws), true;
      case 32:
        if (D <= 32) return quant_single_vnni_run<2, E, 2>(p, sp, ws), true;
        return quant_single_vnni_run<2, E, 4>(p, sp, ws), true;
      case 64:
        return quant_single_vnni_run<1, E, 4>(p, sp, ws), true;
      default:
        return false;
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace attnkern
