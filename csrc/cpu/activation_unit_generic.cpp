// Portable block kernels of the activation unit (VecScalar: one lane, plain C++). They serve
// float64 on every CPU and float32 on CPUs without AVX2/FMA. Compiled with the extension's
// baseline flags.
#include "vec_scalar.h"
#include "activation_unit_impl.h"
#include "activation_unit_kernels.h"

namespace attnkern {
namespace cpu {

AuKernels<float> au_generic_f32() { return au_table<VecScalar<float>>("generic"); }
AuKernels<double> au_generic_f64() { return au_table<VecScalar<double>>("generic"); }

}  // namespace cpu
}  // namespace attnkern
