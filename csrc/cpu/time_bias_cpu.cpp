// attnkern::time_bias_fwd / _bwd: the score bias of AttentionPooling's time and recency tables
// (attnkern.nn), built in one pass over the padded history instead of a chain of [B, L] and
// [H, B, L] temporaries (the float log of every gap, two lookups, their sum, a transposed copy).
//
//   bias[b, h, l] = time_table[h, bucket(query_time[b] - key_times[b, l])]
//                 + recency_table[h, min(lengths[b] - 1 - l, NR - 1)]      for l < lengths[b]
//   bias[b, h, l] = 0                                                      for l >= lengths[b]
//
// bucket(dt) is the number of time_bounds <= |dt| (attnkern.reference.log_time_bucket, exactly:
// the bounds are found on that formula, see attnkern/sequence.py), with int64's wrap-around for
// the gap and its absolute value as torch computes them. The backward sums the bias gradient into
// the tables in fixed chunks of rows, then the chunks in order: the same sums on any thread
// count, no atomics. Schemas, fake impls and autograd: attnkern/ops/time_bias.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "../input_checks.h"

namespace attnkern {
namespace cpu {
namespace {

using OptT = std::optional<at::Tensor>;

// Rows per backward chunk: fixed, so that the summation order never depends on the threads.
constexpr int64_t kRowsPerChunk = 32;

bool given(const OptT& t) { return t.has_value() && t->defined(); }

// bucket(a) = #bounds <= a for non-decreasing bounds. Every bound <= 2^e counts for a in
// [2^e, 2^(e+1)), so the walk starts there: a few steps (the log buckets are ~2.3 per octave)
// instead of a binary search per position.
struct Bucketer {
  const int64_t* bounds;
  int64_t n;
  int64_t start[64];

  Bucketer(const int64_t* b, int64_t count) : bounds(b), n(count) {
    for (int e = 0; e < 63; ++e) start[e] = std::upper_bound(b, b + count, int64_t(1) << e) - b;
    start[63] = 0;  // no int64 reaches 2^63: unused
  }

  int64_t operator()(int64_t query_time, int64_t key_time) const {
    const int64_t dt = int64_t(uint64_t(query_time) - uint64_t(key_time));
    // torch's int64 abs: INT64_MIN stays negative (and lands in bucket 0 like every a < 1).
    const int64_t a = dt < 0 ? int64_t(uint64_t(0) - uint64_t(dt)) : dt;
    int64_t k = a >= 1 ? start[63 - __builtin_clzll(uint64_t(a))] : 0;
    while (k < n && bounds[k] <= a) ++k;
    return k;
  }
};

struct TimeBiasArgs {
  at::Tensor key_times, query_time, lengths, bounds;
  OptT time_table, recency_table;
  int64_t B, L, H, NB, NR;
};

void check_table(const OptT& t, const char* name) {
  if (!given(t)) return;
  check_dense(*t, name);
  TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble, "attnkern: ", name,
                   " must be float32 or float64, got ", dtype_name(t->scalar_type()));
  TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) >= 1 && t->size(1) >= 1, "attnkern: ", name,
                    " must be [H, buckets] with H, buckets >= 1, got ", t->sizes());
}

