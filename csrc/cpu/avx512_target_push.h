// Opens the AVX-512 region of the AVX-512 kernel files (attention_pool_avx512.cpp,
// attention_pool_tile_avx512.cpp, attention_pool_tile_avx512_bf16.cpp, attention_pool_tile_amx.cpp,
// activation_unit_avx512.cpp): the rest of the translation unit is compiled for AVX-512 F/BW/VL/DQ (plus
// AVX512-BF16 where the file defines ATTNKERN_AVX512_BF16 first, AVX512-VNNI where it defines
// ATTNKERN_AVX512_VNNI, and AMX-TILE/AMX-BF16 where it
// also defines ATTNKERN_AMX) by a target pragma, never by a global flag, so the
// extension loads on any x86-64 CPU; <immintrin.h> comes after it. In the emulation test build
// (ATTNKERN_EMULATE_AVX512) the region is AVX2 instead and avx512_emulation.h stands in for the
// AVX-512 intrinsics. target_pop.h closes the region. Deliberately no include guard: the
// pragma must take effect in each file that includes this.
#if defined(ATTNKERN_EMULATE_AVX512)
#include "avx2_target_push.h"
#include "avx512_emulation.h"
#if defined(ATTNKERN_AMX)
#include "amx_emulation.h"
#endif
#elif defined(ATTNKERN_AMX)
#if defined(__clang__)
#pragma clang attribute push(                                                                         \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16,avx2,fma,f16c"))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16,avx2,fma,f16c")
#endif
#include <immintrin.h>
#elif defined(ATTNKERN_AVX512_VNNI)
#if defined(__clang__)
#pragma clang attribute push(                                                                         \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
#endif
#include <immintrin.h>
#elif defined(ATTNKERN_AVX512_BF16)
#if defined(__clang__)
#pragma clang attribute push(                                                                         \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#endif
#include <immintrin.h>
#else
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif
#include <immintrin.h>
#endif
