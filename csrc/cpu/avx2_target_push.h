// Opens the AVX2 region of the AVX2 kernel files (attention_pool_avx2.cpp,
// attention_pool_tile_avx2.cpp, activation_unit_avx2.cpp; and of the AVX-512 files in the
// emulation test build, see avx512_target_push.h): the rest of the translation unit is compiled
// for AVX2, FMA and F16C by a target pragma, never by a global flag, so the extension loads on
// any x86-64 CPU; <immintrin.h> comes after it. target_pop.h closes the region. Deliberately no
// include guard: the pragma must take effect in each file that includes this.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#include <immintrin.h>
