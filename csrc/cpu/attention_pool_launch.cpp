// CPU launchers of the four attention-pool ops: they check their inputs, fill the kernels'
// parameters and run the kernel table attention_pool_dispatch.cpp chooses over the work items of
// attention_pool_work.h, then normalise (forward) or sum (backward) what the kernels leave.
//
// The backward is deterministic: each position belongs to one task, which writes its dk/dv;
// dq partials of a split row are summed in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_pool.h"
#include "attention_pool_kernels.h"
#include "attention_pool_launch.h"
#include "attention_pool_tile_kernels.h"
#include "attention_pool_work.h"
#include "host_buffers.h"

namespace attnkern {
namespace cpu {
namespace {

at::ScalarType accumulator_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: return kF64;
  }
}

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// The (row, position, head) strides of a key-like tensor: padded [B, L, H, D], or jagged
// [T, H, D] (no row stride: a jagged row starts at its offset).
void row_strides(const at::Tensor& t, bool jagged, int64_t& sb, int64_t& sl, int64_t& sh) {
  sb = jagged ? 0 : t.stride(0);
  sl = t.stride(jagged ? 0 : 1);
  sh = t.stride(jagged ? 1 : 2);
}

void fill_fwd_params(FwdParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool jagged,
                     const PoolDims& d, double scale) {
  p.dtype = dtype_code(q.scalar_type());
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_sb = q.stride(0);
  p.q_sn = q.stride(1);
  p.q_sh = q.stride(2);
  row_strides(k, jagged, p.k_sb, p.k_sl, p.k_sh);
  row_strides(v, jagged, p.v_sb, p.v_sl, p.v_sh);
  p.N = d.N;
  p.H = d.H;
  p.Dk = d.Dk;
  p.Dv = d.Dv;
  p.scale = scale;
  // About 64 KiB of K and V rows ahead (ATTNKERN_CPU_PREFETCH_KB; 0 = off): enough to cover the
  // memory latency at full bandwidth and to cross the 4 KiB pages the hardware prefetchers
  // stop at, and well inside L2.
  static const int64_t pf_kb = [] {
    const char* e = std::getenv("ATTNKERN_CPU_PREFETCH_KB");
    return e ? std::max<int64_t>(0, std::atoll(e)) : int64_t(64);
  }();
  const int64_t es = p.dtype == kF64 ? 8 : p.dtype == kF32 ? 4 : 2;
  p.prefetch = pf_kb ? std::max<int64_t>(32, (pf_kb << 10) / ((d.Dk + d.Dv) * es)) : 0;
}

// The bias in the accumulator type (a copy only when its dtype differs), its strides in
// FwdParams; padded [B, Nb, Hb, L], jagged [T, Nb, Hb] (attention_pool.h).
at::Tensor fill_bias_params(FwdParams& p, const std::optional<at::Tensor>& bias, at::ScalarType acc, bool jagged) {
  if (!bias.has_value()) return at::Tensor();
  at::Tensor b = bias->to(acc);
  p.bias = b.data_ptr();
  p.bias_nb = b.size(1);
  p.bias_sn = b.stride(1);
  p.bias_sh = b.size(2) == 1 ? 0 : b.stride(2);
  p.bias_sb = jagged ? 0 : b.stride(0);
  p.bias_sl = jagged ? b.stride(0) : b.stride(3);
  return b;
}

template <class A>
A shift_of_host(A m) {  // as shift_of in attention_pool_impl.h: the shift the kernels subtracted
  return std::isinf(m) ? A(0) : m;
}

// Writes out in the accumulator type (float32, float64 for float64 inputs): the autograd
// forms delta = sum(grad_out * out) from these unrounded values, which float16/bfloat16
// rounding would make inaccurate for peaked softmaxes; the public function casts out to the
// query dtype.
template <class scalar_t>
void fwd_impl(const FwdParams& p, const Rows& rows, at::Tensor& out, at::Tensor& lse) {
  using A = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
  const KernelTable& kt = kernels_for(p.dtype);
  const int64_t N = p.N, H = p.H, Dv = p.Dv;
  const bool tiles = use_tiles(kt, N);
  const FwdFn fwd = tiles ? kt.fwd_tile : kt.fwd;
  const int64_t ws_n = workspace_for(kt, tiles, N, p.Dk, Dv);
  A* o = out.data_ptr<A>();
  float* ls = lse.data_ptr<float>();

  // Normalises queries [n0, n0 + nq) of one task (acc/m/l indexed from n0).
  auto finish_rows = [&](int64_t task, const A* acc, const A* m, const A* l, int64_t n0, int64_t nq) {
    const int64_t b = task / H, h = task % H;
    for (int64_t n = 0; n < nq; ++n) {
      const int64_t r = (b * N + n0 + n) * H + h;
      A* on = o + r * Dv;
      // l == 0 only when no valid position has a finite logit (an empty row, or all -inf: the
      // reference's "empty" too); a NaN l (a NaN/inf logit or value) propagates. The lse sum
      // is formed in double: in float, m + log2(l) loses log2(l) at large logits.
      if (!(l[n] == A(0))) {
        const A inv = A(1) / l[n];
        for (int64_t e = 0; e < Dv; ++e) on[e] = acc[n * Dv + e] * inv;
        ls[r] = float(double(shift_of_host(m[n])) + std::log(double(l[n])));
      } else {
        for (int64_t e = 0; e < Dv; ++e) on[e] = A(0);
        ls[r] = -std::numeric_limits<float>::infinity();
      }
    }
  };
  auto finish = [&](int64_t task, const A* acc, const A* m, const A* l) { finish_rows(task, acc, m, l, 0, N); };

  const int64_t ntasks = rows.B * H;
  const std::vector<Item> items = split_plan(rows, H, p.dtype);
  const int64_t avg_len = rows.offsets ? (rows.B ? (rows.offsets[rows.B] - rows.offsets[0]) / rows.B + 1 : 1) : rows.L + 1;
  // Many queries and few tasks: the tiled kernel's work is split over query chunks instead of
  // key slices (a shape-only rule; each query's arithmetic is the same either way), so there is
  // no merge pass and one parallel region. Inside it a query's arithmetic does not depend on
  // its chunk either, so the chunks follow the thread count (tile_chunks_for_threads: each
  // chunk packs its task's K/V anew), and the threads take them in turn from a shared counter,
  // so that a thread that starts late or is preempted leaves its share to the other.
  if (!items.empty() && tiles && tile_query_chunks(N, ntasks) > 1) {
    const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
    const int64_t qchunks = tile_chunks_for_threads(N, p.Dk, Dv, ntasks, nth);
    const int64_t qn = (N + qchunks - 1) / qchunks, nitems = ntasks * qchunks;
    const int64_t ws_q = workspace_for(kt, tiles, qn, p.Dk, Dv);
    const int64_t es = int64_t(sizeof(scalar_t));
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min(nth, nitems), 1, [&](int64_t, int64_t) {
      std::vector<A> ws(ws_q), acc(qn * Dv), m(qn), l(qn);
      std::vector<int64_t> idx;
      for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < nitems;
           i = next.fetch_add(1, std::memory_order_relaxed)) {
        const int64_t t = i / qchunks, n0 = (i % qchunks) * qn, nq = std::min(qn, N - n0);
        if (nq <= 0) continue;
        const int64_t b = t / H;
        const int64_t cnt = rows.count(b, &idx);
        FwdParams pc = p;
        pc.q = static_cast<const char*>(p.q) + n0 * p.q_sn * es;
        pc.N = nq;
        pc.n0 = n0;
        fwd(pc, Span{b, t % H, rows.start(b), cnt, rows.mask ? idx.data() : nullptr}, ws.data(), acc.data(), m.data(),
            l.data());
        finish_rows(t, acc.data(), m.data(), l.data(), n0, nq);
      }
    });
    return;
  }
  if (items.empty() && heads_are_neighbours(p) && !tiles) {
    // One pass over each row for all its heads (see the split case below).
    FwdParams ph = p;
    ph.heads = H;
    at::parallel_for(0, rows.B, grain_for(H * N * avg_len * (p.Dk + Dv)), [&](int64_t b0, int64_t b1) {
      std::vector<A> ws(ws_n), acc(H * N * Dv), m(H * N), l(H * N);
      for_each_task(ph, rows, b0 * H, b1 * H, H, [&](int64_t t, const Span& s) {
        fwd(ph, s, ws.data(), acc.data(), m.data(), l.data());
        for (int64_t h = 0; h < H; ++h) finish(t + h, acc.data() + h * N * Dv, m.data() + h * N, l.data() + h * N);
      });
    });
    return;
  }
  if (items.empty()) {
    at::parallel_for(0, ntasks, grain_for(N * avg_len * (p.Dk + Dv)), [&](int64_t t0, int64_t t1) {
      std::vector<A> ws(ws_n), acc(N * Dv), m(N), l(N);
      for_each_task(p, rows, t0, t1, 1, [&](int64_t t, const Span& s) {
        fwd(p, s, ws.data(), acc.data(), m.data(), l.data());
        finish(t, acc.data(), m.data(), l.data());
      });
    });
    return;
  }

  // Split rows: partial (acc, m, l) per item, then a fixed-order log-sum-exp merge per task.
  const int64_t nitems = int64_t(items.size());
  std::vector<A> pacc(nitems * N * Dv), pm(nitems * N), pl(nitems * N);
  const std::vector<int64_t> order = execution_order(items, H);
  if (heads_are_neighbours(p) && !tiles) {
    // The H items of a piece (back to back in `order`) run as one span over all heads.
    FwdParams ph = p;
    ph.heads = H;
    at::parallel_for(0, nitems / H, 1, [&](int64_t u0, int64_t u1) {
      std::vector<A> ws(ws_n), acc(H * N * Dv), m(H * N), l(H * N);
      for_each_item(ph, rows, items, order, u0 * H, u1 * H, H, [&](int64_t j, const Span& s) {
        fwd(ph, s, ws.data(), acc.data(), m.data(), l.data());
        for (int64_t h = 0; h < H; ++h) {
          const int64_t i = order[j + h];
          std::copy_n(acc.data() + h * N * Dv, N * Dv, pacc.data() + i * N * Dv);
          std::copy_n(m.data() + h * N, N, pm.data() + i * N);
          std::copy_n(l.data() + h * N, N, pl.data() + i * N);
        }
      });
    });
  } else {
    at::parallel_for(0, nitems, 1, [&](int64_t i0, int64_t i1) {
      std::vector<A> ws(ws_n);
      for_each_item(p, rows, items, order, i0, i1, 1, [&](int64_t j, const Span& s) {
        const int64_t i = order[j];
        fwd(p, s, ws.data(), pacc.data() + i * N * Dv, pm.data() + i * N, pl.data() + i * N);
      });
    });
  }
  std::vector<int64_t> first(ntasks + 1, nitems);
  for (int64_t i = nitems - 1; i >= 0; --i) first[items[i].task] = i;
  at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<A> acc(N * Dv), m(N), l(N);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e = (t + 1 < ntasks) ? first[t + 1] : nitems;
      for (int64_t n = 0; n < N; ++n) {
        // Each piece's (acc, l) is relative to its shift; pieces with l == 0 (no finite logit)
        // take no part, so that they cannot move the common shift.
        A mx = -std::numeric_limits<A>::infinity();
        bool any = false;
        for (int64_t i = first[t]; i < e; ++i) {
          if (pl[i * N + n] == A(0)) continue;
          const A sh = shift_of_host(pm[i * N + n]);
          mx = any ? std::max(mx, sh) : sh;
          any = true;
        }
        A lsum = 0;
        for (int64_t x = 0; x < Dv; ++x) acc[n * Dv + x] = 0;
        if (any) {
          for (int64_t i = first[t]; i < e; ++i) {
            if (pl[i * N + n] == A(0)) continue;
            const A w = std::exp(shift_of_host(pm[i * N + n]) - mx);
            lsum += w * pl[i * N + n];
            for (int64_t x = 0; x < Dv; ++x) acc[n * Dv + x] += w * pacc[(i * N + n) * Dv + x];
          }
        }
        m[n] = mx;
        l[n] = lsum;
      }
      finish(t, acc.data(), m.data(), l.data());
    }
  });
}

