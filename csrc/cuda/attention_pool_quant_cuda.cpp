// CUDA launcher of attnkern::attention_pool_quant_fwd (schema in csrc/attention_pool_quant_ops.cpp):
// the checks a direct torch.ops call needs so that the kernel never reads out of bounds (the
// contract of docs/quantized.md), the query and the score bias converted once to float32, the
// row parameters made contiguous, outputs from the torch allocator on the current stream.
// lengths / offsets are never read on the host: the kernel clamps every row (RowSpec).
#include <optional>
#include <tuple>

// The torch headers first: the emulation's cuda_runtime.h redefines CUDA's keywords as macros.
#include "attention_pool_quant_checks.h"
#include "cuda_launch.h"
#include "attention_pool_quant_kernels.h"

namespace attnkern {
namespace {

namespace kc = attnkern::cuda;
using OptT = std::optional<at::Tensor>;
static_assert(int(kc::QuantType::kInt8) == 0 && int(kc::QuantType::kFp8E5M2) == 3, "the numbering of quant_code");

std::tuple<at::Tensor, at::Tensor> attention_pool_quant_fwd_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_scale,
    const OptT& key_bias, const at::Tensor& value_scale, const OptT& value_bias, const OptT& lengths,
    const OptT& mask, const OptT& offsets, int64_t max_length, double scale, const OptT& bias) {
  const QuantInputs in = check_quant_fwd(query, key, value, key_scale, key_bias, value_scale, value_bias, lengths,
                                         mask, offsets, max_length, scale, bias);
  cuda_launch::check_device(query);
  const PoolDims& d = in.d;
  cuda_launch::DeviceGuard guard(query.device());
  auto out = at::empty({d.B, d.N, d.H, d.Dv}, query.options().dtype(at::kFloat));
  auto lse = at::empty({d.B, d.N, d.H}, query.options().dtype(at::kFloat));
  if (d.B == 0) return {out, lse};
  // The float32 kernels' view of the problem: the query converted, key and value the stored bytes.
  const at::Tensor q = query.to(at::kFloat).contiguous();
  const at::Tensor k = cuda_launch::unit_inner_stride(key);
  const at::Tensor v = cuda_launch::unit_inner_stride(value);
  const kc::RowSpec rows = in.jagged ? cuda_launch::jagged_rows(*offsets, max_length)
                                     : cuda_launch::padded_rows(lengths, mask);
  kc::PoolProblem p = cuda_launch::make_problem(d, q, k, v, rows, scale, in.jagged);
  OptT bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat);
  cuda_launch::set_bias(p, bias_f, in.jagged);
  kc::QuantRows qr;
  qr.type = static_cast<kc::QuantType>(in.qtype);
  qr.k_scale = in.k_scale.data_ptr<float>();
  qr.v_scale = in.v_scale.data_ptr<float>();
  qr.k_bias = in.k_bias.defined() ? in.k_bias.data_ptr<float>() : nullptr;
  qr.v_bias = in.v_bias.defined() ? in.v_bias.data_ptr<float>() : nullptr;
  qr.p_sb = in.jagged ? 0 : d.L * d.H;
  ATTNKERN_CUDA_CHECK(kc::launch_quant_fwd(p, qr, out.data_ptr<float>(), lse.data_ptr<float>(),
                                           cuda_launch::current_stream()));
  return {out, lse};
}

}  // namespace
}  // namespace attnkern

TORCH_LIBRARY_IMPL(attnkern, ATTNKERN_CUDA_KEY, m) {
  m.impl(ATTNKERN_CUDA_OP("attention_pool_quant_fwd"), &attnkern::attention_pool_quant_fwd_cuda);
}
