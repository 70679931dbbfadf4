// CUDA launchers of attnkern::sequence_attention_fwd / _bwd (schemas in
// csrc/sequence_attention_ops.cpp): checks of every input's shape, dtype and device (so that a
// direct torch.ops call cannot make a kernel read out of bounds), the rows clamped on the device
// (no host sync: each row is cut to lie inside the T tokens, to max_length and to the dense
// bias's L; num_targets to the row), the small tables and attn_scale converted to float32, and
// outputs and workspaces from the torch allocator on the current stream. The kernels take raw
// pointers (sequence_attention_kernels.h).
//
// The public function (attnkern.sequence_attention) checks the values (rows disjoint and in
// order, max_length >= every row) before it calls these ops.
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "cuda_launch.h"
#include "input_checks.h"
#include "op_limits.h"
#include "sequence_attention_checks.h"
#include "sequence_attention_kernels.h"

namespace attnkern {
namespace {

namespace kc = attnkern::cuda;
using OptT = std::optional<at::Tensor>;

struct SeqCall {
  kc::SeqProblem p;
  std::vector<at::Tensor> keep;  // what p points into
};

SeqCall prepare(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& starts,
                const at::Tensor& lengths, int64_t max_length, const OptT& num_targets, int64_t contextual_len,
                int64_t max_attn_len, bool causal, bool silu, double scale, const OptT& attn_scale,
                std::optional<double> attn_scale_value, const OptT& query_times, const OptT& key_times,
                const OptT& time_table, const OptT& time_bounds, const OptT& position_table, const OptT& bias) {
  check_float_query(query);
  cuda_launch::check_device(query);
  SeqCall call;
  kc::SeqProblem& p = call.p;
  p.dtype = cuda_launch::cuda_dtype(query);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{key, "key"}, {value, "value"}}) {
    check_dense(t, name);
    check_same_dtype(t, name, query);
    check_on_query_device(t, name, query);
  }
  TORCH_CHECK_VALUE(query.dim() == 3, "attnkern: query must be [T, H, Dk], got ", query.sizes());
  p.T = query.size(0);
  p.H = query.size(1);
  p.Dk = query.size(2);
  TORCH_CHECK_VALUE(key.dim() == 3 && key.size(0) == p.T && key.size(2) == p.Dk && key.size(1) >= 1 &&
                        p.H % key.size(1) == 0,
                    "attnkern: key must be [T, Hkv, Dk] = [", p.T, ", Hkv dividing ", p.H, ", ", p.Dk, "], got ",
                    key.sizes());
  p.Hkv = key.size(1);
  TORCH_CHECK_VALUE(value.dim() == 3 && value.size(0) == p.T && value.size(1) == p.Hkv,
                    "attnkern: value must be [T, Hkv, Dv] = [", p.T, ", ", p.Hkv, ", Dv], got ", value.sizes());
  p.Dv = value.size(2);
  TORCH_CHECK_VALUE(p.H >= 1 && p.H <= 65535 && p.Dk >= 1 && p.Dk <= kMaxHeadDim && p.Dv >= 1 && p.Dv <= kMaxHeadDim,
                    "attnkern: 1 <= H <= 65535 and head dims in [1, ", kMaxHeadDim, "] needed, got query ",
                    query.sizes(), " value ", value.sizes());
  TORCH_CHECK_VALUE(starts.dim() == 1, "attnkern: starts must be [B], got ", starts.sizes());
  p.B = starts.size(0);
  check_long_vector(starts, "starts", p.B, query);
  check_long_vector(lengths, "lengths", p.B, query);
  TORCH_CHECK_VALUE(max_length >= -1, "attnkern: max_length must be >= 0 or -1 (the longest row), got ", max_length);
  TORCH_CHECK_VALUE(contextual_len >= 0 && contextual_len < (int64_t(1) << 31),
                    "attnkern: contextual_len must be in [0, 2**31), got ", contextual_len);
  TORCH_CHECK_VALUE(max_attn_len >= 0 && max_attn_len < (int64_t(1) << 31),
                    "attnkern: max_attn_len must be in [0, 2**31), got ", max_attn_len);
  TORCH_CHECK_VALUE(std::isfinite(scale), "attnkern: scale must be finite, got ", scale);
  p.contextual_len = contextual_len;
  p.max_attn_len = max_attn_len;
  p.causal = causal;
  p.silu = silu;
  p.scale = static_cast<float>(scale);
  const at::Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  call.keep.insert(call.keep.end(), {q, k, v});
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();

