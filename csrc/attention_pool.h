// Shared declarations for every attnkern launcher (CPU and CUDA).
//
// Canonical layouts seen by the registered ops (the Python API normalises to these):
//   padded: query [B, N, H, Dk], key [B, L, H, Dk], value [B, L, H, Dv],
//           lengths [B] int32/int64 (optional) XOR mask [B, L] bool (optional)
//   jagged: query [B, N, H, Dk], key [T, H, Dk],    value [T, H, Dv],
//           offsets [B+1] int32/int64, max_length (-1 = unknown)
// Outputs: out [B, N, H, Dv] contiguous, in the accumulator dtype (float32; float64 for float64
// inputs): unrounded, so that the autograd's delta = sum(grad_out * out) is accurate for
// float16/bfloat16 (the public function casts out to the query dtype); lse [B, N, H] float32
// (-inf on empty rows, NaN where a valid position holds a non-finite value).
// Backward takes delta [B, N, H] float32 (float64 allowed for float64 inputs)
// = sum_d(grad_out * out) - grad_lse and returns
// grad_query / grad_key / grad_value with the shapes and dtypes of query / key / value, exactly
// zero at every position that takes part in no row.
//
// Optional score bias (added to scale * <q, k_l> before the softmax), in the accumulator's
// units: padded [B, Nb, Hb, L], jagged [T, Nb, Hb], float32 or the query's dtype, any strides;
// Nb divides N (query n reads bias row n % Nb: 1 = shared by every query, N = one per query,
// and after the public function's fold of shared K/V heads, G = one per query head of a
// group), Hb is 1 (shared by every head) or H. The backward returns grad_bias shaped and typed
// like bias (an empty tensor without bias), summed over the queries and heads that share an
// entry, exactly 0 at positions that take part in no row.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <optional>
#include <string>
#include <vector>

#include "op_limits.h"

namespace attnkern {

struct PoolDims {
  int64_t B = 0;   // rows (users)
  int64_t N = 0;   // queries per row
  int64_t H = 0;   // heads
  int64_t Dk = 0;  // query/key head dim
  int64_t Dv = 0;  // value head dim
  int64_t L = 0;   // padded: max history length; jagged: T (total key rows)
};

// The dims of query [B, N, H, Dk] and key/value of `rank` dims (4 padded, 3 jagged), already
// checked to have those ranks.
PoolDims pool_dims(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t rank);

// Shape/dtype/device checks shared by the forward launchers. They never read tensor data, so
// they are safe for CUDA tensors. Errors are ValueError (shapes) / TypeError (dtypes) naming
// the argument with expected vs given (csrc/input_checks.h).
PoolDims check_padded_fwd(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                          const std::optional<at::Tensor>& lengths,
                          const std::optional<at::Tensor>& mask);
PoolDims check_jagged_fwd(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                          const at::Tensor& offsets, int64_t max_length);

// The optional bias of a call with dims d (padded: d.L is L; jagged: d.L is T).
void check_bias(const PoolDims& d, const at::Tensor& query, const std::optional<at::Tensor>& bias, bool jagged);

// Extra checks of the backward-only inputs (grad_out, lse, delta).
void check_bwd_extras(const PoolDims& d, const at::Tensor& query, const at::Tensor& grad_out,
                      const at::Tensor& lse, const at::Tensor& delta);

// Value checks that read lengths/offsets. Only for CPU tensors (they would sync a GPU).
void check_lengths_values_cpu(const at::Tensor& lengths, int64_t L);
void check_offsets_values_cpu(const at::Tensor& offsets, int64_t T, int64_t max_length);

}  // namespace attnkern
