// The launchers' side of score_rows.h (attention_topk_launch.cpp, attention_weights_launch.cpp):
// the query in the kernels' form and the ScoreRows of a checked call.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "score_rows.h"

namespace attnkern {
namespace cpu {

// query [B, N, H, Dk] in the accumulator type acc, Dk zero-padded to whole vectors of every width.
inline at::Tensor score_query(const at::Tensor& query, at::ScalarType acc) {
  const int64_t Dk = query.size(3);
  const int64_t Dkp = (Dk + kScoreQueryAlign - 1) / kScoreQueryAlign * kScoreQueryAlign;
  at::Tensor q = at::zeros({query.size(0), query.size(1), query.size(2), Dkp}, query.options().dtype(acc));
  q.narrow(3, 0, Dk).copy_(query);
  return q;
}

// The rows of a checked call: q from score_query, k contiguous [rows, Hkv, Dk], mask_u8 / bias
// (contiguous, in acc) undefined when absent. The vectors must outlive the kernels' run.
inline ScoreRows score_rows(const at::Tensor& q, const at::Tensor& k, int64_t Dk, int64_t L,
                            const std::vector<int64_t>& starts, const std::vector<int64_t>& lens,
                            const at::Tensor& mask_u8, double scale, const at::Tensor& bias, bool jagged) {
  ScoreRows r{};
  r.q = q.data_ptr();
  r.k = k.data_ptr();
  r.B = q.size(0);
  r.N = q.size(1);
  r.H = q.size(2);
  r.Hkv = k.size(-2);
  r.Dk = Dk;
  r.Dkp = q.size(3);
  r.L = L;
  r.starts = starts.data();
  r.lens = lens.data();
  r.mask = mask_u8.defined() ? mask_u8.data_ptr<uint8_t>() : nullptr;
  r.scale = scale;
  r.bias = bias.defined() ? bias.data_ptr() : nullptr;
  r.Nb = bias.defined() ? bias.size(1) : 1;
  r.Hb = bias.defined() ? bias.size(2) : 1;
  r.jagged = jagged;
  return r;
}

}  // namespace cpu
}  // namespace attnkern
