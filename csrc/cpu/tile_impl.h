// Tiled CPU kernels for many queries per history, written once over a vector class `V` and
// included by tile_{avx512,avx2,generic}.cpp after each defines its `V`. Everything here has
// internal linkage (anonymous namespace), so the per-ISA copies are never merged by the linker.
//
// V provides: W (fp32 lanes), MR (query rows of a tile), NV (key vectors of a panel: NR = NV * W
// keys), CG (value chunks of W per register block), KB (keys of a block); zero, set1, load and
// store of float, load of bf16_t/fp16_t (W elements), to_f32/from_f32 (one element of any input
// type), + - *, fma, max, hmax, hsum, mask_tail(n) (lanes >= n set to -inf) and exp2 (exactly 0
// below -126 and for -inf, NaN for NaN).
//
// Shape of the work, per span (the valid positions of one (row, head), or a slice of them):
// the keys are taken KB at a time; a block's keys are converted to fp32 once, transposed into
// panels of NR keys (Kt[panel][d][NR]), and its values into fp32 rows. Every tile of MR queries
// then runs against the block as small GEMMs whose accumulators live in registers: the scores
// S = Qs Kt (MR x NV vectors per panel), the online softmax per query row on the block (one
// max and one rescale decision per row and block), and O += P V (MR x CG vectors at a time).
// The backward recomputes S with the same code and the same pre-scaled queries (so the logits
// round exactly as in the forward), and forms dP = dO Vt, dS, dQ += dS K and the block's
// dK += dS^T Q, dV += P^T dO (register-blocked rank-MR updates), written once per key.
#pragma once

#include "kernel_common.h"
#include "tile_kernels.h"

