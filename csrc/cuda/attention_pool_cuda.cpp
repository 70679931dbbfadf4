// CUDA launchers of the attnkern ops: input checks (the shared ones from attention_pool.h plus
// the CUDA-only dtype rule), output and scratch allocation with the torch allocator, the
// current stream and a device guard. The kernels themselves take raw pointers and strides
// (attention_pool_kernels.h).
//
// lengths / offsets are never read on the host (that would sync the device): the kernels clamp
// every row to its legal range, so no value can make them access memory out of bounds.
#include <limits>
#include <optional>
#include <tuple>

#include "attention_pool.h"
#include "cuda_launch.h"

namespace attnkern {
namespace {

namespace kc = attnkern::cuda;
using cuda_launch::bias_strides;
using cuda_launch::check_cuda_inputs;
using cuda_launch::jagged_rows;
using cuda_launch::make_problem;
using cuda_launch::padded_rows;
using cuda_launch::set_bias;
using cuda_launch::unit_inner_stride;

float* scratch_ptr(at::Tensor& holder, int64_t floats, const at::Tensor& like) {
  if (floats <= 0) return nullptr;
  holder = at::empty({floats}, like.options().dtype(at::kFloat));
  return holder.data_ptr<float>();
}

std::tuple<at::Tensor, at::Tensor> run_fwd(const PoolDims& d, const at::Tensor& query,
                                           const at::Tensor& key, const at::Tensor& value,
                                           const kc::RowSpec& rows, double scale, bool jagged,
                                           const std::optional<at::Tensor>& bias) {
  // The op's out is float32 for every input dtype, the kernels' unrounded accumulators (as on
  // the CPU), so that the autograd's delta = sum(grad_out * out) is not computed from values
  // rounded to bf16/fp16: the public function casts out to the query dtype.
  auto out = at::empty({d.B, d.N, d.H, d.Dv}, query.options().dtype(at::kFloat));
  auto lse = at::empty({d.B, d.N, d.H}, query.options().dtype(at::kFloat));
  if (d.B == 0) return {out, lse};
  if (d.L == 0) {  // every row is empty
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out.zero_(), lse};
  }
  const auto q = unit_inner_stride(query);
  const auto k = unit_inner_stride(key);
  const auto v = unit_inner_stride(value);
  kc::PoolProblem p = make_problem(d, q, k, v, rows, scale, jagged);
  set_bias(p, bias, jagged);
  const kc::FwdPlan plan = kc::plan_fwd(p, cuda_launch::num_sms());
  at::Tensor scratch;
  float* scratch_data = scratch_ptr(scratch, kc::fwd_scratch_floats(p, plan), query);
  ATTNKERN_CUDA_CHECK(kc::launch_fwd(p, plan, out.data_ptr(), lse.data_ptr<float>(),
                                     scratch_data, cuda_launch::current_stream()));
  return {out, lse};
}

// grad_bias: shaped and typed like the bias (an empty tensor of the query's dtype without one),
// from the kernels' float32 accumulators.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_bwd(
    const PoolDims& d, const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const kc::RowSpec& rows, const at::Tensor& lse,
    const at::Tensor& delta, double scale, bool jagged, const std::optional<at::Tensor>& bias) {
  // grad_key / grad_value (and the bias gradient's accumulators) start at zero: the kernel
  // writes only valid positions.
  auto grad_query = at::empty(query.sizes(), query.options());
  auto grad_key = at::zeros(key.sizes(), key.options());
  auto grad_value = at::zeros(value.sizes(), value.options());
  auto grad_bias_acc = bias.has_value() ? at::zeros(bias->sizes(), bias->options().dtype(at::kFloat))
                                        : at::empty({0}, query.options());
  auto grad_bias = [&] { return bias.has_value() ? grad_bias_acc.to(bias->scalar_type()) : grad_bias_acc; };
  if (d.B == 0) return {grad_query, grad_key, grad_value, grad_bias()};
  if (d.L == 0) {
    grad_query.zero_();
    return {grad_query, grad_key, grad_value, grad_bias()};
  }
  const auto q = unit_inner_stride(query);
  const auto k = unit_inner_stride(key);
  const auto v = unit_inner_stride(value);
  const auto go = unit_inner_stride(grad_out);
  const auto lse_c = lse.contiguous();
  const auto delta_c = delta.contiguous();
  kc::PoolProblem p = make_problem(d, q, k, v, rows, scale, jagged);
  set_bias(p, bias, jagged);
  kc::BwdInputs in;
  in.grad_out = go.data_ptr();
  in.go_sb = go.stride(0);
  in.go_sn = go.stride(1);
  in.go_sh = go.stride(2);
  in.lse = lse_c.data_ptr<float>();
  in.delta = delta_c.data_ptr<float>();
  if (bias.has_value()) {
    const cuda_launch::BiasStrides s = bias_strides(grad_bias_acc, jagged);
    in.grad_bias = grad_bias_acc.data_ptr<float>();
    in.gb_sb = s.sb;
    in.gb_sn = s.sn;
    in.gb_sh = s.sh;
    in.gb_sl = s.sl;
  }
  const kc::BwdPlan plan = kc::plan_bwd(p, cuda_launch::num_sms());
  at::Tensor scratch;
  float* scratch_data = scratch_ptr(scratch, kc::bwd_scratch_floats(p, plan), query);
  ATTNKERN_CUDA_CHECK(kc::launch_bwd(p, in, plan, grad_query.data_ptr(), grad_key.data_ptr(),
                                     grad_value.data_ptr(), scratch_data,
                                     cuda_launch::current_stream()));
  return {grad_query, grad_key, grad_value, grad_bias()};
}

