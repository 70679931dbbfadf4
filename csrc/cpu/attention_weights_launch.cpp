// CPU launcher of attnkern::attention_weights_fwd and jagged_attention_weights_fwd: checks its
// inputs with the attention pool's checks (what a direct torch.ops call needs so that no kernel
// reads out of bounds), converts the query and the bias once to the accumulator type, and runs
// the kernels of the instruction set isa_dispatch.h selected over (row, head, query block)
// items. Deterministic: each item writes only its own queries' weights.
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

#include "../attention_pool.h"
#include "../input_checks.h"
#include "attention_weights_kernels.h"
#include "isa_dispatch.h"
#include "score_rows_launch.h"

namespace attnkern {
namespace cpu {
namespace {

using OptT = std::optional<at::Tensor>;

WeightsFn kernel_for(at::ScalarType dtype) {
  if (dtype == at::kDouble) return weights_generic_f64_kernel();
  WeightsKernels kt;
  switch (selected_isa()) {
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::kAmx:
    case Isa::kAvx512Bf16:
    case Isa::kAvx512: kt = weights_avx512_kernels(); break;
    case Isa::kAvx2: kt = weights_avx2_kernels(); break;
#endif
    default: kt = weights_generic_kernels();
  }
  return dtype == at::kBFloat16 ? kt.bf16 : dtype == at::kHalf ? kt.f16 : kt.f32;
}

// Both layouts once checked: starts/lens are the rows' first key row and length (jagged: from
// offsets; padded: b * L and lengths, or L).
std::tuple<at::Tensor, at::Tensor> weights_fwd(const at::Tensor& query, const at::Tensor& key, const PoolDims& d,
                                               std::vector<int64_t> starts, std::vector<int64_t> lens,
                                               const OptT& mask, double scale, const OptT& bias, bool jagged) {
  TORCH_CHECK_VALUE(query.device().is_cpu(), "attnkern: the CPU kernels need CPU tensors, got query on ",
                    query.device());
  TORCH_CHECK_VALUE(std::isfinite(scale), "attnkern: scale must be finite, got ", scale);
  check_bias(d, query, bias, jagged);
  const at::ScalarType acc = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t B = d.B, N = d.N, H = d.H, Dk = d.Dk, L = d.L;
  at::Tensor mask_u8, bias_c;
  if (mask.has_value()) mask_u8 = mask->contiguous().view(at::kByte);
  if (bias.has_value()) bias_c = bias->to(acc).contiguous();
  const at::Tensor q_c = score_query(query, acc);
  const at::Tensor k_c = key.contiguous();
  at::Tensor w = jagged ? at::empty({L, N, H}, query.options().dtype(acc))
                        : at::empty({B, N, H, L}, query.options().dtype(acc));
  at::Tensor lse = at::empty({B, N, H}, query.options().dtype(acc));
  if (jagged) {  // key rows past offsets[-1] take part in no row
    const int64_t end = B > 0 ? starts[size_t(B - 1)] + lens[size_t(B - 1)] : 0;
    w.narrow(0, end, L - end).zero_();
  }
  if (B == 0 || w.numel() == 0) {
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {w, lse};
  }
  const int64_t longest = lens.empty() ? 0 : *std::max_element(lens.begin(), lens.end());
  WeightsParams p{score_rows(q_c, k_c, Dk, L, starts, lens, mask_u8, scale, bias_c, jagged), 1, w.data_ptr(),
                  lse.data_ptr()};
  // Query blocks of about 256k multiply-adds, so that many candidates of few rows still split
  // over the threads and tiny rows do not pay one task each.
  const int64_t per_query = std::max<int64_t>(1, std::max<int64_t>(jagged ? L / B : L, 1) * Dk);
  p.QB = std::max<int64_t>(1, std::min<int64_t>(N, (int64_t(1) << 18) / per_query));
  const int64_t blocks = (N + p.QB - 1) / p.QB;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (p.QB * per_query));
  const WeightsFn fn = kernel_for(query.scalar_type());
  const int64_t row_bytes = std::max<int64_t>(longest, 1) * int64_t(acc == at::kDouble ? 8 : 4);
  at::parallel_for(0, B * H * blocks, grain, [&](int64_t begin, int64_t end) {
    // One scratch row per task: the logits, then the exponentials, of one query.
    std::vector<uint8_t> scratch(size_t(row_bytes) + 64);
    void* row = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~uintptr_t(63));
    fn(p, begin, end, row);
  });
  return {w, lse};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_weights_fwd_cpu(const at::Tensor& query, const at::Tensor& key,
                                                             const OptT& lengths, const OptT& mask, double scale,
                                                             const OptT& bias) {
  const PoolDims d = check_padded_fwd(query, key, key, lengths, mask);
  std::vector<int64_t> starts(size_t(d.B)), lens(size_t(d.B), d.L);
  for (int64_t b = 0; b < d.B; ++b) starts[size_t(b)] = b * d.L;
  if (lengths.has_value()) {
    check_lengths_values_cpu(*lengths, d.L);
    const at::Tensor l = lengths->to(at::kLong).contiguous();
    std::copy(l.data_ptr<int64_t>(), l.data_ptr<int64_t>() + d.B, lens.begin());
  }
  return weights_fwd(query, key, d, std::move(starts), std::move(lens), mask, scale, bias, /*jagged=*/false);
}

std::tuple<at::Tensor, at::Tensor> jagged_attention_weights_fwd_cpu(const at::Tensor& query, const at::Tensor& key,
                                                                    const at::Tensor& offsets, int64_t max_length,
                                                                    double scale, const OptT& bias) {
  const PoolDims d = check_jagged_fwd(query, key, key, offsets, max_length);
  check_offsets_values_cpu(offsets, d.L, max_length);
  const at::Tensor o = offsets.to(at::kLong).contiguous();
  const int64_t* op = o.data_ptr<int64_t>();
  std::vector<int64_t> starts(size_t(d.B)), lens(size_t(d.B));
  for (int64_t b = 0; b < d.B; ++b) {
    starts[size_t(b)] = op[b];
    lens[size_t(b)] = op[b + 1] - op[b];
  }
  return weights_fwd(query, key, d, std::move(starts), std::move(lens), std::nullopt, scale, bias, /*jagged=*/true);
}

}  // namespace cpu
}  // namespace attnkern

TORCH_LIBRARY_IMPL(attnkern, CPU, m) {
  m.impl("attention_weights_fwd", &attnkern::cpu::attention_weights_fwd_cpu);
  m.impl("jagged_attention_weights_fwd", &attnkern::cpu::jagged_attention_weights_fwd_cpu);
}
