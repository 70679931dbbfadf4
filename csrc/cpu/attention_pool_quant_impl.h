// The quantized-K/V attention-pool forward, written once over the vector type V (vec_common.h)
// and the stored element type E; instantiated per instruction set by
// attention_pool_quant_{generic,avx2,avx512,avx512_vnni}.cpp, which include their vec_*.h first and
// define ATTNKERN_QUANT_ISA (0 generic, 1 AVX2, 2 AVX-512, 3 AVX-512 with VNNI: the one-query
// integer kernel of attention_pool_quant_vnni.h for int8/uint8 rows and a bf16/fp16 query).
//
// The stored rows are never dequantized in memory. With element = x * s + c per row:
//   score  = scale * <q, x s + c> = s <q', x> + c sum(q')      (q' = scale log2(e) q)
//   output = sum_l p_l (x_l s_l + c_l) = sum_l (p_l s_l) x_l + sum_l p_l c_l
// so each key row costs one widening dot product and each value row one widening multiply-add;
// the biases are one scalar per row. float8_e4m3fn bytes are widened through the float16 bits
// that hold them exactly (value / 256, the 2^8 folded into the row's scale), float8_e5m2 bytes
// are the upper half of a float16, int8/uint8 are converted exactly.
// No torch/STL header (see attention_pool_kernels.h).
#pragma once

#include <stdint.h>

#include "attention_pool_quant_kernels.h"
#include "vec_common.h"

