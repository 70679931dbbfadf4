// CPU launcher of attnkern::attention_pool_quant_fwd: checks its inputs (so that a direct
// torch.ops call can never read out of bounds), converts the query and the score bias to
// float32, cuts the work into (row, query chunk) tasks and runs the kernel of the instruction
// set the dispatcher selected (isa_dispatch.h; avx512_bf16 and amx run the AVX-512 kernel).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <vector>

#include "attention_pool.h"
#include "attention_pool_quant_kernels.h"
#include "attention_pool_work.h"
#include "input_checks.h"
#include "isa_dispatch.h"

namespace attnkern {
namespace {

using cpu::QuantParams;
using cpu::QuantSpan;

int quant_type(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kChar:
      return cpu::kQInt8;
    case at::kByte:
      return cpu::kQUInt8;
    case at::kFloat8_e4m3fn:
      return cpu::kQFp8E4M3;
    case at::kFloat8_e5m2:
      return cpu::kQFp8E5M2;
    default:
      TORCH_CHECK_TYPE(false, "attnkern: quantized ", name,
                       " must be torch.int8, torch.uint8, torch.float8_e4m3fn or torch.float8_e5m2, got ",
                       dtype_name(t));
  }
  return 0;
}

// A per-row parameter: float32 of shape `want` ([B, L, H] or [T, H]).
at::Tensor row_param(const at::Tensor& t, const char* name, at::IntArrayRef want, const at::Tensor& query) {
  check_dense(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "attnkern: ", name, " must be torch.float32, got ",
                   dtype_name(t.scalar_type()));
  check_shape(t, name, want);
  check_on_query_device(t, name, query);
  return t.contiguous();
}

cpu::QuantFwdFn kernel() {
  static const cpu::QuantFwdFn fn = [] {
    switch (cpu::selected_isa()) {
#if defined(__x86_64__) || defined(_M_X64)
      case cpu::Isa::kAmx:
      case cpu::Isa::kAvx512Bf16:  // every CPU with AVX512-BF16 has AVX512-VNNI
        return cpu::quant_avx512_vnni_kernel();
      case cpu::Isa::kAvx512:
        return cpu::quant_avx512_kernel();
      case cpu::Isa::kAvx2:
        return cpu::quant_avx2_kernel();
#endif
      default:
        return cpu::quant_generic_kernel();
    }
  }();
  return fn;
}

std::tuple<at::Tensor, at::Tensor> attention_pool_quant_fwd_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_scale,
    const std::optional<at::Tensor>& key_bias, const at::Tensor& value_scale,
    const std::optional<at::Tensor>& value_bias, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& offsets, int64_t max_length, double scale,
    const std::optional<at::Tensor>& bias) {
  check_dense(query, "query");
  TORCH_CHECK_TYPE(query.scalar_type() == at::kFloat || query.scalar_type() == at::kHalf ||
                       query.scalar_type() == at::kBFloat16,
                   "attnkern: with quantized key/value, query must be float16, bfloat16 or float32, got ",
                   dtype_name(query.scalar_type()));
  TORCH_CHECK_VALUE(query.dim() == 4, "attnkern: query must be [B, N, H, Dk], got ", query.sizes());
  check_dense(key, "key");
  check_dense(value, "value");
  const int qtype = quant_type(key.scalar_type(), "key");
  TORCH_CHECK_TYPE(value.scalar_type() == key.scalar_type(), "attnkern: value must have the dtype of key (",
                   dtype_name(key.scalar_type()), "), got ", dtype_name(value.scalar_type()));
  check_on_query_device(key, "key", query);
  check_on_query_device(value, "value", query);
  const bool jagged = offsets.has_value();
  const int64_t rank = jagged ? 3 : 4;
  PoolDims d;
  d.B = query.size(0);
  d.N = query.size(1);
  d.H = query.size(2);
  d.Dk = query.size(3);
  TORCH_CHECK_VALUE(key.dim() == rank && value.dim() == rank, "attnkern: ",
                    jagged ? "jagged key/value must be [T, H, Dk] / [T, H, Dv]"
                           : "padded key/value must be [B, L, H, Dk] / [B, L, H, Dv]",
                    ", got ", key.sizes(), " and ", value.sizes());
  d.L = key.size(rank - 3);
  d.Dv = value.size(rank - 1);
  TORCH_CHECK_VALUE(d.H >= 1 && d.N >= 1, "attnkern: query must have N >= 1 and H >= 1, got ", query.sizes());
  check_dim_in_range("query/key head dim Dk", d.Dk, kMaxHeadDim);
  check_dim_in_range("value head dim Dv", d.Dv, kMaxHeadDim);
  std::vector<int64_t> kshape, vshape, pshape;
  if (jagged) {
    kshape = {d.L, d.H, d.Dk};
    vshape = {d.L, d.H, d.Dv};
    pshape = {d.L, d.H};
  } else {
    kshape = {d.B, d.L, d.H, d.Dk};
    vshape = {d.B, d.L, d.H, d.Dv};
    pshape = {d.B, d.L, d.H};
  }
  check_shape(key, "key", kshape);
  check_shape(value, "value", vshape);
  const at::Tensor ks = row_param(key_scale, "key_scale", pshape, query);
  const at::Tensor vs = row_param(value_scale, "value_scale", pshape, query);
  std::optional<at::Tensor> kb, vb;
  if (key_bias.has_value()) kb = row_param(*key_bias, "key_bias", pshape, query);
  if (value_bias.has_value()) vb = row_param(*value_bias, "value_bias", pshape, query);
  TORCH_CHECK_VALUE(!(lengths.has_value() && mask.has_value()), "attnkern: give lengths or mask, not both");
  TORCH_CHECK_VALUE(!jagged || (!lengths.has_value() && !mask.has_value()),
                    "attnkern: lengths and mask are for the padded layout, got offsets too");
  if (lengths.has_value()) check_index_tensor(*lengths, "lengths", d.B, query);
  if (mask.has_value()) check_mask(*mask, d.B, d.L, query);
  if (jagged) {
    check_index_tensor(*offsets, "offsets", d.B + 1, query);
    check_max_length(max_length);
  }
  check_bias(d, query, bias, jagged);
  TORCH_CHECK_VALUE(std::isfinite(scale), "attnkern: scale must be finite, got ", scale);

  const cpu::Rows rows = jagged ? cpu::jagged_rows(d, *offsets, max_length) : cpu::padded_rows(d, lengths, mask);
  // The kernels read the head dim with stride 1; other strides are free.
  const at::Tensor k = key.stride(-1) == 1 ? key : key.contiguous();
  const at::Tensor v = value.stride(-1) == 1 ? value : value.contiguous();
  const at::Tensor q = query.to(at::kFloat).contiguous();
  std::optional<at::Tensor> bf;
  if (bias.has_value()) bf = bias->to(at::kFloat);
  at::Tensor out = at::empty({d.B, d.N, d.H, d.Dv}, query.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({d.B, d.N, d.H}, query.options().dtype(at::kFloat));

  QuantParams p;
  p.qtype = qtype;
  p.q = q.data_ptr<float>();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.k_sb = jagged ? 0 : k.stride(0);
  p.k_sl = k.stride(rank - 3);
  p.k_sh = k.stride(rank - 2);
  p.v_sb = jagged ? 0 : v.stride(0);
  p.v_sl = v.stride(rank - 3);
  p.v_sh = v.stride(rank - 2);
  p.k_scale = ks.data_ptr<float>();
  p.v_scale = vs.data_ptr<float>();
  p.k_bias = kb ? kb->data_ptr<float>() : nullptr;
  p.v_bias = vb ? vb->data_ptr<float>() : nullptr;
  p.p_sb = jagged ? 0 : d.L * d.H;
  p.N = d.N;
  p.H = d.H;
  p.Dk = d.Dk;
  p.Dv = d.Dv;
  p.scale = float(scale);
  p.q_lowp = query.scalar_type() != at::kFloat;
  if (bf) {
    const at::Tensor& t = *bf;
    p.bias = t.data_ptr<float>();
    // padded [B, Nb, Hb, L], jagged [T, Nb, Hb]
    p.bias_sb = jagged ? 0 : t.stride(0);
    p.bias_sl = jagged ? t.stride(0) : t.stride(3);
    p.bias_sn = t.stride(1);
    p.bias_sh = t.size(2) == 1 ? 0 : t.stride(2);
    p.bias_nb = t.size(1);
  }
  p.out = out.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  // As the float launcher: about ATTNKERN_CPU_PREFETCH_KB (default 64; 0 = off) KiB of rows and
  // their parameters ahead, in whole blocks.
  static const int64_t pf_kb = [] {
    const char* e = std::getenv("ATTNKERN_CPU_PREFETCH_KB");
    return e ? std::max<int64_t>(0, std::atoll(e)) : int64_t(64);
  }();
  const int64_t pos_bytes = d.H * (d.Dk + d.Dv + 16);
  p.prefetch = pf_kb ? ((pf_kb << 10) / pos_bytes / cpu::kQuantBK + 1) * cpu::kQuantBK : 0;

  const int64_t chunks = (d.N + cpu::kQuantChunk - 1) / cpu::kQuantChunk;
  const int64_t nq_max = std::min(d.N, cpu::kQuantChunk);
  // The single-query kernel holds the query and the accumulator padded to whole vectors (at
  // most max(2 D, 16) floats each), the running maximum and a block's scores per head.
  const int64_t ws_elems = std::max(d.H * nq_max * (d.Dk + d.Dv + 4) + cpu::kQuantBK * (1 + d.Dk + d.Dv) + 64,
                                    d.H * (4 * std::max<int64_t>({d.Dk, d.Dv, 8}) + 1 + cpu::kQuantBK));
  const cpu::QuantFwdFn fn = kernel();
  at::parallel_for(0, d.B * chunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> ws(ws_elems);
    std::vector<int64_t> idx;
    int64_t idx_row = -1, cnt = 0;
    for (int64_t t = t0; t < t1; ++t) {
      QuantSpan s;
      s.b = t / chunks;
      s.n0 = (t % chunks) * cpu::kQuantChunk;
      s.nq = std::min(cpu::kQuantChunk, d.N - s.n0);
      if (s.b != idx_row) {
        cnt = rows.count(s.b, &idx);
        idx_row = s.b;
      }
      s.start = rows.start(s.b);
      s.count = cnt;
      s.idx = rows.mask ? idx.data() : nullptr;
      fn(p, s, ws.data());
    }
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkern, CPU, m) { m.impl("attention_pool_quant_fwd", &attention_pool_quant_fwd_cpu); }

}  // namespace attnkern
