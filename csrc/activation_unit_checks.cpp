// Input checks of the activation-unit ops, shared by every launcher, so that a direct
// torch.ops.attnkern.activation_unit_pool_* call can never make a kernel read out of bounds (the
// contract: docs/contract.md; the public API checks more, with its own messages, in
// attnkern/_validation.py).
#include "activation_unit.h"

#include "input_checks.h"

namespace attnkern {
namespace {

// An input of the query's dtype and device.
void check_float_like(const at::Tensor& t, const char* name, const at::Tensor& query) {
  check_dense(t, name);
  check_same_dtype(t, name, query);
  check_on_query_device(t, name, query);
}

}  // namespace

AuDims check_activation_unit_fwd(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                 const std::optional<at::Tensor>& lengths,
                                 const std::optional<at::Tensor>& mask,
                                 const std::optional<at::Tensor>& offsets, int64_t max_length,
                                 const at::Tensor& w1, const at::Tensor& b1,
                                 const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2,
                                 const at::Tensor& w_out, const at::Tensor& b_out,
                                 const std::optional<at::Tensor>& act1,
                                 const std::optional<at::Tensor>& act2, const std::string& activation) {
  check_float_query(query);
  TORCH_CHECK_VALUE(query.dim() == 3, "attnkern: query must be [B, N, E], got ", query.sizes());
  check_float_like(key, "key", query);
  check_float_like(value, "value", query);
  AuDims d;
  d.B = query.size(0);
  d.N = query.size(1);
  d.E = query.size(2);
  d.jagged = offsets.has_value();
  if (d.jagged) {
    TORCH_CHECK_VALUE(!lengths.has_value() && !mask.has_value(),
                      "attnkern: lengths and mask are for the padded layout; with offsets leave them None");
    TORCH_CHECK_VALUE(key.dim() == 2 && key.size(1) == d.E, "attnkern: jagged key must be [T, E] = [T, ", d.E,
                      "], got ", key.sizes());
    d.L = key.size(0);
    TORCH_CHECK_VALUE(value.dim() == 2 && value.size(0) == d.L, "attnkern: jagged value must be [T, Dv] = [",
                      d.L, ", Dv], got ", value.sizes());
    check_index_tensor(*offsets, "offsets", d.B + 1, query);
    check_max_length(max_length);
  } else {
    TORCH_CHECK_VALUE(key.dim() == 3 && key.size(0) == d.B && key.size(2) == d.E,
                      "attnkern: padded key must be [B, L, E] = [", d.B, ", L, ", d.E, "], got ", key.sizes());
    d.L = key.size(1);
    TORCH_CHECK_VALUE(value.dim() == 3 && value.size(0) == d.B && value.size(1) == d.L,
                      "attnkern: padded value must be [B, L, Dv] = [", d.B, ", ", d.L, ", Dv], got ",
                      value.sizes());
    TORCH_CHECK_VALUE(!(lengths.has_value() && mask.has_value()), "attnkern: give lengths or mask, not both");
    if (lengths.has_value()) check_index_tensor(*lengths, "lengths", d.B, query);
    if (mask.has_value()) check_mask(*mask, d.B, d.L, query);
  }
  d.Dv = value.size(-1);
  TORCH_CHECK_VALUE(d.N >= 1, "attnkern: query must have N >= 1 queries, got ", query.sizes());
  check_dim_in_range("embedding dim E", d.E, kMaxUnits);
  check_dim_in_range("value dim Dv", d.Dv, kMaxUnits);

  if (activation == "relu") d.act = 0;
  else if (activation == "sigmoid") d.act = 1;
  else if (activation == "prelu") d.act = 2, d.act_rows = 1;
  else if (activation == "dice") d.act = 3, d.act_rows = 3;
  else TORCH_CHECK_VALUE(false, "attnkern: activation must be relu, sigmoid, prelu or dice, got '", activation, "'");

  check_float_like(w1, "w1", query);
  TORCH_CHECK_VALUE(w1.dim() == 2 && w1.size(1) == 4 * d.E, "attnkern: w1 must be [H1, 4E] = [H1, ", 4 * d.E,
                    "], got ", w1.sizes());
  d.H1 = w1.size(0);
  check_dim_in_range("hidden units H1", d.H1, kMaxUnits);
  check_float_like(b1, "b1", query);
  check_shape(b1, "b1", {d.H1});
  TORCH_CHECK_VALUE(w2.has_value() == b2.has_value(), "attnkern: give w2 and b2 together, or neither");
  if (w2.has_value()) {
    check_float_like(*w2, "w2", query);
    TORCH_CHECK_VALUE(w2->dim() == 2 && w2->size(1) == d.H1, "attnkern: w2 must be [H2, H1] = [H2, ", d.H1,
                      "], got ", w2->sizes());
    d.H2 = w2->size(0);
    check_dim_in_range("hidden units H2", d.H2, kMaxUnits);
    check_float_like(*b2, "b2", query);
    check_shape(*b2, "b2", {d.H2});
  }
  const int64_t hl = d.H2 ? d.H2 : d.H1;
  check_float_like(w_out, "w_out", query);
  check_shape(w_out, "w_out", {1, hl});
  check_float_like(b_out, "b_out", query);
  check_shape(b_out, "b_out", {1});
  const char* names[2] = {"act1", "act2"};
  const std::optional<at::Tensor>* acts[2] = {&act1, &act2};
  const int64_t units[2] = {d.H1, d.H2};
  for (int i = 0; i < 2; ++i) {
    const bool want = d.act_rows > 0 && units[i] > 0;
    TORCH_CHECK_VALUE(acts[i]->has_value() == want, "attnkern: ", names[i],
                      want ? " is required" : " must be None", " for activation '", activation, "'",
                      (i == 1 && d.H2 == 0) ? " with one hidden layer" : "");
    if (want) {
      check_float_like(**acts[i], names[i], query);
      check_shape(**acts[i], names[i], {d.act_rows, units[i]});
    }
  }
  return d;
}

void check_activation_unit_bwd_extras(const AuDims& d, const at::Tensor& query, const at::Tensor& grad_out,
                                      const at::Tensor& lse, const at::Tensor& delta) {
  check_float_like(grad_out, "grad_out", query);
  check_shape(grad_out, "grad_out", {d.B, d.N, d.Dv});
  const auto acc = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto* t : {&lse, &delta}) {
    const char* name = t == &lse ? "lse" : "delta";
    check_dense(*t, name);
    TORCH_CHECK_TYPE(t->scalar_type() == acc, "attnkern: ", name, " must be ", dtype_name(acc), " for ",
                     dtype_name(query.scalar_type()), " inputs, got ", dtype_name(t->scalar_type()));
    check_shape(*t, name, {d.B, d.N});
    check_on_query_device(*t, name, query);
  }
}

}  // namespace attnkern