namespace attnkern {
namespace cpu {
namespace {

struct fp8e4m3_t {
  uint8_t x;
};
struct fp8e5m2_t {
  uint8_t x;
};

// What the widening loads return is the stored value times 1 / kLoadFactor<E>.
template <class E>
constexpr float kLoadFactor = 1.f;
template <>
constexpr float kLoadFactor<fp8e4m3_t> = 256.f;

// The float16 bits of a float8 byte (times 2^-8 for e4m3, whose NaN, S.1111.111, becomes a
// float16 NaN; e4m3fn has no infinities).
inline uint16_t e5m2_bits(uint8_t b) { return uint16_t(b) << 8; }
inline uint16_t e4m3_bits(uint8_t b) {
  const uint16_t sign = uint16_t(b & 0x80) << 8, em = b & 0x7f;
  return em == 0x7f ? uint16_t(sign | 0x7e00) : uint16_t(sign | (em << 7));
}

#if ATTNKERN_QUANT_ISA == 0
inline float half_bits_to_f32(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }
#else
inline float half_bits_to_f32(uint16_t h) { return _cvtsh_ss(h); }
#endif

inline float widen1(int8_t x) { return float(x); }
inline float widen1(uint8_t x) { return float(x); }
inline float widen1(fp8e5m2_t x) { return half_bits_to_f32(e5m2_bits(x.x)); }
inline float widen1(fp8e4m3_t x) { return half_bits_to_f32(e4m3_bits(x.x)); }

// n (1 <= n) elements from p widened to a vector, lanes >= n zero; never reads past n.
template <class V, class E>
inline V widen_staged(const E* p, int n) {
  float buf[V::W];
  for (int i = 0; i < V::W; ++i) buf[i] = i < n ? widen1(p[i]) : 0.f;
  return V::load(buf);
}

template <class V>
inline V load_n(const float* p, int n) {
  return n >= V::W ? V::load(p) : V::load_partial(p, n);
}

#if ATTNKERN_QUANT_ISA == 0
template <class V, class E>
inline V load_n(const E* p, int n) {
  return V::set1(widen1(*p));
}
#elif ATTNKERN_QUANT_ISA == 1
inline __m128i bytes8(const void* p, int n) {
  if (n >= 8) return _mm_loadl_epi64(static_cast<const __m128i*>(p));
  uint8_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int i = 0; i < n; ++i) buf[i] = static_cast<const uint8_t*>(p)[i];
  return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(buf));
}
inline __m128i e4m3_halves(__m128i w) {  // e4m3_bits on 8 16-bit lanes
  const __m128i sign = _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x80)), 8);
  const __m128i em = _mm_and_si128(w, _mm_set1_epi16(0x7f));
  const __m128i h = _mm_or_si128(sign, _mm_slli_epi16(em, 7));
  const __m128i nan = _mm_cmpeq_epi16(em, _mm_set1_epi16(0x7f));
  return _mm_blendv_epi8(h, _mm_or_si128(sign, _mm_set1_epi16(0x7e00)), nan);
}
template <class V>
inline V load_n(const int8_t* p, int n) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes8(p, n)))};
}
template <class V>
inline V load_n(const uint8_t* p, int n) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes8(p, n)))};
}
template <class V>
inline V load_n(const fp8e5m2_t* p, int n) {
  return {_mm256_cvtph_ps(_mm_slli_epi16(_mm_cvtepu8_epi16(bytes8(p, n)), 8))};
}
template <class V>
inline V load_n(const fp8e4m3_t* p, int n) {
  return {_mm256_cvtph_ps(e4m3_halves(_mm_cvtepu8_epi16(bytes8(p, n))))};
}
#elif ATTNKERN_QUANT_ISA >= 2 && defined(ATTNKERN_EMULATE_AVX512)
// The emulation test build stands in for the AVX-512 integer conversions with staged loads.
template <class V, class E>
inline V load_n(const E* p, int n) {
  return widen_staged<V>(p, n);
}
#elif ATTNKERN_QUANT_ISA >= 2
inline __m128i bytes16(const void* p, int n) {
  return n >= 16 ? _mm_loadu_si128(static_cast<const __m128i*>(p)) : _mm_maskz_loadu_epi8(lanes(n), p);
}
template <class V>
inline V load_n(const int8_t* p, int n) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes16(p, n)))};
}
template <class V>
inline V load_n(const uint8_t* p, int n) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes16(p, n)))};
}
template <class V>
inline V load_n(const fp8e5m2_t* p, int n) {
  return {_mm512_cvtph_ps(_mm256_slli_epi16(_mm256_cvtepu8_epi16(bytes16(p, n)), 8))};
}
template <class V>
inline V load_n(const fp8e4m3_t* p, int n) {
  const __m256i w = _mm256_cvtepu8_epi16(bytes16(p, n));
  const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x80)), 8);
  const __m256i em = _mm256_and_si256(w, _mm256_set1_epi16(0x7f));
  const __m256i h = _mm256_or_si256(sign, _mm256_slli_epi16(em, 7));
  const __m256i nan = _mm256_cmpeq_epi16(em, _mm256_set1_epi16(0x7f));
  return {_mm512_cvtph_ps(_mm256_blendv_epi8(h, _mm256_or_si256(sign, _mm256_set1_epi16(0x7e00)), nan))};
}
#endif

// <a, b> over D elements, a float, b float or stored (widened as loaded), as a vector whose
// lanes sum to it.
template <class V, class E>
inline V dot_lanes(const float* a, const E* b, int64_t D) {
  V acc = V::zero();
  for (int64_t d = 0; d < D; d += V::W) {
    const int n = int(D - d < V::W ? D - d : V::W);
    acc = V::fma(load_n<V>(a + d, n), load_n<V>(b + d, n), acc);
  }
  return acc;
}

// sum_j w[j] rows[j][d .. d + dn) over the block's nb rows, in four independent chains (one
// chain would wait on the multiply-add latency at every row).
template <class V, class R>
inline V weighted_rows(const float* w, const R* const* rows, int nb, int64_t d, int dn) {
  V o0 = V::zero(), o1 = V::zero(), o2 = V::zero(), o3 = V::zero();
  int j = 0;
  for (; j + 4 <= nb; j += 4) {
    o0 = V::fma(V::set1(w[j]), load_n<V>(rows[j] + d, dn), o0);
    o1 = V::fma(V::set1(w[j + 1]), load_n<V>(rows[j + 1] + d, dn), o1);
    o2 = V::fma(V::set1(w[j + 2]), load_n<V>(rows[j + 2] + d, dn), o2);
    o3 = V::fma(V::set1(w[j + 3]), load_n<V>(rows[j + 3] + d, dn), o3);
  }
  for (; j < nb; ++j) o0 = V::fma(V::set1(w[j]), load_n<V>(rows[j] + d, dn), o0);
  return (o0 + o1) + (o2 + o3);
}

