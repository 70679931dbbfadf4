// Input checks of the attention-pool ops, shared by every launcher, so that a direct
// torch.ops.attnkern.* call can never make a kernel read out of bounds (the contract:
// docs/contract.md; the public API checks more, with its own messages, in attnkern/_validation.py).
#include "attention_pool.h"

#include "input_checks.h"

namespace attnkern {

PoolDims pool_dims(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t rank) {
  PoolDims d;
  d.B = query.size(0);
  d.N = query.size(1);
  d.H = query.size(2);
  d.Dk = query.size(3);
  d.L = key.size(rank - 3);
  d.Dv = value.size(rank - 1);
  return d;
}

namespace {

// query [B, N, H, Dk] with key and value of its dtype and device, key and value of `rank` dims;
// the dims every layout shares (L is the padded length or the jagged T).
PoolDims check_qkv(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t rank,
                   const char* key_shape, const char* value_shape) {
  check_float_query(query);
  check_dense(key, "key");
  check_dense(value, "value");
  check_same_dtype(key, "key", query);
  check_same_dtype(value, "value", query);
  TORCH_CHECK_VALUE(key.device() == query.device() && value.device() == query.device(),
                    "attnkern: query, key and value must be on one device, got ", query.device(),
                    ", ", key.device(), ", ", value.device());
  TORCH_CHECK_VALUE(query.dim() == 4, "attnkern: query must be [B, N, H, Dk], got ", query.dim(),
                    " dims");
  TORCH_CHECK_VALUE(key.dim() == rank, "attnkern: ", key_shape, ", got ", key.sizes());
  TORCH_CHECK_VALUE(value.dim() == rank, "attnkern: ", value_shape, ", got ", value.sizes());
  return pool_dims(query, key, value, rank);
}

void check_dims(const PoolDims& d) {
  TORCH_CHECK_VALUE(d.H >= 1, "attnkern: query must have H >= 1 heads, got H=", d.H);
  TORCH_CHECK_VALUE(d.N >= 1, "attnkern: query must have N >= 1 queries, got N=", d.N);
  check_dim_in_range("query/key head dim Dk", d.Dk, kMaxHeadDim);
  check_dim_in_range("value head dim Dv", d.Dv, kMaxHeadDim);
}

}  // namespace

PoolDims check_padded_fwd(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                          const std::optional<at::Tensor>& lengths,
                          const std::optional<at::Tensor>& mask) {
  const PoolDims d = check_qkv(query, key, value, 4, "padded key must be [B, L, H, Dk]",
                               "padded value must be [B, L, H, Dv]");
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
  if (mask.has_value()) check_mask(*mask, d.B, d.L, query);
  return d;
}

PoolDims check_jagged_fwd(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                          const at::Tensor& offsets, int64_t max_length) {
  const PoolDims d = check_qkv(query, key, value, 3, "jagged key must be [T, H, Dk]",
                               "jagged value must be [T, H, Dv]");
  TORCH_CHECK_VALUE(key.size(1) == d.H && key.size(2) == d.Dk, "attnkern: key must be [T, H, Dk] = [T, ",
                    d.H, ", ", d.Dk, "] to match query ", query.sizes(), ", got ", key.sizes());
  TORCH_CHECK_VALUE(value.size(0) == d.L && value.size(1) == d.H,
                    "attnkern: value must be [T, H, Dv] = [", d.L, ", ", d.H,
                    ", Dv] to match key ", key.sizes(), ", got ", value.sizes());
  check_dims(d);
  check_index_tensor(offsets, "offsets", d.B + 1, query);
  check_max_length(max_length);
  return d;
}

void check_bias(const PoolDims& d, const at::Tensor& query, const std::optional<at::Tensor>& bias, bool jagged) {
  if (!bias.has_value()) return;
  const at::Tensor& b = *bias;
  check_dense(b, "bias");
  TORCH_CHECK_TYPE(b.scalar_type() == at::kFloat || b.scalar_type() == query.scalar_type(),
                   "attnkern: bias must be torch.float32 or the dtype of query (", dtype_name(query.scalar_type()),
                   "), got ", dtype_name(b.scalar_type()));
  const int64_t rank = jagged ? 3 : 4;
  // padded [B, Nb, Hb, L], jagged [T, Nb, Hb]: Nb and Hb are dims 1 and 2 of both.
  const int64_t nb = b.dim() == rank ? b.size(1) : 0;
  const int64_t hb = b.dim() == rank ? b.size(2) : 0;
  const bool rows_ok = b.dim() == rank && b.size(0) == (jagged ? d.L : d.B) && (jagged || b.size(3) == d.L);
  TORCH_CHECK_VALUE(rows_ok && nb >= 1 && d.N % nb == 0 && (hb == 1 || hb == d.H), "attnkern: bias must be ",
                    jagged ? "[T, Nb, Hb] = [" : "[B, Nb, Hb, L] = [", jagged ? d.L : d.B,
                    jagged ? ", Nb, Hb]" : ", Nb, Hb, ", jagged ? "" : std::to_string(d.L), jagged ? "" : "]",
                    " with Nb dividing N = ", d.N, " and Hb 1 or H = ", d.H, ", got ", b.sizes());
  check_on_query_device(b, "bias", query);
}

void check_bwd_extras(const PoolDims& d, const at::Tensor& query, const at::Tensor& grad_out,
                      const at::Tensor& lse, const at::Tensor& delta) {
  check_dense(grad_out, "grad_out");
  check_dense(lse, "lse");
  check_dense(delta, "delta");
  check_same_dtype(grad_out, "grad_out", query);
  check_shape(grad_out, "grad_out", {d.B, d.N, d.H, d.Dv}, "[B, N, H, Dv]");
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, "attnkern: lse must be torch.float32, got ",
                   dtype_name(lse.scalar_type()));
  // float64 inputs may pass a float64 delta, so that their gradients stay float64-accurate.
  TORCH_CHECK_TYPE(delta.scalar_type() == at::kFloat ||
                       (delta.scalar_type() == at::kDouble && query.scalar_type() == at::kDouble),
                   "attnkern: delta must be torch.float32 (or torch.float64 for torch.float64 inputs), got ",
                   dtype_name(delta.scalar_type()), " with ", dtype_name(query.scalar_type()), " inputs");
  check_shape(lse, "lse", {d.B, d.N, d.H}, "[B, N, H]");
  check_shape(delta, "delta", {d.B, d.N, d.H}, "[B, N, H]");
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
