// Plain-data interface between the CPU launcher and the per-ISA kernel translation units.
//
// This header must stay free of torch/STL headers and of inline functions: it is included by
// translation units compiled under `#pragma GCC target("avx512f,...")`, and an inline function
// defined there could be emitted as an AVX-512 COMDAT copy that the linker then picks for
// baseline code (an illegal instruction on older CPUs).
#pragma once

#include <stdint.h>

#include "elem_types.h"

namespace attnkern {
namespace cpu {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// Strides are in elements; the last (head-dim) stride is always 1.
// Row b of a padded layout starts at key + b * k_sb (start = 0); a jagged row starts at
// key + start * k_sl with k_sb = 0.
struct FwdParams {
  int dtype = kF32;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_sb = 0, q_sn = 0, q_sh = 0;
  int64_t k_sb = 0, k_sl = 0, k_sh = 0;
  int64_t v_sb = 0, v_sl = 0, v_sh = 0;
  int64_t N = 1, H = 1, Dk = 1, Dv = 1;
  double scale = 1.0;
  int64_t prefetch = 0;  // valid positions ahead whose K/V rows are prefetched (0: none)
  // Heads a span covers, from its head s.h on (forward, general kernels only): outputs are
  // stacked per head (acc [heads, N, Dv], m and l [heads, N]), and the prefetches ask for the
  // rows of all of them. 1 for the tiled kernels.
  int64_t heads = 1;
  // Score bias added to the logit, in the accumulator type (float, double for kF64), or null.
  // Query n (n0 + n of the call: a task may hold a chunk of its queries), head h, position pos
  // (the row's start plus the span index, as for K) reads
  // bias[b * bias_sb + pos * bias_sl + ((n0 + n) % bias_nb) * bias_sn + h * bias_sh]
  // (bias_sh = 0: one bias for every head).
  const void* bias = nullptr;
  int64_t bias_sb = 0, bias_sl = 0, bias_sn = 0, bias_sh = 0, bias_nb = 1;
  int64_t n0 = 0;
  // The inference op (no backward will read this forward's out): the tiled kernels may round
  // the probabilities to the input dtype for O += P V where that runs the product at the bf16
  // rate (avx512_bf16, amx on bf16 inputs); every other path ignores it.
  bool round_p = false;
};

struct BwdParams : FwdParams {
  const void* go = nullptr;  // grad_out [B, N, H, Dv]
  int64_t go_sb = 0, go_sn = 0, go_sh = 0;
  // Per (b, n, h) row r: shift[2r] = the logit shift m, shift[2r + 1] = log2 of the softmax sum
  // after it, so that p = 2^((s - m) log2(e) - shift[2r + 1]) for the logit s = scale * q.k. Accumulator precision (float,
  // double for kF64). The launcher derives it from the forward's lse, or recomputes it
  // (stats below) where that float32 lse cannot resolve the logits.
  const void* shift = nullptr;
  const float* delta = nullptr;  // [B, N, H] contiguous
  const double* delta64 = nullptr;  // the same, for float64 inputs (then delta is null)
  void* gk = nullptr;            // grad_key, dtype of key, written at the span's positions only
  void* gv = nullptr;
  int64_t gk_sb = 0, gk_sl = 0, gk_sh = 0;
  int64_t gv_sb = 0, gv_sl = 0, gv_sh = 0;
  // grad_bias accumulators (accumulator type; with bias only), laid out as the bias with one
  // entry per head: each span adds d(logit) of its positions (summed over the queries that share
  // a bias row, in query order) to its head's entries, which the launcher zeroed first. A
  // position belongs to one span, so every entry has one writer: no atomics, a fixed order.
  void* gbias = nullptr;
  int64_t gb_sb = 0, gb_sl = 0, gb_sn = 0, gb_sh = 0;
};

// The valid positions of one (row, head) task, or a slice of them:
// position i (0 <= i < count) is start + (idx ? idx[i] : i). 64-bit positions: a mask row
// may be longer than 2^31.
struct Span {
  int64_t b = 0;
  int64_t h = 0;
  int64_t start = 0;
  int64_t count = 0;
  const int64_t* idx = nullptr;
  bool whole = true;  // every valid position of the row (false: a piece of a split row)
};

// Forward over one span: unnormalised acc [N, Dv] = sum_l exp(s_l - m) v_l, running max m [N]
// of the logits s = scale * q.k and l [N] = sum_l exp(s_l - m) (m is the shift actually used:
// the kernels subtract 0 instead when m is infinite). An empty span gives
// acc = 0, m = -inf, l = 0. acc/m/l are float (double for kF64).
typedef void (*FwdFn)(const FwdParams& p, const Span& s, void* ws, void* acc, void* m, void* l);
// Backward over one span: writes grad_key/grad_value at the span's positions and
// dq [N, Dk] (float, or double for kF64) = scale * sum_l ds_l k_l over the span.
typedef void (*BwdFn)(const BwdParams& p, const Span& s, void* ws, void* dq);
// Softmax statistics of a span with the backward's logits: m [N] (max) and
// l [N] = sum_l exp(s_l - m) (float, or double for kF64).
typedef void (*StatsFn)(const FwdParams& p, const Span& s, void* ws, void* m, void* l);
// Workspace (in accumulator elements: float, or double for kF64) that the kernels need.
typedef int64_t (*WorkspaceFn)(int64_t N, int64_t Dk, int64_t Dv);

// Zeroes `bytes` bytes with streaming stores where aligned (gradients of padded positions).
typedef void (*ZeroFn)(void* p, int64_t bytes);

struct KernelTable {
  FwdFn fwd;
  BwdFn bwd;
  StatsFn stats;
  ZeroFn zero;
  WorkspaceFn workspace;
  // Tiled kernels for many queries per history (attention_pool_tile_kernels.h); null where there are none.
  // stats_tile scores as bwd_tile does; workspace_tile sizes their workspace.
  FwdFn fwd_tile = nullptr;
  BwdFn bwd_tile = nullptr;
  StatsFn stats_tile = nullptr;
  WorkspaceFn workspace_tile = nullptr;
};

// Prefetches the K/V rows of the first p.prefetch positions of span s (portable code: the
// launcher calls it for the task that runs next, so that its rows arrive during this one).
void prefetch_span_head(const FwdParams& p, const Span& s);

// Portable kernels (scalar, auto-vectorised): every dtype, and the only float64 path.
KernelTable generic_kernels();
#if defined(__x86_64__) || defined(_M_X64)
KernelTable avx2_kernels();    // needs avx2, fma, f16c
KernelTable avx512_kernels();  // needs avx512f, avx512bw, avx512vl, avx512dq, fma
#endif

// The launcher's side (attention_pool_dispatch.cpp): the table of a call with inputs of dtype
// (the selected instruction set's, or the generic one for kF64); whether its tasks of N queries
// take the tiled kernels; and the workspace elements of the kernels it runs.
const KernelTable& kernels_for(int dtype);
bool use_tiles(const KernelTable& kt, int64_t N);
int64_t workspace_for(const KernelTable& kt, bool tiles, int64_t N, int64_t Dk, int64_t Dv);

// delta of M rows whose every valid key is in this block (a short row, whole in its span); the
// tiled backward and the general one (attention_pool_impl.h) both take it.
// The autograd's delta, rowsum(dO * O) in float64 from the forward's output, equals
// sum_j p_j dP_j only up to the rounding of the kernel's fp32 dot products dP; dS = p (dP - delta)
// keeps that rounding where the true dS cancels (a softmax over one key is constant: dS = 0),
// and dK sums it over every query. The kernel's own sum cancels as a softmax backward does
// (the reference's): it replaces delta where the two differ by no more than that rounding can,
// |dP_j error| <= Dv eps |dO| |v_j| (and the output's rounding, (nb + 2) eps |dO| sum p |v|).
// A delta further off holds a gradient of the log-sum-exp (delta = rowsum(dO * O) - dLSE) and
// is kept. NaN anywhere: kept (the comparison fails).
inline void bwd_own_delta(int M, const float* S, const float* dP, int64_t ss, int nb, int64_t Dv, const float* vn,
                          const float* dn, const float* dl, float* out) {
  constexpr double kEps = 5.9604644775390625e-08;  // 2^-24, fp32's unit roundoff
  for (int r = 0; r < M; ++r) {
    double sum = 0.0, mass = 0.0;
    for (int j = 0; j < nb; ++j) {
      sum += double(S[r * ss + j]) * double(dP[r * ss + j]);
      mass += double(S[r * ss + j]) * double(vn[j]);
    }
    const double off = __builtin_fabs(sum - double(dl[r]));
    const double tol = double(Dv + nb + 4) * kEps * double(dn[r]) * mass + kEps * __builtin_fabs(double(dl[r]));
    out[r] = off <= tol ? float(sum) : dl[r];
  }
}

// Euclidean norms of n rows of D elements (row stride ld).
inline void row_norms(int n, const float* x, int64_t ld, int64_t D, float* out) {
  for (int i = 0; i < n; ++i) {
    double s = 0.0;
    for (int64_t d = 0; d < D; ++d) s += double(x[i * ld + d]) * double(x[i * ld + d]);
    out[i] = float(__builtin_sqrt(s));
  }
}

}  // namespace cpu
}  // namespace attnkern
