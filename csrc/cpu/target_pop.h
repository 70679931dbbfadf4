// Closes the region avx2_target_push.h or avx512_target_push.h opened (no include guard, as there).
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