// The rows of one block for one head: stored K/V rows and per-row parameters (scales times
// kLoadFactor); entries past the block's nb rows are 0, so the vector passes below run over
// whole blocks.
template <class E>
struct QuantBlock {
  const E* krow[kQuantBK];
  const E* vrow[kQuantBK];
  alignas(64) float ks[kQuantBK];
  alignas(64) float kb[kQuantBK];
  alignas(64) float vs[kQuantBK];
  alignas(64) float vb[kQuantBK];
  int64_t pos[kQuantBK];
};

// Scores (log2 units) of query qn against the block's nb rows into s[0 .. kQuantBK), -inf past
// nb. KR is the row type the dot products read: E (stored) or float (the widened tile).
template <class V, class E, class KR>
inline void block_scores(const QuantParams& p, const QuantSpan& sp, const QuantBlock<E>& blk, const KR* const* rows,
                         int nb, const float* qn, float qsum, int64_t n, int64_t h, float* s) {
  constexpr int W = V::W;
  constexpr float kLog2e = 1.4426950408889634f;
  const V vq = V::set1(qsum);
  for (int j0 = 0; j0 < kQuantBK; j0 += W) {
    V r;
    if (j0 < nb) {
      V a[W];
      for (int j = 0; j < W; ++j) a[j] = j0 + j < nb ? dot_lanes<V>(qn, rows[j0 + j], p.Dk) : V::zero();
      r = V::fma(V::transpose_reduce(a), V::load(blk.ks + j0), V::load(blk.kb + j0) * vq);
    } else {
      r = V::zero();
    }
    r.mask_tail(nb - j0).store(s + j0);
  }
  if (p.bias) {
    const float* bb = p.bias + sp.b * p.bias_sb + ((sp.n0 + n) % p.bias_nb) * p.bias_sn + h * p.bias_sh;
    for (int j = 0; j < nb; ++j) s[j] += bb[blk.pos[j] * p.bias_sl] * kLog2e;
  }
}

// Asks for everything valid positions [i0, i1) of the span read (K and V rows of every head,
// the four per-row parameters) ahead of use: the rows of one position are short runs spread
// over six streams, which the hardware prefetchers follow too late for the core to overlap the
// memory latency with the arithmetic.
inline void prefetch_bytes(const void* p, int64_t n) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < n; o += 64) __builtin_prefetch(c + o, 0, 3);
  __builtin_prefetch(c + n - 1, 0, 3);
}
inline void quant_prefetch(const QuantParams& p, const QuantSpan& sp, int64_t i0, int64_t i1, int64_t esize) {
  const int64_t kbytes = ((p.H - 1) * p.k_sh + p.Dk) * esize, vbytes = ((p.H - 1) * p.v_sh + p.Dv) * esize;
  const char* K = static_cast<const char*>(p.k) + sp.b * p.k_sb * esize;
  const char* Vv = static_cast<const char*>(p.v) + sp.b * p.v_sb * esize;
  const float* const params[4] = {p.k_scale, p.k_bias, p.v_scale, p.v_bias};
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t pos = sp.start + (sp.idx ? sp.idx[i] : i);
    prefetch_bytes(K + pos * p.k_sl * esize, kbytes);
    prefetch_bytes(Vv + pos * p.v_sl * esize, vbytes);
    if (sp.idx) {
      const int64_t pi = sp.b * p.p_sb + pos * p.H;
      for (const float* a : params)
        if (a) prefetch_bytes(a + pi, p.H * 4);
    }
  }
  if (!sp.idx) {  // the parameters of consecutive positions are one run per array
    const int64_t pi = sp.b * p.p_sb + (sp.start + i0) * p.H;
    for (const float* a : params)
      if (a) prefetch_bytes(a + pi, (i1 - i0) * p.H * 4);
  }
}

