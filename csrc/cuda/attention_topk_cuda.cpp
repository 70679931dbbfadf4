// CUDA launcher of attnkern::attention_topk_fwd (schema in csrc/attention_topk_ops.cpp): the
// checks a direct torch.ops call needs so that the kernel never reads out of bounds (the shared
// ones of attention_topk_checks.h plus the CUDA limits), outputs from the torch allocator on the
// current stream. lengths / offsets are never read on the host (no device sync): the kernel
// clamps every row to its legal range (RowSpec); the public function checks their values first.
#include <cstdint>
#include <optional>
#include <tuple>

// The torch headers first: the emulation's cuda_runtime.h redefines CUDA's keywords as macros.
#include "attention_topk_checks.h"
#include "cuda_launch.h"
#include "attention_topk_kernels.h"

namespace attnkern {
namespace {

namespace kc = attnkern::cuda;
using OptT = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor> attention_topk_fwd_cuda(const at::Tensor& query, const at::Tensor& key,
                                                           const OptT& lengths, const OptT& mask, const OptT& offsets,
                                                           int64_t k, double scale, const OptT& bias) {
  const TopkDims t = check_topk_fwd(query, key, lengths, mask, offsets, k, scale, bias);
  cuda_launch::check_device(query);
  cuda_launch::cuda_dtype(query);
  // Positions are int32 in the kernel's shared memory.
  TORCH_CHECK_VALUE(t.d.L <= INT32_MAX, "attnkern: the cuda top-k takes rows of at most 2^31 - 1 positions, got ",
                    t.d.L);
  TORCH_CHECK_VALUE(k <= kc::kTopkMaxK, "attnkern: k must be in [0, ", kc::kTopkMaxK,
                    "] on the cuda backend (the running top-k lives in shared memory), got ", k);
  cuda_launch::DeviceGuard guard(query.device());
  const at::Tensor q = cuda_launch::unit_inner_stride(query);
  const at::Tensor kt = cuda_launch::unit_inner_stride(key);
  const kc::RowSpec rows = t.jagged ? cuda_launch::jagged_rows(*offsets, /*max_length=*/-1)
                                    : cuda_launch::padded_rows(lengths, mask);
  kc::TopkProblem p{cuda_launch::make_problem(t.d, q, kt, kt, rows, scale, t.jagged)};
  cuda_launch::set_bias(p, bias, t.jagged);
  p.Hkv = t.Hkv;
  p.K = k;
  auto scores = at::empty({p.B, p.N, p.H, k}, query.options().dtype(at::kFloat));
  auto indices = at::empty({p.B, p.N, p.H, k}, query.options().dtype(at::kLong));
  p.scores = scores.data_ptr<float>();
  p.indices = indices.data_ptr<int64_t>();
  ATTNKERN_CUDA_CHECK(kc::launch_topk_fwd(p, cuda_launch::current_stream()));
  return {scores, indices};
}

}  // namespace
}  // namespace attnkern

TORCH_LIBRARY_IMPL(attnkern, ATTNKERN_CUDA_KEY, m) {
  m.impl(ATTNKERN_CUDA_OP("attention_topk_fwd"), &attnkern::attention_topk_fwd_cuda);
}
