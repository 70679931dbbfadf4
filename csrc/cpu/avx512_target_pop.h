// Closes the region avx512_target_push.h opened (no include guard, as there).
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