TimeBiasArgs check_args(const at::Tensor& key_times, const at::Tensor& query_time, const at::Tensor& lengths,
                        const at::Tensor& bounds, const OptT& time_table, const OptT& recency_table) {
  check_dense(key_times, "key_times");
  TORCH_CHECK_TYPE(key_times.scalar_type() == at::kLong, "attnkern: key_times must be int64, got ",
                   dtype_name(key_times.scalar_type()));
  TORCH_CHECK_VALUE(key_times.dim() == 2, "attnkern: key_times must be [B, L], got ", key_times.sizes());
  TimeBiasArgs a;
  a.B = key_times.size(0);
  a.L = key_times.size(1);
  check_dense(query_time, "query_time");
  TORCH_CHECK_TYPE(query_time.scalar_type() == at::kLong, "attnkern: query_time must be int64, got ",
                   dtype_name(query_time.scalar_type()));
  check_shape(query_time, "query_time", {a.B}, "[B]");
  check_index_tensor(lengths, "lengths", a.B, key_times);
  check_dense(bounds, "time_bounds");
  TORCH_CHECK_TYPE(bounds.scalar_type() == at::kLong, "attnkern: time_bounds must be int64, got ",
                   dtype_name(bounds.scalar_type()));
  TORCH_CHECK_VALUE(bounds.dim() == 1, "attnkern: time_bounds must be 1-D, got ", bounds.sizes());
  check_table(time_table, "time_table");
  check_table(recency_table, "recency_table");
  TORCH_CHECK_VALUE(given(time_table) || given(recency_table),
                    "attnkern: time_bias needs a time_table, a recency_table or both");
  const at::Tensor& any = given(time_table) ? *time_table : *recency_table;
  a.H = any.size(0);
  a.NB = given(time_table) ? time_table->size(1) : 0;
  a.NR = given(recency_table) ? recency_table->size(1) : 0;
  if (given(time_table) && given(recency_table)) {
    TORCH_CHECK_TYPE(recency_table->scalar_type() == time_table->scalar_type(),
                     "attnkern: recency_table must have the dtype of time_table (",
                     dtype_name(time_table->scalar_type()), "), got ", dtype_name(recency_table->scalar_type()));
    TORCH_CHECK_VALUE(recency_table->size(0) == a.H, "attnkern: recency_table must have the H = ", a.H,
                      " rows of time_table, got ", recency_table->sizes());
  }
  if (given(time_table))
    TORCH_CHECK_VALUE(bounds.size(0) <= a.NB - 1, "attnkern: time_bounds may hold at most NB - 1 = ", a.NB - 1,
                      " bounds, got ", bounds.size(0));
  for (const OptT* t : {&time_table, &recency_table})
    if (given(*t)) check_on_query_device(**t, "a table", key_times);
  check_on_query_device(query_time, "query_time", key_times);
  check_on_query_device(bounds, "time_bounds", key_times);
  a.key_times = key_times.contiguous();
  a.query_time = query_time.contiguous();
  a.lengths = lengths.to(at::kLong).contiguous();
  a.bounds = bounds.contiguous();
  const int64_t* len = a.lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < a.B; ++b)
    TORCH_CHECK_VALUE(len[b] >= 0 && len[b] <= a.L, "attnkern: lengths must be in [0, L] = [0, ", a.L,
                      "], got ", len[b], " at row ", b);
  const int64_t* bd = a.bounds.data_ptr<int64_t>();
  for (int64_t i = 0; i + 1 < a.bounds.size(0); ++i)
    TORCH_CHECK_VALUE(bd[i] <= bd[i + 1], "attnkern: time_bounds must be non-decreasing");
  a.time_table = given(time_table) ? OptT(time_table->contiguous()) : std::nullopt;
  a.recency_table = given(recency_table) ? OptT(recency_table->contiguous()) : std::nullopt;
  return a;
}

template <typename scalar_t>
void time_bias_fwd_kernel(const TimeBiasArgs& a, const Bucketer& bucket, scalar_t* out) {
  const int64_t *kt = a.key_times.data_ptr<int64_t>(), *qt = a.query_time.data_ptr<int64_t>(),
                *len = a.lengths.data_ptr<int64_t>();
  const scalar_t* tt = a.time_table ? a.time_table->data_ptr<scalar_t>() : nullptr;
  const scalar_t* rt = a.recency_table ? a.recency_table->data_ptr<scalar_t>() : nullptr;
  const int64_t B = a.B, L = a.L, H = a.H, NB = a.NB, NR = a.NR;
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    std::vector<int32_t> tb(tt ? L : 0);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = len[b];
      if (tt)
        for (int64_t l = 0; l < n; ++l) tb[l] = int32_t(bucket(qt[b], kt[b * L + l]));
      for (int64_t h = 0; h < H; ++h) {
        scalar_t* o = out + (b * H + h) * L;
        const scalar_t* th = tt ? tt + h * NB : nullptr;
        const scalar_t* rh = rt ? rt + h * NR : nullptr;
        for (int64_t l = 0; l < n; ++l) {
          scalar_t v = 0;
          if (th) v += th[tb[l]];
          if (rh) v += rh[std::min(n - 1 - l, NR - 1)];
          o[l] = v;
        }
        std::fill(o + n, o + L, scalar_t(0));
      }
    }
  });
}

