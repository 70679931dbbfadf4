// AVX2 attention-weights kernels (8 fp32 lanes), compiled for AVX2 by avx2_target_push.h and called only
// after isa_dispatch.h has checked the CPU.
#if defined(__x86_64__) || defined(_M_X64)

#include "avx2_target_push.h"

#include "attention_weights_kernels.h"
#include "vec_avx2.h"
#include "attention_weights_impl.h"

namespace attnkern {
namespace cpu {

WeightsKernels weights_avx2_kernels() { return weights_kernels_of<Vec256>(); }

}  // namespace cpu
}  // namespace attnkern

#include "target_pop.h"

#endif  // x86-64
