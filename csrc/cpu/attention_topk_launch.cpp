// CPU launcher of attnkern::attention_topk_fwd: checks its inputs (what a direct torch.ops call
// needs so that no kernel reads out of bounds), converts the query and the bias once to the
// accumulator type, and runs the kernels of the instruction set isa_dispatch.h selected over the
// (row, K/V head) items. Deterministic: each item writes only its own queries' output rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "../attention_topk_checks.h"
#include "attention_topk_kernels.h"
#include "isa_dispatch.h"
#include "score_rows_launch.h"

namespace attnkern {
namespace cpu {
namespace {

using OptT = std::optional<at::Tensor>;

TopkFn kernel_for(at::ScalarType dtype) {
  if (dtype == at::kDouble) return topk_generic_f64_kernel();
  TopkKernels kt;
  switch (selected_isa()) {
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::kAmx:
    case Isa::kAvx512Bf16:
    case Isa::kAvx512: kt = topk_avx512_kernels(); break;
    case Isa::kAvx2: kt = topk_avx2_kernels(); break;
#endif
    default: kt = topk_generic_kernels();
  }
  return dtype == at::kBFloat16 ? kt.bf16 : dtype == at::kHalf ? kt.f16 : kt.f32;
}

// Row starts and scanned lengths, checked: padded rows are [b * L, b * L + len), jagged rows
// [offsets[b], offsets[b + 1]) in order inside the T key rows.
void row_ranges(const OptT& lengths, const OptT& offsets, int64_t B, int64_t L, std::vector<int64_t>& starts,
                std::vector<int64_t>& lens) {
  starts.assign(size_t(B), 0);
  lens.assign(size_t(B), L);
  if (given(offsets)) {
    const at::Tensor o = offsets->to(at::kLong).contiguous();
    const int64_t* op = o.data_ptr<int64_t>();
    TORCH_CHECK_VALUE(B == 0 || op[0] >= 0, "attnkern: offsets[0] must be >= 0, got ", B ? op[0] : 0);
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK_VALUE(op[b + 1] >= op[b] && op[b + 1] <= L, "attnkern: offsets must be non-decreasing and <= T = ",
                        L, ", got offsets[", b, "] = ", op[b], ", offsets[", b + 1, "] = ", op[b + 1]);
      starts[size_t(b)] = op[b];
      lens[size_t(b)] = op[b + 1] - op[b];
    }
    return;
  }
  for (int64_t b = 0; b < B; ++b) starts[size_t(b)] = b * L;
  if (given(lengths)) {
    const at::Tensor l = lengths->to(at::kLong).contiguous();
    const int64_t* lp = l.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK_VALUE(lp[b] >= 0 && lp[b] <= L, "attnkern: lengths must be in [0, L = ", L, "], got lengths[", b,
                        "] = ", lp[b]);
      lens[size_t(b)] = lp[b];
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_topk_fwd_cpu(const at::Tensor& query, const at::Tensor& key,
                                                          const OptT& lengths, const OptT& mask, const OptT& offsets,
                                                          int64_t k, double scale, const OptT& bias) {
  const TopkDims t = check_topk_fwd(query, key, lengths, mask, offsets, k, scale, bias);
  TORCH_CHECK_VALUE(query.device().is_cpu(), "attnkern: the CPU kernels need CPU tensors, got query on ",
                    query.device());
  const int64_t B = t.d.B, N = t.d.N, H = t.d.H, Dk = t.d.Dk, L = t.d.L, Hkv = t.Hkv;
  const bool jagged = t.jagged;
  const at::Tensor mask_u8 = given(mask) ? mask->contiguous().view(at::kByte) : at::Tensor();
  const at::ScalarType acc = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor bias_c = given(bias) ? bias->to(acc).contiguous() : at::Tensor();
  std::vector<int64_t> starts, lens;
  row_ranges(lengths, offsets, B, L, starts, lens);

  const at::Tensor q_c = score_query(query, acc);
  const at::Tensor k_c = key.contiguous();
  at::Tensor scores = at::full({B, N, H, k}, -std::numeric_limits<double>::infinity(), query.options().dtype(acc));
  at::Tensor indices = at::full({B, N, H, k}, -1, query.options().dtype(at::kLong));
  TopkParams p{score_rows(q_c, k_c, Dk, L, starts, lens, mask_u8, scale, bias_c, jagged), k, scores.data_ptr(),
               indices.data_ptr<int64_t>()};
  if (k == 0 || B == 0) return {scores, indices};
  const TopkFn fn = kernel_for(query.scalar_type());
  // Items of about 64k multiply-adds at least, so that tiny rows do not pay one task each.
  const int64_t row_len = jagged ? L / B : L;
  const int64_t per_item = std::max<int64_t>(1, N * (H / Hkv) * std::max<int64_t>(row_len, 1) * Dk);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / per_item);
  at::parallel_for(0, B * Hkv, grain, [&](int64_t begin, int64_t end) { fn(p, begin, end); });
  return {scores, indices};
}

}  // namespace cpu
}  // namespace attnkern

TORCH_LIBRARY_IMPL(attnkern, CPU, m) { m.impl("attention_topk_fwd", &attnkern::cpu::attention_topk_fwd_cpu); }
