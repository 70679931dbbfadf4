// AVX-512 kernels (16 fp32 lanes). The whole translation unit is compiled for AVX-512 by
// avx512_target_push.h, never by a global -mavx512 flag, so the extension still loads on any x86-64 CPU:
// the launcher calls into this file only after checking the CPU at run time. No torch/STL
// header is included here (see attention_pool_kernels.h for why).
#if defined(__x86_64__) || defined(_M_X64)

#include "avx512_target_push.h"

#include "attention_pool_kernels.h"
#include "vec_avx512.h"
#include "attention_pool_impl.h"

namespace attnkern {
namespace cpu {
namespace {

void zero_avx512(void* p, int64_t bytes) {
  char* c = static_cast<char*>(p);
  for (; bytes > 0 && (reinterpret_cast<uintptr_t>(c) & 63); --bytes) *c++ = 0;
  const __m512i z = _mm512_setzero_si512();
  for (; bytes >= 64; bytes -= 64, c += 64) _mm512_stream_si512(reinterpret_cast<__m512i*>(c), z);
  for (; bytes > 0; --bytes) *c++ = 0;
  _mm_sfence();
}

}  // namespace

KernelTable avx512_kernels() {
  return {&fwd_entry<Vec512>, &bwd_entry<Vec512>, &stats_entry<Vec512>, &zero_avx512, &workspace_entry<Vec512>};
}

}  // namespace cpu
}  // namespace attnkern

#include "target_pop.h"

#endif  // x86-64