// The float key/value reads of the one-query kernel below: each stored element widened to
// fp32 (load_n) and multiplied into an fp32 accumulator.
template <class V, class E, int NC>
struct FloatRows {
  static constexpr int W = V::W;
  static constexpr int NCW = NC * W;
  const QuantParams& p;
  const float* qf;  // [H, NCW] q', zero past Dk
  int64_t koff[W];
  FloatRows(const QuantParams& p_, const float* qf_) : p(p_), qf(qf_) {
    for (int j = 0; j < W; ++j) koff[j] = (j / p.H) * p.k_sl + (j % p.H) * p.k_sh;
  }
  // The integer part of the scores of flat rows [g, g + n) (the dot products <q', x>).
  V dots(const E* kg, int n) const {
    V a[W];
    for (int j = 0; j < W; ++j) {
      a[j] = V::zero();
      if (j < n) {
        const float* qj = qf + (j % p.H) * NCW;
        for (int c = 0; c < NC; ++c)
          if (c * W < p.Dk) a[j] = V::fma(V::load(qj + c * W), load_n<V>(kg + koff[j] + c * W, int(p.Dk - c * W)), a[j]);
      }
    }
    return V::transpose_reduce(a);
  }
  // acc[h] = acc[h] * corr[h] + sum_j w[j * H + h] rows(j, h) over the block's nb positions.
  void accumulate(const E* Vb, int nb, const float* w, const float* corr, float* acc) const {
    for (int64_t h = 0; h < p.H; ++h) {
      const E* vh = Vb + h * p.v_sh;
      float* a = acc + h * NCW;
      const V hc = V::set1(corr[h]);
      V o0[NC], o1[NC];
      for (int c = 0; c < NC; ++c) {
        o0[c] = V::load(a + c * W) * hc;
        o1[c] = V::zero();
      }
      int j = 0;
      for (; j + 2 <= nb; j += 2) {
        const E* r0v = vh + j * p.v_sl;
        const E* r1v = r0v + p.v_sl;
        const V w0 = V::set1(w[j * p.H + h]), w1 = V::set1(w[(j + 1) * p.H + h]);
        for (int c = 0; c < NC; ++c)
          if (c * W < p.Dv) {
            o0[c] = V::fma(w0, load_n<V>(r0v + c * W, int(p.Dv - c * W)), o0[c]);
            o1[c] = V::fma(w1, load_n<V>(r1v + c * W, int(p.Dv - c * W)), o1[c]);
          }
      }
      if (j < nb) {
        const E* r0v = vh + j * p.v_sl;
        const V w0 = V::set1(w[j * p.H + h]);
        for (int c = 0; c < NC; ++c)
          if (c * W < p.Dv) o0[c] = V::fma(w0, load_n<V>(r0v + c * W, int(p.Dv - c * W)), o0[c]);
      }
      for (int c = 0; c < NC; ++c) (o0[c] + o1[c]).store(a + c * W);
    }
  }
};

