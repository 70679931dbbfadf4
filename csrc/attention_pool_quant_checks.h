// Input checks of attnkern::attention_pool_quant_fwd that its CPU and CUDA launchers share
// (cpu/attention_pool_quant_launch.cpp, cuda/attention_pool_quant_cuda.cpp): what a direct
// torch.ops call needs so that no kernel reads out of bounds (the contract: docs/quantized.md).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <vector>

#include "attention_pool.h"
#include "input_checks.h"

namespace attnkern {

// The stored element type of the key and value rows as both backends number it (cpu::QuantType,
// cuda::QuantType): 0 int8, 1 uint8, 2 float8_e4m3fn, 3 float8_e5m2.
inline int quant_code(at::ScalarType t) {
  switch (t) {
    case at::kChar:
      return 0;
    case at::kByte:
      return 1;
    case at::kFloat8_e4m3fn:
      return 2;
    case at::kFloat8_e5m2:
      return 3;
    default:
      TORCH_CHECK_TYPE(false, "attnkern: quantized key must be torch.int8, torch.uint8, torch.float8_e4m3fn or ",
                       "torch.float8_e5m2, got ", dtype_name(t));
  }
  return 0;  // unreachable
}

// A per-row parameter ([B, L, H] padded, [T, H] jagged; float32), contiguous.
inline at::Tensor quant_row_param(const at::Tensor& t, const char* name, at::IntArrayRef want,
                                  const at::Tensor& query) {
  check_dense(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "attnkern: ", name, " must be torch.float32, got ",
                   dtype_name(t.scalar_type()));
  check_shape(t, name, want);
  check_on_query_device(t, name, query);
  return t.contiguous();
}

// The checked call: its dims, layout, stored type (quant_code) and contiguous row parameters
// (a bias undefined when not given).
struct QuantInputs {
  PoolDims d;
  bool jagged = false;
  int64_t rank = 4;  // of key and value: padded [B, L, H, D], jagged [T, H, D]
  int qtype = 0;
  at::Tensor k_scale, k_bias, v_scale, v_bias;
};

inline QuantInputs check_quant_fwd(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                   const at::Tensor& key_scale, const std::optional<at::Tensor>& key_bias,
                                   const at::Tensor& value_scale, const std::optional<at::Tensor>& value_bias,
                                   const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& mask,
                                   const std::optional<at::Tensor>& offsets, int64_t max_length, double scale,
                                   const std::optional<at::Tensor>& bias) {
  QuantInputs r;
  check_dense(query, "query");
  TORCH_CHECK_TYPE(query.scalar_type() == at::kFloat || query.scalar_type() == at::kHalf ||
                       query.scalar_type() == at::kBFloat16,
                   "attnkern: with quantized key/value, query must be float16, bfloat16 or float32, got ",
                   dtype_name(query.scalar_type()));
  TORCH_CHECK_VALUE(query.dim() == 4, "attnkern: query must be [B, N, H, Dk], got ", query.sizes());
  check_dense(key, "key");
  check_dense(value, "value");
  r.qtype = quant_code(key.scalar_type());
  TORCH_CHECK_TYPE(value.scalar_type() == key.scalar_type(), "attnkern: value must have the dtype of key (",
                   dtype_name(key.scalar_type()), "), got ", dtype_name(value.scalar_type()));
  check_on_query_device(key, "key", query);
  check_on_query_device(value, "value", query);
  r.jagged = offsets.has_value();
  r.rank = r.jagged ? 3 : 4;
  TORCH_CHECK_VALUE(key.dim() == r.rank && value.dim() == r.rank, "attnkern: ",
                    r.jagged ? "jagged key/value must be [T, H, Dk] / [T, H, Dv]"
                             : "padded key/value must be [B, L, H, Dk] / [B, L, H, Dv]",
                    ", got ", key.sizes(), " and ", value.sizes());
  const PoolDims d = pool_dims(query, key, value, r.rank);
  r.d = d;
  TORCH_CHECK_VALUE(d.H >= 1 && d.N >= 1, "attnkern: query must have N >= 1 and H >= 1, got ", query.sizes());
  check_dim_in_range("query/key head dim Dk", d.Dk, kMaxHeadDim);
  check_dim_in_range("value head dim Dv", d.Dv, kMaxHeadDim);
  // The key rows ([T, H] jagged, [B, L, H] padded) hold one (scale, bias) each; K and V add a head dim.
  const std::vector<int64_t> rows = r.jagged ? std::vector<int64_t>{d.L, d.H} : std::vector<int64_t>{d.B, d.L, d.H};
  const auto with_dim = [&](int64_t dim) {
    std::vector<int64_t> shape = rows;
    shape.push_back(dim);
    return shape;
  };
  check_shape(key, "key", with_dim(d.Dk));
  check_shape(value, "value", with_dim(d.Dv));
  r.k_scale = quant_row_param(key_scale, "key_scale", rows, query);
  r.v_scale = quant_row_param(value_scale, "value_scale", rows, query);
  if (key_bias.has_value()) r.k_bias = quant_row_param(*key_bias, "key_bias", rows, query);
  if (value_bias.has_value()) r.v_bias = quant_row_param(*value_bias, "value_bias", rows, query);
  TORCH_CHECK_VALUE(!(lengths.has_value() && mask.has_value()), "attnkern: give lengths or mask, not both");
  TORCH_CHECK_VALUE(!r.jagged || (!lengths.has_value() && !mask.has_value()),
                    "attnkern: lengths and mask are for the padded layout, got offsets too");
  if (lengths.has_value()) check_index_tensor(*lengths, "lengths", d.B, query);
  if (mask.has_value()) check_mask(*mask, d.B, d.L, query);
  if (r.jagged) {
    check_index_tensor(*offsets, "offsets", d.B + 1, query);
    check_max_length(max_length);
  }
  check_bias(d, query, bias, r.jagged);
  TORCH_CHECK_VALUE(std::isfinite(scale), "attnkern: scale must be finite, got ", scale);
  return r;
}

}  // namespace attnkern