std::tuple<at::Tensor, at::Tensor> attention_pool_fwd_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& mask,
    double scale, const std::optional<at::Tensor>& bias) {
  const PoolDims d = check_padded_fwd(query, key, value, lengths, mask);
  check_bias(d, query, bias, /*jagged=*/false);
  check_cuda_inputs(query, scale);
  cuda_launch::DeviceGuard guard(query.device());
  return run_fwd(d, query, key, value, padded_rows(lengths, mask), scale, /*jagged=*/false, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_pool_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& mask, const at::Tensor& lse, const at::Tensor& delta,
    double scale, const std::optional<at::Tensor>& bias) {
  const PoolDims d = check_padded_fwd(query, key, value, lengths, mask);
  check_bias(d, query, bias, /*jagged=*/false);
  check_bwd_extras(d, query, grad_out, lse, delta);
  check_cuda_inputs(query, scale);
  cuda_launch::DeviceGuard guard(query.device());
  return run_bwd(d, grad_out, query, key, value, padded_rows(lengths, mask), lse, delta, scale,
                 /*jagged=*/false, bias);
}

std::tuple<at::Tensor, at::Tensor> jagged_attention_pool_fwd_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& offsets, int64_t max_length, double scale, const std::optional<at::Tensor>& bias) {
  const PoolDims d = check_jagged_fwd(query, key, value, offsets, max_length);
  check_bias(d, query, bias, /*jagged=*/true);
  check_cuda_inputs(query, scale);
  cuda_launch::DeviceGuard guard(query.device());
  return run_fwd(d, query, key, value, jagged_rows(offsets, max_length), scale, /*jagged=*/true, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jagged_attention_pool_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& offsets, int64_t max_length, const at::Tensor& lse,
    const at::Tensor& delta, double scale, const std::optional<at::Tensor>& bias) {
  const PoolDims d = check_jagged_fwd(query, key, value, offsets, max_length);
  check_bias(d, query, bias, /*jagged=*/true);
  check_bwd_extras(d, query, grad_out, lse, delta);
  check_cuda_inputs(query, scale);
  cuda_launch::DeviceGuard guard(query.device());
  return run_bwd(d, grad_out, query, key, value, jagged_rows(offsets, max_length), lse, delta,
                 scale, /*jagged=*/true, bias);
}

}  // namespace
}  // namespace attnkern

#define ATTNKERN_CUDA_POOL(KEY)                                                              \
  ATTNKERN_REGISTER_POOL(KEY, ATTNKERN_CUDA_OP, attnkern::attention_pool_fwd_cuda,            \
                         attnkern::attention_pool_bwd_cuda,                                   \
                         attnkern::jagged_attention_pool_fwd_cuda,                            \
                         attnkern::jagged_attention_pool_bwd_cuda)
ATTNKERN_CUDA_POOL(ATTNKERN_CUDA_KEY)
ATTNKERN_CUDA_POOL(ATTNKERN_CUDA_SPARSE_KEY)
ATTNKERN_CUDA_POOL(ATTNKERN_CUDA_SPARSE_CSR_KEY)
ATTNKERN_CUDA_POOL(ATTNKERN_CUDA_NESTED_KEY)
#undef ATTNKERN_CUDA_POOL
