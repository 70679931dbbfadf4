// The one-lane vector type of the portable kernels (attention_pool_generic.cpp,
// attention_pool_tile_generic.cpp, activation_unit_generic.cpp): plain C++, float or double
// lanes, the interface of vec_common.h. Compiled with the extension's baseline flags, so
// torch/c10 headers are safe here.
#pragma once

#include <c10/util/Half.h>

#include <cmath>
#include <limits>

#include "vec_common.h"

namespace attnkern {
namespace cpu {
namespace {

inline float to_f32(fp16_t a) { return c10::detail::fp16_ieee_to_fp32_value(a.x); }
inline void from_f32(float a, fp16_t* d) { d->x = c10::detail::fp16_ieee_from_fp32_value(a); }

// kFusedFma: fma rounds once, as the vector FMA instructions do (the tiled kernels score
// forward and backward identically that way); otherwise it is a * b + c, as written.
template <class AT, bool kFusedFma = false>
struct VecScalar {
  using A = AT;
  using M = bool;
  static constexpr int W = 1;
  static constexpr bool kScalar = true, kPairDot = false;
  A x;

  static VecScalar zero() { return {A(0)}; }
  static VecScalar set1(A a) { return {a}; }
  static VecScalar load(const float* p) { return {A(*p)}; }
  static VecScalar load(const double* p) { return {A(*p)}; }
  static VecScalar load(const bf16_t* p) { return {A(to_f32(*p))}; }
  static VecScalar load(const fp16_t* p) { return {A(to_f32(*p))}; }
  template <class T>
  static VecScalar load_partial(const T* p, int n) {
    return n > 0 ? load(p) : zero();
  }
  void store(float* p) const { *p = float(x); }
  void store(double* p) const { *p = double(x); }
  void store(bf16_t* p) const { from_f32(float(x), p); }
  void store(fp16_t* p) const { from_f32(float(x), p); }
  template <class T>
  void stream(T* p) const {
    store(p);
  }
  static void fence() {}
  template <class T>
  void store_partial(T* p, int n) const {
    if (n > 0) store(p);
  }

  VecScalar operator+(VecScalar b) const { return {x + b.x}; }
  VecScalar operator-(VecScalar b) const { return {x - b.x}; }
  VecScalar operator*(VecScalar b) const { return {x * b.x}; }
  VecScalar operator/(VecScalar b) const { return {x / b.x}; }
  static VecScalar fma(VecScalar a, VecScalar b, VecScalar c) {
    if constexpr (kFusedFma)
      return {std::fma(a.x, b.x, c.x)};
    else
      return {a.x * b.x + c.x};
  }
  static VecScalar max(VecScalar a, VecScalar b) { return {a.x > b.x ? a.x : b.x}; }
  static VecScalar min(VecScalar a, VecScalar b) { return {a.x < b.x ? a.x : b.x}; }
  A reduce_add() const { return x; }
  A reduce_max() const { return x; }
  static M lt(VecScalar a, VecScalar b) { return a.x < b.x; }
  static M ge(VecScalar a, VecScalar b) { return a.x >= b.x; }
  static M gt(VecScalar a, VecScalar b) { return a.x > b.x; }
  static M unord(VecScalar a, VecScalar b) { return a.x != a.x || b.x != b.x; }
  static VecScalar select(M m, VecScalar a, VecScalar b) { return m ? a : b; }
  // exp2(-inf) = 0, +inf -> +inf, NaN -> NaN, as the polynomial paths of vec_common.h.
  static VecScalar exp2_libm(VecScalar a) { return {std::exp2(a.x)}; }
  static VecScalar exp_libm(VecScalar a) { return {std::exp(a.x)}; }
  VecScalar mask_tail(int n) const { return n > 0 ? *this : VecScalar{-std::numeric_limits<A>::infinity()}; }
  static VecScalar transpose_reduce(const VecScalar* a) { return a[0]; }
  // dst[d * NR] = rows[d] for d < D.
  template <int NR>
  static void transpose_rows(const float* rows, int64_t, int64_t D, float* dst) {
    for (int64_t d = 0; d < D; ++d) dst[d * NR] = rows[d];
  }
};

}  // namespace
}  // namespace cpu
}  // namespace attnkern
