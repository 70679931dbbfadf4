// CUDA launchers of attnkern::activation_unit_pool_fwd / _bwd (schemas and semantics in
// csrc/activation_unit_ops.cpp): checks of every input (the shared ones of
// activation_unit_checks.cpp plus the CUDA dtype/device rule, so a direct torch.ops call can
// never make a kernel read out of bounds), output and scratch allocation with the torch allocator,
// the current stream and a device guard. The kernels take raw pointers and strides
// (activation_unit_kernels.h).
//
// lengths / offsets are never read on the host (that would sync the device): the kernels clamp
// every row to its legal range (the same RowSpec as attention pooling).
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "activation_unit.h"
#include "activation_unit_kernels.h"
#include "cuda_launch.h"

namespace attnkern {
namespace {

namespace kc = attnkern::cuda;
using OptT = std::optional<at::Tensor>;

using cuda_launch::cuda_dtype;
using cuda_launch::unit_inner_stride;

// The shared checks (activation_unit_checks.cpp) plus the CUDA-only rules.
AuDims check_fwd_cuda(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                      const OptT& lengths, const OptT& mask, const OptT& offsets,
                      int64_t max_length, const at::Tensor& w1, const at::Tensor& b1,
                      const OptT& w2, const OptT& b2, const at::Tensor& w_out,
                      const at::Tensor& b_out, const OptT& act1, const OptT& act2,
                      c10::string_view activation) {
  const AuDims d = check_activation_unit_fwd(query, key, value, lengths, mask, offsets, max_length,
                                             w1, b1, w2, b2, w_out, b_out, act1, act2,
                                             std::string(activation));
  cuda_dtype(query);
  cuda_launch::check_device(query);
  return d;
}

struct Prepared {
  at::Tensor q, k, v, w1, b1, w2, b2, w_out, b_out, act1, act2;
  kc::AuProblem p;
};

// Keeps the (possibly copied) tensors alive while the problem points at them.
Prepared prepare(const AuDims& d, const at::Tensor& query, const at::Tensor& key,
                 const at::Tensor& value, const OptT& lengths, const OptT& mask,
                 const OptT& offsets, int64_t max_length, const at::Tensor& w1,
                 const at::Tensor& b1, const OptT& w2, const OptT& b2, const at::Tensor& w_out,
                 const at::Tensor& b_out, const OptT& act1, const OptT& act2, bool softmax) {
  Prepared r;
  r.q = unit_inner_stride(query);
  r.k = unit_inner_stride(key);
  r.v = unit_inner_stride(value);
  r.w1 = w1.contiguous();
  r.b1 = b1.contiguous();
  r.w_out = w_out.contiguous();
  r.b_out = b_out.contiguous();
  kc::AuProblem& p = r.p;
  p.dtype = cuda_dtype(query);
  p.B = d.B;
  p.N = d.N;
  p.L = d.L;
  p.E = d.E;
  p.Dv = d.Dv;
  p.H1 = d.H1;
  p.H2 = d.H2;
  p.act = static_cast<kc::AuAct>(d.act);
  p.act_rows = d.act_rows;
  p.softmax = softmax;
  p.query = r.q.data_ptr();
  p.q_sb = r.q.stride(0);
  p.q_sn = r.q.stride(1);
  p.key = r.k.data_ptr();
  p.value = r.v.data_ptr();
  if (d.jagged) {
    p.k_sb = 0;
    p.k_sl = r.k.stride(0);
    p.v_sb = 0;
    p.v_sl = r.v.stride(0);
    p.rows = cuda_launch::jagged_rows(*offsets, max_length);
  } else {
    p.k_sb = r.k.stride(0);
    p.k_sl = r.k.stride(1);
    p.v_sb = r.v.stride(0);
    p.v_sl = r.v.stride(1);
    p.rows = cuda_launch::padded_rows(lengths, mask);
  }
  p.w1 = r.w1.data_ptr();
  p.b1 = r.b1.data_ptr();
  if (w2.has_value()) {
    r.w2 = w2->contiguous();
    r.b2 = b2->contiguous();
    p.w2 = r.w2.data_ptr();
    p.b2 = r.b2.data_ptr();
  }
  p.w_out = r.w_out.data_ptr();
  p.b_out = r.b_out.data_ptr();
  if (act1.has_value()) {
    r.act1 = act1->contiguous();
    p.act1 = r.act1.data_ptr();
  }
  if (act2.has_value()) {
    r.act2 = act2->contiguous();
    p.act2 = r.act2.data_ptr();
  }
  return r;
}

std::tuple<at::Tensor, at::Tensor> activation_unit_pool_fwd_cuda(
    const at::Tensor& query, const at::Tensor& key, const OptT& value_opt, const OptT& lengths,
    const OptT& mask, const OptT& offsets, int64_t max_length, const at::Tensor& w1,
    const at::Tensor& b1, const OptT& w2, const OptT& b2, const at::Tensor& w_out,
    const at::Tensor& b_out, const OptT& act1, const OptT& act2, c10::string_view activation,
    bool softmax) {
  // value None: the keys are also the values.
  const at::Tensor& value = value_opt.has_value() ? *value_opt : key;
  const AuDims d = check_fwd_cuda(query, key, value, lengths, mask, offsets, max_length, w1, b1,
                                  w2, b2, w_out, b_out, act1, act2, activation);
  cuda_launch::DeviceGuard guard(query.device());
  auto out = at::empty({d.B, d.N, d.Dv}, query.options().dtype(at::kFloat));  // unrounded
  auto lse = at::empty({d.B, d.N}, query.options().dtype(at::kFloat));
  if (d.B == 0 || d.N == 0) return {out, lse};
  const Prepared r = prepare(d, query, key, value, lengths, mask, offsets, max_length, w1, b1, w2,
                             b2, w_out, b_out, act1, act2, softmax);
  ATTNKERN_CUDA_CHECK(kc::launch_au_fwd(r.p, out.data_ptr<float>(), lse.data_ptr<float>(),
                                        cuda_launch::max_smem(), cuda_launch::num_sms(),
                                        cuda_launch::current_stream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> activation_unit_scores_fwd_cuda(
    const at::Tensor& query, const at::Tensor& key, const OptT& lengths, const OptT& mask,
    const OptT& offsets, int64_t max_length, const at::Tensor& w1, const at::Tensor& b1,
    const OptT& w2, const OptT& b2, const at::Tensor& w_out, const at::Tensor& b_out,
    const OptT& act1, const OptT& act2, c10::string_view activation, bool softmax) {
  const AuDims d = check_fwd_cuda(query, key, key, lengths, mask, offsets, max_length, w1, b1, w2,
                                  b2, w_out, b_out, act1, act2, activation);
  cuda_launch::DeviceGuard guard(query.device());
  // Zeros first: the kernel writes only the positions that take part in a row.
  auto scores = d.jagged ? at::zeros({d.L, d.N}, query.options().dtype(at::kFloat))
                         : at::zeros({d.B, d.N, d.L}, query.options().dtype(at::kFloat));
  auto lse = at::empty({d.B, d.N}, query.options().dtype(at::kFloat));
  // No position at all (L or T = 0): every row is empty; a null scores pointer would select
  // the kernel's pooling mode.
  if (scores.numel() == 0) {
    lse.fill_(softmax ? -std::numeric_limits<float>::infinity() : 0.f);
    return {scores, lse};
  }
  Prepared r = prepare(d, query, key, key, lengths, mask, offsets, max_length, w1, b1, w2, b2,
                       w_out, b_out, act1, act2, softmax);
  r.p.Dv = 0;  // no values: the pass ends at the scores
  kc::AuScores sc;
  sc.ptr = scores.data_ptr<float>();
  if (d.jagged) {
    sc.sn = 1;
    sc.sl = d.N;
  } else {
    sc.sb = d.N * d.L;
    sc.sn = d.L;
    sc.sl = 1;
  }
  ATTNKERN_CUDA_CHECK(kc::launch_au_fwd(r.p, lse.data_ptr<float>(), lse.data_ptr<float>(),
                                        cuda_launch::max_smem(), cuda_launch::num_sms(),
                                        cuda_launch::current_stream(), sc));
  return {scores, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor, at::Tensor>
activation_unit_pool_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& query,
                              const at::Tensor& key, const OptT& value_opt, const OptT& lengths,
                              const OptT& mask, const OptT& offsets, int64_t max_length,
                              const at::Tensor& w1, const at::Tensor& b1, const OptT& w2,
                              const OptT& b2, const at::Tensor& w_out, const at::Tensor& b_out,
                              const OptT& act1, const OptT& act2, c10::string_view activation,
                              bool softmax, const at::Tensor& lse, const at::Tensor& delta) {
  // value None: the keys are also the values, and grad_key holds both contributions (no second
  // [B, L, E] gradient); grad_value is then an empty [0] tensor.
  const bool shared = !value_opt.has_value();
  const at::Tensor& value = shared ? key : *value_opt;
  const AuDims d = check_fwd_cuda(query, key, value, lengths, mask, offsets, max_length, w1, b1,
                                  w2, b2, w_out, b_out, act1, act2, activation);
  check_activation_unit_bwd_extras(d, query, grad_out, lse, delta);
  cuda_launch::DeviceGuard guard(query.device());
  const auto f32 = query.options().dtype(at::kFloat);
  // grad_query accumulates in fp32; grad_key / grad_value start at zero (the kernel writes only
  // valid positions); the partial weight gradients start at zero.
  auto dq32 = at::zeros({d.B, d.N, d.E}, f32);
  auto grad_key = at::zeros(key.sizes(), key.options());
  auto grad_value = shared ? at::empty({0}, value.options()) : at::zeros(value.sizes(), value.options());
  const Prepared r = prepare(d, query, key, value, lengths, mask, offsets, max_length, w1, b1, w2,
                             b2, w_out, b_out, act1, act2, softmax);
  const int64_t G = kc::au_bwd_blocks(r.p, cuda_launch::num_sms());
  const bool two = d.H2 > 0;
  const int64_t hl = two ? d.H2 : d.H1;
  auto p_dm = at::zeros({G, d.H1, d.E}, f32);
  auto p_dmq = at::zeros({G, d.H1, d.E}, f32);
  auto p_dcq = at::zeros({G, d.H1, d.E}, f32);
  auto p_dc = at::zeros({G, d.H1}, f32);
  auto p_dw2 = at::zeros({G, two ? d.H2 : 1, d.H1}, f32);
  auto p_db2 = at::zeros({G, two ? d.H2 : 1}, f32);
  auto p_dwo = at::zeros({G, hl}, f32);
  auto p_dbo = at::zeros({G}, f32);
  auto p_da1 = at::zeros({G, 3, d.H1}, f32);
  auto p_da2 = at::zeros({G, 3, two ? d.H2 : 1}, f32);
  if (d.B > 0 && d.N > 0) {
    const auto go = unit_inner_stride(grad_out);
    const auto lse_c = lse.contiguous();
    const auto delta_c = delta.contiguous();
    kc::AuBwdInputs in;
    in.grad_out = go.data_ptr();
    in.go_sb = go.stride(0);
    in.go_sn = go.stride(1);
    in.lse = lse_c.data_ptr<float>();
    in.delta = delta_c.data_ptr<float>();
    in.shared_value = shared;
    kc::AuBwdScratch s;
    s.dm = p_dm.data_ptr<float>();
    s.dmq = p_dmq.data_ptr<float>();
    s.dcq = p_dcq.data_ptr<float>();
    s.dc = p_dc.data_ptr<float>();
    s.dw2 = p_dw2.data_ptr<float>();
    s.db2 = p_db2.data_ptr<float>();
    s.dwo = p_dwo.data_ptr<float>();
    s.dbo = p_dbo.data_ptr<float>();
    s.da1 = p_da1.data_ptr<float>();
    s.da2 = p_da2.data_ptr<float>();
    ATTNKERN_CUDA_CHECK(kc::launch_au_bwd(r.p, in, dq32.data_ptr<float>(), grad_key.data_ptr(),
                                          shared ? nullptr : grad_value.data_ptr(), s, G,
                                          cuda_launch::max_smem(), cuda_launch::current_stream()));
  }
  // Partials summed over blocks in a fixed order; W1's four column blocks from the split:
  // dWa = DCQ, dWb = DM, dWc = DCQ - DM, dWd = DMQ.
  const auto dt = query.scalar_type();
  const auto dm = p_dm.sum(0), dmq = p_dmq.sum(0), dcq = p_dcq.sum(0);
  auto g_w1 = at::cat({dcq, dm, dcq - dm, dmq}, 1).to(dt);
  auto g_b1 = p_dc.sum(0).to(dt);
  auto empty = [&]() { return at::empty({0}, query.options()); };
  at::Tensor g_w2 = two ? p_dw2.sum(0).to(dt) : empty();
  at::Tensor g_b2 = two ? p_db2.sum(0).to(dt) : empty();
  auto g_wo = p_dwo.sum(0).reshape({1, hl}).to(dt);
  auto g_bo = p_dbo.sum(0).reshape({1}).to(dt);
  at::Tensor g_a1 = act1.has_value() ? p_da1.sum(0).narrow(0, 0, d.act_rows).to(dt) : empty();
  at::Tensor g_a2 = act2.has_value() && two ? p_da2.sum(0).narrow(0, 0, d.act_rows).to(dt) : empty();
  return {dq32.to(dt), grad_key, grad_value, g_w1, g_b1, g_w2, g_b2, g_wo, g_bo, g_a1, g_a2};
}

}  // namespace
}  // namespace attnkern

TORCH_LIBRARY_IMPL(attnkern, ATTNKERN_CUDA_KEY, m) {
  m.impl(ATTNKERN_CUDA_OP("activation_unit_pool_fwd"), &attnkern::activation_unit_pool_fwd_cuda);
  m.impl(ATTNKERN_CUDA_OP("activation_unit_pool_bwd"), &attnkern::activation_unit_pool_bwd_cuda);
  m.impl(ATTNKERN_CUDA_OP("activation_unit_scores_fwd"), &attnkern::activation_unit_scores_fwd_cuda);
}
