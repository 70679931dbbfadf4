// CUDA launchers of attnkern::activation_unit_pool_fwd / _bwd (schemas and semantics in
// csrc/activation_unit_ops.cpp): checks of every input (so a direct torch.ops call can never
// make a kernel read out of bounds), output and scratch allocation with the torch allocator,
// the current stream and a device guard. The kernels take raw pointers and strides
// (activation_unit_kernels.h).
//
// lengths / offsets are never read on the host (that would sync the device): the kernels clamp
// every row to its legal range (the same RowSpec as attention pooling).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "activation_unit_kernels.h"

namespace attnkern {
namespace {

namespace kc = attnkern::cuda;
using OptT = std::optional<at::Tensor>;

constexpr int64_t kAuMaxDim = 256;

struct Dims {
  int64_t B = 0, N = 0, E = 0, Dv = 0, L = 0, H1 = 0, H2 = 0, act_rows = 0;
  kc::AuAct act = kc::AuAct::kRelu;
  bool jagged = false;
};

void check_like(const at::Tensor& t, const char* name, const at::Tensor& query) {
  TORCH_CHECK_TYPE(t.scalar_type() == query.scalar_type(), "attnkern: ", name,
                   " must have the dtype of query (", query.scalar_type(), "), got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == query.device(), "attnkern: ", name,
                    " must be on the device of query (", query.device(), "), got ", t.device());
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, "attnkern: ", name,
                    " must be a dense (strided) tensor");
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef want) {
  TORCH_CHECK_VALUE(t.sizes() == want, "attnkern: ", name, " must have shape ", want, ", got ",
                    t.sizes());
}

void check_index(const at::Tensor& t, const char* name, int64_t n, const at::Tensor& query) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "attnkern: ",
                   name, " must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, "attnkern: ", name, " must have shape [", n,
                    "], got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == query.device(), "attnkern: ", name,
                    " must be on the device of query (", query.device(), "), got ", t.device());
}

kc::DType cuda_dtype(const at::Tensor& query) {
  switch (query.scalar_type()) {
    case at::kFloat:
      return kc::DType::kFloat32;
    case at::kHalf:
      return kc::DType::kFloat16;
    case at::kBFloat16:
      return kc::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false,
                       "attnkern: the cuda backend takes float32, float16 or bfloat16 inputs, got ",
                       query.scalar_type(), " (float64 runs on the cpu and reference backends)");
  }
  return kc::DType::kFloat32;  // unreachable
}

