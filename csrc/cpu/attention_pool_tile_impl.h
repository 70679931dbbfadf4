// Tiled CPU kernels for many queries per history, written once over a vector type `V` and
// included by attention_pool_tile_{avx512,avx512_bf16,amx,avx2,generic}.cpp with their set's `V`. Everything here has
// internal linkage (anonymous namespace), so the per-ISA copies are never merged by the linker.
//
// V is a vector type of vec_common.h (vec_scalar.h, vec_avx2.h, vec_avx512.h); 2^x is its
// exp2_fast (exactly 0 below -125 and for -inf, +inf from 128 up, NaN for NaN). Its lane count
// sets the register blocking (TileShape below); where V::kPairDot, bf16 inputs are scored on
// pairs (below).
//
// Shape of the work, per span (the valid positions of one (row, head), or a slice of them):
// the keys are taken KB at a time; a block's keys are converted to fp32 once, transposed into
// panels of NR keys (Kt[panel][d][NR]), and its values into fp32 rows. Every tile of MR queries
// then runs against the block as small GEMMs whose accumulators live in registers: the scores
// S = scale * (Q Kt) (MR x NV vectors per panel: the dot products of the unscaled queries first,
// then the scale, so that the logits are in natural units as in attention_pool_impl.h), the online
// softmax per query row on the block (one max and one rescale decision per row and block,
// probabilities 2^((s - m) log2 e)), and O += P V (MR x CG vectors at a time).
// The backward and the stats kernel (the launcher's recomputed shift) score with the same code
// on the same fp32 queries, so their logits round exactly as the forward's; the backward forms
// p = 2^((s - m) log2 e - log2 l) from BwdParams::shift, dP = dO Vt, dS, dQ += dS K and the
// block's dK += dS^T Q, dV += P^T dO (register-blocked rank-MR updates), written once per key.
// Where V::kPairDot (AVX512-BF16) and the inputs are bf16, the scores are dot products of the
// bf16 elements themselves, two at a time (vdpbf16ps: exact products, fp32 sums): queries and key
// panels are kept as 32-bit pairs of neighbouring elements instead of fp32, in forward, stats and
// backward alike, so the three still round identically.
#pragma once

#include "attention_pool_kernels.h"
#include "attention_pool_tile_kernels.h"
#include "vec_common.h"