// One query (N == 1) over consecutive positions (no mask index), Dk, Dv <= NC * W and H dividing
// W. The (position, head) rows of a block are scored as one flat run r = position * H + head, W
// at a time: the per-row parameters are then plain vector loads of their [.., L, H] arrays, and
// the online softmax runs lane-wise (lane i always holds head i % H: the per-head maximum is
// taken over those lanes, the sums l and c stay per lane until the end). The value rows are
// read head by head into NC chunk accumulators. Same arithmetic as quant_fwd_span (log2 units,
// the row scale applied to the integer dot, the bias through sum(q')). Rows (FloatRows or the
// VNNI integer reads) computes the dot products and the weighted value sums; kf scales its
// dots per lane (q' = kf * what it multiplied).
template <class V, class E, int NC, class Rows>
void quant_single_run(const QuantParams& p, const QuantSpan& sp, const Rows& rows, const float* kf, float* ws) {
  constexpr int W = V::W;
  constexpr int NCW = NC * W;
  constexpr float kLog2e = 1.4426950408889634f;
  const int64_t H = p.H, Dk = p.Dk, Dv = p.Dv;
  float* acc = ws;           // [H, NCW]
  float* m = acc + H * NCW;  // [H]
  float* s = m + H;          // [kQuantBK * H] scores, then weights
  alignas(64) float lane[W], lane_shift[W], lane_corr[W], head_corr[W];
  const float qs = p.scale * kLog2e;
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t i = 0; i < NCW; ++i) acc[h * NCW + i] = 0.f;
    m[h] = -__builtin_inff();
  }
  for (int i = 0; i < W; ++i) {
    const float* q = p.q + ((sp.b * p.N + sp.n0) * H + i % H) * Dk;
    float sum = 0.f;
    for (int64_t d = 0; d < Dk; ++d) sum += q[d] * qs;
    lane[i] = sum;
  }
  const V qsum = V::load(lane), kfv = V::load(kf);
  V lsum = V::zero(), csum = V::zero();
  const E* K = static_cast<const E*>(p.k) + sp.b * p.k_sb + sp.start * p.k_sl;
  const E* Vv = static_cast<const E*>(p.v) + sp.b * p.v_sb + sp.start * p.v_sl;
  const int64_t pb = sp.b * p.p_sb + sp.start * H;
  const V lf = V::set1(kLoadFactor<E>);
  const int64_t pf = p.prefetch;
  if (pf) quant_prefetch(p, sp, 0, sp.count < pf ? sp.count : pf, sizeof(E));
  for (int64_t i0 = 0; i0 < sp.count; i0 += kQuantBK) {
    const int nb = int(sp.count - i0 < kQuantBK ? sp.count - i0 : kQuantBK);
    if (pf && i0 + pf < sp.count)
      quant_prefetch(p, sp, i0 + pf, i0 + pf + kQuantBK < sp.count ? i0 + pf + kQuantBK : sp.count, sizeof(E));
    const int64_t nr = nb * H, r0 = pb + i0 * H;
    for (int64_t g = 0; g < nr; g += W) {
      const int n = int(nr - g < W ? nr - g : W);
      const V kb = p.k_bias ? load_n<V>(p.k_bias + r0 + g, n) : V::zero();
      const V dot = rows.dots(K + (i0 + g / H) * p.k_sl, n);
      V::fma(dot * kfv, load_n<V>(p.k_scale + r0 + g, n) * lf, kb * qsum).mask_tail(n).store(s + g);
    }
    if (p.bias) {
      const float* bb = p.bias + sp.b * p.bias_sb + (sp.n0 % p.bias_nb) * p.bias_sn;
      for (int j = 0; j < nb; ++j)
        for (int64_t h = 0; h < H; ++h) s[j * H + h] += bb[(sp.start + i0 + j) * p.bias_sl + h * p.bias_sh] * kLog2e;
    }
    // The per-head maximum: lane-wise over the block, then over the lanes of each head. NaN
    // scores are left out of it but reach l and acc through their p (a NaN at a valid position
    // is never dropped); an all -inf block shifts by 0, giving p = 0.
    V vmx = V::set1(-__builtin_inff());
    for (int64_t g = 0; g < nr; g += W) {
      const V x = V::load(s + g);
      vmx = V::select(V::gt(x, vmx), x, vmx);
    }
    vmx.store(lane);
    for (int64_t h = 0; h < H; ++h) {
      float mx = m[h];
      for (int i = int(h); i < W; i += int(H)) mx = lane[i] > mx ? lane[i] : mx;
      const float shift = mx == -__builtin_inff() ? 0.f : mx;
      const float corr = __builtin_exp2f(m[h] - shift);
      m[h] = mx;
      head_corr[h] = corr;
      for (int i = int(h); i < W; i += int(H)) {
        lane_shift[i] = shift;
        lane_corr[i] = corr;
      }
    }
    const V vshift = V::load(lane_shift), vcorr = V::load(lane_corr);
    lsum = lsum * vcorr;
    csum = csum * vcorr;
    for (int64_t g = 0; g < nr; g += W) {
      const int n = int(nr - g < W ? nr - g : W);
      const V pj = exp2_accurate<V>(V::load(s + g) - vshift);
      lsum = lsum + pj;
      if (p.v_bias) csum = V::fma(pj, load_n<V>(p.v_bias + r0 + g, n), csum);
      (pj * (load_n<V>(p.v_scale + r0 + g, n) * lf)).store(s + g);
    }
    rows.accumulate(Vv + i0 * p.v_sl, nb, s, head_corr, acc);
  }
  constexpr float kLn2 = 0.6931471805599453f;
  alignas(64) float lc[W];
  lsum.store(lane);
  csum.store(lc);
  for (int64_t h = 0; h < H; ++h) {
    float l = 0.f, cm = 0.f;
    for (int i = int(h); i < W; i += int(H)) {
      l += lane[i];
      cm += lc[i];
    }
    const int64_t o = (sp.b * p.N + sp.n0) * H + h;
    float* out = p.out + o * Dv;
    // l == 0: no position with a finite score (an empty row): out 0, lse -inf.
    const bool empty = l == 0.f;
    const float inv = empty ? 0.f : 1.f / l;
    for (int64_t d = 0; d < Dv; ++d) out[d] = empty ? 0.f : (acc[h * NCW + d] + cm) * inv;
    p.lse[o] = empty ? -__builtin_inff() : (m[h] + __builtin_log2f(l)) * kLn2;
  }
}

