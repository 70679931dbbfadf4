// AVX-512 attention-weights kernels (16 fp32 lanes), compiled for AVX-512 by avx512_target_push.h (AVX2
// over avx512_emulation.h in the emulation test build) and called only after isa_dispatch.h has
// checked the CPU. avx512_bf16 and amx run these too.
#if defined(__x86_64__) || defined(_M_X64)

#include "avx512_target_push.h"

#include "attention_weights_kernels.h"
#include "vec_avx512.h"
#include "attention_weights_impl.h"

namespace attnkern {
namespace cpu {

WeightsKernels weights_avx512_kernels() { return weights_kernels_of<Vec512>(); }

}  // namespace cpu
}  // namespace attnkern

#include "target_pop.h"

#endif  // x86-64
