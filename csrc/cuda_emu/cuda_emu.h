// The CUDA built-ins and types that csrc/cuda's kernels use, for a host C++ compiler: the
// execution harness of the CUDA emulation build (docs/cuda_emulation.md, scripts/cuda_emu.sh).
//
// A launch runs its grid block by block; each thread of a block is a fiber with its own stack
// (runtime.cpp), so per-thread locals are per-thread and a shuffle or __syncthreads is a point
// where every participating thread must arrive before any goes on. What a GPU leaves undefined
// or hangs on is reported as a launch error instead: a barrier not reached by every thread of
// the block or reached at different places, a shuffle whose mask names a lane that never comes
// (or comes to another shuffle), a lane reading a lane outside the mask, a shared-memory data
// race between two barriers, a read of shared memory nothing wrote. Out-of-bounds global and
// shared accesses are AddressSanitizer's (shared memory is heap-allocated per block).
//
// The kernels' own sources are compiled unchanged except for two rewrites that C++ cannot
// express (csrc/cuda_emu/build.py): `k<<<grid, block, smem, stream>>>(args)` becomes
// `k | cuda_emu::LaunchConfig{grid, block, smem, stream}(args)`, and `__shared__` declarations
// become references to the current block's shared memory.
#pragma once

// Every standard header the kernels and this file need, before the CUDA keywords below become
// macros (a later standard header could use __noinline__ as an attribute name).
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// The toolkit's host-side half/bfloat16 types and conversions (round to nearest even, as on
// the device), uint4/float2/dim3 and the runtime's error and stream types.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <vector_functions.h>
#include <vector_types.h>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __noinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#ifndef __restrict__
#define __restrict__ __restrict
#endif

namespace cuda_emu {

// ------------------------------------------------------------------ the running thread
struct Block;
struct ThreadState;

// The fiber running now (null outside a launch).
ThreadState* current();
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

// Call sites, for the reports: the default arguments take the caller's file and line.
struct Site {
  const char* file;
  int line;
};

// ------------------------------------------------------------------ synchronisation
// The call site goes in as scalars: GCC drops the address check of a repeated access across a
// call that takes a struct by value (as if that call could not free memory), which would hide
// a shared-memory access after the barrier from the race check.
void syncthreads(const char* file, int line);

// PTX shfl.sync modes.
enum class ShflMode : int { kIdx = 0, kUp = 1, kDown = 2, kBfly = 3 };
// Exchanges 8 bytes with the lanes of `mask`; returns the source lane's bytes.
uint64_t shfl(unsigned mask, uint64_t bits, ShflMode mode, int b, int width, const char* file,
              int line);

template <typename T>
T shfl_typed(unsigned mask, T var, ShflMode mode, int b, int width, Site site) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                "shuffles move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = shfl(mask, bits, mode, b, width, site.file, site.line);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// ------------------------------------------------------------------ shared memory
// The current block's dynamic shared memory (the launch's smem bytes).
void* dynamic_shared();
// A static __shared__ variable of `bytes`, one per block and declaration (key: name and line).
void* static_shared(const char* name, int line, size_t bytes);

template <typename T>
T* dynamic_shared_as() {
  return static_cast<T*>(dynamic_shared());
}

template <typename T>
T& static_shared_as(const char* name, int line) {
  return *static_cast<T*>(static_shared(name, line, sizeof(T)));
}

// ------------------------------------------------------------------ launches
using Entry = void (*)(void*);
// Runs entry(arg) on every thread of the grid; returns the launch's error (cudaSuccess, or
// cudaErrorLaunchFailure with last_error_message() saying what the checks found).
cudaError_t launch(dim3 grid, dim3 block, size_t smem, Entry entry, void* arg);
const char* last_error_message();
cudaError_t take_last_error();
int emulated_sm_count();
int64_t max_shared_per_block();

template <typename... A>
struct BoundLaunch {
  dim3 grid, block;
  size_t smem;
  std::tuple<A...> args;
};

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t smem = 0;
  cudaStream_t stream = nullptr;