std::tuple<at::Tensor, at::Tensor> fwd_common(const at::Tensor& query_in, const at::Tensor& key_in,
                                              const at::Tensor& value_in, const std::optional<at::Tensor>& bias,
                                              const PoolDims& d, const Rows& rows, bool jagged, double scale,
                                              bool round_p) {
  TORCH_CHECK_VALUE(std::isfinite(scale), "attnkern: scale must be finite, got ", scale);
  const at::Tensor q = last_dim_contiguous(query_in);
  const at::Tensor k = last_dim_contiguous(key_in);
  const at::Tensor v = last_dim_contiguous(value_in);
  at::Tensor out = at::empty({d.B, d.N, d.H, d.Dv}, q.options().dtype(accumulator_dtype(q.scalar_type())));
  at::Tensor lse = at::empty({d.B, d.N, d.H}, q.options().dtype(at::kFloat));
  if (d.B == 0) return {out, lse};
  FwdParams p;
  fill_fwd_params(p, q, k, v, jagged, d, scale);
  p.round_p = round_p;
  const at::Tensor b = fill_bias_params(p, bias, out.scalar_type(), jagged);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_pool_fwd_cpu",
                                  [&] { fwd_impl<scalar_t>(p, rows, out, lse); });
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------
// Backward

// Zeroes grad_key/grad_value of head h at the positions of padded row b that take no part.
// Runs of consecutive positions become one streaming fill when the heads are not interleaved
// (H == 1).
template <class scalar_t>
void zero_invalid(const Rows& rows, const BwdParams& p, const KernelTable& kt, int64_t b, int64_t h, int64_t count) {
  if (rows.offsets) return;  // jagged: rows beyond offsets[B] are zeroed once, at the end
  scalar_t* gk = static_cast<scalar_t*>(p.gk) + b * p.gk_sb + h * p.gk_sh;
  scalar_t* gv = static_cast<scalar_t*>(p.gv) + b * p.gv_sb + h * p.gv_sh;
  const bool dense = p.gk_sl == p.Dk && p.gv_sl == p.Dv;
  auto zero_run = [&](int64_t l0, int64_t l1) {  // positions [l0, l1)
    if (l0 >= l1) return;
    if (dense) {
      kt.zero(gk + l0 * p.gk_sl, int64_t(sizeof(scalar_t)) * p.Dk * (l1 - l0));
      kt.zero(gv + l0 * p.gv_sl, int64_t(sizeof(scalar_t)) * p.Dv * (l1 - l0));
      return;
    }
    for (int64_t l = l0; l < l1; ++l) {
      std::memset(gk + l * p.gk_sl, 0, sizeof(scalar_t) * p.Dk);
      std::memset(gv + l * p.gv_sl, 0, sizeof(scalar_t) * p.Dv);
    }
  };
  if (rows.mask) {
    const bool* m = rows.mask + b * rows.L;
    int64_t l = 0;
    while (l < rows.L) {
      while (l < rows.L && m[l]) ++l;
      const int64_t l0 = l;
      while (l < rows.L && !m[l]) ++l;
      zero_run(l0, l);
    }
  } else {
    zero_run(count, rows.L);
  }
}

