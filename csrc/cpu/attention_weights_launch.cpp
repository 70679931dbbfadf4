// CPU launcher of attnkern::attention_weights_fwd and jagged_attention_weights_fwd: checks its
// inputs with the attention pool's checks (what a direct torch.ops call needs so that no kernel
// reads out of bounds), converts the query and the bias once to the accumulator type, and runs
// the kernels of the instruction set isa_dispatch.h selected over (row, head, query block)
// items. Deterministic: each item writes only its own queries' weights. The same for
// attnkern::attention_weights_bwd over (row, head) items, each writing its own rows of dq, dk
// (and dS).
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
#include "host_buffers.h"
#include "isa_dispatch.h"
#include "score_rows_launch.h"

namespace attnkern {
namespace cpu {
namespace {

using OptT = std::optional<at::Tensor>;

WeightsKernels isa_kernels() {
  switch (selected_isa()) {
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::kAmx:
    case Isa::kAvx512Bf16:
    case Isa::kAvx512: return weights_avx512_kernels();
    case Isa::kAvx2: return weights_avx2_kernels();
#endif
    default: return weights_generic_kernels();
  }
}

WeightsFn kernel_for(at::ScalarType dtype) {
  if (dtype == at::kDouble) return weights_generic_f64_kernel();
  const WeightsKernels kt = isa_kernels();
  return dtype == at::kBFloat16 ? kt.bf16 : dtype == at::kHalf ? kt.f16 : kt.f32;
}

WeightsBwdFn bwd_kernel_for(at::ScalarType dtype) {
  if (dtype == at::kDouble) return weights_generic_f64_bwd_kernel();
  const WeightsKernels kt = isa_kernels();
  return dtype == at::kBFloat16 ? kt.bwd_bf16 : dtype == at::kHalf ? kt.bwd_f16 : kt.bwd_f32;
}

// Row b's first key row and length, checked: padded b * L and lengths (or L), jagged from offsets.
void row_ranges(const PoolDims& d, const OptT& lengths, const OptT& offsets, std::vector<int64_t>& starts,
                std::vector<int64_t>& lens) {
  starts.assign(size_t(d.B), 0);
  lens.assign(size_t(d.B), d.L);
  if (offsets.has_value()) {
    const at::Tensor o = offsets->to(at::kLong).contiguous();
    const int64_t* op = o.data_ptr<int64_t>();
    for (int64_t b = 0; b < d.B; ++b) {
      starts[size_t(b)] = op[b];
      lens[size_t(b)] = op[b + 1] - op[b];
    }
    return;
  }
  for (int64_t b = 0; b < d.B; ++b) starts[size_t(b)] = b * d.L;
  if (lengths.has_value()) {
    check_lengths_values_cpu(*lengths, d.L);
    const at::Tensor l = lengths->to(at::kLong).contiguous();
    std::copy(l.data_ptr<int64_t>(), l.data_ptr<int64_t>() + d.B, lens.begin());
  }
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
  std::vector<int64_t> starts, lens;
  row_ranges(d, lengths, std::nullopt, starts, lens);
  return weights_fwd(query, key, d, std::move(starts), std::move(lens), mask, scale, bias, /*jagged=*/false);
}

std::tuple<at::Tensor, at::Tensor> jagged_attention_weights_fwd_cpu(const at::Tensor& query, const at::Tensor& key,
                                                                    const at::Tensor& offsets, int64_t max_length,
                                                                    double scale, const OptT& bias) {
  const PoolDims d = check_jagged_fwd(query, key, key, offsets, max_length);
  check_offsets_values_cpu(offsets, d.L, max_length);
  std::vector<int64_t> starts, lens;
  row_ranges(d, std::nullopt, offsets, starts, lens);
  return weights_fwd(query, key, d, std::move(starts), std::move(lens), std::nullopt, scale, bias, /*jagged=*/true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_weights_bwd_cpu(
    const at::Tensor& grad_weights, const at::Tensor& weights, const OptT& grad_lse, const at::Tensor& query,
    const at::Tensor& key, const OptT& lengths, const OptT& mask, const OptT& offsets, double scale,
    bool need_grad_scores) {
  const bool jagged = offsets.has_value();
  TORCH_CHECK_VALUE(!(jagged && (lengths.has_value() || mask.has_value())),
                    "attnkern: lengths and mask are for the padded layout; with offsets leave them None");
  const PoolDims d = jagged ? check_jagged_fwd(query, key, key, *offsets, -1)
                            : check_padded_fwd(query, key, key, lengths, mask);
  TORCH_CHECK_VALUE(query.device().is_cpu(), "attnkern: the CPU kernels need CPU tensors, got query on ",
                    query.device());
  TORCH_CHECK_VALUE(std::isfinite(scale), "attnkern: scale must be finite, got ", scale);
  const at::ScalarType acc = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const std::vector<int64_t> w_shape = jagged ? std::vector<int64_t>{d.L, d.N, d.H}
                                              : std::vector<int64_t>{d.B, d.N, d.H, d.L};
  const char* w_layout = jagged ? "[T, N, H]" : "[B, N, H, L]";
  auto check_like_w = [&](const at::Tensor& t, const char* name) {
    check_dense(t, name);
    TORCH_CHECK_TYPE(t.scalar_type() == acc, "attnkern: ", name, " must be ", dtype_name(acc), ", got ",
                     dtype_name(t.scalar_type()));
    check_shape(t, name, w_shape, w_layout);
  };
  check_like_w(grad_weights, "grad_weights");
  check_like_w(weights, "weights");
  if (grad_lse.has_value()) {
    check_dense(*grad_lse, "grad_lse");
    TORCH_CHECK_TYPE(grad_lse->scalar_type() == acc, "attnkern: grad_lse must be ", dtype_name(acc), ", got ",
                     dtype_name(grad_lse->scalar_type()));
    check_shape(*grad_lse, "grad_lse", {d.B, d.N, d.H}, "[B, N, H]");
  }
  if (jagged) check_offsets_values_cpu(*offsets, d.L, -1);
  std::vector<int64_t> starts, lens;
  row_ranges(d, lengths, offsets, starts, lens);
  const at::Tensor dw = grad_weights.contiguous(), w = weights.contiguous();
  at::Tensor dlse;
  if (grad_lse.has_value()) dlse = grad_lse->contiguous();
  const at::Tensor q_c = score_query(query, acc), k_c = key.contiguous();
  at::Tensor mask_u8;
  if (mask.has_value()) mask_u8 = mask->contiguous().view(at::kByte);
  const auto opts = query.options().dtype(acc);
  // The key's gradient as the pool's backward allocates it (host_buffers.h): a fresh [B, L, H, Dk]
  // tensor's first-touch page faults cost more than this kernel.
  at::Tensor dq = at::empty(query.sizes(), opts), dk = empty_output(key.sizes(), opts);
  at::Tensor ds = need_grad_scores ? empty_output(w_shape, opts) : at::empty({0}, opts);
  if (jagged) {  // key rows past offsets[-1] take part in no row
    const int64_t end = d.B > 0 ? starts[size_t(d.B - 1)] + lens[size_t(d.B - 1)] : 0;
    dk.narrow(0, end, d.L - end).zero_();
    if (need_grad_scores) ds.narrow(0, end, d.L - end).zero_();
  }
  if (d.B == 0) return {dq, dk, ds};
  WeightsBwdParams p{score_rows(q_c, k_c, d.Dk, d.L, starts, lens, mask_u8, scale, at::Tensor(), jagged)};
  p.dw = dw.data_ptr();
  p.w = w.data_ptr();
  p.dlse = dlse.defined() ? dlse.data_ptr() : nullptr;
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.ds = need_grad_scores ? ds.data_ptr() : nullptr;
  const WeightsBwdFn fn = bwd_kernel_for(key.scalar_type());
  const int64_t longest = lens.empty() ? 0 : *std::max_element(lens.begin(), lens.end());
  const int64_t per_item = std::max<int64_t>(1, 2 * d.N * (jagged ? d.L / d.B : d.L) * d.Dk);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / per_item);
  const size_t scratch_bytes = size_t(d.N * (longest + q_c.size(3))) * size_t(acc == at::kDouble ? 8 : 4);
  at::parallel_for(0, d.B * d.H, grain, [&](int64_t begin, int64_t end) {
    // One task's dS rows and dq accumulators.
    std::vector<uint8_t> scratch(scratch_bytes + 64);
    void* buf = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~uintptr_t(63));
    fn(p, begin, end, buf);
  });
  return {dq, dk, ds};
}

}  // namespace cpu
}  // namespace attnkern

TORCH_LIBRARY_IMPL(attnkern, CPU, m) {
  m.impl("attention_weights_fwd", &attnkern::cpu::attention_weights_fwd_cpu);
  m.impl("attention_weights_bwd", &attnkern::cpu::attention_weights_bwd_cpu);
  m.impl("jagged_attention_weights_fwd", &attnkern::cpu::jagged_attention_weights_fwd_cpu);
}
