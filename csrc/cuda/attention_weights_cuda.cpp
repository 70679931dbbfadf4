// CUDA launchers of attnkern::attention_weights_fwd / jagged_attention_weights_fwd (schemas in
// csrc/attention_weights_ops.cpp): the attention pool's input checks with the key as the
// values, the CUDA dtype rule, zero-filled weights (the kernel writes valid positions only) and
// lse from the torch allocator on the current stream. lengths / offsets are never read on the
// host: the kernel clamps every row (RowSpec); the public function checks their values first.
// The autograd is attnkern/ops/weights.py's, in torch ops on any device.
#include <cmath>
#include <optional>
#include <tuple>

// The torch headers first: the emulation's cuda_runtime.h redefines CUDA's keywords as macros.
#include "attention_pool.h"
#include "cuda_launch.h"
#include "attention_weights_kernels.h"

namespace attnkern {
namespace {

namespace kc = attnkern::cuda;
using OptT = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor> run_weights(const PoolDims& d, const at::Tensor& query, const at::Tensor& key,
                                               const kc::RowSpec& rows, double scale, bool jagged,
                                               const OptT& bias) {
  check_bias(d, query, bias, jagged);
  cuda_launch::check_device(query);
  TORCH_CHECK_VALUE(std::isfinite(scale), "attnkern: scale must be a finite float, got ", scale);
  kc::PoolProblem p;
  p.dtype = cuda_launch::cuda_dtype(query);
  cuda_launch::DeviceGuard guard(query.device());
  auto w = jagged ? at::zeros({d.L, d.N, d.H}, query.options().dtype(at::kFloat))
                  : at::zeros({d.B, d.N, d.H, d.L}, query.options().dtype(at::kFloat));
  auto lse = at::empty({d.B, d.N, d.H}, query.options().dtype(at::kFloat));
  if (d.B == 0) return {w, lse};
  const at::Tensor q = cuda_launch::unit_inner_stride(query);
  const at::Tensor k = cuda_launch::unit_inner_stride(key);
  p.B = d.B;
  p.N = d.N;
  p.H = d.H;
  p.L = d.L;
  p.Dk = d.Dk;
  p.Dv = d.Dk;  // no value: the key stands in (never read as one)
  p.query = q.data_ptr();
  p.q_sb = q.stride(0);
  p.q_sn = q.stride(1);
  p.q_sh = q.stride(2);
  p.key = k.data_ptr();
  p.k_sb = jagged ? 0 : k.stride(0);
  p.k_sl = k.stride(jagged ? 0 : 1);
  p.k_sh = k.stride(jagged ? 1 : 2);
  p.value = p.key;
  p.v_sb = p.k_sb;
  p.v_sl = p.k_sl;
  p.v_sh = p.k_sh;
  p.rows = rows;
  p.scale = static_cast<float>(scale);
  if (bias.has_value()) {  // padded [B, Nb, Hb, L], jagged [T, Nb, Hb]
    const at::Tensor& t = *bias;
    p.bias = t.data_ptr();
    p.bias_f32 = t.scalar_type() == at::kFloat;
    p.bias_nb = t.size(1);
    p.bias_sn = t.stride(1);
    p.bias_sh = t.size(2) > 1 ? t.stride(2) : 0;
    p.bias_sb = jagged ? 0 : t.stride(0);
    p.bias_sl = jagged ? t.stride(0) : t.stride(3);
  }
  kc::WeightsOut out;
  out.w = w.data_ptr<float>();
  if (jagged) {  // [T, N, H]
    out.sb = 0;
    out.sn = d.H;
    out.sh = 1;
    out.sl = d.N * d.H;
  } else {  // [B, N, H, L]
    out.sb = d.N * d.H * d.L;
    out.sn = d.H * d.L;
    out.sh = d.L;
    out.sl = 1;
    out.nan_fill = d.L;
  }
  ATTNKERN_CUDA_CHECK(kc::launch_weights_fwd(p, out, lse.data_ptr<float>(), cuda_launch::current_stream()));
  return {w, lse};
}

std::tuple<at::Tensor, at::Tensor> attention_weights_fwd_cuda(const at::Tensor& query, const at::Tensor& key,
                                                              const OptT& lengths, const OptT& mask, double scale,
                                                              const OptT& bias) {
  const PoolDims d = check_padded_fwd(query, key, key, lengths, mask);
  kc::RowSpec rows;
  if (lengths.has_value()) {
    rows.mode = kc::RowMode::kLengths;
    rows.index = lengths->data_ptr();
    rows.index_is_int64 = lengths->scalar_type() == at::kLong;
    rows.index_stride = lengths->stride(0);
  } else if (mask.has_value()) {
    rows.mode = kc::RowMode::kMask;
    rows.mask = mask->data_ptr<bool>();
    rows.mask_stride_b = mask->stride(0);
    rows.mask_stride_l = mask->stride(1);
  }
  return run_weights(d, query, key, rows, scale, /*jagged=*/false, bias);
}

std::tuple<at::Tensor, at::Tensor> jagged_attention_weights_fwd_cuda(const at::Tensor& query, const at::Tensor& key,
                                                                     const at::Tensor& offsets, int64_t max_length,
                                                                     double scale, const OptT& bias) {
  const PoolDims d = check_jagged_fwd(query, key, key, offsets, max_length);
  kc::RowSpec rows;
  rows.mode = kc::RowMode::kJagged;
  rows.index = offsets.data_ptr();
  rows.index_is_int64 = offsets.scalar_type() == at::kLong;
  rows.index_stride = offsets.stride(0);
  rows.max_length = max_length;
  return run_weights(d, query, key, rows, scale, /*jagged=*/true, bias);
}

}  // namespace
}  // namespace attnkern

TORCH_LIBRARY_IMPL(attnkern, ATTNKERN_CUDA_KEY, m) {
  m.impl(ATTNKERN_CUDA_OP("attention_weights_fwd"), &attnkern::attention_weights_fwd_cuda);
  m.impl(ATTNKERN_CUDA_OP("jagged_attention_weights_fwd"), &attnkern::jagged_attention_weights_fwd_cuda);
}
