// What every CPU vector type (vec_scalar.h, vec_avx2.h, vec_avx512.h) shares: the bf16 rounding
// rule and the exponential functions, written once over the vector type V.
//
// A vector type V provides:
//   A (lane scalar: float, or double for the one-lane type), W (lanes), kScalar (the one-lane
//   type: libm's exp/exp2 instead of the polynomials below), kPairDot (bf16 pair products:
//   load_bits, set1_bits, join_pairs, dot_pairs; vec_avx512.h under ATTNKERN_AVX512_BF16);
//   zero, set1; load, load_partial(p, n), store, store_partial(p, n) and stream (non-temporal)
//   for float and every input type T (bf16_t, fp16_t; double for the one-lane type), fence;
//   + - * /, fma(a, b, c) = a * b + c,
//   max and min (the second operand where either is NaN), reduce_add, reduce_max;
//   comparisons lt, ge, gt (ordered: false for NaN) and unord, whose mask M picks lanes in
//   select(m, a, b); round (to nearest), scale_pow2(y, n) = y * 2^n for integral n in
//   [-126, 127] (AVX-512: any n); mask_tail(n) (lanes >= n set to -inf); transpose_reduce(a[W])
//   (lane j = the sum of a[j], by the same tree of additions for every lane; reduce_add sums
//   a vector by that tree too); concat_lo and concat_hi (the low / high halves of a and b, a's
//   first; W >= 2); load_pairs (2W bf16 elements as fp32 vectors of the even and the odd ones)
//   and interleave_pairs (such a pair back in order; W >= 2); transpose_rows<NR>.
//
// Like attention_pool_kernels.h this header stays free of torch/STL headers: it is included by
// translation units compiled for AVX2 / AVX-512, and everything here has internal linkage.
#pragma once

#include <stdint.h>

#include "elem_types.h"

namespace attnkern {
namespace cpu {
namespace {

// The bf16 bits of the fp32 bits u (in the low half of each 32-bit lane): rounded to nearest
// even, NaN to the quiet NaN 0x7fc0 (torch's rule). U is uint32_t or a GCC vector of them, so
// every instruction set rounds with this one expression.
template <class U>
inline void bf16_round_bits(U& u) {
  const U rne = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  u = (u & 0x7fffffffu) > 0x7f800000u ? (rne & 0u) | 0x7fc0u : rne;
}

// One element of an input type to and from fp32 (fp16_t: vec_avx2.h with F16C, vec_scalar.h
// with c10's portable conversion).
inline float to_f32(float x) { return x; }
inline float to_f32(bf16_t x) {
  const uint32_t u = uint32_t(x.x) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
inline void from_f32(float x, float* d) { *d = x; }
inline void from_f32(float x, bf16_t* d) {
  uint32_t u;
  __builtin_memcpy(&u, &x, 4);
  bf16_round_bits(u);
  d->x = uint16_t(u);
}

// 2^f for |f| <= 1/2: degree-7 Taylor polynomial (relative error < 1e-8).
template <class V>
inline V exp2_poly7(V f) {
  constexpr float c[8] = {1.5252733804059841e-05f, 1.5403530393381608e-04f, 1.3333558146428443e-03f,
                          9.6181291076284772e-03f, 5.5504108664821580e-02f, 2.4022650695910071e-01f,
                          6.9314718055994531e-01f, 1.0f};
  V y = V::set1(c[0]);
#pragma GCC unroll 8
  for (int i = 1; i < 8; ++i) y = V::fma(y, f, V::set1(c[i]));
  return y;
}

// 2^f for |f| <= 1/2: degree-5 minimax polynomial (relative error 1e-7, below the rounding of
// an fp32 logit).
template <class V>
inline V exp2_poly5(V f) {
  constexpr float c[6] = {1.326460061769931e-03f, 9.671514518998413e-03f, 5.550734171906474e-02f,
                          2.4022242044256292e-01f, 6.931469772847576e-01f, 1.0f};
  V y = V::set1(c[0]);
#pragma GCC unroll 6
  for (int i = 1; i < 6; ++i) y = V::fma(y, f, V::set1(c[i]));
  return y;
}

// 2^x = 2^n 2^f with x = n + f rounded to nearest (|f| <= 1/2): exactly 0 below lo (and for
// -inf), +inf from 128 up, NaN stays NaN (max/min return their second operand, x, when it is
// NaN): a non-finite logit at a valid position must show in the result, never vanish.
// The one-lane type takes libm's exp2 instead (the same special values).
template <class V, class Poly>
inline V exp2_range(V x, float lo, Poly poly) {
  if constexpr (V::kScalar) {
    return V::exp2_libm(x);
  } else {
    const V xc = V::min(V::set1(127.f), V::max(V::set1(lo), x));
    const V n = V::round(xc);
    const V r = V::scale_pow2(poly(xc - n), n);
    const V z = V::select(V::lt(x, V::set1(lo)), V::zero(), r);
    return V::select(V::ge(x, V::set1(128.f)), V::set1(__builtin_inff()), z);
  }
}

// 2^x of the single-query kernels (attention_pool_impl.h): the degree-7 polynomial, 0 below -126.
template <class V>
inline V exp2_accurate(V x) {
  return exp2_range(x, -126.f, exp2_poly7<V>);
}

// 2^x of the tiled kernels (attention_pool_tile_impl.h): the degree-5 polynomial, 0 below -125.
template <class V>
inline V exp2_fast(V x) {
  return exp2_range(x, -125.f, exp2_poly5<V>);
}

// e^x of the activation unit: x = n ln2 + f (|f| <= ln2 / 2, ln2 split in two for an exact
// product), e^f by a degree-6 polynomial (relative error ~2e-7), times 2^n. Inputs are clamped
// to [-87.3, 88.7], so that e^x saturates instead of reaching denormals, which is what sigmoid
// needs (1 / (1 + e^-x) is then exactly 1 or ~1e-38). NaN propagates.
template <class V>
inline V exp_clamped(V x) {
  if constexpr (V::kScalar) {
    return V::exp_libm(x);
  } else {
    const V xc = V::min(V::max(x, V::set1(-87.3f)), V::set1(88.7f));
    const V n = V::round(xc * V::set1(1.4426950408889634f));
    V f = V::fma(n, V::set1(-0.693359375f), xc);
    f = V::fma(n, V::set1(2.12194440e-4f), f);
    constexpr float c[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                            4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
    V y = V::set1(c[0]);
#pragma GCC unroll 6
    for (int i = 1; i < 6; ++i) y = V::fma(y, f, V::set1(c[i]));
    y = V::fma(y, f * f, f + V::set1(1.0f));
    // NaN inputs: min/max above return the clamp bound, so put the NaN back.
    return V::select(V::unord(x, x), x, V::scale_pow2(y, n));
  }
}

}  // namespace
}  // namespace cpu
}  // namespace attnkern