  int64_t Hb = 0;
  const auto f32 = query.options().dtype(at::kFloat);
  if (given(time_table)) {
    check_table(*time_table, "time_table", query, p.H, Hb);
    TORCH_CHECK_VALUE(given(query_times) && given(key_times) && given(time_bounds),
                      "attnkern: time_table needs query_times, key_times and time_bounds");
    check_long_vector(*query_times, "query_times", p.T, query);
    check_long_vector(*key_times, "key_times", p.T, query);
    p.NB = time_table->size(0);
    check_long_vector(*time_bounds, "time_bounds", p.NB - 1, query);
    const at::Tensor tt = time_table->to(at::kFloat).contiguous(), qt = query_times->contiguous(),
                     kt = key_times->contiguous(), tb = time_bounds->contiguous();
    call.keep.insert(call.keep.end(), {tt, qt, kt, tb});
    p.time_table = tt.data_ptr<float>();
    p.query_times = qt.data_ptr<int64_t>();
    p.key_times = kt.data_ptr<int64_t>();
    p.time_bounds = tb.data_ptr<int64_t>();
  }
  if (given(position_table)) {
    check_table(*position_table, "position_table", query, p.H, Hb);
    p.P = position_table->size(0);
    const at::Tensor pt = position_table->to(at::kFloat).contiguous();
    call.keep.push_back(pt);
    p.position_table = pt.data_ptr<float>();
  }
  int64_t row_cap = max_length >= 0 ? max_length : p.T;
  if (given(bias)) {
    check_dense(*bias, "bias");
    check_same_dtype(*bias, "bias", query);
    check_on_query_device(*bias, "bias", query);
    const int64_t L = bias->dim() == 4 ? bias->size(2) : -1;
    TORCH_CHECK_VALUE(bias->dim() == 4 && bias->size(0) == p.B && (bias->size(1) == 1 || bias->size(1) == p.H) &&
                          bias->size(3) == L && (max_length < 0 || L == max_length),
                      "attnkern: bias must be [B, Hb, L, L] = [", p.B, ", 1 or ", p.H, ", L, L] with L = max_length (",
                      max_length, "), got ", bias->sizes());
    TORCH_CHECK_VALUE(Hb == 0 || Hb == bias->size(1), "attnkern: bias must have the Hb = ", Hb,
                      " heads of the tables, got ", bias->size(1));
    Hb = bias->size(1);
    p.L = L;
    row_cap = L;
    const at::Tensor b = bias->contiguous();
    call.keep.push_back(b);
    p.bias = b.data_ptr();
  }
  p.Hb = Hb == 0 ? 1 : Hb;

  // The rows, clamped on the device: [start, start + n) inside [0, T), n <= row_cap.
  const at::Tensor st = starts.clamp(0, p.T);
  const at::Tensor n = at::minimum(lengths.clamp_min(0), (p.T - st)).clamp_max(row_cap);
  at::Tensor nt = at::zeros_like(n);
  if (given(num_targets)) {
    check_long_vector(*num_targets, "num_targets", p.B, query);
    nt = at::minimum(num_targets->clamp_min(0), n);
  }
  const at::Tensor cum = at::floor_divide(n + (kc::kSeqTile - 1), kc::kSeqTile).cumsum(0);
  const at::Tensor rows = at::stack({st, n, nt, cum}).contiguous();
  call.keep.push_back(rows);
  p.rows = rows.data_ptr<int64_t>();
  p.tiles = (p.T + kc::kSeqTile - 1) / kc::kSeqTile + p.B;
  TORCH_CHECK_VALUE(p.tiles < (int64_t(1) << 31), "attnkern: too many tokens for the cuda kernels: T = ", p.T);

  if (silu) {
    at::Tensor a;
    if (given(attn_scale)) {
      const at::Tensor& s = *attn_scale;
      check_dense(s, "attn_scale");
      check_on_query_device(s, "attn_scale", query);
      TORCH_CHECK_TYPE(is_float_dtype(s.scalar_type()), "attnkern: attn_scale must be a float tensor, got ",
                       dtype_name(s.scalar_type()));
      TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == p.T, "attnkern: attn_scale must be [T] = [", p.T, "], got ",
                        s.sizes());
      a = s.to(at::kFloat).contiguous();
      p.attn_scale_stride = 1;
    } else if (attn_scale_value.has_value()) {
      a = at::full({1}, *attn_scale_value, f32);
    } else if (max_length >= 0) {
      a = at::full({1}, 1.0 / double(std::max<int64_t>(max_length, 1)), f32);
    } else {  // 1 / the longest row, computed where the rows are (no host sync)
      a = (p.B > 0 ? n.max() : at::zeros({}, n.options())).clamp_min(1).to(at::kFloat).reciprocal().reshape({1});
    }
    call.keep.push_back(a);
    p.attn_scale = a.data_ptr<float>();
  }
  const int64_t smem = std::max(kc::seq_fwd_smem(p), kc::seq_bwd_smem(p));
  TORCH_CHECK_VALUE(smem <= cuda_launch::max_smem(), "attnkern: head dims Dk = ", p.Dk, ", Dv = ", p.Dv,
                    " need ", smem, " bytes of shared memory, this device has ", cuda_launch::max_smem());
  return call;
}

#define ATTNKERN_SEQ_PREPARE                                                                                   \
  cuda_launch::DeviceGuard guard(query.device());                                                              \
  SeqCall call = prepare(query, key, value, starts, lengths, max_length, num_targets, contextual_len,          \
                         max_attn_len, causal, silu, scale, attn_scale, attn_scale_value, query_times, key_times, \
                         time_table, time_bounds, position_table, bias);                                        \
  const kc::SeqProblem& p = call.p;                                                                            \
  const auto f32 = query.options().dtype(at::kFloat);

