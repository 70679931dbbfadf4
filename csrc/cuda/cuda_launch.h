// What the CUDA launchers (csrc/cuda/*_cuda.cpp) share: the dtype rule, the device checks, the
// rows (RowSpec) and the problem (PoolProblem: strides, score bias) of checked tensors, stream and
// device properties a launch needs, the error check, and the dispatch key and op names they
// register under.
//
// ATTNKERN_CUDA_EMULATION (the emulation build, scripts/cuda_emu.sh): the same launchers run
// the kernels through the harness of csrc/cuda_emu on CPU tensors, registered under the CPU key
// as attnkern::cuda_emu_<op> (attnkern/ops/extension.py routes backend="cuda" there).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "attention_pool.h"
#include "input_checks.h"

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

// The rows of a padded call (lengths or mask, checked; neither: every position) or a jagged one.
inline cuda::RowSpec padded_rows(const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& mask) {
  cuda::RowSpec rows;
  if (given(lengths)) {
    rows.mode = cuda::RowMode::kLengths;
    rows.index = lengths->data_ptr();
    rows.index_is_int64 = lengths->scalar_type() == at::kLong;
    rows.index_stride = lengths->stride(0);
  } else if (given(mask)) {
    rows.mode = cuda::RowMode::kMask;
    rows.mask = mask->data_ptr<bool>();
    rows.mask_stride_b = mask->stride(0);
    rows.mask_stride_l = mask->stride(1);
  }
  return rows;
}

inline cuda::RowSpec jagged_rows(const at::Tensor& offsets, int64_t max_length) {
  cuda::RowSpec rows;
  rows.mode = cuda::RowMode::kJagged;
  rows.index = offsets.data_ptr();
  rows.index_is_int64 = offsets.scalar_type() == at::kLong;
  rows.index_stride = offsets.stride(0);
  rows.max_length = max_length;
  return rows;
}

// The problem of checked q, k, v with unit innermost strides (padded [B, L, H, D], jagged
// [T, H, D] with batch strides 0); the quantized, weights and top-k launchers pass their own
// stand-ins (the stored bytes, the key as the value).
inline cuda::PoolProblem make_problem(const PoolDims& d, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const cuda::RowSpec& rows, double scale, bool jagged) {
  const int64_t l_dim = jagged ? 0 : 1;
  cuda::PoolProblem p;
  p.dtype = cuda_dtype(q);
  p.B = d.B;
  p.N = d.N;
  p.H = d.H;
  p.L = d.L;
  p.Dk = d.Dk;
  p.Dv = d.Dv;
  p.query = q.data_ptr();
  p.q_sb = q.stride(0);
  p.q_sn = q.stride(1);
  p.q_sh = q.stride(2);
  p.key = k.data_ptr();
  p.k_sb = jagged ? 0 : k.stride(0);
  p.k_sl = k.stride(l_dim);
  p.k_sh = k.stride(l_dim + 1);
  p.value = v.data_ptr();
  p.v_sb = jagged ? 0 : v.stride(0);
  p.v_sl = v.stride(l_dim);
  p.v_sh = v.stride(l_dim + 1);
  p.rows = rows;
  p.scale = static_cast<float>(scale);
  return p;
}

// The op-level bias (padded [B, Nb, Hb, L], jagged [T, Nb, Hb]; query n reads row n % Nb) as
// (pointer-less) strides: b, n, h, key row; a head stride of 0 when one bias serves every head.
struct BiasStrides {
  int64_t nb, sb, sn, sh, sl;
};

inline BiasStrides bias_strides(const at::Tensor& t, bool jagged) {
  const int64_t sh = t.size(2) > 1 ? t.stride(2) : 0;
  if (jagged) return {t.size(1), 0, t.stride(1), sh, t.stride(0)};
  return {t.size(1), t.stride(0), t.stride(1), sh, t.stride(3)};
}

// The checked bias (float32 or the query's dtype), if any, into p.
inline void set_bias(cuda::PoolProblem& p, const std::optional<at::Tensor>& bias, bool jagged) {
  if (!given(bias)) return;
  const BiasStrides s = bias_strides(*bias, jagged);
  p.bias = bias->data_ptr();
  p.bias_f32 = bias->scalar_type() == at::kFloat;
  p.bias_nb = s.nb;
  p.bias_sb = s.sb;
  p.bias_sn = s.sn;
  p.bias_sh = s.sh;
  p.bias_sl = s.sl;
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

// After an op's shared checks: the device, the scale, then the CUDA-only dtype rule.
inline void check_cuda_inputs(const at::Tensor& query, double scale) {
  check_device(query);
  TORCH_CHECK_VALUE(std::isfinite(scale), "attnkern: scale must be a finite float, got ", scale);
  cuda_dtype(query);
}

}  // namespace cuda_launch
}  // namespace attnkern
