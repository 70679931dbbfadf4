// Input checks of attnkern::attention_topk_fwd that its CPU and CUDA launchers share
// (cpu/attention_topk_launch.cpp, cuda/attention_topk_cuda.cpp): what a direct torch.ops call
// needs so that no kernel reads out of bounds (docs/topk.md). Each launcher adds its device rule
// and its own limits.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

#include "attention_pool.h"
#include "input_checks.h"

namespace attnkern {

// Query [B, N, H, Dk]; key padded [B, L, Hkv, Dk] or jagged [T, Hkv, Dk] (d.L = T), Hkv dividing
// H. No value: d.Dv is Dk (the key stands in, as for the attention weights).
struct TopkDims {
  PoolDims d;
  int64_t Hkv = 1;
  bool jagged = false;
};

inline TopkDims check_topk_fwd(const at::Tensor& query, const at::Tensor& key, const std::optional<at::Tensor>& lengths,
                               const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& offsets,
                               int64_t k, double scale, const std::optional<at::Tensor>& bias) {
  check_float_query(query);
  check_dense(key, "key");
  check_same_dtype(key, "key", query);
  check_on_query_device(key, "key", query);
  TORCH_CHECK_VALUE(query.dim() == 4, "attnkern: query must be [B, N, H, Dk], got ", query.sizes());
  TopkDims t;
  t.jagged = given(offsets);
  const int64_t N = query.size(1), H = query.size(2), Dk = query.size(3);
  TORCH_CHECK_VALUE(N >= 1 && H >= 1, "attnkern: query must have N, H >= 1, got ", query.sizes());
  check_dim_in_range("query/key head dim Dk", Dk, kMaxHeadDim);
  TORCH_CHECK_VALUE(key.dim() == (t.jagged ? 3 : 4), "attnkern: key must be ",
                    t.jagged ? "jagged [T, Hkv, Dk] (offsets given)" : "padded [B, L, Hkv, Dk]", ", got ", key.sizes());
  t.d = pool_dims(query, key, key, t.jagged ? 3 : 4);
  t.Hkv = key.size(t.jagged ? 1 : 2);
  const int64_t B = t.d.B, L = t.d.L;
  TORCH_CHECK_VALUE((t.jagged || key.size(0) == B) && key.size(-1) == Dk && t.Hkv >= 1 && H % t.Hkv == 0,
                    "attnkern: key must have B = ", B, " rows (padded), Dk = ", Dk,
                    " and a head count dividing H = ", H, ", got ", key.sizes());
  TORCH_CHECK_VALUE(k >= 0, "attnkern: k must be >= 0, got ", k);
  TORCH_CHECK_VALUE(std::isfinite(scale), "attnkern: scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(int(given(lengths)) + int(given(mask)) + int(t.jagged) <= 1,
                    "attnkern: give at most one of lengths, mask (padded) and offsets (jagged)");
  if (given(lengths)) check_index_tensor(*lengths, "lengths", B, query);
  if (t.jagged) check_index_tensor(*offsets, "offsets", B + 1, query);
  if (given(mask)) check_mask(*mask, B, L, query);
  if (given(bias)) {  // padded [B, Nb, Hb, L], jagged [T, Nb, Hb]; Nb 1 or N, Hb 1 or H
    const at::Tensor& bt = *bias;
    check_dense(bt, "bias");
    check_on_query_device(bt, "bias", query);
    TORCH_CHECK_TYPE(bt.scalar_type() == at::kFloat || bt.scalar_type() == query.scalar_type(),
                     "attnkern: bias must be torch.float32 or the dtype of query, got ", dtype_name(bt.scalar_type()));
    TORCH_CHECK_VALUE(bt.dim() == (t.jagged ? 3 : 4) && bt.size(0) == (t.jagged ? L : B) &&
                          (bt.size(1) == 1 || bt.size(1) == N) && (bt.size(2) == 1 || bt.size(2) == H) &&
                          (t.jagged || bt.size(3) == L),
                      "attnkern: bias must be ", t.jagged ? "[T, Nb, Hb]" : "[B, Nb, Hb, L]",
                      " with Nb 1 or N and Hb 1 or H, got ", bt.sizes());
  }
  return t;
}

}  // namespace attnkern
