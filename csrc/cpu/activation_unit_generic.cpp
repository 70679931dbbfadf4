// Portable block kernels of the activation unit: one lane, plain C++. They serve float64 on every
// CPU and float32 on CPUs without AVX2/FMA. Compiled with the extension's baseline flags.
#include <cmath>

#include "activation_unit_kernels.h"
#include "activation_unit_impl.h"

namespace attnkern {
namespace cpu {
namespace {

template <class AT>
struct AuVecScalar {
  using A = AT;
  static constexpr int W = 1;
  A x;

  static AuVecScalar zero() { return {A(0)}; }
  static AuVecScalar set1(A a) { return {a}; }
  static AuVecScalar load(const A* p) { return {*p}; }
  void store(A* p) const { *p = x; }
  AuVecScalar operator+(AuVecScalar b) const { return {x + b.x}; }
  AuVecScalar operator-(AuVecScalar b) const { return {x - b.x}; }
  AuVecScalar operator*(AuVecScalar b) const { return {x * b.x}; }
  AuVecScalar operator/(AuVecScalar b) const { return {x / b.x}; }
  static AuVecScalar fma(AuVecScalar a, AuVecScalar b, AuVecScalar c) { return {a.x * b.x + c.x}; }
  static AuVecScalar max(AuVecScalar a, AuVecScalar b) { return {a.x > b.x ? a.x : b.x}; }
  static AuVecScalar min(AuVecScalar a, AuVecScalar b) { return {a.x < b.x ? a.x : b.x}; }
  static AuVecScalar select_pos(AuVecScalar z, AuVecScalar a, AuVecScalar b) { return z.x > A(0) ? a : b; }
  A reduce_add() const { return x; }
  static AuVecScalar exp(AuVecScalar a) { return {std::exp(a.x)}; }
};

}  // namespace

AuKernels<float> au_generic_f32() { return au_table<AuVecScalar<float>>("generic"); }
AuKernels<double> au_generic_f64() { return au_table<AuVecScalar<double>>("generic"); }

}  // namespace cpu
}  // namespace attnkern
