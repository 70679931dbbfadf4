// The activation-unit block kernels, written once over a vector type `V` (vec_common.h:
// vec_scalar.h, vec_avx2.h, vec_avx512.h) and included by each per-ISA translation unit
// (activation_unit_{avx512,avx2,generic}.cpp). Everything has internal linkage (anonymous
// namespace), so the ISA-specific copies are never merged by the linker.
//
// max(a, b) and min(a, b) return b where either is NaN (as maxps/minps do), so a NaN input goes
// second: a NaN at a valid position must reach the score, not become relu's 0.
//
// gemm is a register-tiled rank-P update: a tile of rows x 2 vectors of C stays in registers for
// the whole P loop (kAuRows below).
#pragma once

#include "activation_unit_kernels.h"
#include "vec_common.h"

namespace attnkern {
namespace cpu {
namespace {

// Rows of C per register tile: 6 x 2 vectors (12 accumulators) fill AVX2's 16 registers next to
// the two B vectors and one broadcast; AVX-512's 32 take 12 x 2 (24).
template <class V>
constexpr int kAuRows = V::W >= 16 ? 12 : 6;

// C[0:R, 0:NB * W] += A[0:R, 0:P] B[0:P, 0:NB * W] with the R x NB accumulators in registers.
template <class V, int R, int NB>
inline void au_gemm_tile(int64_t P, const typename V::A* a, int64_t a_si, int64_t a_sp, const typename V::A* b,
                         int64_t ldb, typename V::A* c, int64_t ldc) {
  constexpr int W = V::W;
  V acc[R][NB];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < NB; ++q) acc[r][q] = V::load(c + r * ldc + q * W);
  for (int64_t p = 0; p < P; ++p) {
    V bv[NB];
    for (int q = 0; q < NB; ++q) bv[q] = V::load(b + p * ldb + q * W);
    const typename V::A* ap = a + p * a_sp;
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const V x = V::set1(ap[r * a_si]);
      for (int q = 0; q < NB; ++q) acc[r][q] = V::fma(x, bv[q], acc[r][q]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < NB; ++q) acc[r][q].store(c + r * ldc + q * W);
}

// The last m < kAuRows rows of a column panel: the tile of exactly m rows.
template <class V, int NB, int R = kAuRows<V> - 1>
inline void au_gemm_rows(int m, int64_t P, const typename V::A* a, int64_t a_si, int64_t a_sp,
                         const typename V::A* b, int64_t ldb, typename V::A* c, int64_t ldc) {
  if constexpr (R >= 1) {
    if (m == R) return au_gemm_tile<V, R, NB>(P, a, a_si, a_sp, b, ldb, c, ldc);
    au_gemm_rows<V, NB, R - 1>(m, P, a, a_si, a_sp, b, ldb, c, ldc);
  }
}

// Column panels of 2 vectors (one where ncols, a multiple of kAuPad, leaves a single vector);
// B's panel (P x 2W) is reused from L1 by every row tile.
template <class V, int NB>
void au_gemm_panel(int64_t M, int64_t P, const typename V::A* a, int64_t a_si, int64_t a_sp,
                   const typename V::A* b, int64_t ldb, typename V::A* c, int64_t ldc) {
  constexpr int R = kAuRows<V>;
  int64_t i = 0;
  for (; i + R <= M; i += R) au_gemm_tile<V, R, NB>(P, a + i * a_si, a_si, a_sp, b, ldb, c + i * ldc, ldc);
  if (i < M) au_gemm_rows<V, NB>(int(M - i), P, a + i * a_si, a_si, a_sp, b, ldb, c + i * ldc, ldc);
}

template <class V>
void au_gemm(int64_t M, int64_t P, int64_t ncols, const typename V::A* a, int64_t a_si, int64_t a_sp,
             const typename V::A* b, int64_t ldb, typename V::A* c, int64_t ldc) {
  constexpr int64_t W = V::W;
  int64_t j = 0;
  for (; j + 2 * W <= ncols; j += 2 * W) au_gemm_panel<V, 2>(M, P, a, a_si, a_sp, b + j, ldb, c + j, ldc);
  for (; j < ncols; j += W) au_gemm_panel<V, 1>(M, P, a, a_si, a_sp, b + j, ldb, c + j, ldc);
}

template <class V>
inline V au_sigmoid(V x) {
  const V one = V::set1(typename V::A(1));
  return one / (one + exp_clamped(V::zero() - x));
}

// Lane-wise z > 0 ? a : b.
template <class V>
inline V au_select_pos(V z, V a, V b) {
  return V::select(V::gt(z, V::zero()), a, b);
}

template <class V>
void au_act_fwd(int act, int64_t rows, int64_t ncols, const typename V::A* z, int64_t ld,
                const typename V::A* params, typename V::A* y) {
  using A = typename V::A;
  constexpr int W = V::W;
  const V zero = V::zero(), one = V::set1(A(1));
  for (int64_t r = 0; r < rows; ++r) {
    const A* zr = z + r * ld;
    A* yr = y + r * ld;
    for (int64_t j = 0; j < ncols; j += W) {
      const V x = V::load(zr + j);
      V o;
      switch (act) {
        case kAuRelu: o = V::max(zero, x); break;
        case kAuSigmoid: o = au_sigmoid(x); break;
        case kAuPrelu: o = V::fma(V::load(params + j), V::min(zero, x), V::max(zero, x)); break;
        default: {
          const V al = V::load(params + j);
          const V s = au_sigmoid(V::fma(V::load(params + ncols + j), x, V::load(params + 2 * ncols + j)));
          o = x * V::fma(one - al, s, al);
        }
      }
      o.store(yr + j);
    }
  }
}

template <class V>
void au_act_bwd(int act, int64_t rows, int64_t ncols, const typename V::A* z, const typename V::A* dy,
                int64_t ld, const typename V::A* params, typename V::A* dz, typename V::A* dparams) {
  using A = typename V::A;
  constexpr int W = V::W;
  const V zero = V::zero(), one = V::set1(A(1));
  for (int64_t j = 0; j < ncols; j += W) {
    V g0 = zero, g1 = zero, g2 = zero;
    V p0 = zero, p1 = zero, p2 = zero;
    if (act == kAuPrelu || act == kAuDice) p0 = V::load(params + j);
    if (act == kAuDice) {
      p1 = V::load(params + ncols + j);
      p2 = V::load(params + 2 * ncols + j);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const V x = V::load(z + r * ld + j);
      const V d = V::load(dy + r * ld + j);
      V o;
      switch (act) {
        case kAuRelu: o = au_select_pos(x, d, zero); break;
        case kAuSigmoid: {
          const V s = au_sigmoid(x);
          o = d * s * (one - s);
          break;
        }
        case kAuPrelu:
          o = au_select_pos(x, d, d * p0);
          g0 = V::fma(d, V::min(x, zero), g0);
          break;
        default: {
          const V s = au_sigmoid(V::fma(p1, x, p2));
          const V ds = s * (one - s);            // sigmoid'
          const V om = one - p0;                 // 1 - alpha
          const V t = d * x * om * ds;           // dy * x * (1 - alpha) * sigmoid'
          // dy/dx = alpha + (1 - alpha) * (s + x * s' * scale)
          o = d * V::fma(om, V::fma(x * ds, p1, s), p0);
          g0 = V::fma(d * x, one - s, g0);
          g1 = V::fma(t, x, g1);
          g2 = g2 + t;
        }
      }
      o.store(dz + r * ld + j);
    }
    if (act == kAuPrelu || act == kAuDice) (V::load(dparams + j) + g0).store(dparams + j);
    if (act == kAuDice) {
      (V::load(dparams + ncols + j) + g1).store(dparams + ncols + j);
      (V::load(dparams + 2 * ncols + j) + g2).store(dparams + 2 * ncols + j);
    }
  }
}

template <class V>
typename V::A au_dot(int64_t n, const typename V::A* x, const typename V::A* y) {
  constexpr int W = V::W;
  V a0 = V::zero(), a1 = V::zero();
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    a0 = V::fma(V::load(x + i), V::load(y + i), a0);
    a1 = V::fma(V::load(x + i + W), V::load(y + i + W), a1);
  }
  for (; i < n; i += W) a0 = V::fma(V::load(x + i), V::load(y + i), a0);
  return (a0 + a1).reduce_add();
}

template <class V>
void au_axpby(int64_t n, typename V::A a, const typename V::A* x, typename V::A beta, typename V::A* y) {
  constexpr int W = V::W;
  const V va = V::set1(a), vb = V::set1(beta);
  for (int64_t i = 0; i < n; i += W) V::fma(va, V::load(x + i), V::load(y + i) * vb).store(y + i);
}

template <class V>
void au_muladd(int64_t n, const typename V::A* x, const typename V::A* y, typename V::A* out) {
  constexpr int W = V::W;
  for (int64_t i = 0; i < n; i += W) V::fma(V::load(x + i), V::load(y + i), V::load(out + i)).store(out + i);
}

template <class V>
AuKernels<typename V::A> au_table(const char* name) {
  return {name, &au_gemm<V>, &au_act_fwd<V>, &au_act_bwd<V>, &au_dot<V>, &au_axpby<V>, &au_muladd<V>};
}

}  // namespace
}  // namespace cpu
}  // namespace attnkern
