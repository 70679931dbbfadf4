// CUDA launcher of attnkern::attention_topk_fwd (schema in csrc/attention_topk_ops.cpp): the
// checks a direct torch.ops call needs so that the kernel never reads out of bounds, the bias
// converted once to float32, outputs from the torch allocator on the current stream. lengths /
// offsets are never read on the host (no device sync): the kernel clamps every row to its legal
// range (RowSpec); the public function checks their values first.
#include <cmath>
#include <optional>
#include <tuple>

// The torch headers first: the emulation's cuda_runtime.h redefines CUDA's keywords as macros.
#include "cuda_launch.h"
#include "input_checks.h"
#include "attention_topk_kernels.h"

namespace attnkern {
namespace {

namespace kc = attnkern::cuda;
using OptT = std::optional<at::Tensor>;

bool given(const OptT& t) { return t.has_value() && t->defined(); }

kc::RowSpec topk_rows(const OptT& lengths, const OptT& mask, const OptT& offsets) {
  kc::RowSpec rows;
  const OptT& index = given(offsets) ? offsets : lengths;
  if (given(index)) {
    rows.mode = given(offsets) ? kc::RowMode::kJagged : kc::RowMode::kLengths;
    rows.index = index->data_ptr();
    rows.index_is_int64 = index->scalar_type() == at::kLong;
    rows.index_stride = index->stride(0);
  } else if (given(mask)) {
    rows.mode = kc::RowMode::kMask;
    rows.mask = mask->data_ptr<bool>();
    rows.mask_stride_b = mask->stride(0);
    rows.mask_stride_l = mask->stride(1);
  }
  return rows;
}

// The bias (padded [B, Nb, Hb, L], jagged [T, Nb, Hb]; float32 or the query's dtype), checked,
// as float32 with its strides in p.
at::Tensor set_topk_bias(kc::TopkProblem& p, const at::Tensor& bt, const at::Tensor& query, bool jagged) {
  check_dense(bt, "bias");
  check_on_query_device(bt, "bias", query);
  TORCH_CHECK_TYPE(bt.scalar_type() == at::kFloat || bt.scalar_type() == query.scalar_type(),
                   "attnkern: bias must be torch.float32 or the dtype of query, got ", dtype_name(bt.scalar_type()));
  TORCH_CHECK_VALUE(bt.dim() == (jagged ? 3 : 4) && bt.size(0) == (jagged ? p.L : p.B) &&
                        (bt.size(1) == 1 || bt.size(1) == p.N) && (bt.size(2) == 1 || bt.size(2) == p.H) &&
                        (jagged || bt.size(3) == p.L),
                    "attnkern: bias must be ", jagged ? "[T, Nb, Hb]" : "[B, Nb, Hb, L]",
                    " with Nb 1 or N and Hb 1 or H, got ", bt.sizes());
  const at::Tensor f = bt.to(at::kFloat);
  p.bias = f.data_ptr<float>();
  p.bias_nb = f.size(1);
  p.bias_sn = f.stride(1);
  p.bias_sh = f.size(2) > 1 ? f.stride(2) : 0;
  p.bias_sb = jagged ? 0 : f.stride(0);
  p.bias_sl = jagged ? f.stride(0) : f.stride(3);
  return f;
}

std::tuple<at::Tensor, at::Tensor> attention_topk_fwd_cuda(const at::Tensor& query, const at::Tensor& key,
                                                           const OptT& lengths, const OptT& mask, const OptT& offsets,
                                                           int64_t k, double scale, const OptT& bias) {
  check_float_query(query);
  check_dense(key, "key");
  check_same_dtype(key, "key", query);
  check_on_query_device(key, "key", query);
  cuda_launch::check_device(query);
  kc::TopkProblem p;
  p.dtype = cuda_launch::cuda_dtype(query);
  TORCH_CHECK_VALUE(query.dim() == 4, "attnkern: query must be [B, N, H, Dk], got ", query.sizes());
  p.B = query.size(0);
  p.N = query.size(1);
  p.H = query.size(2);
  p.Dk = query.size(3);
  TORCH_CHECK_VALUE(p.N >= 1 && p.H >= 1, "attnkern: query must have N, H >= 1, got ", query.sizes());
  check_dim_in_range("query/key head dim Dk", p.Dk, kMaxHeadDim);
  const bool jagged = given(offsets);
  TORCH_CHECK_VALUE(key.dim() == (jagged ? 3 : 4), "attnkern: key must be ",
                    jagged ? "jagged [T, Hkv, Dk] (offsets given)" : "padded [B, L, Hkv, Dk]", ", got ", key.sizes());
  p.L = key.size(jagged ? 0 : 1);
  p.Hkv = key.size(jagged ? 1 : 2);
  TORCH_CHECK_VALUE((jagged || key.size(0) == p.B) && key.size(-1) == p.Dk && p.Hkv >= 1 && p.H % p.Hkv == 0,
                    "attnkern: key must have B = ", p.B, " rows (padded), Dk = ", p.Dk,
                    " and a head count dividing H = ", p.H, ", got ", key.sizes());
  // Positions are int32 in the kernel's shared memory.
  TORCH_CHECK_VALUE(p.L <= INT32_MAX, "attnkern: the cuda top-k takes rows of at most 2^31 - 1 positions, got ", p.L);
  TORCH_CHECK_VALUE(k >= 0 && k <= kc::kTopkMaxK, "attnkern: k must be in [0, ", kc::kTopkMaxK,
                    "] on the cuda backend (the running top-k lives in shared memory), got ", k);
  TORCH_CHECK_VALUE(std::isfinite(scale), "attnkern: scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(int(given(lengths)) + int(given(mask)) + int(jagged) <= 1,
                    "attnkern: give at most one of lengths, mask (padded) and offsets (jagged)");
  if (given(lengths)) check_index_tensor(*lengths, "lengths", p.B, query);
  if (jagged) check_index_tensor(*offsets, "offsets", p.B + 1, query);
  if (given(mask)) check_mask(*mask, p.B, p.L, query);
  p.K = k;
  p.scale = static_cast<float>(scale);
  cuda_launch::DeviceGuard guard(query.device());
  at::Tensor bias_f;
  if (given(bias)) bias_f = set_topk_bias(p, *bias, query, jagged);
  const at::Tensor q = cuda_launch::unit_inner_stride(query);
  const at::Tensor kt = cuda_launch::unit_inner_stride(key);
  p.query = q.data_ptr();
  p.q_sb = q.stride(0);
  p.q_sn = q.stride(1);
  p.q_sh = q.stride(2);
  p.key = kt.data_ptr();
  p.k_sb = jagged ? 0 : kt.stride(0);
  p.k_sl = kt.stride(jagged ? 0 : 1);
  p.k_sh = kt.stride(jagged ? 1 : 2);
  p.rows = topk_rows(lengths, mask, offsets);
  auto scores = at::empty({p.B, p.N, p.H, k}, query.options().dtype(at::kFloat));
  auto indices = at::empty({p.B, p.N, p.H, k}, query.options().dtype(at::kLong));
  p.scores = scores.data_ptr<float>();
  p.indices = indices.data_ptr<int64_t>();
  ATTNKERN_CUDA_CHECK(kc::launch_topk_fwd(p, cuda_launch::current_stream()));
  return {scores, indices};
}

}  // namespace
}  // namespace attnkern

TORCH_LIBRARY_IMPL(attnkern, ATTNKERN_CUDA_KEY, m) {
  m.impl(ATTNKERN_CUDA_OP("attention_topk_fwd"), &attnkern::attention_topk_fwd_cuda);
}