namespace attnkern {
namespace cpu {
namespace {

// The register blocking of the tiles for W lanes: MR query rows x NV vectors of keys (NR = NV * W
// keys) of score accumulators, CG value chunks of W per register block, KB keys per block.
// AVX-512 (W = 16): 8 x 32 keys, 16 of the 32 registers; AVX2 (W = 8): 6 x 16 keys, 12 of 16;
// one lane: 4 x 4 in scalar registers.
template <class V>
struct TileShape {
  static constexpr int MR = V::W >= 16 ? 8 : V::W == 8 ? 6 : 4;
  static constexpr int NV = V::W == 1 ? 4 : 2;
  static constexpr int CG = NV;
  static constexpr int KB = 64;
};

constexpr float kTileLog2e = 1.4426950408889634f;
// A row's running max moves only when a block's max exceeds it by more than 8 ln 2 (see
// kLazyMax in attention_pool_impl.h): probabilities stay <= 2^8 and the common case is no rescale.
constexpr float kTileLazyMax = float(8.0 * 0.6931471805599453);

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
// The shift subtracted from the logits (shift_of in attention_pool_impl.h): the running max, or 0 when
// that is infinite, so that masked lanes still give 0 and a +inf logit turns the row NaN.
inline float tile_shift_of(float m) { return (m == neg_inff() || m == __builtin_inff()) ? 0.f : m; }

template <class T>
struct IsBf16 {
  static constexpr bool value = false;
};
template <>
struct IsBf16<bf16_t> {
  static constexpr bool value = true;
};
// Whether V scores inputs of type T on bf16 pairs.
template <class V, class T>
constexpr bool kPairs = V::kPairDot && IsBf16<T>::value;

// 32-bit pairs of a row of D elements (the last one zero-padded when D is odd).
inline int64_t pairs_of(int64_t D) { return (D + 1) / 2; }
// One bf16 row as pairs: dst[i * ds] = bits(src[2i]) | bits(src[2i + 1]) << 16.
inline void row_pairs(const bf16_t* src, int64_t D, uint32_t* dst, int64_t ds) {
  for (int64_t i = 0; 2 * i < D; ++i)
    dst[i * ds] = uint32_t(src[2 * i].x) | (2 * i + 1 < D ? uint32_t(src[2 * i + 1].x) << 16 : 0u);
}

// Workspace layouts (offsets in floats) for W lanes: the kernels carve their workspace with
// these and tile_ws_elems sizes it from them, so the two cannot disagree.
struct TileBump {
  int64_t used = 0;
  int64_t take(int64_t n) {
    const int64_t o = used;
    used += n;
    return o;
  }
};

// One input row (D elements of type T) as fp32, zero-padded to Dp.
template <class V, class T>
inline void row_f32(const T* src, int64_t D, int64_t Dp, float* dst) {
  int64_t d = 0;
  for (; d + V::W <= D; d += V::W) V::load(src + d).store(dst + d);
  for (; d < D; ++d) dst[d] = to_f32(src[d]);
  for (; d < Dp; ++d) dst[d] = 0.f;
}

// Keys [i0, i0 + nb) of the span, rows of `base` (stride sl, D elements), packed as fp32
// rows pr[j][Dp] (zero rows past nb, up to the last panel's end) and, if pk is given, also
// transposed into panels pk[panel][d][NR] (zero past nb), W rows at a time by
// V::transpose_rows.
template <class V, class T>
inline void pack_block(const Span& s, int64_t i0, int nb, const T* base, int64_t sl, int64_t D, int64_t Dp,
                       float* pk, float* pr) {
  constexpr int NR = TileShape<V>::NV * V::W;
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

// Keys [i0, i0 + nb) of the span (bf16 rows of `base`, stride sl, D elements) as pairs in
// panels of PW keys, dst[panel][i][PW] for pairs i < D2p (row_pairs of each key): zero keys past
// nb up to nk (a multiple of PW) and zero pairs past the row's end.
inline void pack_pair_panels(const Span& s, int64_t i0, int nb, int nk, int PW, const bf16_t* base, int64_t sl,
                             int64_t D, int64_t D2p, uint32_t* dst) {
  const int64_t D2 = pairs_of(D);
  for (int j = 0; j < nk; ++j) {
    uint32_t* col = dst + int64_t(j / PW) * D2p * PW + (j % PW);
    int64_t i = 0;
    if (j < nb) {
      row_pairs(base + span_pos(s, i0 + j) * sl, D, col, PW);
      i = D2;
    }
    for (; i < D2p; ++i) col[i * PW] = 0u;
  }
}

// The block's keys (bf16) as pairs in the panels of V's scoring, k2[panel][i][NR], the layout
// of pack_pair_panels: packed as fp32 rows pr and panels kt first (pack_block: vector loads and
// register transposes), then each panel's rows 2i and 2i + 1 joined into pair row i in place
// (k2 aliases kt; pair row i ends before fp32 row 2i + 1's unread part, as D2 <= D). The fp32
// values are bf16 ones, so their high halves are the bf16 bits exactly.
template <class V>
inline void pack_block_pairs(const Span& s, int64_t i0, int nb, const bf16_t* base, int64_t sl, int64_t D,
                             int64_t Dp, float* kt, float* pr) {
  constexpr int NR = TileShape<V>::NV * V::W, W = V::W;
  pack_block<V>(s, i0, nb, base, sl, D, Dp, kt, pr);
  const int64_t D2 = pairs_of(D);
  const int np = int(tile_ceil(nb, NR));
  for (int pn = 0; pn < np; ++pn) {
    const float* f = kt + int64_t(pn) * D * NR;
    float* o = kt + int64_t(pn) * D2 * NR;
    for (int64_t i = 0; i < D2; ++i)
      for (int c = 0; c < NR; c += W) {
        const V even = V::load(f + 2 * i * NR + c);
        const V odd = 2 * i + 1 < D ? V::load(f + (2 * i + 1) * NR + c) : V::zero();
        V::join_pairs(even, odd).store(o + i * NR + c);
      }
  }
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

// Asks for the block after [i0, i0 + bs) of the span ahead of use: its keys (rows of k) and,
// where v is given, its values (prefetch_block).
template <class T>
inline void prefetch_next_block(const Span& s, int64_t i0, int bs, const T* k, int64_t ksl, int64_t Dk, const T* v,
                                int64_t vsl, int64_t Dv) {
  if (i0 + bs >= s.count) return;
  const int nn = int(s.count - i0 - bs < bs ? s.count - i0 - bs : bs);
  prefetch_block(s, i0 + bs, nn, k, ksl, Dk);
  if (v) prefetch_block(s, i0 + bs, nn, v, vsl, Dv);
}

// The end of a panel's scoring: acc *= mul, lanes >= valid set to -inf, stored to S (row
// stride ss).
template <class V, int M>
inline void finish_scores(V (&acc)[M][TileShape<V>::NV], int valid, float mul, float* S, int64_t ss) {
  constexpr int NV = TileShape<V>::NV, W = V::W, NR = NV * W;
  if (mul != 1.f) {
    const V mv = V::set1(mul);
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = acc[r][v] * mv;
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
    for (int v = 0; v < NV; ++v) acc[r][v].store(S + r * ss + v * W);
}

// Scores of M query rows (x, row stride xs, D elements, fp32) against one panel pk[d][NR]:
// S[r][0:NR] = mul * sum_d x[r][d] * pk[d][:], summed in order d = 0, 1, ... by one FMA chain
// per lane, then scaled (the forward, the stats and the backward all score through here, so
// they round identically). Lanes >= valid are set to -inf. PAIRS: the same on bf16 pairs
// (E = uint32_t): x holds the rows as pairs (D pairs each), pk a panel [D][NR] of key pairs,
// one dot_pairs chain per lane.
template <class V, int M, bool PAIRS, class E>
inline void qk_panel(const E* x, int64_t xs, const E* pk, int64_t D, int valid, float mul, float* S, int64_t ss) {
  constexpr int NV = TileShape<V>::NV, W = V::W, NR = NV * W;
  V acc[M][NV];
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = V::zero();
  for (int64_t d = 0; d < D; ++d) {
    V k[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      if constexpr (PAIRS)
        k[v] = V::load_bits(pk + d * NR + v * W);
      else
        k[v] = V::load(pk + d * NR + v * W);
    }
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      if constexpr (PAIRS) {
        const V b = V::set1_bits(x[r * xs + d]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = V::dot_pairs(acc[r][v], b, k[v]);
      } else {
        const V b = V::set1(x[r * xs + d]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(b, k[v], acc[r][v]);
      }
    }
  }
  finish_scores<V, M>(acc, valid, mul, S, ss);
}

// The queries and the key block a tile scores with: fp32 rows q (stride qs) and panels kt
// [panel][Dk][NR], or, on bf16 pairs, q2 (stride D2) and k2 [panel][D2][NR].
struct TileScoring {
  const float* q;
  int64_t qs;
  const float* kt;
  int64_t Dk;
  const uint32_t* q2;
  const uint32_t* k2;
  int64_t D2;
  TileScoring rows_from(int64_t n0) const {
    TileScoring t = *this;
    t.q = q ? q + n0 * qs : nullptr;
    t.q2 = q2 ? q2 + n0 * D2 : nullptr;
    return t;
  }
};

// Scores of M query rows against panel pn of the block (qk_panel, on bf16 pairs when PAIRS).
template <class V, int M, bool PAIRS>
inline void score_panel(const TileScoring& sc, int pn, int valid, float mul, float* S, int64_t ss) {
  constexpr int NR = TileShape<V>::NV * V::W;
  if constexpr (PAIRS)
    qk_panel<V, M, true>(sc.q2, sc.D2, sc.k2 + int64_t(pn) * sc.D2 * NR, sc.D2, valid, mul, S, ss);
  else
    qk_panel<V, M, false>(sc.q, sc.qs, sc.kt + int64_t(pn) * sc.Dk * NR, sc.Dk, valid, mul, S, ss);
}

// Y[r][0:CG*W] += sum_{j < nk} P[r][j] * X[j][0:CG*W] for M rows: O += P V (forward) and
// dQ += dS K (backward). X rows have stride xs, P rows ps, Y rows ys. PAIRS (E = uint32_t, the
// inference path's P V on V::kPairDot): P and X hold bf16 pairs, nk counts pairs, and each term
// is one dot_pairs (softmax_pairs_rows / value_pairs_in_place give the pairs).
template <class V, int M, int CG, bool PAIRS = false, class E = float>
inline void pv_cols(const E* P, int64_t ps, const E* X, int64_t xs, int nk, float* Y, int64_t ys) {
  constexpr int W = V::W;
  V acc[M][CG];
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r)
#pragma GCC unroll 4
    for (int g = 0; g < CG; ++g) acc[r][g] = V::load(Y + r * ys + g * W);
  for (int j = 0; j < nk; ++j) {
    V x[CG];
#pragma GCC unroll 4
    for (int g = 0; g < CG; ++g) {
      if constexpr (PAIRS)
        x[g] = V::load_bits(X + int64_t(j) * xs + g * W);
      else
        x[g] = V::load(X + int64_t(j) * xs + g * W);
    }
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      if constexpr (PAIRS) {
        const V b = V::set1_bits(P[r * ps + j]);
#pragma GCC unroll 4
        for (int g = 0; g < CG; ++g) acc[r][g] = V::dot_pairs(acc[r][g], b, x[g]);
      } else {
        const V b = V::set1(P[r * ps + j]);
#pragma GCC unroll 4
        for (int g = 0; g < CG; ++g) acc[r][g] = V::fma(b, x[g], acc[r][g]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r)
#pragma GCC unroll 4
    for (int g = 0; g < CG; ++g) acc[r][g].store(Y + r * ys + g * W);
}

template <class V, int M>
inline void pv_all(const float* P, int64_t ps, const float* X, int64_t xs, int nk, float* Y, int64_t ys, int64_t Dp) {
  constexpr int W = V::W, CG = TileShape<V>::CG;
  int64_t c = 0;
  for (; c + CG * W <= Dp; c += CG * W) pv_cols<V, M, CG>(P, ps, X + c, xs, nk, Y + c, ys);
  for (; c < Dp; c += W) pv_cols<V, M, 1>(P, ps, X + c, xs, nk, Y + c, ys);
}

// O += P V on bf16 pairs (the inference path): P2 rows of np pairs (row stride ps), X2 rows of
// value pairs (Dp lanes each), by pv_cols' PAIRS form.
template <class V, int M>
inline void pv_pairs_all(const uint32_t* P2, int64_t ps, const uint32_t* X2, int np, float* Y, int64_t Dp) {
  constexpr int W = V::W, CG = TileShape<V>::CG;
  int64_t c = 0;
  for (; c + CG * W <= Dp; c += CG * W) pv_cols<V, M, CG, true>(P2, ps, X2 + c, Dp, np, Y + c, Dp);
  for (; c < Dp; c += W) pv_cols<V, M, 1, true>(P2, ps, X2 + c, Dp, np, Y + c, Dp);
}

// One row's running max m after a block whose max is bmax: it moves (lazily: kTileLazyMax) and
// then rescales its sum (nl partial sums l) and, with PV, its output accumulators o (Dvp lanes).
// Returns the new m.
template <class V, bool PV>
inline float lazy_max_row(float bmax, float* o, int64_t Dvp, float& m, float* l, int nl) {
  if (bmax > m + kTileLazyMax) {
    const float alpha = __builtin_exp2f((m - bmax) * kTileLog2e);  // 0 on the first block
    for (int i = 0; i < nl; ++i) l[i] *= alpha;
    if constexpr (PV) {
      const V a = V::set1(alpha);
      for (int64_t c = 0; c < Dvp; c += V::W) (V::load(o + c) * a).store(o + c);
    }
    m = bmax;
  }
  return m;
}

#if defined(ATTNKERN_AVX512_BF16)
// 2^x for the inference path's probabilities, which P V uses rounded to bf16 (8 significant
// bits): a degree-3 polynomial (relative error 7.5e-5, a 26th of bf16's half ulp) and no compare
// or select: clamped to [-160, 128], 2^n by vscalefps, whose underflow gives exactly 0 below
// -150 (and for -inf: an empty row's l stays 0) and whose overflow gives +inf from 128 up; NaN
// passes the clamps (max/min return their second operand) and stays NaN. AVX-512 only: it needs
// scale_pow2 for any n.
inline Vec512 exp2_bf16p(Vec512 x) {
  const Vec512 xc = Vec512::min(Vec512::set1(128.f), Vec512::max(Vec512::set1(-160.f), x));
  const Vec512 n = Vec512::round(xc), f = xc - n;
  Vec512 y = Vec512::fma(Vec512::set1(0.0551716685295105f), f, Vec512::set1(0.2426111400127411f));
  y = Vec512::fma(y, f, Vec512::set1(0.6932609677314758f));
  y = Vec512::fma(y, f, Vec512::set1(0.9999280571937561f));
  return Vec512::scale_pow2(y, n);
}
#endif

// The inference path's online softmax of M rows (softmax_rows' lazy max and rescale), the sum of
// the fp32 probabilities kept per lane (lv: W partial sums a row, added up once after the last
// block: a horizontal sum per row and block took a tenth of the time at D = 32), and the
// probabilities (exp2_bf16p) rounded to bf16 and joined into pairs (the layout below) as they
// are formed: S row r holds nk / 2 pairs after, group j's pairs written over S[j / 2..) once
// its keys were read.
template <class V>
inline void softmax_pairs_rows(int M, const float* bmax, float* S, int64_t ss, int nk, float* O, int64_t Dvp,
                               float* mm, float* lv) {
  constexpr int W = V::W;
  const V l2e = V::set1(kTileLog2e);
  for (int r = 0; r < M; ++r) {
    const float m = lazy_max_row<V, true>(bmax[r], O + r * Dvp, Dvp, mm[r], lv + r * W, W);
    const V mv = V::set1(tile_shift_of(m));
    V sum0 = V::zero(), sum1 = V::zero();
    float* sr = S + r * ss;
    for (int j = 0; j < nk; j += 2 * W) {
      const V p0 = exp2_bf16p((V::load(sr + j) - mv) * l2e), p1 = exp2_bf16p((V::load(sr + j + W) - mv) * l2e);
      sum0 = sum0 + p0;
      sum1 = sum1 + p1;
      V::round_join_pairs(p0, p1).store(sr + j / 2);
    }
    (V::load(lv + r * W) + (sum0 + sum1)).store(lv + r * W);
  }
}

// The pairing of the inference path's P V: in each group of 2W keys, pair i (i < W) joins key
// i (low half) with key W + i (high half), so that both P's and V's pairs are one join_pairs
// of two whole vectors (no lane shuffles).
//
// The value block's fp32 rows vp [nk][Dp] (bf16 values, so the join is exact) as nk / 2 rows
// of pairs in place, pair row j / 2 + i of group j joining rows j + i and j + W + i; row
// j / 2 + i is written after rows j + i and j + W + i were read and is never read again.
template <class V>
inline void value_pairs_in_place(float* vp, int64_t Dp, int nk) {
  constexpr int W = V::W;
  for (int j = 0; j < nk; j += 2 * W)
    for (int i = 0; i < W; ++i)
      for (int64_t c = 0; c < Dp; c += W) {
        const V lo = V::load(vp + (j + i) * Dp + c), hi = V::load(vp + (j + W + i) * Dp + c);
        V::join_pairs(lo, hi).store(vp + (j / 2 + i) * Dp + c);
      }
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
  constexpr int W = V::W, CG = TileShape<V>::CG;
  int64_t c = 0;
  for (; c + CG * W <= Dp; c += CG * W) rank_cols<V, M, CG>(P, ps, X + c, xs, nk, Y + c, ys);
  for (; c < Dp; c += W) rank_cols<V, M, 1>(P, ps, X + c, xs, nk, Y + c, ys);
}

// Head dims, and padded to whole vectors.
struct TileDims {
  int64_t Dk, Dv, Dkp, Dvp;
};

template <class V>
inline TileDims tile_dims(int64_t Dk, int64_t Dv) {
  constexpr int W = V::W;
  return {Dk, Dv, tile_ceil(Dk, W) * W, tile_ceil(Dv, W) * W};
}

// Forward and stats.
struct TileFwdWs {
  int64_t qs, O, mm, ll, kt, vp, S, kr, q2, lv, total;
};
template <class V>
inline TileFwdWs tile_fwd_ws(int64_t N, const TileDims& t) {
  constexpr int KB = TileShape<V>::KB, MR = TileShape<V>::MR;
  TileBump b;
  TileFwdWs w;
  w.qs = b.take(N * t.Dkp);  // queries as fp32, zero-padded
  w.O = b.take(N * t.Dvp);   // output accumulators
  w.mm = b.take(N);          // running max
  w.ll = b.take(N);          // running sum
  w.kt = b.take(KB * t.Dk);  // key block as panels [KB / NR][Dk][NR]
  w.vp = b.take(KB * t.Dvp); // value block as fp32 rows [KB][Dvp]
  w.S = b.take(MR * KB);     // scores / probabilities of one tile [MR][KB]
  w.kr = b.take(KB * t.Dkp); // key block as rows [KB][Dkp], before the transpose
  // bf16 pair scoring (V::kPairDot): the queries as pairs [N][D2]; the key block's pair panels
  // [KB / NR][D2][NR] take kt's place.
  w.q2 = b.take(V::kPairDot ? N * pairs_of(t.Dk) : 0);
  w.lv = b.take(V::kPairDot ? N * V::W : 0);  // the inference path's partial sums, W a row
  w.total = b.used;
  return w;
}

struct TileBwdWs {
  int64_t qf, dO, dQ, msh, lg, dl, kt, vt, kr, dKb, dVb, S, dP, vr, q2, vn, dn, total;
};
template <class V>
inline TileBwdWs tile_bwd_ws(int64_t N, const TileDims& t) {
  constexpr int KB = TileShape<V>::KB, MR = TileShape<V>::MR;
  TileBump b;
  TileBwdWs w;
  w.qf = b.take(N * t.Dkp);   // queries as fp32 (scores and dK)
  w.dO = b.take(N * t.Dvp);   // grad_out
  w.dQ = b.take(N * t.Dkp);   // dq accumulators
  w.msh = b.take(N);          // logit shift m
  w.lg = b.take(N);           // log2 of the softmax sum after it
  w.dl = b.take(N);           // delta
  w.kt = b.take(KB * t.Dk);   // [KB / NR][Dk][NR]
  w.vt = b.take(KB * t.Dv);   // [KB / NR][Dv][NR]
  w.kr = b.take(KB * t.Dkp);  // [KB][Dkp]
  w.dKb = b.take(KB * t.Dkp); // [KB][Dkp]
  w.dVb = b.take(KB * t.Dvp); // [KB][Dvp]
  w.S = b.take(MR * KB);      // [MR][KB]
  w.dP = b.take(MR * KB);     // [MR][KB]
  w.vr = b.take(KB * t.Dvp);  // [KB][Dvp]: the value block as rows, before the transpose
  w.q2 = b.take(V::kPairDot ? N * pairs_of(t.Dk) : 0);  // as in tile_fwd_ws
  w.vn = b.take(KB);          // |v| of the block's keys (bwd_own_delta)
  w.dn = b.take(N);           // |dO| of each row (bwd_own_delta)
  w.total = b.used;
  return w;
}

// The span's queries as fp32 rows, zero-padded to Dkp (the same in forward, stats, backward).
template <class V, class T>
inline void load_queries(const FwdParams& p, const Span& s, const TileDims& t, float* qf) {
  const T* q = static_cast<const T*>(p.q) + s.b * p.q_sb + s.h * p.q_sh;
  for (int64_t n = 0; n < p.N; ++n) row_f32<V>(q + n * p.q_sn, t.Dk, t.Dkp, qf + n * t.Dkp);
}

// Rows n < N of src (row stride rs, D bf16 elements) as pairs [Np][D2p] (row_pairs): zero
// pairs past the row's end and zero rows from N up to Np.
inline void rows_as_pairs(const bf16_t* src, int64_t rs, int64_t N, int64_t Np, int64_t D, int64_t D2p,
                          uint32_t* dst) {
  const int64_t D2 = pairs_of(D);
  for (int64_t n = 0; n < Np; ++n) {
    uint32_t* row = dst + n * D2p;
    int64_t i = 0;
    if (n < N) {
      row_pairs(src + n * rs, D, row, 1);
      i = D2;
    }
    for (; i < D2p; ++i) row[i] = 0u;
  }
}

// The span's bf16 queries as pairs [N][D2] (rows_as_pairs), for the pair scoring.
inline void load_query_pairs(const FwdParams& p, const Span& s, int64_t Dk, uint32_t* q2) {
  const bf16_t* q = static_cast<const bf16_t*>(p.q) + s.b * p.q_sb + s.h * p.q_sh;
  rows_as_pairs(q, p.q_sn, p.N, p.N, Dk, pairs_of(Dk), q2);
}

// The score bias of one block of a span (FwdParams::bias): rows n0 .. n0 + M - 1 of the span's
// queries, the block's valid positions i0 .. i0 + nb - 1. Each query row reads its bias entries
// once per block, straight from the bias (L1-resident when the queries share a row).
struct BlockBias {
  const FwdParams& p;
  const Span& s;
  int64_t n0, i0;

  template <class F>
  void each(int M, int nb, F&& f) const {
    for (int r = 0; r < M; ++r) {
      const int64_t row = s.b * p.bias_sb + ((p.n0 + n0 + r) % p.bias_nb) * p.bias_sn + s.h * p.bias_sh;
      for (int j = 0; j < nb; ++j) f(r, j, row + span_pos(s, i0 + j) * p.bias_sl);
    }
  }
  // S[r][j] += bias, for the valid lanes j < nb (those past stay -inf).
  void add(int M, int nb, float* S, int64_t ss) const {
    if (!p.bias) return;
    const float* b = static_cast<const float*>(p.bias);
    each(M, nb, [&](int r, int j, int64_t o) { S[r * ss + j] += b[o]; });
  }
  // grad_bias += dS (the gradient of the logits, unscaled) of the valid lanes, in row order.
  void grad(const BwdParams& bp, int M, int nb, const float* dS, int64_t ss) const {
    if (!bp.gbias) return;
    float* g = static_cast<float*>(bp.gbias);
    for (int r = 0; r < M; ++r) {
      const int64_t row = s.b * bp.gb_sb + ((p.n0 + n0 + r) % p.bias_nb) * bp.gb_sn + s.h * bp.gb_sh;
      for (int j = 0; j < nb; ++j) g[row + span_pos(s, i0 + j) * bp.gb_sl] += dS[r * ss + j];
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Forward

// The online softmax of M query rows on a block whose scores are in S (row stride ss, nk keys,
// a multiple of W; -inf past the valid ones), bmax[r] the block max of row r: the running max
// moves (lazily) and rescales ll and, with PV, the output rows O (stride Dvp); the scores become
// probabilities in place (with PV) and their sum is added to ll.
template <class V, bool PV>
inline void softmax_rows(int M, const float* bmax, float* S, int64_t ss, int nk, float* O, int64_t Dvp, float* mm,
                         float* ll) {
  constexpr int W = V::W;
  const V l2e = V::set1(kTileLog2e);
  for (int r = 0; r < M; ++r) {
    const float m = lazy_max_row<V, PV>(bmax[r], O + r * Dvp, Dvp, mm[r], ll + r, 1);
    // The shift: 0 while no finite score was seen (-inf scores then give 0, NaN ones NaN) or
    // once the max is +inf.
    const V mv = V::set1(tile_shift_of(m));
    V sum = V::zero();
    float* sr = S + r * ss;
    for (int j = 0; j < nk; j += W) {
      const V pr = exp2_fast((V::load(sr + j) - mv) * l2e);
      sum = sum + pr;
      if constexpr (PV) pr.store(sr + j);
    }
    ll[r] += sum.reduce_add();
  }
}

// One tile of M query rows against one packed block of nb keys (np panels). PV: also
// O += P V (the forward); without it only the row statistics (the stats kernel).
// RP (the inference path, on bf16 pairs only): P rounded to bf16 for O += P V, which then runs
// on pairs (vp holds value_pairs_in_place's pairs); the softmax sum stays the fp32 P's.
template <class V, int M, bool PV, bool PAIRS, bool RP = false>
inline void fwd_tile_rows(const TileScoring& sc, const BlockBias& bias, const float* vp, int64_t Dvp, int nb,
                          float scale, float* S, float* O, float* mm, float* ll) {
  constexpr int NR = TileShape<V>::NV * V::W, KB = TileShape<V>::KB;
  const int np = int(tile_ceil(nb, NR)), nk = np * NR;
  for (int pn = 0; pn < np; ++pn) {
    const int valid = nb - pn * NR < NR ? nb - pn * NR : NR;
    score_panel<V, M, PAIRS>(sc, pn, valid, scale, S + pn * NR, KB);
  }
  bias.add(M, nb, S, KB);
  // Each row's block max from the stored scores (a running max kept in registers across the
  // panels took M of them from the scoring loop, which then spilled its key vectors).
  float bmax[M];
  for (int r = 0; r < M; ++r) {
    V mx = V::load(S + r * KB);
    for (int j = V::W; j < nk; j += V::W) mx = V::max(mx, V::load(S + r * KB + j));
    bmax[r] = mx.reduce_max();
  }
  if constexpr (PV && RP) {
    softmax_pairs_rows<V>(M, bmax, S, KB, nk, O, Dvp, mm, ll);  // ll: the rows' W partial sums
    pv_pairs_all<V, M>(reinterpret_cast<const uint32_t*>(S), KB, reinterpret_cast<const uint32_t*>(vp), nk / 2, O,
                       Dvp);
  } else {
    softmax_rows<V, PV>(M, bmax, S, KB, nk, O, Dvp, mm, ll);
    if constexpr (PV) pv_all<V, M>(S, KB, vp, Dvp, nk, O, Dvp, Dvp);
  }
}

// The forward's row state before the first block: O = 0 (PV), m = -inf, l = 0 for N rows.
template <bool PV>
inline void fwd_init_rows(int64_t N, int64_t Ors, float* O, float* mm, float* ll) {
  if constexpr (PV)
    for (int64_t i = 0; i < N * Ors; ++i) O[i] = 0.f;
  for (int64_t n = 0; n < N; ++n) {
    mm[n] = neg_inff();
    ll[n] = 0.f;
  }
}

// The forward's results after the last block: acc_out (PV; Dv of each O row, stride Ors), m, l.
template <bool PV>
inline void fwd_write_rows(int64_t N, int64_t Dv, int64_t Ors, const float* O, const float* mm, const float* ll,
                           float* acc_out, float* m_out, float* l_out) {
  for (int64_t n = 0; n < N; ++n) {
    if constexpr (PV)
      for (int64_t d = 0; d < Dv; ++d) acc_out[n * Dv + d] = O[n * Ors + d];
    // m is the running max (the launcher subtracts its shift_of, as the kernels did); a NaN
    // score leaves a NaN l, which the launcher propagates.
    m_out[n] = mm[n];
    l_out[n] = ll[n];
  }
}

// PV: the forward (acc_out, m_out, l_out); otherwise the stats kernel (m_out, l_out only).
// RP: the inference path's P V on bf16 pairs (fwd_tile_rows), for bf16 scored on pairs only.
template <class V, class T, bool PV, bool RP = false>
void tile_fwd_span(const FwdParams& p, const Span& s, float* ws, float* acc_out, float* m_out, float* l_out) {
  constexpr int KB = TileShape<V>::KB, MR = TileShape<V>::MR;
  const TileDims t = tile_dims<V>(p.Dk, p.Dv);
  const int64_t N = p.N;
  const TileFwdWs lay = tile_fwd_ws<V>(N, t);
  float* qs = ws + lay.qs;
  float* O = ws + lay.O;
  float* mm = ws + lay.mm;
  float* ll = ws + lay.ll;
  float* kt = ws + lay.kt;
  float* vp = ws + lay.vp;
  float* S = ws + lay.S;
  float* kr = ws + lay.kr;
  constexpr bool pairs = kPairs<V, T>;
  static_assert(!RP || (pairs && PV), "P V on pairs is the forward's, on bf16 pairs");
  uint32_t* q2 = reinterpret_cast<uint32_t*>(ws + lay.q2);
  uint32_t* k2 = reinterpret_cast<uint32_t*>(kt);
  if constexpr (pairs)
    load_query_pairs(p, s, t.Dk, q2);
  else
    load_queries<V, T>(p, s, t, qs);
  const TileScoring sc{qs, t.Dkp, kt, t.Dk, q2, k2, pairs_of(t.Dk)};
  fwd_init_rows<PV>(N, t.Dvp, O, mm, ll);
  float* lv = ws + lay.lv;  // RP: the rows' sums as W partial sums each (softmax_pairs_rows)
  if constexpr (RP)
    for (int64_t i = 0; i < N * V::W; ++i) lv[i] = 0.f;
  const float scale = float(p.scale);
  const auto* kb = static_cast<const T*>(p.k) + s.b * p.k_sb + s.h * p.k_sh;
  const auto* vb = static_cast<const T*>(p.v) + s.b * p.v_sb + s.h * p.v_sh;
  for (int64_t i0 = 0; i0 < s.count; i0 += KB) {
    const int nb = int(s.count - i0 < KB ? s.count - i0 : KB);
    if (i0 == 0) {
      prefetch_block(s, 0, nb, kb, p.k_sl, t.Dk);
      if constexpr (PV) prefetch_block(s, 0, nb, vb, p.v_sl, t.Dv);
    }
    if constexpr (pairs)
      pack_block_pairs<V>(s, i0, nb, kb, p.k_sl, t.Dk, t.Dkp, kt, kr);
    else
      pack_block<V>(s, i0, nb, kb, p.k_sl, t.Dk, t.Dkp, kt, kr);
    if constexpr (PV) pack_block<V>(s, i0, nb, vb, p.v_sl, t.Dv, t.Dvp, nullptr, vp);
    if constexpr (RP) value_pairs_in_place<V>(vp, t.Dvp, int(tile_ceil(nb, 2 * V::W) * 2 * V::W));
    prefetch_next_block(s, i0, KB, kb, p.k_sl, t.Dk, PV ? vb : nullptr, p.v_sl, t.Dv);
    for (int64_t n0 = 0; n0 < N; n0 += MR) {
      const int rows = int(N - n0 < MR ? N - n0 : MR);
      with_rows<MR>(rows, [&](auto mc) {
        fwd_tile_rows<V, decltype(mc)::value, PV, pairs, RP>(sc.rows_from(n0), BlockBias{p, s, n0, i0}, vp, t.Dvp,
                                                         nb, scale, S, O + n0 * t.Dvp, mm + n0,
                                                         RP ? lv + n0 * V::W : ll + n0);
      });
    }
  }
  if constexpr (RP)
    for (int64_t n = 0; n < N; ++n) ll[n] = V::load(lv + n * V::W).reduce_add();
  fwd_write_rows<PV>(N, t.Dv, t.Dvp, O, mm, ll, acc_out, m_out, l_out);
}

// ---------------------------------------------------------------------------------------------
// Backward

// The backward's probabilities of M rows in place: S (scores, row stride ss, nk keys) becomes
// p = 2^((s - m) log2 e - log2 l).
template <class V>
inline void bwd_probs_rows(int M, float* S, int64_t ss, int nk, const float* msh, const float* lg) {
  constexpr int W = V::W;
  const V l2e = V::set1(kTileLog2e);
  for (int r = 0; r < M; ++r) {
    const V m = V::set1(msh[r]), lgr = V::set1(lg[r]);
    float* sr = S + r * ss;
    for (int j = 0; j < nk; j += W) exp2_fast((V::load(sr + j) - m) * l2e - lgr).store(sr + j);  // past nb: 0
  }
}

// dP (dO . v) of M rows becomes dS = p (dP - delta) in place (p in S).
template <class V>
inline void bwd_ds_rows(int M, const float* S, float* dP, int64_t ss, int nk, const float* dl) {
  constexpr int W = V::W;
  for (int r = 0; r < M; ++r) {
    const V d = V::set1(dl[r]);
    const float* sr = S + r * ss;
    float* pr = dP + r * ss;
    for (int j = 0; j < nk; j += W) (V::load(sr + j) * (V::load(pr + j) - d)).store(pr + j);
  }
}

// The fp32 products of M rows against a block of nb keys (nk packed): dQ += dS K, and the
// block's dV += P^T dO, dK += dS^T Q (P in S, dS in dP, row stride ss).
template <class V, int M>
inline void bwd_updates(const TileDims& t, const float* S, const float* dP, int64_t ss, int nb, int nk,
                        const float* qf, const float* dO, const float* kr, float* dQ, float* dKb, float* dVb) {
  pv_all<V, M>(dP, ss, kr, t.Dkp, nk, dQ, t.Dkp, t.Dkp);
  rank_all<V, M>(S, ss, dO, t.Dvp, nb, dVb, t.Dvp, t.Dvp);
  rank_all<V, M>(dP, ss, qf, t.Dkp, nb, dKb, t.Dkp, t.Dkp);
}

// dQ += dS K for M rows (dS in dP, row stride ss; K as fp32 rows kr [nk][Dkp]; dQ stride Dkp),
// in pieces of at most TileShape<V>::MR rows, the register blocking of pv_cols.
template <class V>
inline void bwd_dq_rows(int M, const float* dP, int64_t ss, int nk, const float* kr, int64_t Dkp, float* dQ) {
  for (int h = 0; h < M; h += TileShape<V>::MR)
    with_rows<TileShape<V>::MR>(M - h < TileShape<V>::MR ? M - h : TileShape<V>::MR, [&](auto mc) {
      pv_all<V, decltype(mc)::value>(dP + h * ss, ss, kr, Dkp, nk, dQ + h * Dkp, Dkp, Dkp);
    });
}

// The backward's per-row inputs of the span: grad_out rows as fp32 (dO, stride t.Dvp; skipped
// where dO is null), dQ = 0 (stride Dqs), the shift (m, log2 l) and delta.
template <class V, class T>
inline void bwd_load_rows(const BwdParams& p, const Span& s, const TileDims& t, int64_t Dqs, float* dO, float* dQ,
                          float* msh, float* lg, float* dl) {
  const T* go = static_cast<const T*>(p.go) + s.b * p.go_sb + s.h * p.go_sh;
  const float* shift = static_cast<const float*>(p.shift);
  for (int64_t n = 0; n < p.N; ++n) {
    if (dO) row_f32<V>(go + n * p.go_sn, t.Dv, t.Dvp, dO + n * t.Dvp);
    for (int64_t d = 0; d < Dqs; ++d) dQ[n * Dqs + d] = 0.f;
    const int64_t r = (s.b * p.N + n) * p.H + s.h;
    // p = 2^((s - m) log2 e - log2 l): the shift the launcher derived from the forward's lse
    // or recomputed with tile_stats (the same logits as here).
    msh[n] = tile_shift_of(shift[2 * r]);
    lg[n] = shift[2 * r + 1];
    dl[n] = p.delta64 ? float(p.delta64[r]) : p.delta[r];
  }
}

// The block's dK/dV accumulators for nb keys, zeroed.
inline void bwd_zero_block(const TileDims& t, int nb, float* dKb, float* dVb) {
  for (int64_t i = 0; i < int64_t(nb) * t.Dkp; ++i) dKb[i] = 0.f;
  for (int64_t i = 0; i < int64_t(nb) * t.Dvp; ++i) dVb[i] = 0.f;
}

// dk (times scale) and dv of a block's nb keys [i0, i0 + nb) of the span, from dKb/dVb.
template <class V, class T>
inline void bwd_write_block(const BwdParams& p, const Span& s, const TileDims& t, int64_t i0, int nb,
                            const float* dKb, const float* dVb) {
  T* gkb = static_cast<T*>(p.gk) + s.b * p.gk_sb + s.h * p.gk_sh;
  T* gvb = static_cast<T*>(p.gv) + s.b * p.gv_sb + s.h * p.gv_sh;
  const float scale = float(p.scale);
  for (int j = 0; j < nb; ++j) {
    const int64_t pos = span_pos(s, i0 + j);
    T* gk = gkb + pos * p.gk_sl;
    T* gv = gvb + pos * p.gv_sl;
    for (int64_t d = 0; d < t.Dk; ++d) from_f32(dKb[j * t.Dkp + d] * scale, gk + d);
    for (int64_t d = 0; d < t.Dv; ++d) from_f32(dVb[j * t.Dvp + d], gv + d);
  }
}

// own: the block holds every valid key of the rows; vn [nb] and dn [M] are then |v| of the keys
// and |dO| of the rows (bwd_own_delta).
template <class V, int M, bool PAIRS>
inline void bwd_tile_rows(const TileDims& t, const TileScoring& sc, const BwdParams& p, const BlockBias& bias,
                          const float* qf, const float* dO, float* dQ, const float* msh, const float* lg,
                          const float* dl, const float* vt, const float* kr, int nb, float scale, float* S, float* dP,
                          float* dKb, float* dVb, bool own, const float* vn, const float* dn) {
  constexpr int NR = TileShape<V>::NV * V::W, KB = TileShape<V>::KB;
  const int np = int(tile_ceil(nb, NR)), nk = np * NR;
  for (int pn = 0; pn < np; ++pn) {
    const int valid = nb - pn * NR < NR ? nb - pn * NR : NR;
    score_panel<V, M, PAIRS>(sc, pn, valid, scale, S + pn * NR, KB);
    qk_panel<V, M, false>(dO, t.Dvp, vt + int64_t(pn) * t.Dv * NR, t.Dv, NR, 1.f, dP + pn * NR, KB);
  }
  bias.add(M, nb, S, KB);
  bwd_probs_rows<V>(M, S, KB, nk, msh, lg);
  float own_dl[M];
  if (own) bwd_own_delta(M, S, dP, KB, nb, t.Dv, vn, dn, dl, own_dl);
  bwd_ds_rows<V>(M, S, dP, KB, nk, own ? own_dl : dl);
  bias.grad(p, M, nb, dP, KB);
  bwd_updates<V, M>(t, S, dP, KB, nb, nk, qf, dO, kr, dQ, dKb, dVb);
}

template <class V, class T>
void tile_bwd_span(const BwdParams& p, const Span& s, float* ws, float* dq_out) {
  constexpr int KB = TileShape<V>::KB, MR = TileShape<V>::MR;
  const TileDims t = tile_dims<V>(p.Dk, p.Dv);
  const int64_t N = p.N;
  const TileBwdWs lay = tile_bwd_ws<V>(N, t);
  float* qf = ws + lay.qf;
  float* dO = ws + lay.dO;
  float* dQ = ws + lay.dQ;
  float* msh = ws + lay.msh;
  float* lg = ws + lay.lg;
  float* dl = ws + lay.dl;
  float* kt = ws + lay.kt;
  float* vt = ws + lay.vt;
  float* kr = ws + lay.kr;
  float* dKb = ws + lay.dKb;
  float* dVb = ws + lay.dVb;
  float* S = ws + lay.S;
  float* dP = ws + lay.dP;
  float* vr = ws + lay.vr;
  float* vn = ws + lay.vn;
  float* dn = ws + lay.dn;
  constexpr bool pairs = kPairs<V, T>;
  uint32_t* q2 = reinterpret_cast<uint32_t*>(ws + lay.q2);
  uint32_t* k2 = reinterpret_cast<uint32_t*>(kt);

  load_queries<V, T>(p, s, t, qf);  // dK += dS^T Q needs them as fp32 also when scoring on pairs
  if constexpr (pairs) load_query_pairs(p, s, t.Dk, q2);
  const TileScoring sc{qf, t.Dkp, kt, t.Dk, q2, k2, pairs_of(t.Dk)};
  bwd_load_rows<V, T>(p, s, t, t.Dkp, dO, dQ, msh, lg, dl);
  const bool own = s.whole && s.count <= KB;  // the row's every key in one block: bwd_own_delta
  if (own) row_norms(int(N), dO, t.Dvp, t.Dv, dn);
  const T* kb = static_cast<const T*>(p.k) + s.b * p.k_sb + s.h * p.k_sh;
  const T* vb = static_cast<const T*>(p.v) + s.b * p.v_sb + s.h * p.v_sh;
  const float scale = float(p.scale);
  for (int64_t i0 = 0; i0 < s.count; i0 += KB) {
    const int nb = int(s.count - i0 < KB ? s.count - i0 : KB);
    if constexpr (pairs)
      pack_block_pairs<V>(s, i0, nb, kb, p.k_sl, t.Dk, t.Dkp, kt, kr);  // kr keeps the fp32 rows
    else
      pack_block<V>(s, i0, nb, kb, p.k_sl, t.Dk, t.Dkp, kt, kr);
    pack_block<V>(s, i0, nb, vb, p.v_sl, t.Dv, t.Dvp, vt, vr);
    prefetch_next_block(s, i0, KB, kb, p.k_sl, t.Dk, vb, p.v_sl, t.Dv);
    if (own) row_norms(nb, vr, t.Dvp, t.Dv, vn);
    bwd_zero_block(t, nb, dKb, dVb);
    for (int64_t n0 = 0; n0 < N; n0 += MR) {
      const int rows = int(N - n0 < MR ? N - n0 : MR);
      with_rows<MR>(rows, [&](auto mc) {
        bwd_tile_rows<V, decltype(mc)::value, pairs>(t, sc.rows_from(n0), p, BlockBias{p, s, n0, i0},
                                                     qf + n0 * t.Dkp, dO + n0 * t.Dvp, dQ + n0 * t.Dkp, msh + n0,
                                                     lg + n0, dl + n0, vt, kr, nb, scale, S, dP, dKb, dVb, own, vn,
                                                     dn + n0);
      });
    }
    bwd_write_block<V, T>(p, s, t, i0, nb, dKb, dVb);
  }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t d = 0; d < t.Dk; ++d) dq_out[n * t.Dk + d] = dQ[n * t.Dkp + d] * scale;
}

// Workspace in floats that any tiled kernel of this V needs (the KernelTable's workspace_tile).
template <class V>
inline int64_t tile_ws_elems(int64_t N, int64_t Dk, int64_t Dv) {
  const TileDims t = tile_dims<V>(Dk, Dv);
  const int64_t f = tile_fwd_ws<V>(N, t).total, b = tile_bwd_ws<V>(N, t).total;
  return f > b ? f : b;
}

template <class V>
void tile_fwd_entry(const FwdParams& p, const Span& s, void* ws, void* acc, void* m, void* l) {
  float* w = static_cast<float*>(ws);
  float* a = static_cast<float*>(acc);
  float* mm = static_cast<float*>(m);
  float* ll = static_cast<float*>(l);
  switch (p.dtype) {
    case kF16: tile_fwd_span<V, fp16_t, true>(p, s, w, a, mm, ll); break;
    case kBF16: tile_fwd_span<V, bf16_t, true>(p, s, w, a, mm, ll); break;
    default: tile_fwd_span<V, float, true>(p, s, w, a, mm, ll); break;
  }
}

// Softmax statistics (StatsFn) with the tiled backward's logits.
template <class V>
void tile_stats_entry(const FwdParams& p, const Span& s, void* ws, void* m, void* l) {
  float* w = static_cast<float*>(ws);
  float* mm = static_cast<float*>(m);
  float* ll = static_cast<float*>(l);
  switch (p.dtype) {
    case kF16: tile_fwd_span<V, fp16_t, false>(p, s, w, nullptr, mm, ll); break;
    case kBF16: tile_fwd_span<V, bf16_t, false>(p, s, w, nullptr, mm, ll); break;
    default: tile_fwd_span<V, float, false>(p, s, w, nullptr, mm, ll); break;
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
