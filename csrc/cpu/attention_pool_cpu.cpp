// CPU launcher and registration of the four attnkern ops for the CPU dispatch key.
//
// Work decomposition: one task per (row, head); a task reads only the valid positions of its
// row (padded prefix, mask list or jagged slice) in one online-softmax pass. When there are
// few (row, head) tasks (a shape-only rule, so the result never depends on the thread count),
// long rows are cut into fixed-length slices computed in parallel and merged with their
// log-sum-exp in a fixed order. The backward is deterministic: each position belongs to one
// task, which writes its dk/dv; dq partials of a split row are summed in a fixed order.
//
// The arithmetic runs in kernel_{avx512,avx2,generic}.cpp; the best one this CPU supports is
// chosen at run time (ATTNKERN_CPU_ISA=generic|avx2|avx512|avx512_bf16|amx caps the choice, for testing;
// any other value is an error).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "attention_pool.h"
#include "host_buffers.h"
#include "register_attention_pool.h"
#include "kernel_common.h"
#include "tile_kernels.h"

namespace attnkern {
namespace cpu {

namespace {

// Rows with more valid positions than this are split when there are few (row, head) tasks.
constexpr int64_t kSplitLen = 512;
constexpr int64_t kSplitMaxTasks = 64;

// ATTNKERN_CPU_TILES=0 turns the tiled kernels off (read at every call, so that a benchmark can
// compare both paths in one process).
bool tiles_enabled() {
  const char* e = std::getenv("ATTNKERN_CPU_TILES");
  return !(e && e[0] == '0');
}

KernelTable with_tiles(KernelTable t, FwdFn fwd, BwdFn bwd, StatsFn stats, WorkspaceFn workspace,
                       const char* isa) {
  t.isa = isa;
  t.fwd_tile = fwd;
  t.bwd_tile = bwd;
  t.stats_tile = stats;
  t.workspace_tile = workspace;
  return t;
}

// Whether the (row, head) tasks of N queries take the tiled kernels of table kt.
bool use_tiles(const KernelTable& kt, int64_t N) { return N >= kTileMinQueries && kt.fwd_tile && tiles_enabled(); }

// Workspace elements for the kernels a call runs (general, or also the tiled ones).
int64_t workspace_for(const KernelTable& kt, bool tiles, int64_t N, int64_t Dk, int64_t Dv) {
  const int64_t w = kt.workspace(N, Dk, Dv);
  return tiles ? std::max(w, kt.workspace_tile(N, Dk, Dv)) : w;
}

// The instruction sets this CPU and build can run. The emulation test build
// (avx512_emulation.h) runs the AVX-512 kernels on any x86-64 CPU, emulated.
struct IsaSupport {
  bool avx2 = false, avx512 = false, avx512_bf16 = false, amx = false, emulated = false;
};

#if defined(__x86_64__) || defined(_M_X64)
// Linux hands a process the AMX tile data state only on request (arch_prctl
// ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); a tile instruction before that raises SIGILL.
// Asked once per process; false where the kernel refuses or is not Linux.
bool amx_permitted() {
  static const bool ok = [] {
#if defined(__linux__)
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return ok;
}
#endif

IsaSupport isa_support() {
  IsaSupport s;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  s.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#if defined(ATTNKERN_EMULATE_AVX512)
  s.avx512 = s.avx512_bf16 = s.amx = s.emulated = true;
#else
  s.avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma") && __builtin_cpu_supports("avx2");
  s.avx512_bf16 = s.avx512 && __builtin_cpu_supports("avx512bf16");
  s.amx = s.avx512_bf16 && __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
          amx_permitted();
#endif
#endif
  return s;
}

const KernelTable& simd_kernels() {
  static const KernelTable table = [] {
    const char* env = std::getenv("ATTNKERN_CPU_ISA");
    const std::string cap = env ? std::string(env) : std::string();
    TORCH_CHECK_VALUE(cap.empty() || cap == "generic" || cap == "avx2" || cap == "avx512" || cap == "avx512_bf16" ||
                          cap == "amx",
                      "attnkern: ATTNKERN_CPU_ISA must be generic, avx2, avx512, avx512_bf16 or amx (or unset), got '",
                      cap, "'");
    const IsaSupport s = isa_support();
#if defined(__x86_64__) || defined(_M_X64)
    // Emulated kernels only when asked for, so that the default stays the fastest real path.
    const bool ask512 = cap == "avx512" || cap == "avx512_bf16" || cap == "amx";
    if (s.amx && (cap == "amx" || (cap.empty() && !s.emulated)))
      return with_tiles(avx512_kernels(), &tile_fwd_amx, &tile_bwd_amx, &tile_stats_amx, &tile_workspace_amx,
                        s.emulated ? "amx-emulated" : "amx");
    if (s.avx512_bf16 && (cap == "avx512_bf16" || cap == "amx" || (cap.empty() && !s.emulated)))
      return with_tiles(avx512_kernels(), &tile_fwd_avx512_bf16, &tile_bwd_avx512_bf16, &tile_stats_avx512_bf16,
                        &tile_workspace_avx512_bf16, s.emulated ? "avx512_bf16-emulated" : "avx512_bf16");
    if (s.avx512 && (ask512 || (cap.empty() && !s.emulated)))
      return with_tiles(avx512_kernels(), &tile_fwd_avx512, &tile_bwd_avx512, &tile_stats_avx512,
                        &tile_workspace_avx512, s.emulated ? "avx512-emulated" : "avx512");
    if (s.avx2 && cap != "generic")
      return with_tiles(avx2_kernels(), &tile_fwd_avx2, &tile_bwd_avx2, &tile_stats_avx2, &tile_workspace_avx2,
                        "avx2");
#endif
    (void)s;
    return with_tiles(generic_kernels(), &tile_fwd_generic, &tile_bwd_generic, &tile_stats_generic,
                      &tile_workspace_generic, "generic");
  }();
  return table;
}

const KernelTable& kernels_for(int dtype) {
  static const KernelTable generic = generic_kernels();
  return dtype == kF64 ? generic : simd_kernels();
}

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

// Which positions of row b take part: padded rows [0, len) or a mask, jagged rows a slice.
struct Rows {
  int64_t B = 0;
  int64_t L = 0;                    // padded length (positions per row in key)
  const int64_t* lengths = nullptr;  // padded + lengths
  const bool* mask = nullptr;        // padded + mask, [B, L] contiguous
  const int64_t* offsets = nullptr;  // jagged
  at::Tensor keep_alive;

  int64_t start(int64_t b) const { return offsets ? offsets[b] : 0; }
  // Valid count; for a mask row also fills idx with the valid positions.
  int64_t count(int64_t b, std::vector<int64_t>* idx) const {
    if (offsets) return offsets[b + 1] - offsets[b];
    if (lengths) return lengths[b];
    if (mask) {
      const bool* m = mask + b * L;
      int64_t c = 0;
      if (idx) {
        idx->resize(L);
        for (int64_t l = 0; l < L; ++l)
          if (m[l]) (*idx)[c++] = l;
      } else {
        for (int64_t l = 0; l < L; ++l) c += m[l];
      }
      return c;
    }
    return L;
  }
};

Rows padded_rows(const PoolDims& d, const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& mask) {
  Rows r;
  r.B = d.B;
  r.L = d.L;
  if (lengths.has_value()) {
    check_lengths_values_cpu(*lengths, d.L);
    r.keep_alive = lengths->to(at::kLong).contiguous();
    r.lengths = r.keep_alive.data_ptr<int64_t>();
  } else if (mask.has_value()) {
    r.keep_alive = mask->contiguous();
    r.mask = r.keep_alive.data_ptr<bool>();
  }
  return r;
}

Rows jagged_rows(const PoolDims& d, const at::Tensor& offsets, int64_t max_length) {
  check_offsets_values_cpu(offsets, d.L, max_length);
  Rows r;
  r.B = d.B;
  r.L = d.L;
  r.keep_alive = offsets.to(at::kLong).contiguous();
  r.offsets = r.keep_alive.data_ptr<int64_t>();
  return r;
}

// A unit of parallel work: (row, head) task, and the slice [i0, i1) of its valid positions;
// for a mask row, l0 is the mask position of valid position i0 (so that an item's positions
// are found by scanning only its own part of the mask).
struct Item {
  int64_t task;
  int64_t i0, i1;
  int64_t l0;
};

// The split plan: empty when no row is split (then items are the tasks themselves).
// float64 rows are never split: their backward recomputes the softmax statistics over the
// whole row.
std::vector<Item> split_plan(const Rows& rows, int64_t H, int dtype) {
  std::vector<Item> items;
  if (rows.B * H > kSplitMaxTasks || dtype == kF64) return items;
  bool any = false;
  std::vector<int64_t> counts(rows.B);
  for (int64_t b = 0; b < rows.B; ++b) {
    counts[b] = rows.count(b, nullptr);
    any = any || counts[b] > kSplitLen;
  }
  if (!any) return items;
  std::vector<int64_t> piece_l0;  // mask position where each piece of the row starts
  for (int64_t b = 0; b < rows.B; ++b) {
    const int64_t c = counts[b];
    piece_l0.clear();
    if (rows.mask) {  // one scan of the row's mask
      const bool* m = rows.mask + b * rows.L;
      for (int64_t l = 0, v = 0; l < rows.L; ++l)
        if (m[l] && v++ % kSplitLen == 0) piece_l0.push_back(l);
    }
    for (int64_t h = 0; h < H; ++h) {
      if (c == 0) items.push_back({b * H + h, 0, 0, 0});
      for (int64_t i0 = 0, k = 0; i0 < c; i0 += kSplitLen, ++k)
        items.push_back({b * H + h, i0, std::min(c, i0 + kSplitLen), rows.mask ? piece_l0[k] : 0});
    }
  }
  return items;
}

// The order in which the split items run: within a row, piece by piece, and for each piece
// every head in turn. In the padded [B, L, H, D] and jagged [T, H, D] layouts the heads of a
// position are neighbours in memory, so the H items of one piece together read one contiguous
// stretch of K and V (a head alone reads D of every H * D elements: a strided stream that ran
// at about half the memory bandwidth). The merge still finds a task's items contiguous in
// `items` (the plan's order: row, head, piece).
std::vector<int64_t> execution_order(const std::vector<Item>& items, int64_t H) {
  std::vector<int64_t> order;
  order.reserve(items.size());
  for (size_t r0 = 0; r0 < items.size();) {  // the items of one row: H runs of equal length
    const int64_t b = items[r0].task / H;
    size_t r1 = r0;
    while (r1 < items.size() && items[r1].task / H == b) ++r1;
    const size_t pieces = (r1 - r0) / size_t(H);
    for (size_t k = 0; k < pieces; ++k)
      for (int64_t h = 0; h < H; ++h) order.push_back(int64_t(r0 + size_t(h) * pieces + k));
    r0 = r1;
  }
  return order;
}

// Whether each position's K rows of all heads (and its V rows) lie back to back in memory, so
// that the first head of a split piece can prefetch them all in one stream.
bool heads_are_neighbours(const FwdParams& p) {
  return p.H > 1 && p.k_sh == p.Dk && p.v_sh == p.Dv && p.k_sl == p.H * p.Dk && p.v_sl == p.H * p.Dv;
}

int64_t grain_for(int64_t per_task_cost) {
  return std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(1, per_task_cost));
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
  if (jagged) {
    p.k_sb = 0, p.k_sl = k.stride(0), p.k_sh = k.stride(1);
    p.v_sb = 0, p.v_sl = v.stride(0), p.v_sh = v.stride(1);
  } else {
    p.k_sb = k.stride(0), p.k_sl = k.stride(1), p.k_sh = k.stride(2);
    p.v_sb = v.stride(0), p.v_sl = v.stride(1), p.v_sh = v.stride(2);
  }
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

// Runs f(t, span) for the (row, head) tasks [t0, t1) in order, span = the task's valid
// positions. Before each task runs, the first rows of the next one are prefetched, so that they
// arrive while this one computes (the kernels prefetch the rest of a task as they go). Mask rows
// are left to the kernels: their positions are known only when the row starts.
// With step = H (t0 a multiple of H), one call per row, its span at head 0 (p.heads = H).
template <class F>
void for_each_task(const FwdParams& p, const Rows& rows, int64_t t0, int64_t t1, int64_t step, F&& f) {
  const int64_t H = p.H;
  auto prefetch = [&](int64_t t) {
    const int64_t b = t / H;
    if (!rows.mask) prefetch_span_head(p, Span{b, t % H, rows.start(b), rows.count(b, nullptr), nullptr});
  };
  std::vector<int64_t> idx;
  int64_t idx_row = -1, cnt = 0;
  for (int64_t t = t0; t < t1; t += step) {
    const int64_t b = t / H;
    if (b != idx_row) {
      cnt = rows.count(b, &idx);
      idx_row = b;
    }
    if (t == t0) prefetch(t);
    if (t + step < t1) prefetch(t + step);
    f(t, Span{b, t % H, rows.start(b), cnt, rows.mask ? idx.data() : nullptr});
  }
}

// Runs f(j, span) for the split items order[j] (execution_order), j = j0, j0 + step, ... < j1:
// span = positions [it.i0, it.i1) of the item's task. Before each item runs, the first rows of
// the next one are prefetched (of every head when p.heads says so): the kernels
// prefetch only inside their own span, so each piece would otherwise start on cold memory.
template <class F>
void for_each_item(const FwdParams& p, const Rows& rows, const std::vector<Item>& items,
                   const std::vector<int64_t>& order, int64_t j0, int64_t j1, int64_t step, F&& f) {
  const int64_t H = p.H;
  std::vector<int64_t> idx;
  auto span_of = [&](const Item& it, int64_t n) {
    // A piece that starts a row and is shorter than a split is the whole row.
    return Span{it.task / H, it.task % H, rows.start(it.task / H) + (rows.mask ? 0 : it.i0), n,
                rows.mask ? idx.data() : nullptr, it.i0 == 0 && it.i1 < kSplitLen};
  };
  auto prefetch = [&](int64_t j) {
    const Item& it = items[order[j]];
    if (!rows.mask && it.i1 > it.i0) prefetch_span_head(p, span_of(it, it.i1 - it.i0));
  };
  for (int64_t j = j0; j < j1; j += step) {
    if (j == j0) prefetch(j);
    if (j + step < j1) prefetch(j + step);
    const Item& it = items[order[j]];
    const int64_t b = it.task / H;
    const int64_t n = it.i1 - it.i0;
    if (rows.mask) {  // this item's positions only: its part of the mask, from l0
      idx.resize(std::max<int64_t>(n, 1));
      const bool* m = rows.mask + b * rows.L;
      for (int64_t l = it.l0, c = 0; c < n; ++l)
        if (m[l]) idx[c++] = l;
    }
    f(j, span_of(it, n));
  }
}

template <class A>
A shift_of_host(A m) {  // as shift_of in kernel_impl.h: the shift the kernels subtracted
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
  // no merge pass and one parallel region.
  const int64_t qchunks = tiles ? tile_query_chunks(N, ntasks) : 1;
  if (!items.empty() && qchunks > 1) {
    const int64_t qn = (N + qchunks - 1) / qchunks;
    const int64_t es = int64_t(sizeof(scalar_t));
    at::parallel_for(0, ntasks * qchunks, 1, [&](int64_t i0, int64_t i1) {
      std::vector<A> ws(ws_n), acc(qn * Dv), m(qn), l(qn);
      std::vector<int64_t> idx;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t t = i / qchunks, n0 = (i % qchunks) * qn, nq = std::min(qn, N - n0);
        if (nq <= 0) continue;
        const int64_t b = t / H;
        const int64_t cnt = rows.count(b, &idx);
        FwdParams pc = p;
        pc.q = static_cast<const char*>(p.q) + n0 * p.q_sn * es;
        pc.N = nq;
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
                                              const at::Tensor& value_in, const PoolDims& d, const Rows& rows,
                                              bool jagged, double scale) {
  TORCH_CHECK_VALUE(std::isfinite(scale), "attnkern: scale must be finite, got ", scale);
  const at::Tensor q = last_dim_contiguous(query_in);
  const at::Tensor k = last_dim_contiguous(key_in);
  const at::Tensor v = last_dim_contiguous(value_in);
  at::Tensor out = at::empty({d.B, d.N, d.H, d.Dv}, q.options().dtype(accumulator_dtype(q.scalar_type())));
  at::Tensor lse = at::empty({d.B, d.N, d.H}, q.options().dtype(at::kFloat));
  if (d.B == 0) return {out, lse};
  FwdParams p;
  fill_fwd_params(p, q, k, v, jagged, d, scale);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_common(const at::Tensor& grad_out_in, const at::Tensor& query_in,
                                                          const at::Tensor& key_in, const at::Tensor& value_in,
                                                          const at::Tensor& lse_in, const at::Tensor& delta_in,
                                                          const PoolDims& d, const Rows& rows, bool jagged,
                                                          double scale) {
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
  if (d.B == 0) {
    gk.zero_();
    gv.zero_();
    return {gq, gk, gv};
  }
  BwdParams p;
  fill_fwd_params(p, q, k, v, jagged, d, scale);
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
  if (jagged) {
    p.gk_sb = 0, p.gk_sl = gk.stride(0), p.gk_sh = gk.stride(1);
    p.gv_sb = 0, p.gv_sl = gv.stride(0), p.gv_sh = gv.stride(1);
  } else {
    p.gk_sb = gk.stride(0), p.gk_sl = gk.stride(1), p.gk_sh = gk.stride(2);
    p.gv_sb = gv.stride(0), p.gv_sl = gv.stride(1), p.gv_sh = gv.stride(2);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_pool_bwd_cpu",
                                  [&] { bwd_impl<scalar_t>(p, rows, lse.data_ptr<float>(), gq); });
  if (jagged) {
    const int64_t end = rows.offsets[rows.B];
    if (end < d.L) {
      gk.narrow(0, end, d.L - end).zero_();
      gv.narrow(0, end, d.L - end).zero_();
    }
  }
  return {gq, gk, gv};
}

}  // namespace
}  // namespace cpu

const char* cpu_isa() { return cpu::simd_kernels().isa; }

std::vector<std::string> cpu_isas() {
  const cpu::IsaSupport s = cpu::isa_support();
  const std::string tag = s.emulated ? "-emulated" : "";
  std::vector<std::string> r{"generic"};
  if (s.avx2) r.push_back("avx2");
  if (s.avx512) r.push_back("avx512" + tag);
  if (s.avx512_bf16) r.push_back("avx512_bf16" + tag);
  if (s.amx) r.push_back("amx" + tag);
  return r;
}

// ---------------------------------------------------------------------------------------------
// Registered ops

std::tuple<at::Tensor, at::Tensor> attention_pool_fwd_cpu(const at::Tensor& query, const at::Tensor& key,
                                                          const at::Tensor& value,
                                                          const std::optional<at::Tensor>& lengths,
                                                          const std::optional<at::Tensor>& mask, double scale) {
  const PoolDims d = check_padded_fwd(query, key, value, lengths, mask);
  const cpu::Rows rows = cpu::padded_rows(d, lengths, mask);
  return cpu::fwd_common(query, key, value, d, rows, /*jagged=*/false, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_pool_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& mask, const at::Tensor& lse,
    const at::Tensor& delta, double scale) {
  const PoolDims d = check_padded_fwd(query, key, value, lengths, mask);
  check_bwd_extras(d, query, grad_out, lse, delta);
  const cpu::Rows rows = cpu::padded_rows(d, lengths, mask);
  return cpu::bwd_common(grad_out, query, key, value, lse, delta, d, rows, /*jagged=*/false, scale);
}

std::tuple<at::Tensor, at::Tensor> jagged_attention_pool_fwd_cpu(const at::Tensor& query, const at::Tensor& key,
                                                                 const at::Tensor& value, const at::Tensor& offsets,
                                                                 int64_t max_length, double scale) {
  const PoolDims d = check_jagged_fwd(query, key, value, offsets, max_length);
  const cpu::Rows rows = cpu::jagged_rows(d, offsets, max_length);
  return cpu::fwd_common(query, key, value, d, rows, /*jagged=*/true, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jagged_attention_pool_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& offsets, int64_t max_length, const at::Tensor& lse, const at::Tensor& delta, double scale) {
  const PoolDims d = check_jagged_fwd(query, key, value, offsets, max_length);
  check_bwd_extras(d, query, grad_out, lse, delta);
  const cpu::Rows rows = cpu::jagged_rows(d, offsets, max_length);
  return cpu::bwd_common(grad_out, query, key, value, lse, delta, d, rows, /*jagged=*/true, scale);
}

}  // namespace attnkern

// Under the CPU key, and under the sparse, mkldnn and nested CPU keys (register_attention_pool.h).
#define ATTNKERN_CPU_POOL(KEY)                                                            \
  ATTNKERN_REGISTER_POOL(KEY, ATTNKERN_OP_NAME, attnkern::attention_pool_fwd_cpu,          \
                         attnkern::attention_pool_bwd_cpu,                                 \
                         attnkern::jagged_attention_pool_fwd_cpu,                          \
                         attnkern::jagged_attention_pool_bwd_cpu)
ATTNKERN_CPU_POOL(CPU)
ATTNKERN_CPU_POOL(SparseCPU)
ATTNKERN_CPU_POOL(SparseCsrCPU)
ATTNKERN_CPU_POOL(MkldnnCPU)
ATTNKERN_CPU_POOL(NestedTensorCPU)
#undef ATTNKERN_CPU_POOL