Dims check_fwd(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
               const OptT& lengths, const OptT& mask, const OptT& offsets, int64_t max_length,
               const at::Tensor& w1, const at::Tensor& b1, const OptT& w2, const OptT& b2,
               const at::Tensor& w_out, const at::Tensor& b_out, const OptT& act1,
               const OptT& act2, const std::string& activation) {
  cuda_dtype(query);
  TORCH_CHECK_VALUE(query.layout() == at::kStrided, "attnkern: query must be a dense (strided) tensor");
  TORCH_CHECK_VALUE(query.dim() == 3, "attnkern: query must be [B, N, E], got ", query.sizes());
  TORCH_CHECK_VALUE(query.is_cuda(), "attnkern: the cuda kernels need CUDA tensors, got query on ",
                    query.device());
  check_like(key, "key", query);
  check_like(value, "value", query);
  Dims d;
  d.B = query.size(0);
  d.N = query.size(1);
  d.E = query.size(2);
  d.jagged = offsets.has_value();
  if (d.jagged) {
    TORCH_CHECK_VALUE(!lengths.has_value() && !mask.has_value(),
                      "attnkern: lengths and mask are for the padded layout; with offsets leave them None");
    TORCH_CHECK_VALUE(key.dim() == 2 && key.size(1) == d.E, "attnkern: jagged key must be [T, E] = [T, ",
                      d.E, "], got ", key.sizes());
    d.L = key.size(0);
    TORCH_CHECK_VALUE(value.dim() == 2 && value.size(0) == d.L,
                      "attnkern: jagged value must be [T, Dv] = [", d.L, ", Dv], got ", value.sizes());
    check_index(*offsets, "offsets", d.B + 1, query);
    TORCH_CHECK_VALUE(max_length >= -1, "attnkern: max_length must be >= 0 (or -1 for unknown), got ",
                      max_length);
  } else {
    TORCH_CHECK_VALUE(key.dim() == 3 && key.size(0) == d.B && key.size(2) == d.E,
                      "attnkern: padded key must be [B, L, E] = [", d.B, ", L, ", d.E, "], got ",
                      key.sizes());
    d.L = key.size(1);
    TORCH_CHECK_VALUE(value.dim() == 3 && value.size(0) == d.B && value.size(1) == d.L,
                      "attnkern: padded value must be [B, L, Dv] = [", d.B, ", ", d.L, ", Dv], got ",
                      value.sizes());
    TORCH_CHECK_VALUE(!(lengths.has_value() && mask.has_value()),
                      "attnkern: give lengths or mask, not both");
    if (lengths.has_value()) check_index(*lengths, "lengths", d.B, query);
    if (mask.has_value()) {
      TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool,
                       "attnkern: mask must be bool (True = attend), got ", mask->scalar_type());
      check_shape(*mask, "mask", {d.B, d.L});
      TORCH_CHECK_VALUE(mask->device() == query.device(), "attnkern: mask must be on the device of query (",
                        query.device(), "), got ", mask->device());
    }
  }
  d.Dv = value.size(-1);
  TORCH_CHECK_VALUE(d.E >= 1 && d.E <= kAuMaxDim, "attnkern: E must be in [1, ", kAuMaxDim, "], got ", d.E);
  TORCH_CHECK_VALUE(d.Dv >= 1 && d.Dv <= kAuMaxDim, "attnkern: Dv must be in [1, ", kAuMaxDim, "], got ",
                    d.Dv);
  if (activation == "relu") {
    d.act = kc::AuAct::kRelu;
  } else if (activation == "sigmoid") {
    d.act = kc::AuAct::kSigmoid;
  } else if (activation == "prelu") {
    d.act = kc::AuAct::kPrelu;
    d.act_rows = 1;
  } else if (activation == "dice") {
    d.act = kc::AuAct::kDice;
    d.act_rows = 3;
  } else {
    TORCH_CHECK_VALUE(false, "attnkern: activation must be one of relu, sigmoid, prelu, dice, got '",
                      activation, "'");
  }
  check_like(w1, "w1", query);
  TORCH_CHECK_VALUE(w1.dim() == 2 && w1.size(1) == 4 * d.E, "attnkern: w1 must be [H1, 4E] = [H1, ",
                    4 * d.E, "], got ", w1.sizes());
  d.H1 = w1.size(0);
  TORCH_CHECK_VALUE(d.H1 >= 1 && d.H1 <= kAuMaxDim, "attnkern: hidden layer 1 must have 1..", kAuMaxDim,
                    " units, got ", d.H1);
  check_like(b1, "b1", query);
  check_shape(b1, "b1", {d.H1});
  TORCH_CHECK_VALUE(w2.has_value() == b2.has_value(),
                    "attnkern: w2 and b2 come together (a second hidden layer) or not at all");
  if (w2.has_value()) {
    check_like(*w2, "w2", query);
    TORCH_CHECK_VALUE(w2->dim() == 2 && w2->size(1) == d.H1, "attnkern: w2 must be [H2, H1] = [H2, ",
                      d.H1, "], got ", w2->sizes());
    d.H2 = w2->size(0);
    TORCH_CHECK_VALUE(d.H2 >= 1 && d.H2 <= kAuMaxDim, "attnkern: hidden layer 2 must have 1..",
                      kAuMaxDim, " units, got ", d.H2);
    check_like(*b2, "b2", query);
    check_shape(*b2, "b2", {d.H2});
  }
  const int64_t hl = d.H2 > 0 ? d.H2 : d.H1;
  check_like(w_out, "w_out", query);
  check_shape(w_out, "w_out", {1, hl});
  check_like(b_out, "b_out", query);
  check_shape(b_out, "b_out", {1});
  const OptT* acts[2] = {&act1, &act2};
  const char* names[2] = {"act1", "act2"};
  const int64_t units[2] = {d.H1, d.H2};
  for (int i = 0; i < 2; ++i) {
    const OptT& a = *acts[i];
    if (d.act_rows == 0 || units[i] == 0) {
      TORCH_CHECK_VALUE(!a.has_value(), "attnkern: ", names[i], " must be None (",
                        d.act_rows == 0 ? "the activation takes none" : "there is no second hidden layer",
                        ")");
      continue;
    }
    TORCH_CHECK_VALUE(a.has_value(), "attnkern: ", names[i], " must be given for activation '",
                      activation, "': [", d.act_rows, ", ", units[i], "]");
    check_like(*a, names[i], query);
    check_shape(*a, names[i], {d.act_rows, units[i]});
  }
  return d;
}

void check_bwd_extras(const Dims& d, const at::Tensor& query, const at::Tensor& grad_out,
                      const at::Tensor& lse, const at::Tensor& delta) {
  check_like(grad_out, "grad_out", query);
  check_shape(grad_out, "grad_out", {d.B, d.N, d.Dv});
  const std::pair<const at::Tensor*, const char*> extras[2] = {{&lse, "lse"}, {&delta, "delta"}};
  for (const auto& [t, name] : extras) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, "attnkern: ", name, " must be float32, got ",
                     t->scalar_type());
    check_shape(*t, name, {d.B, d.N});
    TORCH_CHECK_VALUE(t->device() == query.device(), "attnkern: ", name,
                      " must be on the device of query (", query.device(), "), got ", t->device());
  }
}