template <typename scalar_t>
void time_bias_bwd_kernel(const TimeBiasArgs& a, const Bucketer& bucket, const scalar_t* grad, double* dtime,
                          double* drec) {
  const int64_t *kt = a.key_times.data_ptr<int64_t>(), *qt = a.query_time.data_ptr<int64_t>(),
                *len = a.lengths.data_ptr<int64_t>();
  const int64_t B = a.B, L = a.L, H = a.H, NB = a.NB, NR = a.NR;
  const int64_t chunks = (B + kRowsPerChunk - 1) / kRowsPerChunk;
  // Per chunk: its own partial tables (float64), added in chunk order below.
  std::vector<double> part(size_t(chunks * H * (NB + NR)), 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<int32_t> tb(NB ? L : 0);
    for (int64_t c = c0; c < c1; ++c) {
      double* pt = part.data() + c * H * (NB + NR);
      double* pr = pt + H * NB;
      for (int64_t b = c * kRowsPerChunk; b < std::min(B, (c + 1) * kRowsPerChunk); ++b) {
        const int64_t n = len[b];
        if (NB)
          for (int64_t l = 0; l < n; ++l) tb[l] = int32_t(bucket(qt[b], kt[b * L + l]));
        for (int64_t h = 0; h < H; ++h) {
          const scalar_t* g = grad + (b * H + h) * L;
          if (NB) {
            double* th = pt + h * NB;
            for (int64_t l = 0; l < n; ++l) th[tb[l]] += double(g[l]);
          }
          if (NR) {
            double* rh = pr + h * NR;
            // Positions l <= n - NR share the last recency bucket; the others own one each.
            const int64_t shared = std::max<int64_t>(n - NR + 1, 0);
            double s = 0;
            for (int64_t l = 0; l < shared; ++l) s += double(g[l]);
            rh[NR - 1] += s;
            for (int64_t l = shared; l < n; ++l) rh[n - 1 - l] += double(g[l]);
          }
        }
      }
    }
  });
  for (int64_t c = 0; c < chunks; ++c) {
    const double* pt = part.data() + c * H * (NB + NR);
    for (int64_t i = 0; i < H * NB; ++i) dtime[i] += pt[i];
    for (int64_t i = 0; i < H * NR; ++i) drec[i] += pt[H * NB + i];
  }
}

at::ScalarType table_dtype(const TimeBiasArgs& a) {
  return (a.time_table ? *a.time_table : *a.recency_table).scalar_type();
}

}  // namespace

at::Tensor time_bias_fwd_cpu(const at::Tensor& key_times, const at::Tensor& query_time, const at::Tensor& lengths,
                             const at::Tensor& time_bounds, const OptT& time_table, const OptT& recency_table) {
  const TimeBiasArgs a = check_args(key_times, query_time, lengths, time_bounds, time_table, recency_table);
  at::Tensor out = at::empty({a.B, a.H, a.L}, key_times.options().dtype(table_dtype(a)));
  const Bucketer bucket(a.bounds.data_ptr<int64_t>(), a.NB ? a.bounds.size(0) : 0);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "time_bias_fwd_cpu",
                             [&] { time_bias_fwd_kernel<scalar_t>(a, bucket, out.data_ptr<scalar_t>()); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> time_bias_bwd_cpu(const at::Tensor& grad_bias, const at::Tensor& key_times,
                                                     const at::Tensor& query_time, const at::Tensor& lengths,
                                                     const at::Tensor& time_bounds, const OptT& time_table,
                                                     const OptT& recency_table) {
  const TimeBiasArgs a = check_args(key_times, query_time, lengths, time_bounds, time_table, recency_table);
  check_dense(grad_bias, "grad_bias");
  TORCH_CHECK_TYPE(grad_bias.scalar_type() == table_dtype(a), "attnkern: grad_bias must have the tables' dtype (",
                   dtype_name(table_dtype(a)), "), got ", dtype_name(grad_bias.scalar_type()));
  check_shape(grad_bias, "grad_bias", {a.B, a.H, a.L}, "[B, H, L]");
  const at::Tensor g = grad_bias.contiguous();
  at::Tensor dtime = at::zeros({a.H, a.NB}, key_times.options().dtype(at::kDouble));
  at::Tensor drec = at::zeros({a.H, a.NR}, key_times.options().dtype(at::kDouble));
  const Bucketer bucket(a.bounds.data_ptr<int64_t>(), a.NB ? a.bounds.size(0) : 0);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "time_bias_bwd_cpu", [&] {
    time_bias_bwd_kernel<scalar_t>(a, bucket, g.data_ptr<scalar_t>(), dtime.data_ptr<double>(),
                                   drec.data_ptr<double>());
  });
  const auto empty = key_times.options().dtype(table_dtype(a));
  return {a.NB ? dtime.to(table_dtype(a)) : at::empty({0}, empty),
          a.NR ? drec.to(table_dtype(a)) : at::empty({0}, empty)};
}

}  // namespace cpu
}  // namespace attnkern

// Declared here rather than beside the attention-pool schemas: a CPU-only op (other devices take
// the PyTorch formula in attnkern.nn).
TORCH_LIBRARY_FRAGMENT(attnkern, m) {
  m.def("time_bias_fwd(Tensor key_times, Tensor query_time, Tensor lengths, Tensor time_bounds, "
        "Tensor? time_table, Tensor? recency_table) -> Tensor");
  m.def("time_bias_bwd(Tensor grad_bias, Tensor key_times, Tensor query_time, Tensor lengths, "
        "Tensor time_bounds, Tensor? time_table, Tensor? recency_table) -> (Tensor grad_time_table, "
        "Tensor grad_recency_table)");
}

TORCH_LIBRARY_IMPL(attnkern, CPU, m) {
  m.impl("time_bias_fwd", &attnkern::cpu::time_bias_fwd_cpu);
  m.impl("time_bias_bwd", &attnkern::cpu::time_bias_bwd_cpu);
}
