// Shared declarations of the activation-unit launchers (CPU and CUDA): the argument checks of
// attnkern::activation_unit_pool_fwd/_bwd (schemas and semantics in activation_unit_ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "op_limits.h"

namespace attnkern {

struct AuDims {
  int64_t B = 0, N = 0, E = 0, Dv = 0;
  int64_t L = 0;   // padded: max history length; jagged: T (total key rows)
  int64_t H1 = 0;  // first hidden layer's units
  int64_t H2 = 0;  // second hidden layer's units (0: one hidden layer)
  int act = 0;     // 0 relu, 1 sigmoid, 2 prelu, 3 dice
  int64_t act_rows = 0;  // rows of act1/act2: 0, 1 (prelu) or 3 (dice)
  bool jagged = false;
};

// Shape/dtype/device checks of every forward input. They never read tensor data, so they are
// safe for CUDA tensors. ValueError (shapes, names) / TypeError (dtypes) naming the argument.
AuDims check_activation_unit_fwd(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                 const std::optional<at::Tensor>& lengths,
                                 const std::optional<at::Tensor>& mask,
                                 const std::optional<at::Tensor>& offsets, int64_t max_length,
                                 const at::Tensor& w1, const at::Tensor& b1,
                                 const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2,
                                 const at::Tensor& w_out, const at::Tensor& b_out,
                                 const std::optional<at::Tensor>& act1,
                                 const std::optional<at::Tensor>& act2, const std::string& activation);

// The backward-only inputs: grad_out [B, N, Dv] (query dtype), lse and delta [B, N] (float64 for
// float64 inputs, else float32).
void check_activation_unit_bwd_extras(const AuDims& d, const at::Tensor& query, const at::Tensor& grad_out,
                                      const at::Tensor& lse, const at::Tensor& delta);

}  // namespace attnkern
