// Input checks shared by every launcher, so that a direct torch.ops.attnkern.* call can never
// make a kernel read out of bounds.
#include "attention_pool.h"

#include <c10/util/Exception.h>

namespace attnkern {
namespace {

// Sparse, mkldnn and nested tensors have no strides to hand the kernels; refuse them first (a
// nested tensor cannot even report its sizes).
void check_dense(const at::Tensor& t, const char* name) {
  // None passed for a Tensor argument arrives as an undefined tensor.
  TORCH_CHECK_TYPE(t.defined(), "attnkern: ", name, " must be a Tensor, got None");
  TORCH_CHECK_TYPE(!t.is_nested(), "attnkern: ", name, " must be a dense (strided) tensor, got a nested tensor");
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, "attnkern: ", name, " must be a dense (strided) tensor, got layout ",
                   t.layout());
}

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void check_qkv_common(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value) {
  check_dense(query, "query");
  check_dense(key, "key");
  check_dense(value, "value");
  TORCH_CHECK_TYPE(is_float_dtype(query.scalar_type()),
                   "attnkern: query must be float16, bfloat16, float32 or float64, got ",
                   query.scalar_type());
  TORCH_CHECK_TYPE(key.scalar_type() == query.scalar_type(),
                   "attnkern: key must have the dtype of query (", query.scalar_type(), "), got ",
                   key.scalar_type());
  TORCH_CHECK_TYPE(value.scalar_type() == query.scalar_type(),
                   "attnkern: value must have the dtype of query (", query.scalar_type(),
                   "), got ", value.scalar_type());
  TORCH_CHECK_VALUE(key.device() == query.device() && value.device() == query.device(),
                    "attnkern: query, key and value must be on one device, got ", query.device(),
                    ", ", key.device(), ", ", value.device());
  TORCH_CHECK_VALUE(query.dim() == 4, "attnkern: query must be [B, N, H, Dk], got ", query.dim(),
                    " dims");
}

void check_dims(PoolDims& d) {
  TORCH_CHECK_VALUE(d.H >= 1, "attnkern: query must have H >= 1 heads, got H=", d.H);
  TORCH_CHECK_VALUE(d.N >= 1, "attnkern: query must have N >= 1 queries, got N=", d.N);
  TORCH_CHECK_VALUE(d.Dk >= 1 && d.Dk <= kMaxHeadDim, "attnkern: query/key head dim Dk must be in [1, ",
                    kMaxHeadDim, "], got ", d.Dk);
  TORCH_CHECK_VALUE(d.Dv >= 1 && d.Dv <= kMaxHeadDim, "attnkern: value head dim Dv must be in [1, ",
                    kMaxHeadDim, "], got ", d.Dv);
}

void check_index_tensor(const at::Tensor& t, const char* name, int64_t expected_len,
                        const at::Tensor& query) {
  check_dense(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "attnkern: ",
                   name, " must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == expected_len, "attnkern: ", name,
                    " must have shape [", expected_len, "], got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == query.device(), "attnkern: ", name,
                    " must be on the device of query (", query.device(), "), got ", t.device());
}

}  // namespace

PoolDims check_padded_fwd(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                          const std::optional<at::Tensor>& lengths,
                          const std::optional<at::Tensor>& mask) {
  check_qkv_common(query, key, value);
  TORCH_CHECK_VALUE(key.dim() == 4, "attnkern: padded key must be [B, L, H, Dk], got ", key.sizes());
  TORCH_CHECK_VALUE(value.dim() == 4, "attnkern: padded value must be [B, L, H, Dv], got ",
                    value.sizes());
  PoolDims d;
  d.B = query.size(0);
  d.N = query.size(1);
  d.H = query.size(2);
  d.Dk = query.size(3);
  d.L = key.size(1);
  d.Dv = value.size(3);
  TORCH_CHECK_VALUE(key.size(0) == d.B && key.size(2) == d.H && key.size(3) == d.Dk,
                    "attnkern: key must be [B, L, H, Dk] = [", d.B, ", L, ", d.H, ", ", d.Dk,
                    "] to match query ", query.sizes(), ", got ", key.sizes());
  TORCH_CHECK_VALUE(value.size(0) == d.B && value.size(1) == d.L && value.size(2) == d.H,
                    "attnkern: value must be [B, L, H, Dv] = [", d.B, ", ", d.L, ", ", d.H,
                    ", Dv] to match key ", key.sizes(), ", got ", value.sizes());
  check_dims(d);
  TORCH_CHECK_VALUE(!(lengths.has_value() && mask.has_value()),
                    "attnkern: give lengths or mask, not both");
  if (lengths.has_value()) check_index_tensor(*lengths, "lengths", d.B, query);
  if (mask.has_value()) {
    const auto& m = *mask;
    check_dense(m, "mask");
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, "attnkern: mask must be bool (True = attend), got ",
                     m.scalar_type());
    TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == d.B && m.size(1) == d.L,
                      "attnkern: mask must have shape [B, L] = [", d.B, ", ", d.L, "], got ",
                      m.sizes());
    TORCH_CHECK_VALUE(m.device() == query.device(), "attnkern: mask must be on the device of query (",
                      query.device(), "), got ", m.device());
  }
  return d;
}

