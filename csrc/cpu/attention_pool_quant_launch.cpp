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
#include "attention_pool_quant_checks.h"
#include "attention_pool_quant_kernels.h"
#include "attention_pool_work.h"
#include "input_checks.h"
#include "isa_dispatch.h"

namespace attnkern {
namespace {

using cpu::QuantParams;
using cpu::QuantSpan;
static_assert(cpu::kQInt8 == 0 && cpu::kQFp8E5M2 == 3, "the numbering of quant_code");

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
  const QuantInputs in = check_quant_fwd(query, key, value, key_scale, key_bias, value_scale, value_bias, lengths,
                                         mask, offsets, max_length, scale, bias);
  const PoolDims& d = in.d;
  const bool jagged = in.jagged;
  const int64_t rank = in.rank;

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
  p.qtype = in.qtype;
  p.q = q.data_ptr<float>();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.k_sb = jagged ? 0 : k.stride(0);
  p.k_sl = k.stride(rank - 3);
  p.k_sh = k.stride(rank - 2);
  p.v_sb = jagged ? 0 : v.stride(0);
  p.v_sl = v.stride(rank - 3);
  p.v_sh = v.stride(rank - 2);
  p.k_scale = in.k_scale.data_ptr<float>();
  p.v_scale = in.v_scale.data_ptr<float>();
  p.k_bias = in.k_bias.defined() ? in.k_bias.data_ptr<float>() : nullptr;
  p.v_bias = in.v_bias.defined() ? in.v_bias.data_ptr<float>() : nullptr;
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
