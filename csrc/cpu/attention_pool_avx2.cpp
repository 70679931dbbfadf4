// AVX2 kernels (8 fp32 lanes), for x86-64 CPUs without AVX-512. Compiled for AVX2/FMA/F16C by
// avx2_target_push.h, never by a global flag; the launcher checks the CPU before calling in.
// No torch/STL header is included here (see attention_pool_kernels.h for why).
#if defined(__x86_64__) || defined(_M_X64)

#include "avx2_target_push.h"

#include "attention_pool_kernels.h"
#include "vec_avx2.h"
#include "attention_pool_impl.h"

namespace attnkern {
namespace cpu {
namespace {

void zero_avx2(void* p, int64_t bytes) {
  char* c = static_cast<char*>(p);
  for (; bytes > 0 && (reinterpret_cast<uintptr_t>(c) & 31); --bytes) *c++ = 0;
  const __m256i z = _mm256_setzero_si256();
  for (; bytes >= 32; bytes -= 32, c += 32) _mm256_stream_si256(reinterpret_cast<__m256i*>(c), z);
  for (; bytes > 0; --bytes) *c++ = 0;
  _mm_sfence();
}

}  // namespace

KernelTable avx2_kernels() {
  return {&fwd_entry<Vec256>, &bwd_entry<Vec256>, &stats_entry<Vec256>, &zero_avx2, &workspace_entry<Vec256>};
}

}  // namespace cpu
}  // namespace attnkern

#include "target_pop.h"

#endif  // x86-64
