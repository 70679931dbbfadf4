// The activation-unit block kernels, written once over a SIMD vector class `V` and included by
// each per-ISA translation unit (activation_unit_avx2.cpp, activation_unit_generic.cpp) after it
// defines its `V`. Everything has internal linkage (anonymous namespace), so the ISA-specific
// copies are never merged by the linker.
//
// V provides: A (scalar), W (lanes), zero, set1, load, store, + - * /, fma(a, b, c) = a * b + c,
// max, min, exp, select_pos(z, a, b) (lane-wise z > 0 ? a : b) and reduce_add. max(a, b) and
// min(a, b) return b where either is NaN (as maxps/minps do), so a NaN input goes second: a NaN
// at a valid position must reach the score, not become relu's 0.
//
// gemm is a register-tiled rank-P update: a tile of 6 rows x 2 vectors of C (12 accumulators,
// within AVX2's 16 registers next to the two B vectors and one broadcast) stays in registers for
// the whole P loop; B's column panel (P x 2W) is reused from L1 by every row tile.
#pragma once

#include "activation_unit_kernels.h"

namespace attnkern {
namespace cpu {
namespace {

template <class V, int R>
inline void au_gemm_tile(int64_t P, const typename V::A* a, int64_t a_si, int64_t a_sp,
                         const typename V::A* b, int64_t ldb, typename V::A* c, int64_t ldc) {
  constexpr int W = V::W;
  V acc0[R], acc1[R];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    acc0[r] = V::load(c + r * ldc);
    acc1[r] = V::load(c + r * ldc + W);
  }
  for (int64_t p = 0; p < P; ++p) {
    const V b0 = V::load(b + p * ldb), b1 = V::load(b + p * ldb + W);
    const typename V::A* ap = a + p * a_sp;
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const V x = V::set1(ap[r * a_si]);
      acc0[r] = V::fma(x, b0, acc0[r]);
      acc1[r] = V::fma(x, b1, acc1[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    acc0[r].store(c + r * ldc);
    acc1[r].store(c + r * ldc + W);
  }
}

template <class V>
void au_gemm(int64_t M, int64_t P, int64_t ncols, const typename V::A* a, int64_t a_si, int64_t a_sp,
             const typename V::A* b, int64_t ldb, typename V::A* c, int64_t ldc) {
  constexpr int64_t CW = 2 * V::W;
  for (int64_t j = 0; j < ncols; j += CW) {
    int64_t i = 0;
    for (; i + 6 <= M; i += 6) au_gemm_tile<V, 6>(P, a + i * a_si, a_si, a_sp, b + j, ldb, c + i * ldc + j, ldc);
    const typename V::A* ai = a + i * a_si;
    typename V::A* ci = c + i * ldc + j;
    switch (M - i) {
      case 5: au_gemm_tile<V, 5>(P, ai, a_si, a_sp, b + j, ldb, ci, ldc); break;
      case 4: au_gemm_tile<V, 4>(P, ai, a_si, a_sp, b + j, ldb, ci, ldc); break;
      case 3: au_gemm_tile<V, 3>(P, ai, a_si, a_sp, b + j, ldb, ci, ldc); break;
      case 2: au_gemm_tile<V, 2>(P, ai, a_si, a_sp, b + j, ldb, ci, ldc); break;
      case 1: au_gemm_tile<V, 1>(P, ai, a_si, a_sp, b + j, ldb, ci, ldc); break;
      default: break;
    }
  }
}

template <class V>
inline V au_sigmoid(V x) {
  const V one = V::set1(typename V::A(1));
  return one / (one + V::exp(V::zero() - x));
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
        case kAuRelu: o = V::select_pos(x, d, zero); break;
        case kAuSigmoid: {
          const V s = au_sigmoid(x);
          o = d * s * (one - s);
          break;
        }
        case kAuPrelu:
          o = V::select_pos(x, d, d * p0);
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
