// CUDA launchers of the attnkern ops: input checks (the shared ones from attention_pool.h plus
// the CUDA-only dtype rule), output and scratch allocation with the torch allocator, the
// current stream and a device guard. The kernels themselves take raw pointers and strides
// (attention_pool_kernels.h).
//
// lengths / offsets are never read on the host (that would sync the device): the kernels clamp
// every row to its legal range, so no value can make them access memory out of bounds.
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "attention_pool.h"
#include "cuda_launch.h"

namespace attnkern {
namespace {

namespace kc = attnkern::cuda;
using cuda_launch::cuda_dtype;
using cuda_launch::unit_inner_stride;

// After the op's shared checks: the device, the scale, then the CUDA-only dtype rule.
void check_cuda_inputs(const at::Tensor& query, double scale) {
  cuda_launch::check_device(query);
  TORCH_CHECK_VALUE(std::isfinite(scale), "attnkern: scale must be a finite float, got ", scale);
  cuda_dtype(query);
}

float* scratch_ptr(at::Tensor& holder, int64_t floats, const at::Tensor& like) {
  if (floats <= 0) return nullptr;
  holder = at::empty({floats}, like.options().dtype(at::kFloat));
  return holder.data_ptr<float>();
}

kc::RowSpec padded_rows(const std::optional<at::Tensor>& lengths,
                        const std::optional<at::Tensor>& mask) {
  kc::RowSpec rows;
  if (lengths.has_value()) {
    rows.mode = kc::RowMode::kLengths;
    rows.index = lengths->data_ptr();
    rows.index_is_int64 = lengths->scalar_type() == at::kLong;
    rows.index_stride = lengths->stride(0);
  } else if (mask.has_value()) {
    rows.mode = kc::RowMode::kMask;
    rows.mask = mask->data_ptr<bool>();
    rows.mask_stride_b = mask->stride(0);
    rows.mask_stride_l = mask->stride(1);
  }
  return rows;
}

kc::RowSpec jagged_rows(const at::Tensor& offsets, int64_t max_length) {
  kc::RowSpec rows;
  rows.mode = kc::RowMode::kJagged;
  rows.index = offsets.data_ptr();
  rows.index_is_int64 = offsets.scalar_type() == at::kLong;
  rows.index_stride = offsets.stride(0);
  rows.max_length = max_length;
  return rows;
}

// q/k/v must already have a unit innermost stride.
kc::PoolProblem make_problem(const PoolDims& d, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const kc::RowSpec& rows, double scale,
                             bool jagged) {
  kc::PoolProblem p;
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
  p.value = v.data_ptr();
  if (jagged) {  // [T, H, D]
    p.k_sb = 0;
    p.k_sl = k.stride(0);
    p.k_sh = k.stride(1);
    p.v_sb = 0;
    p.v_sl = v.stride(0);
    p.v_sh = v.stride(1);
  } else {  // [B, L, H, D]
    p.k_sb = k.stride(0);
    p.k_sl = k.stride(1);
    p.k_sh = k.stride(2);
    p.v_sb = v.stride(0);
    p.v_sl = v.stride(1);
    p.v_sh = v.stride(2);
  }
  p.rows = rows;
  p.scale = static_cast<float>(scale);
  return p;
}

// The op-level bias (padded [B, Nb, Hb, L], jagged [T, Nb, Hb]; query n reads row n % Nb) as
// (pointer-less) strides: b, n, h, key row; a head stride of 0 when one bias serves every head.
struct BiasStrides {
  int64_t nb, sb, sn, sh, sl;
};

BiasStrides bias_strides(const at::Tensor& t, bool jagged) {
  const int64_t sh = t.size(2) > 1 ? t.stride(2) : 0;
  if (jagged) return {t.size(1), 0, t.stride(1), sh, t.stride(0)};
  return {t.size(1), t.stride(0), t.stride(1), sh, t.stride(3)};
}

void set_bias(kc::PoolProblem& p, const std::optional<at::Tensor>& bias, bool jagged) {
  if (!bias.has_value()) return;
  const BiasStrides s = bias_strides(*bias, jagged);
  p.bias = bias->data_ptr();
  p.bias_f32 = bias->scalar_type() == at::kFloat;
  p.bias_nb = s.nb;
  p.bias_sb = s.sb;
  p.bias_sn = s.sn;
  p.bias_sh = s.sh;
  p.bias_sl = s.sl;
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
    const BiasStrides s = bias_strides(grad_bias_acc, jagged);
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
