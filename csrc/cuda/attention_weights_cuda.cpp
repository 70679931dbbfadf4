// CUDA launchers of attnkern::attention_weights_fwd / jagged_attention_weights_fwd (schemas in
// csrc/attention_weights_ops.cpp): the attention pool's input checks with the key as the
// values, the CUDA dtype rule, zero-filled weights (the kernel writes valid positions only) and
// lse from the torch allocator on the current stream. lengths / offsets are never read on the
// host: the kernel clamps every row (RowSpec); the public function checks their values first.
// The autograd is attnkern/ops/weights.py's, in torch ops on any device.
#include <optional>
#include <tuple>

// The torch headers first: the emulation's cuda_runtime.h redefines CUDA's keywords as macros.
#include "attention_pool.h"
#include "cuda_launch.h"
#include "attention_weights_kernels.h"

namespace attnkern {
namespace {

namespace kc = attnkern::cuda;
using OptT = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor> run_weights(const PoolDims& d, const at::Tensor& query, const at::Tensor& key,
                                               const kc::RowSpec& rows, double scale, bool jagged,
                                               const OptT& bias) {
  check_bias(d, query, bias, jagged);
  cuda_launch::check_cuda_inputs(query, scale);
  cuda_launch::DeviceGuard guard(query.device());
  auto w = jagged ? at::zeros({d.L, d.N, d.H}, query.options().dtype(at::kFloat))
                  : at::zeros({d.B, d.N, d.H, d.L}, query.options().dtype(at::kFloat));
  auto lse = at::empty({d.B, d.N, d.H}, query.options().dtype(at::kFloat));
  if (d.B == 0) return {w, lse};
  const at::Tensor q = cuda_launch::unit_inner_stride(query);
  const at::Tensor k = cuda_launch::unit_inner_stride(key);
  // No value: the key stands in (d.Dv is Dk; never read as one).
  kc::PoolProblem p = cuda_launch::make_problem(d, q, k, k, rows, scale, jagged);
  cuda_launch::set_bias(p, bias, jagged);
  kc::WeightsOut out;
  out.w = w.data_ptr<float>();
  if (jagged) {  // [T, N, H]
    out.sb = 0;
    out.sn = d.H;
    out.sh = 1;
    out.sl = d.N * d.H;
  } else {  // [B, N, H, L]
    out.sb = d.N * d.H * d.L;
    out.sn = d.H * d.L;
    out.sh = d.L;
    out.sl = 1;
    out.nan_fill = d.L;
  }
  ATTNKERN_CUDA_CHECK(kc::launch_weights_fwd(p, out, lse.data_ptr<float>(), cuda_launch::current_stream()));
  return {w, lse};
}

std::tuple<at::Tensor, at::Tensor> attention_weights_fwd_cuda(const at::Tensor& query, const at::Tensor& key,
                                                              const OptT& lengths, const OptT& mask, double scale,
                                                              const OptT& bias) {
  const PoolDims d = check_padded_fwd(query, key, key, lengths, mask);
  return run_weights(d, query, key, cuda_launch::padded_rows(lengths, mask), scale, /*jagged=*/false, bias);
}

std::tuple<at::Tensor, at::Tensor> jagged_attention_weights_fwd_cuda(const at::Tensor& query, const at::Tensor& key,
                                                                     const at::Tensor& offsets, int64_t max_length,
                                                                     double scale, const OptT& bias) {
  const PoolDims d = check_jagged_fwd(query, key, key, offsets, max_length);
  return run_weights(d, query, key, cuda_launch::jagged_rows(offsets, max_length), scale, /*jagged=*/true, bias);
}

}  // namespace
}  // namespace attnkern

TORCH_LIBRARY_IMPL(attnkern, ATTNKERN_CUDA_KEY, m) {
  m.impl(ATTNKERN_CUDA_OP("attention_weights_fwd"), &attnkern::attention_weights_fwd_cuda);
  m.impl(ATTNKERN_CUDA_OP("jagged_attention_weights_fwd"), &attnkern::jagged_attention_weights_fwd_cuda);
}