std::tuple<at::Tensor, at::Tensor> sequence_attention_fwd_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& starts,
    const at::Tensor& lengths, int64_t max_length, const OptT& num_targets, int64_t contextual_len,
    int64_t max_attn_len, bool causal, bool silu, double scale, const OptT& attn_scale,
    std::optional<double> attn_scale_value, const OptT& query_times, const OptT& key_times, const OptT& time_table,
    const OptT& time_bounds, const OptT& position_table, const OptT& bias) {
  ATTNKERN_SEQ_PREPARE
  // float32 for every input dtype (the unrounded accumulators, as on the CPU): the autograd's
  // delta = sum(grad_out * out) then comes from values not rounded to 16 bits.
  at::Tensor out = at::zeros({p.T, p.H, p.Dv}, f32);
  at::Tensor lse = at::full({p.T, p.H}, -std::numeric_limits<double>::infinity(), f32);
  ATTNKERN_CUDA_CHECK(kc::launch_seq_fwd(p, out.data_ptr<float>(), lse.data_ptr<float>(),
                                         cuda_launch::current_stream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sequence_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& lse, const at::Tensor& delta, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& value, const at::Tensor& starts, const at::Tensor& lengths,
    int64_t max_length, const OptT& num_targets, int64_t contextual_len, int64_t max_attn_len, bool causal,
    bool silu, double scale, const OptT& attn_scale, std::optional<double> attn_scale_value,
    const OptT& query_times, const OptT& key_times, const OptT& time_table, const OptT& time_bounds,
    const OptT& position_table, const OptT& bias) {
  ATTNKERN_SEQ_PREPARE
  check_dense(grad_out, "grad_out");
  check_on_query_device(grad_out, "grad_out", query);
  TORCH_CHECK_VALUE(grad_out.dim() == 3 && grad_out.size(0) == p.T && grad_out.size(1) == p.H &&
                        grad_out.size(2) == p.Dv,
                    "attnkern: grad_out must be [T, H, Dv] = [", p.T, ", ", p.H, ", ", p.Dv, "], got ",
                    grad_out.sizes());
  kc::SeqBwdIO io;
  const at::Tensor go = grad_out.to(query.scalar_type()).contiguous();
  io.grad_out = go.data_ptr();
  at::Tensor lse_c, delta_c;
  if (!silu) {
    for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{lse, "lse"}, {delta, "delta"}}) {
      check_dense(t, name);
      check_on_query_device(t, name, query);
      TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == p.T && t.size(1) == p.H, "attnkern: ", name,
                        " must be [T, H] = [", p.T, ", ", p.H, "], got ", t.sizes());
    }
    lse_c = lse.to(at::kFloat).contiguous();
    delta_c = delta.to(at::kFloat).contiguous();
    io.lse = lse_c.data_ptr<float>();
    io.delta = delta_c.data_ptr<float>();
  }
  at::Tensor dq = at::zeros(query.sizes(), query.options()), dk = at::zeros(key.sizes(), key.options()),
             dv = at::zeros(value.sizes(), value.options());
  io.grad_q = dq.data_ptr();
  io.grad_k = dk.data_ptr();
  io.grad_v = dv.data_ptr();
  const int64_t slices = kc::seq_bwd_slices(p);
  at::Tensor time_ws, pos_ws, g_time, g_pos, g_bias;
  if (p.time_table) {
    time_ws = at::zeros({slices, p.NB, p.Hb}, f32);
    g_time = at::zeros({p.NB, p.Hb}, f32);
    io.time_ws = time_ws.data_ptr<float>();
    io.grad_time = g_time.data_ptr<float>();
  }
  if (p.position_table) {
    pos_ws = at::zeros({slices, p.P, p.Hb}, f32);
    g_pos = at::zeros({p.P, p.Hb}, f32);
    io.position_ws = pos_ws.data_ptr<float>();
    io.grad_position = g_pos.data_ptr<float>();
  }
  if (p.bias) {
    g_bias = at::zeros({p.B, p.Hb, p.L, p.L}, f32);
    io.grad_bias = g_bias.data_ptr<float>();
  }
  ATTNKERN_CUDA_CHECK(kc::launch_seq_bwd(p, io, cuda_launch::current_stream()));
  const auto cast = [&](const at::Tensor& t) {
    return t.defined() ? t.to(query.scalar_type()) : at::empty({0}, query.options());
  };
  return {dq, dk, dv, cast(g_time), cast(g_pos), cast(g_bias)};
}

#undef ATTNKERN_SEQ_PREPARE

}  // namespace
}  // namespace attnkern

TORCH_LIBRARY_IMPL(attnkern, ATTNKERN_CUDA_KEY, m) {
  m.impl(ATTNKERN_CUDA_OP("sequence_attention_fwd"), &attnkern::sequence_attention_fwd_cuda);
  m.impl(ATTNKERN_CUDA_OP("sequence_attention_bwd"), &attnkern::sequence_attention_bwd_cuda);
}
