// What the CUDA launchers (attention_pool_cuda.cpp, activation_unit_cuda.cpp) share: the dtype
// rule, the device checks, stream and device properties a launch needs, the error check, and
// the dispatch key and op names they register under.
//
// ATTNKERN_CUDA_EMULATION (the emulation build, scripts/cuda_emu.sh): the same launchers run
// the kernels through the harness of csrc/cuda_emu on CPU tensors, registered under the CPU key
// as attnkern::cuda_emu_<op> (attnkern/ops/extension.py routes backend="cuda" there).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#ifdef ATTNKERN_CUDA_EMULATION
#include <cuda_runtime.h>
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "attention_pool_kernels.h"
#include "register_attention_pool.h"

namespace attnkern {
namespace cuda_launch {

inline cuda::DType cuda_dtype(const at::Tensor& query) {
  switch (query.scalar_type()) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false,
                       "attnkern: the cuda backend takes float32, float16 or bfloat16 inputs, got ",
                       query.scalar_type(), " (float64 runs on the cpu and reference backends)");
  }
  return cuda::DType::kFloat32;  // unreachable
}

// The kernels need a unit innermost stride (a head vector is one contiguous run); every other
// stride is passed through, stride-0 expansions included.
inline at::Tensor unit_inner_stride(const at::Tensor& t) {
  return (t.size(-1) == 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

#ifdef ATTNKERN_CUDA_EMULATION
inline void check_device(const at::Tensor& query) {
  TORCH_CHECK_VALUE(query.is_cpu(), "attnkern: the emulated cuda kernels need CPU tensors, got query on ",
                    query.device());
}
inline cudaStream_t current_stream() { return nullptr; }
inline int num_sms() { return ::cuda_emu::emulated_sm_count(); }
inline int64_t max_smem() { return ::cuda_emu::max_shared_per_block(); }
struct DeviceGuard {
  explicit DeviceGuard(at::Device) {}
};
#define ATTNKERN_CUDA_CHECK(EXPR)                                                   \
  do {                                                                              \
    const cudaError_t attnkern_err = (EXPR);                                        \
    TORCH_CHECK(attnkern_err == cudaSuccess, cudaGetErrorString(attnkern_err));     \
  } while (0)
#define ATTNKERN_CUDA_KEY CPU
#define ATTNKERN_CUDA_SPARSE_KEY SparseCPU
#define ATTNKERN_CUDA_SPARSE_CSR_KEY SparseCsrCPU
#define ATTNKERN_CUDA_NESTED_KEY NestedTensorCPU
#define ATTNKERN_CUDA_OP(NAME) "cuda_emu_" NAME
#else
inline void check_device(const at::Tensor& query) {
  TORCH_CHECK_VALUE(query.is_cuda(), "attnkern: the cuda kernels need CUDA tensors, got query on ",
                    query.device());
}
inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }
inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
inline int64_t max_smem() {
  return static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
}
using DeviceGuard = c10::cuda::CUDAGuard;
#define ATTNKERN_CUDA_CHECK(EXPR) C10_CUDA_CHECK(EXPR)
#define ATTNKERN_CUDA_KEY CUDA
#define ATTNKERN_CUDA_SPARSE_KEY SparseCUDA
#define ATTNKERN_CUDA_SPARSE_CSR_KEY SparseCsrCUDA
#define ATTNKERN_CUDA_NESTED_KEY NestedTensorCUDA
#define ATTNKERN_CUDA_OP(NAME) ATTNKERN_OP_NAME(NAME)
#endif

}  // namespace cuda_launch
}  // namespace attnkern