namespace attnkern {
namespace cpu {
namespace {

constexpr double kTileLog2e = 1.4426950408889634;
// A row's running max moves only when a block's max exceeds it by more than 2^8 (see
// kLazyLog2 in kernel_impl.h): probabilities stay <= 2^8 and the common case is no rescale.
constexpr float kTileLazyLog2 = 8.0f;

template <int M>
struct IntC {
  static constexpr int value = M;
};

// Calls f(IntC<m>{}) for 1 <= m <= M.
template <int M, class F>
inline void with_rows(int m, F&& f) {
  if constexpr (M >= 1) {
    if (m == M) {
      f(IntC<M>{});
      return;
    }
    with_rows<M - 1>(m, f);
  }
}

inline int64_t tile_ceil(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t span_pos(const Span& s, int64_t i) { return s.start + (s.idx ? int64_t(s.idx[i]) : i); }
inline float neg_inff() { return -__builtin_inff(); }

// One input row (D elements of type T) as fp32, zero-padded to Dp.
template <class V, class T>
inline void row_f32(const T* src, int64_t D, int64_t Dp, float* dst) {
  int64_t d = 0;
  for (; d + V::W <= D; d += V::W) V::load(src + d).store(dst + d);
  for (; d < D; ++d) dst[d] = V::to_f32(src[d]);
  for (; d < Dp; ++d) dst[d] = 0.f;
}

// Keys [i0, i0 + nb) of the span, rows of `base` (stride sl, D elements), packed as fp32
// rows pr[j][Dp] (zero rows past nb, up to the last panel's end) and, if pk is given, also
// transposed into panels pk[panel][d][NR] (zero past nb), W rows at a time by
// V::transpose_rows.
template <class V, class T>
inline void pack_block(const Span& s, int64_t i0, int nb, const T* base, int64_t sl, int64_t D, int64_t Dp,
                       float* pk, float* pr) {
  constexpr int NR = V::NV * V::W;
  const int nk = int(tile_ceil(nb, NR) * NR);
  for (int j = 0; j < nk; ++j) {
    float* row = pr + int64_t(j) * Dp;
    if (j < nb) {
      row_f32<V>(base + span_pos(s, i0 + j) * sl, D, Dp, row);
    } else {
      for (int64_t d = 0; d < Dp; ++d) row[d] = 0.f;
    }
  }
  if (pk)
    for (int j = 0; j < nk; j += V::W)
      V::template transpose_rows<NR>(pr + int64_t(j) * Dp, Dp, D, pk + int64_t(j / NR) * D * NR + (j % NR));
}

// Asks for the rows of keys [i0, i0 + nb) of the span (D elements of type T each) ahead of
// use: a history's rows are short and strided (the heads are interleaved), which the hardware
// prefetchers follow poorly, so the next block is requested while this one computes.
template <class T>
inline void prefetch_block(const Span& s, int64_t i0, int nb, const T* base, int64_t sl, int64_t D) {
  const int64_t bytes = D * int64_t(sizeof(T));
  for (int j = 0; j < nb; ++j) {
    const char* r = reinterpret_cast<const char*>(base + span_pos(s, i0 + j) * sl);
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(r + o, 0, 3);
  }
}

// Scores of M query rows (x, row stride xs, D elements, fp32) against one panel pk[d][NR]:
// S[r][0:NR] = sum_d x[r][d] * pk[d][:], summed in order d = 0, 1, ... by one FMA chain per
// lane (the forward and the backward both score through here, so they round identically).
// Lanes >= valid are set to -inf; vmax[r] (if given) takes the lane-wise max.
template <class V, int M>
inline void qk_panel(const float* x, int64_t xs, const float* pk, int64_t D, int valid, float* S, int64_t ss,
                     V* vmax) {
  constexpr int NV = V::NV, W = V::W, NR = NV * W;
  V acc[M][NV];
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = V::zero();
  for (int64_t d = 0; d < D; ++d) {
    V k[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) k[v] = V::load(pk + d * NR + v * W);
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      const V b = V::set1(x[r * xs + d]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(b, k[v], acc[r][v]);
    }
  }
  if (valid < NR) {
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = acc[r][v].mask_tail(valid - v * W);
  }
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      acc[r][v].store(S + r * ss + v * W);
      if (vmax) vmax[r] = V::max(vmax[r], acc[r][v]);
    }
}

// Y[r][0:CG*W] += sum_{j < nk} P[r][j] * X[j][0:CG*W] for M rows: O += P V (forward) and
// dQ += dS K (backward). X rows have stride xs, P rows ps, Y rows ys.
template <class V, int M, int CG>
inline void pv_cols(const float* P, int64_t ps, const float* X, int64_t xs, int nk, float* Y, int64_t ys) {
  constexpr int W = V::W;
  V acc[M][CG];
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r)
#pragma GCC unroll 4
    for (int g = 0; g < CG; ++g) acc[r][g] = V::load(Y + r * ys + g * W);
  for (int j = 0; j < nk; ++j) {
    V x[CG];
#pragma GCC unroll 4
    for (int g = 0; g < CG; ++g) x[g] = V::load(X + int64_t(j) * xs + g * W);
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      const V b = V::set1(P[r * ps + j]);
#pragma GCC unroll 4
      for (int g = 0; g < CG; ++g) acc[r][g] = V::fma(b, x[g], acc[r][g]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r)
#pragma GCC unroll 4
    for (int g = 0; g < CG; ++g) acc[r][g].store(Y + r * ys + g * W);
}

template <class V, int M>
inline void pv_all(const float* P, int64_t ps, const float* X, int64_t xs, int nk, float* Y, int64_t ys, int64_t Dp) {
  constexpr int W = V::W, CG = V::CG;
  int64_t c = 0;
  for (; c + CG * W <= Dp; c += CG * W) pv_cols<V, M, CG>(P, ps, X + c, xs, nk, Y + c, ys);
  for (; c < Dp; c += W) pv_cols<V, M, 1>(P, ps, X + c, xs, nk, Y + c, ys);
}

// Y[j][0:CG*W] += sum_{r < M} P[r][j] * X[r][0:CG*W] for keys j < nk: the block's
// dV += P^T dO and dK += dS^T Q, with the M x CG vectors of X held in registers.
template <class V, int M, int CG>
inline void rank_cols(const float* P, int64_t ps, const float* X, int64_t xs, int nk, float* Y, int64_t ys) {
  constexpr int W = V::W;
  V x[M][CG];
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r)
#pragma GCC unroll 4
    for (int g = 0; g < CG; ++g) x[r][g] = V::load(X + r * xs + g * W);
  for (int j = 0; j < nk; ++j) {
    V y[CG];
#pragma GCC unroll 4
    for (int g = 0; g < CG; ++g) y[g] = V::load(Y + int64_t(j) * ys + g * W);
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      const V b = V::set1(P[r * ps + j]);
#pragma GCC unroll 4
      for (int g = 0; g < CG; ++g) y[g] = V::fma(b, x[r][g], y[g]);
    }
#pragma GCC unroll 4
    for (int g = 0; g < CG; ++g) y[g].store(Y + int64_t(j) * ys + g * W);
  }
}

template <class V, int M>
inline void rank_all(const float* P, int64_t ps, const float* X, int64_t xs, int nk, float* Y, int64_t ys,
                     int64_t Dp) {
  constexpr int W = V::W, CG = V::CG;
  int64_t c = 0;
  for (; c + CG * W <= Dp; c += CG * W) rank_cols<V, M, CG>(P, ps, X + c, xs, nk, Y + c, ys);
  for (; c < Dp; c += W) rank_cols<V, M, 1>(P, ps, X + c, xs, nk, Y + c, ys);
}

// Workspace layout shared by the forward and the backward (float elements).
struct TileDims {
  int64_t Dk, Dv, Dkp, Dvp;
};

template <class V>
inline TileDims tile_dims(const FwdParams& p) {
  constexpr int W = V::W;
  return {p.Dk, p.Dv, tile_ceil(p.Dk, W) * W, tile_ceil(p.Dv, W) * W};
}

// Pre-scaled queries: fl32(fl32(q) * fl32(scale * log2 e)), the same in forward and backward.
template <class V, class T>
inline void load_scaled_queries(const FwdParams& p, const Span& s, const TileDims& t, float* qs, float* qf) {
  const T* q = static_cast<const T*>(p.q) + s.b * p.q_sb + s.h * p.q_sh;
  const float c2 = float(p.scale * kTileLog2e);
  for (int64_t n = 0; n < p.N; ++n) {
    float* row = qs + n * t.Dkp;
    row_f32<V>(q + n * p.q_sn, t.Dk, t.Dkp, row);
    if (qf)
      for (int64_t d = 0; d < t.Dkp; ++d) qf[n * t.Dkp + d] = row[d];
    for (int64_t d = 0; d < t.Dkp; ++d) row[d] = row[d] * c2;
  }
}

// ---------------------------------------------------------------------------------------------
// Forward

// One tile of M query rows against one packed block of nb keys (np panels).
template <class V, int M>
inline void fwd_tile_rows(const float* qs, int64_t Dkp, const float* kt, int64_t Dk, const float* vp, int64_t Dvp,
                          int nb, float* S, float* O, float* mm, float* ll) {
  constexpr int W = V::W, NR = V::NV * V::W, KB = V::KB;
  const int np = int(tile_ceil(nb, NR)), nk = np * NR;
  V vmax[M];
  for (int r = 0; r < M; ++r) vmax[r] = V::set1(neg_inff());
  for (int pn = 0; pn < np; ++pn) {
    const int valid = nb - pn * NR < NR ? nb - pn * NR : NR;
    qk_panel<V, M>(qs, Dkp, kt + int64_t(pn) * Dk * NR, Dk, valid, S + pn * NR, KB, vmax);
  }
  for (int r = 0; r < M; ++r) {
    const float bmax = vmax[r].hmax();
    float m = mm[r];
    if (bmax > m + kTileLazyLog2) {
      const float alpha = __builtin_exp2f(m - bmax);  // 0 on the first block
      ll[r] *= alpha;
      float* o = O + r * Dvp;
      const V a = V::set1(alpha);
      for (int64_t c = 0; c < Dvp; c += W) (V::load(o + c) * a).store(o + c);
      m = mm[r] = bmax;
    }
    // m = -inf: no finite score yet; -inf scores then give 0, NaN ones NaN.
    const V mv = V::set1(m == neg_inff() ? 0.f : m);
    V sum = V::zero();
    float* sr = S + r * KB;
    for (int j = 0; j < nk; j += W) {
      const V pr = V::exp2(V::load(sr + j) - mv);
      sum = sum + pr;
      pr.store(sr + j);
    }
    ll[r] += sum.hsum();
  }
  pv_all<V, M>(S, KB, vp, Dvp, nk, O, Dvp, Dvp);
}

template <class V, class T>
void tile_fwd_span(const FwdParams& p, const Span& s, float* ws, float* acc_out, float* m_out, float* l_out) {
  constexpr int NR = V::NV * V::W, KB = V::KB, MR = V::MR;
  const TileDims t = tile_dims<V>(p);
  const int64_t N = p.N;
  float* qs = ws;
  float* O = qs + N * t.Dkp;
  float* mm = O + N * t.Dvp;
  float* ll = mm + N;
  float* kt = ll + N;            // [KB / NR][Dk][NR]
  float* vp = kt + KB * t.Dk;    // [KB][Dvp]
  float* S = vp + KB * t.Dvp;    // [MR][KB]
  float* kr = S + MR * KB;       // [KB][Dkp]: the key block as rows, before the transpose
  load_scaled_queries<V, T>(p, s, t, qs, nullptr);
  for (int64_t i = 0; i < N * t.Dvp; ++i) O[i] = 0.f;
  for (int64_t n = 0; n < N; ++n) {
    mm[n] = neg_inff();
    ll[n] = 0.f;
  }
  const auto* kb = static_cast<const T*>(p.k) + s.b * p.k_sb + s.h * p.k_sh;
  const auto* vb = static_cast<const T*>(p.v) + s.b * p.v_sb + s.h * p.v_sh;
  for (int64_t i0 = 0; i0 < s.count; i0 += KB) {
    const int nb = int(s.count - i0 < KB ? s.count - i0 : KB);
    if (i0 == 0) {
      prefetch_block(s, 0, nb, kb, p.k_sl, t.Dk);
      prefetch_block(s, 0, nb, vb, p.v_sl, t.Dv);
    }
    pack_block<V>(s, i0, nb, kb, p.k_sl, t.Dk, t.Dkp, kt, kr);
    pack_block<V>(s, i0, nb, vb, p.v_sl, t.Dv, t.Dvp, nullptr, vp);
    if (i0 + KB < s.count) {
      const int nn = int(s.count - i0 - KB < KB ? s.count - i0 - KB : KB);
      prefetch_block(s, i0 + KB, nn, kb, p.k_sl, t.Dk);
      prefetch_block(s, i0 + KB, nn, vb, p.v_sl, t.Dv);
    }
    for (int64_t n0 = 0; n0 < N; n0 += MR) {
      const int rows = int(N - n0 < MR ? N - n0 : MR);
      with_rows<MR>(rows, [&](auto mc) {
        fwd_tile_rows<V, decltype(mc)::value>(qs + n0 * t.Dkp, t.Dkp, kt, t.Dk, vp, t.Dvp, nb, S, O + n0 * t.Dvp,
                                              mm + n0, ll + n0);
      });
    }
  }
  (void)NR;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t d = 0; d < t.Dv; ++d) acc_out[n * t.Dv + d] = O[n * t.Dvp + d];
    // A NaN/inf score makes l NaN; m = +inf then marks the row for the launcher's split merge
    // (which ranks slices by m), so that the NaN reaches the output.
    m_out[n] = ll[n] != ll[n] ? __builtin_inff() : mm[n];
    l_out[n] = ll[n];
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

template <class V, int M>
inline void bwd_tile_rows(const TileDims& t, const float* qs, const float* qf, const float* dO, float* dQ,
                          const float* lhi, const float* llo, const float* dl, const float* kt, const float* vt,
                          const float* kr, int nb, float* S, float* dP, float* dKb, float* dVb) {
  constexpr int W = V::W, NR = V::NV * V::W, KB = V::KB;
  const int np = int(tile_ceil(nb, NR)), nk = np * NR;
  for (int pn = 0; pn < np; ++pn) {
    const int valid = nb - pn * NR < NR ? nb - pn * NR : NR;
    qk_panel<V, M>(qs, t.Dkp, kt + int64_t(pn) * t.Dk * NR, t.Dk, valid, S + pn * NR, KB, nullptr);
    qk_panel<V, M>(dO, t.Dvp, vt + int64_t(pn) * t.Dv * NR, t.Dv, NR, dP + pn * NR, KB, nullptr);
  }
  for (int r = 0; r < M; ++r) {
    const V hi = V::set1(lhi[r]), lo = V::set1(llo[r]), d = V::set1(dl[r]);
    float* sr = S + r * KB;
    float* pr = dP + r * KB;
    for (int j = 0; j < nk; j += W) {
      const V pj = V::exp2((V::load(sr + j) - hi) - lo);  // keys past nb: -inf -> 0
      const V ds = pj * (V::load(pr + j) - d);
      pj.store(sr + j);
      ds.store(pr + j);
    }
  }
  pv_all<V, M>(dP, KB, kr, t.Dkp, nk, dQ, t.Dkp, t.Dkp);
  rank_all<V, M>(S, KB, dO, t.Dvp, nb, dVb, t.Dvp, t.Dvp);
  rank_all<V, M>(dP, KB, qf, t.Dkp, nb, dKb, t.Dkp, t.Dkp);
}

template <class V, class T>
void tile_bwd_span(const BwdParams& p, const Span& s, float* ws, float* dq_out) {
  constexpr int KB = V::KB, MR = V::MR;
  const TileDims t = tile_dims<V>(p);
  const int64_t N = p.N, H = p.H;
  float* qs = ws;                  // [N][Dkp] pre-scaled
  float* qf = qs + N * t.Dkp;      // [N][Dkp] as given
  float* dO = qf + N * t.Dkp;      // [N][Dvp]
  float* dQ = dO + N * t.Dvp;      // [N][Dkp]
  float* lhi = dQ + N * t.Dkp;     // lse in log2 units, as hi + lo
  float* llo = lhi + N;
  float* dl = llo + N;
  float* kt = dl + N;              // [KB / NR][Dk][NR]
  float* vt = kt + KB * t.Dk;      // [KB / NR][Dv][NR]
  float* kr = vt + KB * t.Dv;      // [KB][Dkp]
  float* dKb = kr + KB * t.Dkp;    // [KB][Dkp]
  float* dVb = dKb + KB * t.Dkp;   // [KB][Dvp]
  float* S = dVb + KB * t.Dvp;     // [MR][KB]
  float* dP = S + MR * KB;         // [MR][KB]
  float* vr = dP + MR * KB;        // [KB][Dvp]: the value block as rows, before the transpose

  load_scaled_queries<V, T>(p, s, t, qs, qf);
  const T* go = static_cast<const T*>(p.go) + s.b * p.go_sb + s.h * p.go_sh;
  for (int64_t n = 0; n < N; ++n) {
    row_f32<V>(go + n * p.go_sn, t.Dv, t.Dvp, dO + n * t.Dvp);
    for (int64_t d = 0; d < t.Dkp; ++d) dQ[n * t.Dkp + d] = 0.f;
    const int64_t r = (s.b * N + n) * H + s.h;
    const float lse = p.lse[r];
    // lse * log2(e) split into two floats, so that p = 2^((s - hi) - lo) keeps all of the
    // saved lse's bits when the logits are large. An empty row's -inf gives p = 0.
    const double l2 = lse == neg_inff() ? 0.0 : double(lse) * kTileLog2e;
    lhi[n] = float(l2);
    llo[n] = l2 - l2 == 0.0 ? float(l2 - double(lhi[n])) : 0.f;
    dl[n] = p.delta[r];
  }
  const T* kb = static_cast<const T*>(p.k) + s.b * p.k_sb + s.h * p.k_sh;
  const T* vb = static_cast<const T*>(p.v) + s.b * p.v_sb + s.h * p.v_sh;
  T* gkb = static_cast<T*>(p.gk) + s.b * p.gk_sb + s.h * p.gk_sh;
  T* gvb = static_cast<T*>(p.gv) + s.b * p.gv_sb + s.h * p.gv_sh;
  const float scale = float(p.scale);
  for (int64_t i0 = 0; i0 < s.count; i0 += KB) {
    const int nb = int(s.count - i0 < KB ? s.count - i0 : KB);
    pack_block<V>(s, i0, nb, kb, p.k_sl, t.Dk, t.Dkp, kt, kr);
    pack_block<V>(s, i0, nb, vb, p.v_sl, t.Dv, t.Dvp, vt, vr);
    if (i0 + KB < s.count) {
      const int nn = int(s.count - i0 - KB < KB ? s.count - i0 - KB : KB);
      prefetch_block(s, i0 + KB, nn, kb, p.k_sl, t.Dk);
      prefetch_block(s, i0 + KB, nn, vb, p.v_sl, t.Dv);
    }
    for (int64_t i = 0; i < int64_t(nb) * t.Dkp; ++i) dKb[i] = 0.f;
    for (int64_t i = 0; i < int64_t(nb) * t.Dvp; ++i) dVb[i] = 0.f;
    for (int64_t n0 = 0; n0 < N; n0 += MR) {
      const int rows = int(N - n0 < MR ? N - n0 : MR);
      with_rows<MR>(rows, [&](auto mc) {
        bwd_tile_rows<V, decltype(mc)::value>(t, qs + n0 * t.Dkp, qf + n0 * t.Dkp, dO + n0 * t.Dvp, dQ + n0 * t.Dkp,
                                              lhi + n0, llo + n0, dl + n0, kt, vt, kr, nb, S, dP, dKb, dVb);
      });
    }
    for (int j = 0; j < nb; ++j) {
      const int64_t pos = span_pos(s, i0 + j);
      T* gk = gkb + pos * p.gk_sl;
      T* gv = gvb + pos * p.gv_sl;
      for (int64_t d = 0; d < t.Dk; ++d) V::from_f32(dKb[j * t.Dkp + d] * scale, gk + d);
      for (int64_t d = 0; d < t.Dv; ++d) V::from_f32(dVb[j * t.Dvp + d], gv + d);
    }
  }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t d = 0; d < t.Dk; ++d) dq_out[n * t.Dk + d] = dQ[n * t.Dkp + d] * scale;
}

