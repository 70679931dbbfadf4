// AVX2 sequence-attention kernels (8 fp32 lanes), compiled for AVX2 by avx2_target_push.h and
// called only after isa_dispatch.h has checked the CPU.
#if defined(__x86_64__) || defined(_M_X64)

#include "avx2_target_push.h"

#include "sequence_attention_kernels.h"
#include "vec_avx2.h"
#include "sequence_attention_impl.h"

namespace attnkern {
namespace cpu {

SeqKernels seq_avx2_kernels() { return {&seq_fwd_entry<Vec256>, &seq_bwd_entry<Vec256>}; }

}  // namespace cpu
}  // namespace attnkern

#include "target_pop.h"

#endif  // x86-64
