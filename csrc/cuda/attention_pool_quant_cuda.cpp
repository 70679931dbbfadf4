// CUDA launcher of attnkern::attention_pool_quant_fwd (schema in csrc/attention_pool_quant_ops.cpp):
// the checks a direct torch.ops call needs so that the kernel never reads out of bounds (the
// contract of docs/quantized.md), the query and the score bias converted once to float32, the
// row parameters made contiguous, outputs from the torch allocator on the current stream.
// lengths / offsets are never read on the host: the kernel clamps every row (RowSpec).
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

// The torch headers first: the emulation's cuda_runtime.h redefines CUDA's keywords as macros.
#include "attention_pool.h"
#include "cuda_launch.h"
#include "input_checks.h"
#include "attention_pool_quant_kernels.h"

namespace attnkern {
namespace {

namespace kc = attnkern::cuda;
using OptT = std::optional<at::Tensor>;

kc::QuantType quant_type_of(at::ScalarType t) {
  switch (t) {
    case at::kChar:
      return kc::QuantType::kInt8;
    case at::kByte:
      return kc::QuantType::kUInt8;
    case at::kFloat8_e4m3fn:
      return kc::QuantType::kFp8E4M3;
    case at::kFloat8_e5m2:
      return kc::QuantType::kFp8E5M2;
    default:
      TORCH_CHECK_TYPE(false, "attnkern: quantized key must be torch.int8, torch.uint8, torch.float8_e4m3fn or ",
                       "torch.float8_e5m2, got ", dtype_name(t));
  }
  return kc::QuantType::kInt8;  // unreachable
}

// A per-row parameter ([B, L, H] or [T, H], float32), contiguous.
at::Tensor row_parameter(const at::Tensor& t, const char* name, at::IntArrayRef want, const at::Tensor& query) {
  check_dense(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "attnkern: ", name, " must be torch.float32, got ",
                   dtype_name(t.scalar_type()));
  check_shape(t, name, want);
  check_on_query_device(t, name, query);
  return t.contiguous();
}

std::tuple<at::Tensor, at::Tensor> attention_pool_quant_fwd_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_scale,
    const OptT& key_bias, const at::Tensor& value_scale, const OptT& value_bias, const OptT& lengths,
    const OptT& mask, const OptT& offsets, int64_t max_length, double scale, const OptT& bias) {
  check_dense(query, "query");
  cuda_launch::check_device(query);
  cuda_launch::cuda_dtype(query);
  TORCH_CHECK_VALUE(query.dim() == 4, "attnkern: query must be [B, N, H, Dk], got ", query.sizes());
  check_dense(key, "key");
  check_dense(value, "value");
  const kc::QuantType qtype = quant_type_of(key.scalar_type());
  TORCH_CHECK_TYPE(value.scalar_type() == key.scalar_type(), "attnkern: value must have the dtype of key (",
                   dtype_name(key.scalar_type()), "), got ", dtype_name(value.scalar_type()));
  check_on_query_device(key, "key", query);
  check_on_query_device(value, "value", query);
  const bool jagged = offsets.has_value();
  const int64_t rank = jagged ? 3 : 4;
  TORCH_CHECK_VALUE(key.dim() == rank && value.dim() == rank, "attnkern: ",
                    jagged ? "jagged key/value must be [T, H, Dk] / [T, H, Dv]"
                           : "padded key/value must be [B, L, H, Dk] / [B, L, H, Dv]",
                    ", got ", key.sizes(), " and ", value.sizes());
  PoolDims d;
  d.B = query.size(0);
  d.N = query.size(1);
  d.H = query.size(2);
  d.Dk = query.size(3);
  d.L = key.size(rank - 3);
  d.Dv = value.size(rank - 1);
  TORCH_CHECK_VALUE(d.H >= 1 && d.N >= 1, "attnkern: query must have N >= 1 and H >= 1, got ", query.sizes());
  check_dim_in_range("query/key head dim Dk", d.Dk, kMaxHeadDim);
  check_dim_in_range("value head dim Dv", d.Dv, kMaxHeadDim);
  const std::vector<int64_t> kshape = jagged ? std::vector<int64_t>{d.L, d.H, d.Dk}
                                             : std::vector<int64_t>{d.B, d.L, d.H, d.Dk};
  const std::vector<int64_t> vshape = jagged ? std::vector<int64_t>{d.L, d.H, d.Dv}
                                             : std::vector<int64_t>{d.B, d.L, d.H, d.Dv};
  const std::vector<int64_t> pshape = jagged ? std::vector<int64_t>{d.L, d.H} : std::vector<int64_t>{d.B, d.L, d.H};
  check_shape(key, "key", kshape);
  check_shape(value, "value", vshape);
  const at::Tensor ks = row_parameter(key_scale, "key_scale", pshape, query);
  const at::Tensor vs = row_parameter(value_scale, "value_scale", pshape, query);
  at::Tensor kb, vb;
  if (key_bias.has_value()) kb = row_parameter(*key_bias, "key_bias", pshape, query);
  if (value_bias.has_value()) vb = row_parameter(*value_bias, "value_bias", pshape, query);
  TORCH_CHECK_VALUE(!(lengths.has_value() && mask.has_value()), "attnkern: give lengths or mask, not both");
  TORCH_CHECK_VALUE(!jagged || (!lengths.has_value() && !mask.has_value()),
                    "attnkern: lengths and mask are for the padded layout, got offsets too");
  if (lengths.has_value()) check_index_tensor(*lengths, "lengths", d.B, query);
  if (mask.has_value()) check_mask(*mask, d.B, d.L, query);
  if (jagged) {
    check_index_tensor(*offsets, "offsets", d.B + 1, query);
    check_max_length(max_length);
  }
  check_bias(d, query, bias, jagged);
  TORCH_CHECK_VALUE(std::isfinite(scale), "attnkern: scale must be finite, got ", scale);

  cuda_launch::DeviceGuard guard(query.device());
  auto out = at::empty({d.B, d.N, d.H, d.Dv}, query.options().dtype(at::kFloat));
  auto lse = at::empty({d.B, d.N, d.H}, query.options().dtype(at::kFloat));
  if (d.B == 0) return {out, lse};
  const at::Tensor q = query.to(at::kFloat).contiguous();
  const at::Tensor k = cuda_launch::unit_inner_stride(key);
  const at::Tensor v = cuda_launch::unit_inner_stride(value);
  at::Tensor bias_f;
  kc::PoolProblem p;
  p.dtype = kc::DType::kFloat32;
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
  p.k_sl = k.stride(rank - 3);
  p.k_sh = k.stride(rank - 2);
  p.value = v.data_ptr();
  p.v_sb = jagged ? 0 : v.stride(0);
  p.v_sl = v.stride(rank - 3);
  p.v_sh = v.stride(rank - 2);
  if (jagged) {
    p.rows.mode = kc::RowMode::kJagged;
    p.rows.index = offsets->data_ptr();
    p.rows.index_is_int64 = offsets->scalar_type() == at::kLong;
    p.rows.index_stride = offsets->stride(0);
    p.rows.max_length = max_length;
  } else if (lengths.has_value()) {
    p.rows.mode = kc::RowMode::kLengths;
    p.rows.index = lengths->data_ptr();
    p.rows.index_is_int64 = lengths->scalar_type() == at::kLong;
    p.rows.index_stride = lengths->stride(0);
  } else if (mask.has_value()) {
    p.rows.mode = kc::RowMode::kMask;
    p.rows.mask = mask->data_ptr<bool>();
    p.rows.mask_stride_b = mask->stride(0);
    p.rows.mask_stride_l = mask->stride(1);
  }
  p.scale = static_cast<float>(scale);
  if (bias.has_value()) {  // padded [B, Nb, Hb, L], jagged [T, Nb, Hb]
    bias_f = bias->to(at::kFloat);
    p.bias = bias_f.data_ptr();
    p.bias_f32 = true;
    p.bias_nb = bias_f.size(1);
    p.bias_sn = bias_f.stride(1);
    p.bias_sh = bias_f.size(2) > 1 ? bias_f.stride(2) : 0;
    p.bias_sb = jagged ? 0 : bias_f.stride(0);
    p.bias_sl = jagged ? bias_f.stride(0) : bias_f.stride(3);
  }
  kc::QuantRows qr;
  qr.type = qtype;
  qr.k_scale = ks.data_ptr<float>();
  qr.v_scale = vs.data_ptr<float>();
  qr.k_bias = kb.defined() ? kb.data_ptr<float>() : nullptr;
  qr.v_bias = vb.defined() ? vb.data_ptr<float>() : nullptr;
  qr.p_sb = jagged ? 0 : d.L * d.H;
  ATTNKERN_CUDA_CHECK(kc::launch_quant_fwd(p, qr, out.data_ptr<float>(), lse.data_ptr<float>(),
                                           cuda_launch::current_stream()));
  return {out, lse};
}

}  // namespace
}  // namespace attnkern

TORCH_LIBRARY_IMPL(attnkern, ATTNKERN_CUDA_KEY, m) {
  m.impl(ATTNKERN_CUDA_OP("attention_pool_quant_fwd"), &attnkern::attention_pool_quant_fwd_cuda);
}
