// AVX512-BF16 block kernels of the activation unit: activation_unit_avx512.cpp's, plus the
// first layer's product on bf16 pairs (gemm_pairs: vdpbf16ps, two exact products per lane and
// instruction), which the launcher uses for bfloat16 inputs. Compiled for that set by
// avx512_target_push.h, never by a global flag; the dispatcher (isa_dispatch.h) checks the CPU
// before the launcher calls in. No torch/STL header here (activation_unit_kernels.h).
#if defined(__x86_64__) || defined(_M_X64)

#define ATTNKERN_AVX512_BF16 1  // the target below adds AVX512-BF16; vec_avx512.h the pair ops
#include "avx512_target_push.h"

#include "vec_avx512.h"
#include "activation_unit_impl.h"
#include "activation_unit_kernels.h"

namespace attnkern {
namespace cpu {

AuKernels<float> au_avx512_bf16_f32() { return au_table<Vec512>("avx512_bf16"); }

}  // namespace cpu
}  // namespace attnkern

#include "target_pop.h"

#endif  // x86-64
