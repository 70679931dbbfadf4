// AVX2/FMA block kernels of the activation unit (Vec256, 8 fp32 lanes). Compiled for AVX2 by
// avx2_target_push.h, never by a global flag; the dispatcher (isa_dispatch.h) checks the CPU
// before the launcher calls in. No torch/STL header is included here (see
// activation_unit_kernels.h for why).
#if defined(__x86_64__) || defined(_M_X64)

#include "avx2_target_push.h"

#include "vec_avx2.h"
#include "activation_unit_impl.h"
#include "activation_unit_kernels.h"

namespace attnkern {
namespace cpu {

AuKernels<float> au_avx2_f32() { return au_table<Vec256>("avx2"); }

}  // namespace cpu
}  // namespace attnkern

#include "target_pop.h"

#endif  // x86-64