// The float one-query kernel: q' = scale log2(e) q held padded to NC vectors per head.
template <class V, class E, int NC>
void quant_single_span(const QuantParams& p, const QuantSpan& sp, float* ws) {
  constexpr int W = V::W;
  constexpr int NCW = NC * W;
  const int64_t H = p.H, Dk = p.Dk;
  float* qf = ws;  // [H, NCW], zero past Dk; the run's workspace follows
  const float qs = p.scale * 1.4426950408889634f;
  for (int64_t h = 0; h < H; ++h) {
    const float* q = p.q + ((sp.b * p.N + sp.n0) * H + h) * Dk;
    for (int64_t i = 0; i < NCW; ++i) qf[h * NCW + i] = i < Dk ? q[i] * qs : 0.f;
  }
  alignas(64) float one[W];
  for (int i = 0; i < W; ++i) one[i] = 1.f;
  quant_single_run<V, E, NC>(p, sp, FloatRows<V, E, NC>(p, qf), one, qf + H * NCW);
}

}  // namespace
}  // namespace cpu
}  // namespace attnkern

#if ATTNKERN_QUANT_ISA == 3
#include "attention_pool_quant_vnni.h"
#endif

namespace attnkern {
namespace cpu {
namespace {

template <class V, class E>
void quant_fwd_span(const QuantParams& p, const QuantSpan& sp, float* ws) {
  constexpr int W = V::W;
  constexpr float kLog2e = 1.4426950408889634f;
  const int64_t H = p.H, NQ = sp.nq, Dk = p.Dk, Dv = p.Dv;
  const bool tiled = NQ >= kQuantTileMin;
  if constexpr (W > 1) {
    const int64_t D = Dk > Dv ? Dk : Dv;
    if (NQ == 1 && !sp.idx && W % H == 0 && D <= 4 * W) {
#if ATTNKERN_QUANT_ISA == 3
      if (quant_single_vnni<E>(p, sp, ws)) return;
#endif
      if (D <= W) return quant_single_span<V, E, 1>(p, sp, ws);
      if (D <= 2 * W) return quant_single_span<V, E, 2>(p, sp, ws);
      return quant_single_span<V, E, 4>(p, sp, ws);
    }
  }
  // Workspace: q' [H, NQ, Dk], q' sums, running shift m, sum l and bias mass c [H, NQ],
  // acc [H, NQ, Dv], scores [kQuantBK], widened tiles [kQuantBK, Dk] and [kQuantBK, Dv].
  float* qf = ws;
  float* qsum = qf + H * NQ * Dk;
  float* m = qsum + H * NQ;
  float* l = m + H * NQ;
  float* cm = l + H * NQ;
  float* acc = cm + H * NQ;
  float* s = acc + H * NQ * Dv;
  float* kt = s + kQuantBK;
  float* vt = kt + kQuantBK * Dk;

  const float qs = p.scale * kLog2e;
  for (int64_t h = 0; h < H; ++h)
    for (int64_t n = 0; n < NQ; ++n) {
      const float* q = p.q + ((sp.b * p.N + sp.n0 + n) * H + h) * Dk;
      float* d = qf + (h * NQ + n) * Dk;
      float sum = 0.f;
      for (int64_t i = 0; i < Dk; ++i) {
        d[i] = q[i] * qs;
        sum += d[i];
      }
      const int64_t r = h * NQ + n;
      qsum[r] = sum;
      m[r] = -__builtin_inff();
      l[r] = 0.f;
      cm[r] = 0.f;
      for (int64_t i = 0; i < Dv; ++i) acc[r * Dv + i] = 0.f;
    }

  const E* K = static_cast<const E*>(p.k);
  const E* Vv = static_cast<const E*>(p.v);
  QuantBlock<E> blk;
  for (int j = 0; j < kQuantBK; ++j) blk.ks[j] = blk.kb[j] = blk.vs[j] = blk.vb[j] = 0.f;
  const float* krows_t[kQuantBK];
  const float* vrows_t[kQuantBK];
  for (int j = 0; j < kQuantBK; ++j) {
    krows_t[j] = kt + j * Dk;
    vrows_t[j] = vt + j * Dv;
  }
  const int64_t pf = p.prefetch;
  if (pf) quant_prefetch(p, sp, 0, sp.count < pf ? sp.count : pf, sizeof(E));
  for (int64_t i0 = 0; i0 < sp.count; i0 += kQuantBK) {
    const int nb = int(sp.count - i0 < kQuantBK ? sp.count - i0 : kQuantBK);
    if (pf && i0 + pf < sp.count) quant_prefetch(p, sp, i0 + pf, i0 + pf + kQuantBK < sp.count ? i0 + pf + kQuantBK : sp.count, sizeof(E));
    for (int j = 0; j < nb; ++j) blk.pos[j] = sp.start + (sp.idx ? sp.idx[i0 + j] : i0 + j);
    if (nb < kQuantBK)
      for (int j = nb; j < kQuantBK; ++j) blk.ks[j] = blk.kb[j] = blk.vs[j] = blk.vb[j] = 0.f;
    // Heads inside the block: the H rows of a position are neighbours in memory, so the block
    // is read as one stream.
    for (int64_t h = 0; h < H; ++h) {
      for (int j = 0; j < nb; ++j) {
        const int64_t pos = blk.pos[j];
        blk.krow[j] = K + sp.b * p.k_sb + pos * p.k_sl + h * p.k_sh;
        blk.vrow[j] = Vv + sp.b * p.v_sb + pos * p.v_sl + h * p.v_sh;
        const int64_t pi = sp.b * p.p_sb + pos * H + h;
        blk.ks[j] = p.k_scale[pi] * kLoadFactor<E>;
        blk.kb[j] = p.k_bias ? p.k_bias[pi] : 0.f;
        blk.vs[j] = p.v_scale[pi] * kLoadFactor<E>;
        blk.vb[j] = p.v_bias ? p.v_bias[pi] : 0.f;
      }
      if (tiled) {  // widen the block once for every query
        for (int j = 0; j < nb; ++j) {
          for (int64_t d = 0; d < Dk; d += W) {
            const int n = int(Dk - d < W ? Dk - d : W);
            load_n<V>(blk.krow[j] + d, n).store_partial(kt + j * Dk + d, n);
          }
          for (int64_t d = 0; d < Dv; d += W) {
            const int n = int(Dv - d < W ? Dv - d : W);
            load_n<V>(blk.vrow[j] + d, n).store_partial(vt + j * Dv + d, n);
          }
        }
      }
      for (int64_t n = 0; n < NQ; ++n) {
        const int64_t r = h * NQ + n;
        if (tiled)
          block_scores<V, E, float>(p, sp, blk, krows_t, nb, qf + r * Dk, qsum[r], n, h, s);
        else
          block_scores<V, E, E>(p, sp, blk, blk.krow, nb, qf + r * Dk, qsum[r], n, h, s);
        // Online softmax in log2 units. NaN scores are left out of the max but reach l and acc
        // through their p (a NaN at a valid position is never dropped); an all -inf block
        // shifts by 0, giving p = 0.
        V vmx = V::set1(m[r]);
        for (int j = 0; j < kQuantBK; j += W) {
          const V x = V::load(s + j);
          vmx = V::select(V::gt(x, vmx), x, vmx);
        }
        const float mx = vmx.reduce_max();
        const float shift = mx == -__builtin_inff() ? 0.f : mx;
        const float corr = __builtin_exp2f(m[r] - shift);
        const V vshift = V::set1(shift);
        V vl = V::zero(), vc = V::zero();
        for (int j = 0; j < kQuantBK; j += W) {
          const V pj = exp2_accurate<V>(V::load(s + j) - vshift);
          vl = vl + pj;
          vc = V::fma(pj, V::load(blk.vb + j), vc);
          (pj * V::load(blk.vs + j)).store(s + j);
        }
        l[r] = l[r] * corr + vl.reduce_add();
        cm[r] = cm[r] * corr + vc.reduce_add();
        m[r] = mx;
        float* a = acc + r * Dv;
        const V vcorr = V::set1(corr);
        for (int64_t d = 0; d < Dv; d += W) {
          const int dn = int(Dv - d < W ? Dv - d : W);
          const V o = load_n<V>(a + d, dn) * vcorr;
          const V sum = tiled ? weighted_rows<V>(s, vrows_t, nb, d, dn) : weighted_rows<V>(s, blk.vrow, nb, d, dn);
          (o + sum).store_partial(a + d, dn);
        }
      }
    }
  }

  constexpr float kLn2 = 0.6931471805599453f;
  for (int64_t h = 0; h < H; ++h)
    for (int64_t n = 0; n < NQ; ++n) {
      const int64_t r = h * NQ + n;
      const int64_t o = (sp.b * p.N + sp.n0 + n) * H + h;
      float* out = p.out + o * Dv;
      // l == 0: no position with a finite score (an empty row): out 0, lse -inf.
      const bool empty = l[r] == 0.f;
      const float inv = empty ? 0.f : 1.f / l[r];
      for (int64_t d = 0; d < Dv; ++d) out[d] = empty ? 0.f : (acc[r * Dv + d] + cm[r]) * inv;
      p.lse[o] = empty ? -__builtin_inff() : (m[r] + __builtin_log2f(l[r])) * kLn2;
    }
}

template <class V>
void quant_fwd_entry(const QuantParams& p, const QuantSpan& s, float* ws) {
  switch (p.qtype) {
    case kQInt8:
      return quant_fwd_span<V, int8_t>(p, s, ws);
    case kQUInt8:
      return quant_fwd_span<V, uint8_t>(p, s, ws);
    case kQFp8E4M3:
      return quant_fwd_span<V, fp8e4m3_t>(p, s, ws);
    default:
      return quant_fwd_span<V, fp8e5m2_t>(p, s, ws);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace attnkern
