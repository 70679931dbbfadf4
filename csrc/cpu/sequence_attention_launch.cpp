// CPU launchers of attnkern::sequence_attention_fwd / _bwd: they check their inputs (what a
// direct torch.ops call needs so that no kernel reads out of bounds), convert the floating
// inputs once to the accumulator type, and run the kernels of the instruction set isa_dispatch.h
// selected over work items taken from a shared counter, largest first.
//
// Deterministic: each forward item writes its own query block, each backward item the gradient
// columns of one (row, K/V head group) and its own partial table sums, which are added in item
// order at the end. The split depends on the shape only, never on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>
#include <vector>

#include "../input_checks.h"
#include "../sequence_attention_checks.h"
#include "isa_dispatch.h"
#include "sequence_attention_kernels.h"

namespace attnkern {
namespace cpu {
namespace {

using OptT = std::optional<at::Tensor>;

struct SeqArgs {
  at::Tensor q, k, v, starts, lengths;
  int64_t max_length;
  OptT num_targets;
  int64_t contextual_len, max_attn_len;
  bool causal, silu;
  double scale;
  OptT attn_scale;
  std::optional<double> attn_scale_value;
  OptT query_times, key_times, time_table, time_bounds, position_table, bias;
};

at::Tensor acc_contig(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

// Checks every argument and fills the kernels' parameters (pointers into `keep`, which holds
// the converted tensors alive).
SeqParams prepare(const SeqArgs& a, std::vector<at::Tensor>& keep) {
  const at::Tensor& q = a.q;
  check_float_query(q);
  check_dense(a.k, "key");
  check_dense(a.v, "value");
  check_same_dtype(a.k, "key", q);
  check_same_dtype(a.v, "value", q);
  check_on_query_device(a.k, "key", q);
  check_on_query_device(a.v, "value", q);
  TORCH_CHECK_VALUE(q.device().is_cpu(), "attnkern: the CPU kernels need CPU tensors, got query on ", q.device());
  TORCH_CHECK_VALUE(q.dim() == 3, "attnkern: query must be [T, H, Dk], got ", q.sizes());
  const int64_t T = q.size(0), H = q.size(1), Dk = q.size(2);
  TORCH_CHECK_VALUE(a.k.dim() == 3 && a.k.size(0) == T && a.k.size(2) == Dk && a.k.size(1) >= 1 &&
                        H % a.k.size(1) == 0,
                    "attnkern: key must be [T, Hkv, Dk] = [", T, ", Hkv dividing ", H, ", ", Dk, "], got ",
                    a.k.sizes());
  const int64_t Hkv = a.k.size(1);
  TORCH_CHECK_VALUE(a.v.dim() == 3 && a.v.size(0) == T && a.v.size(1) == Hkv, "attnkern: value must be [T, Hkv, Dv] = [",
                    T, ", ", Hkv, ", Dv], got ", a.v.sizes());
  const int64_t Dv = a.v.size(2);
  TORCH_CHECK_VALUE(H >= 1 && Dk >= 1 && Dk <= kMaxHeadDim && Dv >= 1 && Dv <= kMaxHeadDim,
                    "attnkern: H >= 1 and head dims in [1, ", kMaxHeadDim, "] needed, got query ", q.sizes(),
                    " value ", a.v.sizes());
  TORCH_CHECK_VALUE(a.starts.dim() == 1, "attnkern: starts must be [B], got ", a.starts.sizes());
  const int64_t B = a.starts.size(0);
  check_long_vector(a.starts, "starts", B, q);
  check_long_vector(a.lengths, "lengths", B, q);
  TORCH_CHECK_VALUE(a.contextual_len >= 0 && a.contextual_len < (int64_t(1) << 31), "attnkern: contextual_len must be in [0, 2**31), got ",
                    a.contextual_len);
  TORCH_CHECK_VALUE(a.max_attn_len >= 0 && a.max_attn_len < (int64_t(1) << 31), "attnkern: max_attn_len must be in [0, 2**31), got ",
                    a.max_attn_len);
  TORCH_CHECK_VALUE(std::isfinite(a.scale), "attnkern: scale must be finite, got ", a.scale);
  const at::ScalarType acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor starts = a.starts.contiguous(), lengths = a.lengths.contiguous();
  keep.push_back(starts);
  keep.push_back(lengths);
  const int64_t* st = starts.data_ptr<int64_t>();
  const int64_t* ln = lengths.data_ptr<int64_t>();
  int64_t longest = 0, prev_end = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(ln[b] >= 0 && st[b] >= prev_end && st[b] <= T && ln[b] <= T - st[b], "attnkern: rows must be ",
                      "disjoint, in order and inside the T = ", T, " tokens: row ", b, " has starts ", st[b],
                      ", lengths ", ln[b], " after a row ending at ", prev_end);
    prev_end = st[b] + ln[b];
    longest = std::max(longest, ln[b]);
  }
  TORCH_CHECK_VALUE(a.max_length >= -1, "attnkern: max_length must be >= 0 or -1 (the longest row), got ",
                    a.max_length);
  TORCH_CHECK_VALUE(a.max_length < 0 || a.max_length >= longest, "attnkern: max_length=", a.max_length,
                    " is less than the length ", longest, " of a row");
  const int64_t L = a.max_length < 0 ? longest : a.max_length;

  SeqParams p{};
  p.B = B;
  p.T = T;
  p.H = H;
  p.Hkv = Hkv;
  p.Dk = Dk;
  p.Dv = Dv;
  p.L = L;
  p.starts = st;
  p.lengths = ln;
  p.contextual_len = a.contextual_len;
  p.max_attn_len = a.max_attn_len;
  p.causal = a.causal;
  p.silu = a.silu;
  p.scale = a.scale;
  if (given(a.num_targets)) {
    check_long_vector(*a.num_targets, "num_targets", B, q);
    const at::Tensor nt = a.num_targets->contiguous();
    keep.push_back(nt);
    p.num_targets = nt.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK_VALUE(p.num_targets[b] >= 0 && p.num_targets[b] <= ln[b], "attnkern: num_targets[", b,
                        "] must be in [0, ", ln[b], "] (the row's length), got ", p.num_targets[b]);
  }
  for (const at::Tensor* t : {&q, &a.k, &a.v}) keep.push_back(acc_contig(*t, acc));
  p.q = keep[keep.size() - 3].data_ptr();
  p.k = keep[keep.size() - 2].data_ptr();
  p.v = keep[keep.size() - 1].data_ptr();
  if (given(a.attn_scale)) {
    const at::Tensor& s = *a.attn_scale;
    check_dense(s, "attn_scale");
    check_on_query_device(s, "attn_scale", q);
    TORCH_CHECK_TYPE(is_float_dtype(s.scalar_type()), "attnkern: attn_scale must be a float tensor, got ",
                     dtype_name(s.scalar_type()));
    TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == T, "attnkern: attn_scale must be [T] = [", T, "], got ", s.sizes());
    keep.push_back(acc_contig(s, acc));
    p.attn_scale = keep.back().data_ptr();
  }
  p.attn_scale_value = a.attn_scale_value.has_value() ? *a.attn_scale_value : 1.0 / double(std::max<int64_t>(L, 1));
  int64_t Hb = 0;
  if (given(a.time_table)) {
    check_table(*a.time_table, "time_table", q, H, Hb);
    TORCH_CHECK_VALUE(given(a.query_times) && given(a.key_times) && given(a.time_bounds),
                      "attnkern: time_table needs query_times, key_times and time_bounds");
    check_long_vector(*a.query_times, "query_times", T, q);
    check_long_vector(*a.key_times, "key_times", T, q);
    p.NB = a.time_table->size(0);
    TORCH_CHECK_VALUE(p.NB < (int64_t(1) << 31), "attnkern: time_table must have fewer than 2**31 rows, got ", p.NB);
    check_long_vector(*a.time_bounds, "time_bounds", p.NB - 1, q);
    for (const OptT* t : {&a.query_times, &a.key_times, &a.time_bounds}) keep.push_back((*t)->contiguous());
    p.query_times = keep[keep.size() - 3].data_ptr<int64_t>();
    p.key_times = keep[keep.size() - 2].data_ptr<int64_t>();
    p.time_bounds = keep[keep.size() - 1].data_ptr<int64_t>();
    for (int64_t i = 0; i + 1 < p.NB - 1; ++i)
      TORCH_CHECK_VALUE(p.time_bounds[i] >= 0 && p.time_bounds[i] <= p.time_bounds[i + 1],
                        "attnkern: time_bounds must be non-negative and non-decreasing");
    // The kernels' bucket search: the bounds as unsigned with a bound no |dt| reaches appended,
    // and each |dt| cell's bucket range.
    at::Tensor ub = at::empty({p.NB}, at::kLong), cells = at::empty({kSeqTimeCells + 1}, at::kInt);
    uint64_t* u = reinterpret_cast<uint64_t*>(ub.data_ptr<int64_t>());
    for (int64_t i = 0; i + 1 < p.NB; ++i) u[i] = uint64_t(p.time_bounds[i]);
    u[p.NB - 1] = std::numeric_limits<uint64_t>::max();
    int32_t* cl = cells.data_ptr<int32_t>();
    for (int64_t c = 0; c < kSeqTimeCells; ++c)
      cl[c] = int32_t(std::upper_bound(u, u + p.NB - 1, seq_time_cell_start(c)) - u);
    cl[kSeqTimeCells] = int32_t(p.NB - 1);
    keep.push_back(ub);
    keep.push_back(cells);
    p.time_ubounds = u;
    p.time_cells = cl;
    keep.push_back(acc_contig(*a.time_table, acc));
    p.time_table = keep.back().data_ptr();
  }
  if (given(a.position_table)) {
    check_table(*a.position_table, "position_table", q, H, Hb);
    p.P = a.position_table->size(0);
    keep.push_back(acc_contig(*a.position_table, acc));
    p.position_table = keep.back().data_ptr();
  }
  if (given(a.bias)) {
    const at::Tensor& bias = *a.bias;
    check_dense(bias, "bias");
    check_same_dtype(bias, "bias", q);
    check_on_query_device(bias, "bias", q);
    TORCH_CHECK_VALUE(bias.dim() == 4 && bias.size(0) == B && (bias.size(1) == 1 || bias.size(1) == H) &&
                          bias.size(2) == L && bias.size(3) == L,
                      "attnkern: bias must be [B, Hb, L, L] = [", B, ", 1 or ", H, ", ", L, ", ", L, "], got ",
                      bias.sizes());
    TORCH_CHECK_VALUE(Hb == 0 || Hb == bias.size(1), "attnkern: bias must have the Hb = ", Hb,
                      " heads of the tables, got ", bias.size(1));
    Hb = bias.size(1);
    keep.push_back(acc_contig(bias, acc));
    p.bias = keep.back().data_ptr();
  }
  p.Hb = Hb == 0 ? 1 : Hb;
  return p;
}

SeqKernels kernels_for(at::ScalarType dtype) {
  if (dtype == at::kDouble) return seq_generic_f64_kernels();
  switch (selected_isa()) {
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::kAmx:
    case Isa::kAvx512Bf16:
    case Isa::kAvx512: return seq_avx512_kernels();
    case Isa::kAvx2: return seq_avx2_kernels();
#endif
    default: return seq_generic_kernels();
  }
}

// Runs fn(item, workspace) over items [0, n) in the order given, each thread taking the next
// item from a shared counter (the items' costs differ widely: causal blocks, ragged rows).
template <class F>
void run_items(const SeqParams& p, at::ScalarType acc, int64_t n, const F& fn) {
  std::atomic<int64_t> next{0};
  const int64_t ws_bytes = seq_workspace(p) * (acc == at::kDouble ? 8 : 4);
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    std::vector<uint64_t> ws(size_t(ws_bytes / 8 + 1));
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i, ws.data());
  });
}

}  // namespace

