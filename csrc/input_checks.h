// Argument checks shared by the launchers' input checks of every op (attention_pool_checks.cpp,
// activation_unit_checks.cpp): what a direct torch.ops.attnkern.* call needs so that no kernel
// can read out of bounds. Errors are ValueError (shapes, devices) / TypeError (dtypes, layouts)
// naming the argument with expected vs given; dtypes are spelled as Python spells them.
// attnkern/ops/checks.py mirrors these checks for the fake impls and the Python ops.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

#include "op_limits.h"

namespace attnkern {

// An optional tensor argument that was passed (None arrives as an empty optional).
inline bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// "torch.float32", as str(torch.float32) prints it.
inline std::string dtype_name(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

// Sparse, mkldnn and nested tensors have no strides to hand the kernels; refuse them first (a
// nested tensor cannot even report its sizes).
inline void check_dense(const at::Tensor& t, const char* name) {
  // None passed for a Tensor argument arrives as an undefined tensor.
  TORCH_CHECK_TYPE(t.defined(), "attnkern: ", name, " must be a Tensor, got None");
  TORCH_CHECK_TYPE(!t.is_nested(), "attnkern: ", name, " must be a dense (strided) tensor, got a nested tensor");
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, "attnkern: ", name, " must be a dense (strided) tensor, got layout ",
                   t.layout());
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline void check_float_query(const at::Tensor& query) {
  check_dense(query, "query");
  TORCH_CHECK_TYPE(is_float_dtype(query.scalar_type()),
                   "attnkern: query must be float16, bfloat16, float32 or float64, got ",
                   dtype_name(query.scalar_type()));
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& query) {
  TORCH_CHECK_TYPE(t.scalar_type() == query.scalar_type(), "attnkern: ", name, " must have the dtype of query (",
                   dtype_name(query.scalar_type()), "), got ", dtype_name(t.scalar_type()));
}

inline void check_on_query_device(const at::Tensor& t, const char* name, const at::Tensor& query) {
  TORCH_CHECK_VALUE(t.device() == query.device(), "attnkern: ", name, " must be on the device of query (",
                    query.device(), "), got ", t.device());
}

// lengths [n] or offsets [n].
inline void check_index_tensor(const at::Tensor& t, const char* name, int64_t n, const at::Tensor& query) {
  check_dense(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "attnkern: ", name,
                   " must be int32 or int64, got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, "attnkern: ", name, " must have shape [", n, "], got ",
                    t.sizes());
  check_on_query_device(t, name, query);
}

// mask [B, L] bool, True = the position takes part.
inline void check_mask(const at::Tensor& m, int64_t B, int64_t L, const at::Tensor& query) {
  check_dense(m, "mask");
  TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, "attnkern: mask must be bool (True = attend), got ",
                   dtype_name(m.scalar_type()));
  TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == B && m.size(1) == L, "attnkern: mask must have shape [B, L] = [",
                    B, ", ", L, "], got ", m.sizes());
  check_on_query_device(m, "mask", query);
}

inline void check_max_length(int64_t max_length) {
  TORCH_CHECK_VALUE(max_length >= -1, "attnkern: max_length must be >= 0 (or -1 for unknown), got ", max_length);
}

// t's sizes are `want`; `dims` spells them ("[B, N, H]") where it helps.
inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef want, const char* dims = nullptr) {
  TORCH_CHECK_VALUE(t.sizes() == want, "attnkern: ", name, " must have shape ", dims ? dims : "", dims ? " = " : "",
                    want, ", got ", t.sizes());
}

// what in [1, most].
inline void check_dim_in_range(const char* what, int64_t d, int64_t most) {
  TORCH_CHECK_VALUE(d >= 1 && d <= most, "attnkern: ", what, " must be in [1, ", most, "], got ", d);
}

}  // namespace attnkern
