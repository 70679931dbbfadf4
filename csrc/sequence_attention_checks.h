// Input checks that the sequence-attention launchers share (CPU: cpu/sequence_attention_launch.cpp,
// CUDA: cuda/sequence_attention_cuda.cpp), over input_checks.h's general ones.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>

#include "input_checks.h"

namespace attnkern {

// A dense int64 [n] vector on the query's device (rows, lengths, targets, times, bounds).
inline void check_long_vector(const at::Tensor& t, const char* name, int64_t n, const at::Tensor& q) {
  check_dense(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, "attnkern: ", name, " must be int64, got ",
                   dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, "attnkern: ", name, " must have shape [", n, "], got ",
                    t.sizes());
  check_on_query_device(t, name, q);
}

// A [rows >= 1, Hb] table of the query's dtype, Hb 1 or H and the same for every bias term
// (Hb 0: none seen yet; set to this table's).
inline void check_table(const at::Tensor& t, const char* name, const at::Tensor& q, int64_t H, int64_t& Hb) {
  check_dense(t, name);
  check_same_dtype(t, name, q);
  check_on_query_device(t, name, q);
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) >= 1 && (t.size(1) == 1 || t.size(1) == H), "attnkern: ", name,
                    " must be [rows >= 1, Hb] with Hb 1 or H = ", H, ", got ", t.sizes());
  TORCH_CHECK_VALUE(Hb == 0 || Hb == t.size(1), "attnkern: ", name, " must have the Hb = ", Hb,
                    " heads of the other bias terms, got ", t.size(1));
  Hb = t.size(1);
}

}  // namespace attnkern