PoolDims check_jagged_fwd(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                          const at::Tensor& offsets, int64_t max_length) {
  check_qkv_common(query, key, value);
  TORCH_CHECK_VALUE(key.dim() == 3, "attnkern: jagged key must be [T, H, Dk], got ", key.sizes());
  TORCH_CHECK_VALUE(value.dim() == 3, "attnkern: jagged value must be [T, H, Dv], got ",
                    value.sizes());
  PoolDims d;
  d.B = query.size(0);
  d.N = query.size(1);
  d.H = query.size(2);
  d.Dk = query.size(3);
  d.L = key.size(0);
  d.Dv = value.size(2);
  TORCH_CHECK_VALUE(key.size(1) == d.H && key.size(2) == d.Dk, "attnkern: key must be [T, H, Dk] = [T, ",
                    d.H, ", ", d.Dk, "] to match query ", query.sizes(), ", got ", key.sizes());
  TORCH_CHECK_VALUE(value.size(0) == d.L && value.size(1) == d.H,
                    "attnkern: value must be [T, H, Dv] = [", d.L, ", ", d.H,
                    ", Dv] to match key ", key.sizes(), ", got ", value.sizes());
  check_dims(d);
  check_index_tensor(offsets, "offsets", d.B + 1, query);
  TORCH_CHECK_VALUE(max_length >= -1, "attnkern: max_length must be >= 0 (or -1 for unknown), got ",
                    max_length);
  return d;
}

void check_bwd_extras(const PoolDims& d, const at::Tensor& query, const at::Tensor& grad_out,
                      const at::Tensor& lse, const at::Tensor& delta) {
  check_dense(grad_out, "grad_out");
  check_dense(lse, "lse");
  check_dense(delta, "delta");
  TORCH_CHECK_TYPE(grad_out.scalar_type() == query.scalar_type(),
                   "attnkern: grad_out must have the dtype of query (", query.scalar_type(),
                   "), got ", grad_out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == d.B && grad_out.size(1) == d.N &&
                        grad_out.size(2) == d.H && grad_out.size(3) == d.Dv,
                    "attnkern: grad_out must be [B, N, H, Dv] = [", d.B, ", ", d.N, ", ", d.H, ", ",
                    d.Dv, "], got ", grad_out.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, "attnkern: lse must be float32, got ",
                   lse.scalar_type());
  // float64 inputs may pass a float64 delta, so that their gradients stay float64-accurate.
  TORCH_CHECK_TYPE(delta.scalar_type() == at::kFloat ||
                       (delta.scalar_type() == at::kDouble && query.scalar_type() == at::kDouble),
                   "attnkern: delta must be float32 (or float64 for float64 inputs), got ",
                   delta.scalar_type(), " with ", query.scalar_type(), " inputs");
  for (const auto* t : {&lse, &delta}) {
    const char* name = (t == &lse) ? "lse" : "delta";
    TORCH_CHECK_VALUE(t->dim() == 3 && t->size(0) == d.B && t->size(1) == d.N && t->size(2) == d.H,
                      "attnkern: ", name, " must be [B, N, H] = [", d.B, ", ", d.N, ", ", d.H,
                      "], got ", t->sizes());
  }
  TORCH_CHECK_VALUE(grad_out.device() == query.device() && lse.device() == query.device() &&
                        delta.device() == query.device(),
                    "attnkern: grad_out, lse and delta must be on the device of query (",
                    query.device(), ")");
}

void check_lengths_values_cpu(const at::Tensor& lengths, int64_t L) {
  if (lengths.numel() == 0) return;
  const auto l64 = lengths.to(at::kLong);
  const int64_t lo = l64.min().item<int64_t>();
  const int64_t hi = l64.max().item<int64_t>();
  TORCH_CHECK_VALUE(lo >= 0, "attnkern: lengths must be >= 0, got a length of ", lo);
  TORCH_CHECK_VALUE(hi <= L, "attnkern: lengths must be <= L = ", L, ", got a length of ", hi);
}

void check_offsets_values_cpu(const at::Tensor& offsets, int64_t T, int64_t max_length) {
  const auto o = offsets.to(at::kLong).contiguous();
  const int64_t* p = o.data_ptr<int64_t>();
  const int64_t n = o.numel();
  TORCH_CHECK_VALUE(p[0] == 0, "attnkern: offsets[0] must be 0, got ", p[0]);
  for (int64_t i = 1; i < n; ++i)
    TORCH_CHECK_VALUE(p[i] >= p[i - 1], "attnkern: offsets must be non-decreasing, got offsets[", i - 1,
                      "]=", p[i - 1], " > offsets[", i, "]=", p[i]);
  for (int64_t i = 1; i < n; ++i)
    TORCH_CHECK_VALUE(max_length < 0 || p[i] - p[i - 1] <= max_length, "attnkern: max_length=", max_length,
                      " is less than the length ", p[i] - p[i - 1], " that offsets give row ", i - 1);
  TORCH_CHECK_VALUE(p[n - 1] <= T, "attnkern: offsets[-1] must be <= T = ", T, " (key rows), got ",
                    p[n - 1]);
}

}  // namespace attnkern