// Rows whose float32 lse is at least this large in magnitude (or not finite) get their softmax
// statistics recomputed in the backward: a float32 lse is off by up to |lse| * 6e-8, which the
// probabilities recomputed from it inherit as a relative error (1e-6 here; 6e-5 at 1e3, and
// beyond 1e9 no probability at all), against about 1e-7 for the float32 reference.
constexpr double kRefineLse = 16.0;

// BwdParams::shift for the (row, head) task of span s: from the forward's lse, or, where
// that cannot resolve the logits (large or non-finite lse, float64 inputs), recomputed over the
// whole row with the backward's own logits (one extra pass over K).
template <class A>
void fill_shift(const BwdParams& p, StatsFn stats, const float* lse, const Span& s, A* ws, A* m, A* l,
                A* shift) {
  const int64_t N = p.N, H = p.H;
  bool refine = p.dtype == kF64;
  for (int64_t n = 0; n < N && !refine; ++n) {
    const float x = lse[((s.b * N + n) * H) + s.h];
    refine = s.count > 0 && !(std::fabs(x) < kRefineLse);
  }
  if (refine) stats(p, s, ws, m, l);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t r = (s.b * N + n) * H + s.h;
    if (refine) {
      shift[2 * r] = m[n];
      // l == 0: no finite logit; a zero log-sum then keeps 2^(-inf) = 0 at every position.
      shift[2 * r + 1] = l[n] > A(0) ? A(std::log2(l[n])) : (l[n] == A(0) ? A(0) : l[n]);
    } else {
      shift[2 * r] = A(lse[r]);
      shift[2 * r + 1] = A(0);
    }
  }
}