// The checked parameters, the tensors they point into, the accumulator type (both launchers).
#define ATTNKERN_SEQ_PREPARE                                                                                       \
  std::vector<at::Tensor> keep;                                                                                    \
  SeqParams p = prepare({query, key, value, starts, lengths, max_length, num_targets, contextual_len, max_attn_len, \
                         causal, silu, scale, attn_scale, attn_scale_value, query_times, key_times, time_table,    \
                         time_bounds, position_table, bias},                                                       \
                        keep);                                                                                     \
  const at::ScalarType acc = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;                       \
  const auto opts = query.options().dtype(acc);

std::tuple<at::Tensor, at::Tensor> sequence_attention_fwd_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& starts,
    const at::Tensor& lengths, int64_t max_length, const OptT& num_targets, int64_t contextual_len,
    int64_t max_attn_len, bool causal, bool silu, double scale, const OptT& attn_scale,
    std::optional<double> attn_scale_value, const OptT& query_times, const OptT& key_times, const OptT& time_table,
    const OptT& time_bounds, const OptT& position_table, const OptT& bias) {
  ATTNKERN_SEQ_PREPARE
  at::Tensor out = at::zeros({p.T, p.H, p.Dv}, opts);
  at::Tensor lse = at::full({p.T, p.H}, -std::numeric_limits<double>::infinity(), opts);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  std::vector<int64_t> rows, q0s, cost;
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t i0 = 0; i0 < p.lengths[b]; i0 += kSeqBQ) {
      rows.push_back(b);
      q0s.push_back(i0);
      // causal: the keys up to the block; otherwise the whole row
      cost.push_back(p.causal ? std::min(p.lengths[b], i0 + kSeqBQ) : p.lengths[b]);
    }
  std::vector<int64_t> order(rows.size());
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return cost[x] > cost[y]; });
  std::vector<int64_t> r2(order.size()), q2(order.size());
  for (size_t i = 0; i < order.size(); ++i) {
    r2[i] = rows[order[i]];
    q2[i] = q0s[order[i]];
  }
  const SeqKernels kt = kernels_for(query.scalar_type());
  run_items(p, acc, int64_t(r2.size()), [&](int64_t i, void* ws) { kt.fwd(p, r2.data(), q2.data(), i, i + 1, ws); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sequence_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& lse, const at::Tensor& delta, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& value, const at::Tensor& starts, const at::Tensor& lengths,
    int64_t max_length, const OptT& num_targets, int64_t contextual_len, int64_t max_attn_len, bool causal,
    bool silu, double scale, const OptT& attn_scale, std::optional<double> attn_scale_value,
    const OptT& query_times, const OptT& key_times, const OptT& time_table, const OptT& time_bounds,
    const OptT& position_table, const OptT& bias) {
  ATTNKERN_SEQ_PREPARE
  check_dense(grad_out, "grad_out");
  TORCH_CHECK_VALUE(grad_out.dim() == 3 && grad_out.size(0) == p.T && grad_out.size(1) == p.H &&
                        grad_out.size(2) == p.Dv,
                    "attnkern: grad_out must be [T, H, Dv] = [", p.T, ", ", p.H, ", ", p.Dv, "], got ", grad_out.sizes());
  const at::Tensor go = acc_contig(grad_out, acc);
  p.grad_out = go.data_ptr();
  at::Tensor lse_c, delta_c;
  if (!silu) {
    for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{lse, "lse"}, {delta, "delta"}}) {
      check_dense(t, name);
      TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == p.T && t.size(1) == p.H, "attnkern: ", name,
                        " must be [T, H] = [", p.T, ", ", p.H, "], got ", t.sizes());
    }
    lse_c = acc_contig(lse, acc);
    delta_c = acc_contig(delta, acc);
    p.lse = lse_c.data_ptr();
    p.delta = delta_c.data_ptr();
  }
  at::Tensor dq = at::zeros({p.T, p.H, p.Dk}, opts), dk = at::zeros({p.T, p.Hkv, p.Dk}, opts),
             dv = at::zeros({p.T, p.Hkv, p.Dv}, opts);
  p.grad_q = dq.data_ptr();
  p.grad_k = dk.data_ptr();
  p.grad_v = dv.data_ptr();
  // One item per (row, K/V head): a single long row keeps Hkv threads busy. A dense bias with
  // one column is shared by every head, so its rows are not split; nor are those of one-column
  // tables in a batch of several rows, whose items then form each block pair's bias tile, time
  // buckets and table sums once for all heads instead of once per K/V head.
  const bool one_column = p.Hb == 1 && p.Hkv > 1;
  const bool whole_rows = one_column && (p.bias || ((p.time_table || p.position_table) && p.B > 1));
  const int64_t split = whole_rows ? 1 : p.Hkv, items = p.B * split;
  at::Tensor gt_part, gp_part, gb;
  if (p.time_table) {
    gt_part = at::zeros({items, p.NB, p.Hb}, opts);
    p.grad_time = gt_part.data_ptr();
  }
  if (p.position_table) {
    gp_part = at::zeros({items, p.P, p.Hb}, opts);
    p.grad_position = gp_part.data_ptr();
  }
  if (p.bias) {
    gb = at::zeros({p.B, p.Hb, p.L, p.L}, opts);
    p.grad_bias = gb.data_ptr();
  }
  std::vector<int64_t> order(static_cast<size_t>(items));
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t x, int64_t y) { return p.lengths[x / split] > p.lengths[y / split]; });
  const SeqKernels kt = kernels_for(query.scalar_type());
  const int64_t per = p.Hkv / split;
  run_items(p, acc, items, [&](int64_t i, void* ws) {
    const int64_t it = order[i], b = it / split, s = it % split;
    kt.bwd(p, b, s * per, (s + 1) * per, it, ws);
  });
  // The items' partial table sums, added in item order.
  auto reduce_rows = [&](const at::Tensor& part) {
    at::Tensor total = part.select(0, 0).clone();
    for (int64_t b = 1; b < items; ++b) total.add_(part.select(0, b));
    return total;
  };
  const auto empty = [&](const at::ScalarType t) { return at::empty({0}, query.options().dtype(t)); };
  at::Tensor g_time = p.time_table ? (items ? reduce_rows(gt_part) : at::zeros({p.NB, p.Hb}, opts)).to(query.scalar_type())
                                   : empty(query.scalar_type());
  at::Tensor g_pos = p.position_table ? (items ? reduce_rows(gp_part) : at::zeros({p.P, p.Hb}, opts)).to(query.scalar_type())
                                      : empty(query.scalar_type());
  at::Tensor g_bias = p.bias ? gb.to(query.scalar_type()) : empty(query.scalar_type());
  return {dq.to(query.scalar_type()), dk.to(query.scalar_type()), dv.to(query.scalar_type()), g_time, g_pos, g_bias};
}

#undef ATTNKERN_SEQ_PREPARE

}  // namespace cpu
}  // namespace attnkern

TORCH_LIBRARY_IMPL(attnkern, CPU, m) {
  m.impl("sequence_attention_fwd", &attnkern::cpu::sequence_attention_fwd_cpu);
  m.impl("sequence_attention_bwd", &attnkern::cpu::sequence_attention_bwd_cpu);
}