  template <typename... A>
  BoundLaunch<std::decay_t<A>...> operator()(A&&... args) const {
    return {grid, block, smem, std::tuple<std::decay_t<A>...>(std::forward<A>(args)...)};
  }
};

// `kernel | LaunchConfig{...}(args...)`: the rewritten `kernel<<<...>>>(args...)`. Each thread
// calls the kernel with its own copy of the arguments, as kernel parameters are on a GPU.
template <typename K, typename... A>
void operator|(K kernel, BoundLaunch<A...>&& l) {
  struct Call {
    K kernel;
    std::tuple<A...>* args;
    static void run(void* self) {
      Call* c = static_cast<Call*>(self);
      std::apply([c](const A&... a) { c->kernel(a...); }, *c->args);
    }
  };
  Call call{kernel, &l.args};
  launch(l.grid, l.block, l.smem, &Call::run, &call);
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::thread_idx())
#define blockIdx (::cuda_emu::block_idx())
#define blockDim (::cuda_emu::block_dim())
#define gridDim (::cuda_emu::grid_dim())
constexpr int warpSize = 32;

inline void __syncthreads(cuda_emu::Site site = {__builtin_FILE(), __builtin_LINE()}) {
  cuda_emu::syncthreads(site.file, site.line);
}

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32,
              cuda_emu::Site site = {__builtin_FILE(), __builtin_LINE()}) {
  return cuda_emu::shfl_typed(mask, var, cuda_emu::ShflMode::kIdx, src_lane, width, site);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                 cuda_emu::Site site = {__builtin_FILE(), __builtin_LINE()}) {
  return cuda_emu::shfl_typed(mask, var, cuda_emu::ShflMode::kUp, int(delta), width, site);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                   cuda_emu::Site site = {__builtin_FILE(), __builtin_LINE()}) {
  return cuda_emu::shfl_typed(mask, var, cuda_emu::ShflMode::kDown, int(delta), width, site);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                  cuda_emu::Site site = {__builtin_FILE(), __builtin_LINE()}) {
  return cuda_emu::shfl_typed(mask, var, cuda_emu::ShflMode::kBfly, lane_mask, width, site);
}

// ------------------------------------------------------------------ loads and bit casts
template <typename T>
inline T __ldg(const T* ptr) {
  return *ptr;
}

namespace cuda_emu {
template <typename To, typename From>
inline To bits_as(From x) {
  static_assert(sizeof(To) == sizeof(From), "a bit cast keeps the size");
  To out;
  std::memcpy(&out, &x, sizeof(out));
  return out;
}
}  // namespace cuda_emu

inline float __uint_as_float(unsigned x) { return cuda_emu::bits_as<float>(x); }
inline unsigned __float_as_uint(float x) { return cuda_emu::bits_as<unsigned>(x); }
inline float __int_as_float(int x) { return cuda_emu::bits_as<float>(x); }
inline int __float_as_int(float x) { return cuda_emu::bits_as<int>(x); }

// ------------------------------------------------------------------ float math
// Correctly rounded host math (the build has -ffp-contract=off, so a * b + c is never fused
// behind the kernels' back). The GPU build's --use_fast_math approximations (exp2f, logf, the
// division) differ by a few ulp: docs/cuda_emulation.md.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
using std::isinf;
using std::isnan;

// ------------------------------------------------------------------ runtime API
inline cudaError_t cudaGetLastError() { return cuda_emu::take_last_error(); }
inline const char* cudaGetErrorString(cudaError_t err) {
  return err == cudaSuccess ? "no error" : cuda_emu::last_error_message();
}
// Accepts what an H100 accepts (the opt-in shared memory per block); nothing else to set.
template <typename K>
cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize &&
      (value < 0 || value > cuda_emu::max_shared_per_block())) {
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