template <class scalar_t>
void bwd_impl(BwdParams& p, const Rows& rows, const float* lse, at::Tensor& gq) {
  using A = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
  const KernelTable& kt = kernels_for(p.dtype);
  const int64_t N = p.N, H = p.H, Dk = p.Dk;
  // The tiled path recomputes a row's shift with the tiled stats kernel: the same logits as
  // the tiled backward.
  const bool tiles = use_tiles(kt, N);
  const BwdFn bwd = tiles ? kt.bwd_tile : kt.bwd;
  const StatsFn stats = tiles ? kt.stats_tile : kt.stats;
  const int64_t ws_n = workspace_for(kt, tiles, N, Dk, p.Dv);
  std::vector<A> shift(2 * rows.B * N * H);
  p.shift = shift.data();
  scalar_t* gqp = gq.data_ptr<scalar_t>();
  auto store_dq = [&](int64_t task, const A* dq) {
    const int64_t b = task / H, h = task % H;
    for (int64_t n = 0; n < N; ++n) {
      scalar_t* g = gqp + ((b * N + n) * H + h) * Dk;
      for (int64_t e = 0; e < Dk; ++e) g[e] = scalar_t(dq[n * Dk + e]);
    }
  };

  const int64_t ntasks = rows.B * H;
  const std::vector<Item> items = split_plan(rows, H, p.dtype);
  const int64_t avg_len = rows.offsets ? (rows.B ? (rows.offsets[rows.B] - rows.offsets[0]) / rows.B + 1 : 1) : rows.L + 1;
  if (items.empty()) {
    at::parallel_for(0, ntasks, grain_for(2 * N * avg_len * (Dk + p.Dv)), [&](int64_t t0, int64_t t1) {
      std::vector<A> ws(ws_n), dq(N * Dk), m(N), l(N);
      for_each_task(p, rows, t0, t1, 1, [&](int64_t t, const Span& s) {
        fill_shift<A>(p, stats, lse, s, ws.data(), m.data(), l.data(), shift.data());
        bwd(p, s, ws.data(), dq.data());
        store_dq(t, dq.data());
        zero_invalid<scalar_t>(rows, p, kt, s.b, s.h, s.count);
      });
    });
    return;
  }

  // Split rows: the shift of each whole row first, then the pieces.
  at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<A> ws(ws_n), m(N), l(N);
    for_each_task(p, rows, t0, t1, 1, [&](int64_t, const Span& s) {
      fill_shift<A>(p, stats, lse, s, ws.data(), m.data(), l.data(), shift.data());
    });
  });
  const int64_t nitems = int64_t(items.size());
  std::vector<A> pdq(nitems * N * Dk);
  const std::vector<int64_t> order = execution_order(items, H);
  at::parallel_for(0, nitems, 1, [&](int64_t i0, int64_t i1) {
    std::vector<A> ws(ws_n);
    for_each_item(p, rows, items, order, i0, i1, 1, [&](int64_t j, const Span& s) {
      const int64_t i = order[j];
      bwd(p, s, ws.data(), pdq.data() + i * N * Dk);
    });
  });
  std::vector<int64_t> first(ntasks + 1, nitems);
  for (int64_t i = nitems - 1; i >= 0; --i) first[items[i].task] = i;
  at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<A> dq(N * Dk);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e = (t + 1 < ntasks) ? first[t + 1] : nitems;
      std::fill(dq.begin(), dq.end(), A(0));
      for (int64_t i = first[t]; i < e; ++i)
        for (int64_t x = 0; x < N * Dk; ++x) dq[x] += pdq[i * N * Dk + x];
      store_dq(t, dq.data());
      const int64_t b = t / H;
      zero_invalid<scalar_t>(rows, p, kt, b, t % H, rows.count(b, nullptr));
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_common(
    const at::Tensor& grad_out_in, const at::Tensor& query_in, const at::Tensor& key_in, const at::Tensor& value_in,
    const at::Tensor& lse_in, const at::Tensor& delta_in, const std::optional<at::Tensor>& bias, const PoolDims& d,
    const Rows& rows, bool jagged, double scale) {
  TORCH_CHECK_VALUE(std::isfinite(scale), "attnkern: scale must be finite, got ", scale);
  const at::Tensor q = last_dim_contiguous(query_in);
  const at::Tensor k = last_dim_contiguous(key_in);
  const at::Tensor v = last_dim_contiguous(value_in);
  const at::Tensor go = last_dim_contiguous(grad_out_in);
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor delta = delta_in.contiguous();
  at::Tensor gq = at::empty(q.sizes(), q.options());
  at::Tensor gk = empty_output(k.sizes(), k.options());
  at::Tensor gv = empty_output(v.sizes(), v.options());
  BwdParams p;
  fill_fwd_params(p, q, k, v, jagged, d, scale);
  const at::ScalarType acc = accumulator_dtype(q.scalar_type());
  const at::Tensor b = fill_bias_params(p, bias, acc, jagged);
  // grad_bias accumulates per head (padded [B, Nb, H, L], jagged [T, Nb, H]): the spans of the
  // heads that share a bias entry each write their own, summed over the heads at the end.
  at::Tensor gb = at::empty({0}, q.options());
  if (bias.has_value()) {
    const int64_t nb = bias->size(1);
    gb = at::zeros(jagged ? at::IntArrayRef{d.L, nb, d.H} : at::IntArrayRef{d.B, nb, d.H, d.L},
                   q.options().dtype(acc));
    p.gbias = gb.data_ptr();
    p.gb_sn = gb.stride(1);
    p.gb_sh = gb.stride(2);
    p.gb_sb = jagged ? 0 : gb.stride(0);
    p.gb_sl = jagged ? gb.stride(0) : gb.stride(3);
  }
  if (d.B == 0) {
    gk.zero_();
    gv.zero_();
  } else {
    p.go = go.data_ptr();
    p.go_sb = go.stride(0);
    p.go_sn = go.stride(1);
    p.go_sh = go.stride(2);
    if (delta.scalar_type() == at::kDouble) {
      p.delta64 = delta.data_ptr<double>();
    } else {
      p.delta = delta.data_ptr<float>();
    }
    p.gk = gk.data_ptr();
    p.gv = gv.data_ptr();
    row_strides(gk, jagged, p.gk_sb, p.gk_sl, p.gk_sh);
    row_strides(gv, jagged, p.gv_sb, p.gv_sl, p.gv_sh);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_pool_bwd_cpu",
                                    [&] { bwd_impl<scalar_t>(p, rows, lse.data_ptr<float>(), gq); });
    if (jagged) {
      const int64_t end = rows.offsets[rows.B];
      if (end < d.L) {
        gk.narrow(0, end, d.L - end).zero_();
        gv.narrow(0, end, d.L - end).zero_();
      }
    }
  }
  if (bias.has_value()) {
    if (bias->size(2) == 1 && d.H > 1) gb = gb.sum(2, /*keepdim=*/true);
    gb = gb.to(bias->scalar_type());
  }
  return {gq, gk, gv, gb};
}

}  // namespace