// The kernels need a unit innermost stride; every other stride is passed through.
at::Tensor unit_inner_stride(const at::Tensor& t) {
  return (t.size(-1) == 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

struct Prepared {
  at::Tensor q, k, v, w1, b1, w2, b2, w_out, b_out, act1, act2;
  kc::AuProblem p;
};

// Keeps the (possibly copied) tensors alive while the problem points at them.
Prepared prepare(const Dims& d, const at::Tensor& query, const at::Tensor& key,
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
  p.act = d.act;
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
    p.rows.mode = kc::RowMode::kJagged;
    p.rows.index = offsets->data_ptr();
    p.rows.index_is_int64 = offsets->scalar_type() == at::kLong;
    p.rows.index_stride = offsets->stride(0);
    p.rows.max_length = max_length;
  } else {
    p.k_sb = r.k.stride(0);
    p.k_sl = r.k.stride(1);
    p.v_sb = r.v.stride(0);
    p.v_sl = r.v.stride(1);
    if (lengths.has_value()) {
      p.rows.mode = kc::RowMode::kLengths;
      p.rows.index = lengths->data_ptr();
      p.rows.index_is_int64 = lengths->scalar_type() == at::kLong;
      p.rows.index_stride = lengths->stride(0);
    } else if (mask.has_value()) {
      p.rows.mode = kc::RowMode::kMask;
      p.rows.mask = mask->data_ptr<bool>();
      p.rows.mask_stride_b = mask->stride(0);
      p.rows.mask_stride_l = mask->stride(1);
    }
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

int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
int64_t max_smem() {
  return static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
}

std::tuple<at::Tensor, at::Tensor> activation_unit_pool_fwd_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const OptT& lengths,
    const OptT& mask, const OptT& offsets, int64_t max_length, const at::Tensor& w1,
    const at::Tensor& b1, const OptT& w2, const OptT& b2, const at::Tensor& w_out,
    const at::Tensor& b_out, const OptT& act1, const OptT& act2, c10::string_view activation,
    bool softmax) {
  const Dims d = check_fwd(query, key, value, lengths, mask, offsets, max_length, w1, b1, w2, b2,
                           w_out, b_out, act1, act2, std::string(activation));
  c10::cuda::CUDAGuard guard(query.device());
  auto out = at::empty({d.B, d.N, d.Dv}, query.options());
  auto lse = at::empty({d.B, d.N}, query.options().dtype(at::kFloat));
  if (d.B == 0 || d.N == 0) return {out, lse};
  const Prepared r = prepare(d, query, key, value, lengths, mask, offsets, max_length, w1, b1, w2,
                             b2, w_out, b_out, act1, act2, softmax);
  C10_CUDA_CHECK(kc::launch_au_fwd(r.p, out.data_ptr(), lse.data_ptr<float>(), max_smem(),
                                   num_sms(), at::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor, at::Tensor>
activation_unit_pool_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& query,
                              const at::Tensor& key, const at::Tensor& value, const OptT& lengths,
                              const OptT& mask, const OptT& offsets, int64_t max_length,
                              const at::Tensor& w1, const at::Tensor& b1, const OptT& w2,
                              const OptT& b2, const at::Tensor& w_out, const at::Tensor& b_out,
                              const OptT& act1, const OptT& act2, c10::string_view activation,
                              bool softmax, const at::Tensor& lse, const at::Tensor& delta) {
  const Dims d = check_fwd(query, key, value, lengths, mask, offsets, max_length, w1, b1, w2, b2,
                           w_out, b_out, act1, act2, std::string(activation));
  check_bwd_extras(d, query, grad_out, lse, delta);
  c10::cuda::CUDAGuard guard(query.device());
  const auto f32 = query.options().dtype(at::kFloat);
  // grad_query accumulates in fp32; grad_key / grad_value start at zero (the kernel writes only
  // valid positions); the partial weight gradients start at zero.
  auto dq32 = at::zeros({d.B, d.N, d.E}, f32);
  auto grad_key = at::zeros(key.sizes(), key.options());
  auto grad_value = at::zeros(value.sizes(), value.options());
  const Prepared r = prepare(d, query, key, value, lengths, mask, offsets, max_length, w1, b1, w2,
                             b2, w_out, b_out, act1, act2, softmax);
  const int64_t G = kc::au_bwd_blocks(r.p, num_sms());
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
    C10_CUDA_CHECK(kc::launch_au_bwd(r.p, in, dq32.data_ptr<float>(), grad_key.data_ptr(),
                                     grad_value.data_ptr(), s, G, max_smem(),
                                     at::cuda::getCurrentCUDAStream()));
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

TORCH_LIBRARY_IMPL(attnkern, CUDA, m) {
  m.impl("activation_unit_pool_fwd", &attnkern::activation_unit_pool_fwd_cuda);
  m.impl("activation_unit_pool_bwd", &attnkern::activation_unit_pool_bwd_cuda);
}