// Workspace in floats for both directions (caller: tile_workspace_elems).
template <class V>
inline int64_t tile_ws_elems(int64_t N, int64_t Dk, int64_t Dv) {
  constexpr int W = V::W, KB = V::KB, MR = V::MR;
  const int64_t Dkp = tile_ceil(Dk, W) * W, Dvp = tile_ceil(Dv, W) * W, Dm = Dkp > Dvp ? Dkp : Dvp;
  const int64_t fwd = N * (Dkp + Dvp) + 2 * N + KB * (Dk + Dvp + Dkp) + MR * KB + Dm;
  const int64_t bwd = N * (3 * Dkp + Dvp) + 3 * N + KB * (Dk + Dv + 2 * Dkp + 2 * Dvp) + 2 * MR * KB + Dm;
  return (fwd > bwd ? fwd : bwd) + 64;
}

template <class V>
void tile_fwd_entry(const FwdParams& p, const Span& s, void* ws, void* acc, void* m, void* l) {
  float* w = static_cast<float*>(ws);
  float* a = static_cast<float*>(acc);
  float* mm = static_cast<float*>(m);
  float* ll = static_cast<float*>(l);
  switch (p.dtype) {
    case kF16: tile_fwd_span<V, fp16_t>(p, s, w, a, mm, ll); break;
    case kBF16: tile_fwd_span<V, bf16_t>(p, s, w, a, mm, ll); break;
    default: tile_fwd_span<V, float>(p, s, w, a, mm, ll); break;
  }
}

template <class V>
void tile_bwd_entry(const BwdParams& p, const Span& s, void* ws, void* dq) {
  float* w = static_cast<float*>(ws);
  float* d = static_cast<float*>(dq);
  switch (p.dtype) {
    case kF16: tile_bwd_span<V, fp16_t>(p, s, w, d); break;
    case kBF16: tile_bwd_span<V, bf16_t>(p, s, w, d); break;
    default: tile_bwd_span<V, float>(p, s, w, d); break;
  }
}

}  // namespace
}  // namespace cpu
}  // namespace attnkern