// The forward of both layouts' ops: their checks, then fwd_common (round_p: the inference ops).
std::tuple<at::Tensor, at::Tensor> padded_fwd(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                              const std::optional<at::Tensor>& lengths,
                                              const std::optional<at::Tensor>& mask, double scale,
                                              const std::optional<at::Tensor>& bias, bool round_p) {
  const PoolDims d = check_padded_fwd(query, key, value, lengths, mask);
  check_bias(d, query, bias, /*jagged=*/false);
  return fwd_common(query, key, value, bias, d, padded_rows(d, lengths, mask), /*jagged=*/false, scale, round_p);
}

std::tuple<at::Tensor, at::Tensor> jagged_fwd(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                              const at::Tensor& offsets, int64_t max_length, double scale,
                                              const std::optional<at::Tensor>& bias, bool round_p) {
  const PoolDims d = check_jagged_fwd(query, key, value, offsets, max_length);
  check_bias(d, query, bias, /*jagged=*/true);
  return fwd_common(query, key, value, bias, d, jagged_rows(d, offsets, max_length), /*jagged=*/true, scale,
                    round_p);
}

}  // namespace cpu

std::tuple<at::Tensor, at::Tensor> attention_pool_fwd_cpu(const at::Tensor& query, const at::Tensor& key,
                                                          const at::Tensor& value,
                                                          const std::optional<at::Tensor>& lengths,
                                                          const std::optional<at::Tensor>& mask, double scale,
                                                          const std::optional<at::Tensor>& bias) {
  return cpu::padded_fwd(query, key, value, lengths, mask, scale, bias, /*round_p=*/false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_pool_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& mask, const at::Tensor& lse,
    const at::Tensor& delta, double scale, const std::optional<at::Tensor>& bias) {
  const PoolDims d = check_padded_fwd(query, key, value, lengths, mask);
  check_bias(d, query, bias, /*jagged=*/false);
  check_bwd_extras(d, query, grad_out, lse, delta);
  const cpu::Rows rows = cpu::padded_rows(d, lengths, mask);
  return cpu::bwd_common(grad_out, query, key, value, lse, delta, bias, d, rows, /*jagged=*/false, scale);
}

std::tuple<at::Tensor, at::Tensor> jagged_attention_pool_fwd_cpu(const at::Tensor& query, const at::Tensor& key,
                                                                 const at::Tensor& value, const at::Tensor& offsets,
                                                                 int64_t max_length, double scale,
                                                                 const std::optional<at::Tensor>& bias) {
  return cpu::jagged_fwd(query, key, value, offsets, max_length, scale, bias, /*round_p=*/false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jagged_attention_pool_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& offsets, int64_t max_length, const at::Tensor& lse, const at::Tensor& delta, double scale,
    const std::optional<at::Tensor>& bias) {
  const PoolDims d = check_jagged_fwd(query, key, value, offsets, max_length);
  check_bias(d, query, bias, /*jagged=*/true);
  check_bwd_extras(d, query, grad_out, lse, delta);
  const cpu::Rows rows = cpu::jagged_rows(d, offsets, max_length);
  return cpu::bwd_common(grad_out, query, key, value, lse, delta, bias, d, rows, /*jagged=*/true, scale);
}

// The inference ops: the forward's checks and results, with P V allowed to round P to the input
// dtype (FwdParams::round_p); no backward is registered for them.
std::tuple<at::Tensor, at::Tensor> attention_pool_infer_cpu(const at::Tensor& query, const at::Tensor& key,
                                                            const at::Tensor& value,
                                                            const std::optional<at::Tensor>& lengths,
                                                            const std::optional<at::Tensor>& mask, double scale,
                                                            const std::optional<at::Tensor>& bias) {
  return cpu::padded_fwd(query, key, value, lengths, mask, scale, bias, /*round_p=*/true);
}

std::tuple<at::Tensor, at::Tensor> jagged_attention_pool_infer_cpu(const at::Tensor& query, const at::Tensor& key,
                                                                   const at::Tensor& value,
                                                                   const at::Tensor& offsets, int64_t max_length,
                                                                   double scale,
                                                                   const std::optional<at::Tensor>& bias) {
  return cpu::jagged_fwd(query, key, value, offsets, max_length, scale, bias, /*round_p=*/true);
}

}  // namespace attnkern
