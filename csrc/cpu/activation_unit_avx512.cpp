// AVX-512 block kernels of the activation unit (Vec512, 16 fp32 lanes): the kernels of
// activation_unit_impl.h, whose [keys x units] products take the most of the time, on twice
// AVX2's lanes. Compiled for AVX-512 by avx512_target_push.h (in the emulation test build, for
// AVX2 over avx512_emulation.h), never by a global flag; the dispatcher (isa_dispatch.h) checks
// the CPU before the launcher calls in. No torch/STL header here (activation_unit_kernels.h).
#if defined(__x86_64__) || defined(_M_X64)

#include "avx512_target_push.h"

#include "vec_avx512.h"
#include "activation_unit_impl.h"
#include "activation_unit_kernels.h"

namespace attnkern {
namespace cpu {

AuKernels<float> au_avx512_f32() { return au_table<Vec512>("avx512"); }

}  // namespace cpu
}  // namespace attnkern

#include "target_pop.h"

#endif  // x86-64
