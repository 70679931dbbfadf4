// Tiled kernels for CPUs with AMX (AMX-TILE, AMX-BF16: Sapphire Rapids and later) on bf16
// inputs; fp32 and fp16 inputs run attention_pool_tile_avx512_bf16.cpp's kernels. The matrix products whose
// operands are bf16 run on the tile unit (tdpbf16ps: exact bf16 products, fp32 sums), the
// softmax and the rest on AVX-512 (Vec512 and attention_pool_tile_impl.h's row code):
//   forward: S = Q K^T on tiles; online softmax; O += P V on tiles, with P as the sum of two
//            bf16 parts (hi + lo: products with V exact, O accumulated in fp32, so O is as
//            accurate as with fp32 P; the backward's delta = sum(dO O) depends on that), or
//            on the inference path (FwdParams::round_p) P rounded to bf16 alone, one product;
//   stats:   S = Q K^T on tiles, exactly as the forward and the backward score;
//   backward: S = Q K^T and dP = dO V^T on tiles (both exact products of bf16 inputs); p and dS
//            in fp32 (attention_pool_tile_impl.h's row code); dK = dS^T Q and dV = P^T dO on tiles with P and
//            dS in bf16 (fp32 accumulation; summed over all the span's queries at once, per
//            block of keys); dQ += dS K in fp32 on AVX-512: its terms cancel (a row's dS sums
//            to 0), so dS rounded to bf16 would cost it more than the bf16 reference's error.
// Shapes: 16 queries (one tile of rows; a span's queries are padded to 16 with zero rows) against
// blocks of 64 keys (four tiles of 16 key columns), the head dims taken 32 at a time (16 bf16
// pairs per tile row), zero-padded. Every tile is configured 16 rows x 64 bytes; the kernels load
// the configuration on entry and release the tiles on return, on the thread they run on.
// The launcher calls in only on a CPU with AMX whose kernel granted this process the tile data
// (amx_permitted in isa_dispatch.cpp). Compiled for the ISA by avx512_target_push.h,
// never by a global flag; in the emulation test build amx_emulation.h stands in for the tile
// instructions. No torch/STL header here (see attention_pool_kernels.h for why).
#if defined(__x86_64__) || defined(_M_X64)

#define ATTNKERN_AVX512_BF16 1
#define ATTNKERN_AMX 1
#include "avx512_target_push.h"

#include "vec_avx512.h"
#include "attention_pool_tile_impl.h"

namespace attnkern {
namespace cpu {
namespace {

using V = Vec512;
constexpr int kRows = 16;     // query rows of a tile
constexpr int kKeys = 64;     // keys of a block: four tiles of 16 key columns
constexpr int kChunk = 32;    // keys of one P tile (16 pairs)
static_assert(kKeys == TileShape<V>::KB, "the fp32 row code strides S by TileShape<V>::KB");

inline int64_t ceil_to(int64_t a, int64_t b) { return tile_ceil(a, b) * b; }

// GCC's tile-load asm (<amxtileintrin.h>) names only the address, not the memory behind it, and
// its ldtilecfg only the configuration's first 8 bytes, so the compiler may keep earlier stores
// there (the packing, the softmax's rescale of O, the configuration itself) pending past the
// instruction: this barrier, before each group of tile loads, makes them all happen first.
inline void tile_fence(const void* p) { __asm__ volatile("" : : "r"(p) : "memory"); }

// Palette 1, tiles 0-7 all 16 rows x 64 bytes.
struct alignas(64) AmxConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

struct AmxTiles {
  AmxTiles() {
    AmxConfig c{};
    c.palette = 1;
    for (int i = 0; i < 8; ++i) {
      c.colsb[i] = 64;
      c.rows[i] = kRows;
    }
    tile_fence(&c);
    _tile_loadconfig(&c);
  }
  ~AmxTiles() { _tile_release(); }
};

// Dimensions: fp32 rows padded to 16 (TileDims), bf16 pairs padded to 16 per tile row.
struct AmxDims {
  TileDims t;
  int64_t K2, V2;  // pairs of Dk and Dv, padded to whole tile rows
};
inline AmxDims amx_dims(int64_t Dk, int64_t Dv) {
  return {tile_dims<V>(Dk, Dv), ceil_to(pairs_of(Dk), 16), ceil_to(pairs_of(Dv), 16)};
}

// Keys [i0, i0 + nb) of the span as the B tiles of the products with them: [nk / 16][D2p][16]
// pairs (pack_pair_panels, panels of 16), key j in column j % 16 of group j / 16.
inline void pack_key_pairs(const Span& s, int64_t i0, int nb, int nk, const bf16_t* base, int64_t sl, int64_t D,
                           int64_t D2p, uint32_t* dst) {
  pack_pair_panels(s, i0, nb, nk, 16, base, sl, D, D2p, dst);
}

// Rows as the B tiles of a product summed over them: pairs of neighbouring rows [nk / 2][Dp],
// dst[j / 2][d] = (row j)[d] in the low half for even j, the high half for odd j; row(j) is the
// j-th of nb rows (D bf16 elements), zero rows from nb up to nk and zero dims past D.
template <class Row>
inline void pairs_of_rows(int64_t nb, int64_t nk, int64_t D, int64_t Dp, Row row, uint16_t* dst) {
  for (int64_t j = 0; j < nk; ++j) {
    uint16_t* out = dst + (j / 2) * Dp * 2 + (j % 2);
    int64_t d = 0;
    if (j < nb) {
      const bf16_t* v = row(j);
      for (; d < D; ++d) out[2 * d] = v[d].x;
    }
    for (; d < Dp; ++d) out[2 * d] = 0;
  }
}

// Rows [i0, i0 + nb) of the span (keys or values: base, stride sl) as pairs_of_rows.
inline void pack_row_pairs(const Span& s, int64_t i0, int nb, int nk, const bf16_t* base, int64_t sl, int64_t D,
                           int64_t Dp, uint16_t* dst) {
  pairs_of_rows(nb, nk, D, Dp, [&](int64_t j) { return base + span_pos(s, i0 + j) * sl; }, dst);
}

// C[16][16 g + c] = sum over the D2p pairs of a (16 rows as pairs, stride as) times group g of
// b ([ng][D2p][16]) for g < ng <= 4, stored to C (row stride cs floats). Tiles 0-3 accumulate,
// 4 holds a's rows, 5 and 6 alternate b's groups.
inline void tile_products(const uint32_t* a, int64_t as, const uint32_t* b, int64_t D2p, int ng, float* C,
                          int64_t cs) {
  const int64_t gs = D2p * 16;  // pairs per group of b
  tile_fence(b);
  _tile_zero(0);
  if (ng > 1) _tile_zero(1);
  if (ng > 2) _tile_zero(2);
  if (ng > 3) _tile_zero(3);
  for (int64_t k = 0; k < D2p; k += 16) {
    _tile_loadd(4, a + k, as * 4);
    const uint32_t* bk = b + k * 16;
    _tile_loadd(5, bk, 64);
    _tile_dpbf16ps(0, 4, 5);
    if (ng > 1) {
      _tile_loadd(6, bk + gs, 64);
      _tile_dpbf16ps(1, 4, 6);
    }
    if (ng > 2) {
      _tile_loadd(5, bk + 2 * gs, 64);
      _tile_dpbf16ps(2, 4, 5);
    }
    if (ng > 3) {
      _tile_loadd(6, bk + 3 * gs, 64);
      _tile_dpbf16ps(3, 4, 6);
    }
  }
  _tile_stored(0, C, cs * 4);
  if (ng > 1) _tile_stored(1, C + 16, cs * 4);
  if (ng > 2) _tile_stored(2, C + 32, cs * 4);
  if (ng > 3) _tile_stored(3, C + 48, cs * 4);
}

// C[16][0:Dp] (fp32, row stride Dp) = (ACC ? C : 0) + A[16][0:K] (bf16, row stride as) times
// B, pairs of its K rows [K / 2][Dp] (pairs_of_rows), K a multiple of 32: O += P V (A: a tile's
// rows) and the block's dV = P^T dO, dK = dS^T Q (A: 16 keys' columns).
template <bool ACC>
inline void tile_times_pairs(const uint16_t* A, int64_t as, int64_t K, const uint32_t* B, int64_t Dp, float* C) {
  const int64_t cs = Dp * 4, bs = Dp * 4;
  tile_fence(C);
  for (int64_t c = 0; c < Dp; c += 64) {
    const int nc = int((Dp - c) / 16 < 4 ? (Dp - c) / 16 : 4);
    if constexpr (ACC) {
      _tile_loadd(0, C + c, cs);
      if (nc > 1) _tile_loadd(1, C + c + 16, cs);
      if (nc > 2) _tile_loadd(2, C + c + 32, cs);
      if (nc > 3) _tile_loadd(3, C + c + 48, cs);
    } else {
      _tile_zero(0);
      if (nc > 1) _tile_zero(1);
      if (nc > 2) _tile_zero(2);
      if (nc > 3) _tile_zero(3);
    }
    for (int64_t kc = 0; kc < K; kc += kChunk) {
      _tile_loadd(4, A + kc, as * 2);
      const uint32_t* bk = B + (kc / 2) * Dp + c;
      _tile_loadd(5, bk, bs);
      _tile_dpbf16ps(0, 4, 5);
      if (nc > 1) {
        _tile_loadd(6, bk + 16, bs);
        _tile_dpbf16ps(1, 4, 6);
      }
      if (nc > 2) {
        _tile_loadd(5, bk + 32, bs);
        _tile_dpbf16ps(2, 4, 5);
      }
      if (nc > 3) {
        _tile_loadd(6, bk + 48, bs);
        _tile_dpbf16ps(3, 4, 6);
      }
    }
    _tile_stored(0, C + c, cs);
    if (nc > 1) _tile_stored(1, C + c + 16, cs);
    if (nc > 2) _tile_stored(2, C + c + 32, cs);
    if (nc > 3) _tile_stored(3, C + c + 48, cs);
  }
}

// M rows of X (fp32, row stride kKeys, nk columns) as bf16 rows of Y (row stride kKeys).
inline void rows_to_bf16(int M, const float* X, int nk, uint16_t* Y) {
  for (int r = 0; r < M; ++r)
    for (int j = 0; j < nk; j += V::W) V::load(X + r * kKeys + j).store(reinterpret_cast<bf16_t*>(Y + r * kKeys + j));
}

// The same as two bf16 parts, X = hi + lo to about 2^-16 of X: hi = bf16(X), lo = bf16(X - hi).
inline void rows_to_bf16_split(int M, const float* X, int nk, uint16_t* hi, uint16_t* lo) {
  for (int r = 0; r < M; ++r)
    for (int j = 0; j < nk; j += V::W) {
      const int64_t o = r * kKeys + j;
      const V x = V::load(X + o);
      x.store(reinterpret_cast<bf16_t*>(hi + o));
      (x - V::load(reinterpret_cast<const bf16_t*>(hi + o))).store(reinterpret_cast<bf16_t*>(lo + o));
    }
}

// The logits of M rows from their dot products in S (nk keys, nb valid): times scale, plus the
// bias, -inf past nb (finish_scores' order), and each row's block max in bmax (if given).
inline void finish_logits(int M, float* S, int nb, int nk, float scale, const BlockBias& bias, float* bmax) {
  const V sv = V::set1(scale);
  for (int r = 0; r < M; ++r) {
    float* sr = S + r * kKeys;
    V mx = V::set1(neg_inff());
    for (int j = 0; j < nk; j += V::W) {
      const V x = (V::load(sr + j) * sv).mask_tail(nb - j);
      x.store(sr + j);
      mx = V::max(mx, x);
    }
    if (bmax) bmax[r] = mx.reduce_max();
  }
  if (!bias.p.bias) return;
  bias.add(M, nb, S, kKeys);
  for (int r = 0; r < M && bmax; ++r) {
    V mx = V::set1(neg_inff());
    for (int j = 0; j < nk; j += V::W) mx = V::max(mx, V::load(S + r * kKeys + j));
    bmax[r] = mx.reduce_max();
  }
}

struct AmxFwdWs {
  int64_t q2, O, mm, ll, k2, v2, S, P, total;
};
inline AmxFwdWs amx_fwd_ws(int64_t N, const AmxDims& a) {
  const int64_t Np = ceil_to(N, kRows);
  TileBump b;
  AmxFwdWs w;
  w.q2 = b.take(Np * a.K2);             // queries as pairs [Np][K2]
  w.O = b.take(Np * a.t.Dvp);           // output accumulators (padding rows unused)
  w.mm = b.take(Np);                    // running max
  w.ll = b.take(Np);                    // running sum
  w.k2 = b.take(kKeys * a.K2);          // key block [4][K2][16]
  w.v2 = b.take(kKeys / 2 * a.t.Dvp);   // value block as key pairs [32][Dvp]
  w.S = b.take(kRows * kKeys);          // one tile's scores / probabilities [16][64]
  w.P = b.take(kRows * kKeys);          // its probabilities as two bf16 parts [2][16][64]
  w.total = b.used;
  return w;
}

struct AmxBwdWs {
  int64_t q2, o2, qq, oq, dQ, msh, lg, dl, k2, v2, kr, dKb, dVb, S, dP, dS, Pt, dSt, total;
};
// Nq: the span's queries padded to 32, the K of the block's dV = P^T dO and dK = dS^T Q.
inline AmxBwdWs amx_bwd_ws(int64_t N, const AmxDims& a) {
  const int64_t Nq = ceil_to(N, 2 * kRows);
  TileBump b;
  AmxBwdWs w;
  w.q2 = b.take(Nq * a.K2);                 // queries as pairs of dims [Nq][K2] (scores)
  w.o2 = b.take(Nq * a.V2);                 // grad_out as pairs of dims [Nq][V2] (dP)
  w.qq = b.take(Nq / 2 * a.t.Dkp);          // queries as pairs of rows [Nq / 2][Dkp] (dK)
  w.oq = b.take(Nq / 2 * a.t.Dvp);          // grad_out as pairs of rows [Nq / 2][Dvp] (dV)
  w.dQ = b.take(N * a.t.Dkp);               // dq accumulators
  w.msh = b.take(N);                        // logit shift m
  w.lg = b.take(N);                         // log2 of the softmax sum after it
  w.dl = b.take(N);                         // delta
  w.k2 = b.take(kKeys * a.K2);              // key block [4][K2][16] (scores)
  w.v2 = b.take(kKeys * a.V2);              // value block [4][V2][16] (dP = dO V^T)
  w.kr = b.take(kKeys * a.t.Dkp);           // key block as fp32 rows [64][Dkp] (dQ += dS K)
  w.dKb = b.take(kKeys * a.t.Dkp);          // the block's dK, dV [64][Dkp], [64][Dvp]
  w.dVb = b.take(kKeys * a.t.Dvp);
  w.S = b.take(kRows * kKeys);              // one tile's scores, then P [16][64]
  w.dP = b.take(kRows * kKeys);             // its dP, then dS [16][64]
  w.dS = b.take(kRows * kKeys / 2);         // dS as bf16 [16][64]
  w.Pt = b.take(kKeys * Nq / 2);            // the block's P^T and dS^T as bf16 [64][Nq]
  w.dSt = b.take(kKeys * Nq / 2);
  w.total = b.used;
  return w;
}

// Columns n0 .. n0 + M - 1 of Yt (bf16 [nk][Nq]) from the M rows of Y (bf16, row stride kKeys).
inline void transpose_rows_bf16(int M, const uint16_t* Y, int nk, int64_t Nq, int64_t n0, uint16_t* Yt) {
  for (int j = 0; j < nk; ++j) {
    uint16_t* col = Yt + j * Nq + n0;
    for (int r = 0; r < M; ++r) col[r] = Y[r * kKeys + j];
  }
}

// Forward (PV) or stats on bf16 inputs.
template <bool PV>
void amx_fwd_span(const FwdParams& p, const Span& s, float* ws, float* acc_out, float* m_out, float* l_out) {
  const AmxDims a = amx_dims(p.Dk, p.Dv);
  const int64_t N = p.N, Np = ceil_to(N, kRows), Dvp = a.t.Dvp;
  const AmxFwdWs lay = amx_fwd_ws(N, a);
  uint32_t* q2 = reinterpret_cast<uint32_t*>(ws + lay.q2);
  float* O = ws + lay.O;
  float* mm = ws + lay.mm;
  float* ll = ws + lay.ll;
  uint32_t* k2 = reinterpret_cast<uint32_t*>(ws + lay.k2);
  uint16_t* v2 = reinterpret_cast<uint16_t*>(ws + lay.v2);
  float* S = ws + lay.S;
  uint16_t* P = reinterpret_cast<uint16_t*>(ws + lay.P);
  const bf16_t* q = static_cast<const bf16_t*>(p.q) + s.b * p.q_sb + s.h * p.q_sh;
  rows_as_pairs(q, p.q_sn, N, Np, p.Dk, a.K2, q2);
  fwd_init_rows<PV>(Np, Dvp, O, mm, ll);
  if constexpr (PV)
    for (int i = 0; i < 2 * kRows * kKeys; ++i) P[i] = 0;  // rows past a short tile's end add to O's padding
  const float scale = float(p.scale);
  const auto* kb = static_cast<const bf16_t*>(p.k) + s.b * p.k_sb + s.h * p.k_sh;
  const auto* vb = static_cast<const bf16_t*>(p.v) + s.b * p.v_sb + s.h * p.v_sh;
  const AmxTiles tiles;
  for (int64_t i0 = 0; i0 < s.count; i0 += kKeys) {
    const int nb = int(s.count - i0 < kKeys ? s.count - i0 : kKeys);
    const int nk = int(ceil_to(nb, kChunk));
    pack_key_pairs(s, i0, nb, nk, kb, p.k_sl, p.Dk, a.K2, k2);
    if constexpr (PV) pack_row_pairs(s, i0, nb, nk, vb, p.v_sl, p.Dv, Dvp, v2);
    prefetch_next_block(s, i0, kKeys, kb, p.k_sl, p.Dk, PV ? vb : nullptr, p.v_sl, p.Dv);
    for (int64_t n0 = 0; n0 < N; n0 += kRows) {
      const int M = int(N - n0 < kRows ? N - n0 : kRows);
      tile_products(q2 + n0 * a.K2, a.K2, k2, a.K2, nk / 16, S, kKeys);
      float bmax[kRows];
      finish_logits(M, S, nb, nk, scale, BlockBias{p, s, n0, i0}, bmax);
      softmax_rows<V, PV>(M, bmax, S, kKeys, nk, O + n0 * Dvp, Dvp, mm + n0, ll + n0);
      if constexpr (PV) {
        if (p.round_p) {  // the inference path: P rounded to bf16 once, as SDPA's bf16 path does
          rows_to_bf16(M, S, nk, P);
          tile_times_pairs<true>(P, kKeys, nk, reinterpret_cast<const uint32_t*>(v2), Dvp, O + n0 * Dvp);
          continue;
        }
        // P = hi + lo, both bf16: the products with V stay exact, so P V is as accurate as in
        // fp32 (P in bf16 alone makes O, and the backward's delta from it, off by 2^-9 of P V).
        rows_to_bf16_split(M, S, nk, P, P + kRows * kKeys);
        const uint32_t* vpairs = reinterpret_cast<const uint32_t*>(v2);
        tile_times_pairs<true>(P, kKeys, nk, vpairs, Dvp, O + n0 * Dvp);
        tile_times_pairs<true>(P + kRows * kKeys, kKeys, nk, vpairs, Dvp, O + n0 * Dvp);
      }
    }
  }
  fwd_write_rows<PV>(N, p.Dv, Dvp, O, mm, ll, acc_out, m_out, l_out);
}

// Backward on bf16 inputs, every matrix product on the tiles: per tile of 16 rows S = Q K^T and
// dP = dO V^T (exact products of the inputs), p and dS in fp32 (bwd_probs_rows, bwd_ds_rows;
// no bwd_own_delta: its fp32 rounding is far below bf16's tolerance), dQ += dS K in fp32
// (bwd_dq_rows); the tile's P and dS also go, as bf16, into the block's P^T and dS^T, from
// which the block's dV = P^T dO and dK = dS^T Q are formed once every tile has passed.
void amx_bwd_span(const BwdParams& p, const Span& s, float* ws, float* dq_out) {
  const AmxDims a = amx_dims(p.Dk, p.Dv);
  const TileDims& t = a.t;
  const int64_t N = p.N, Nq = ceil_to(N, 2 * kRows);
  const AmxBwdWs lay = amx_bwd_ws(N, a);
  uint32_t* q2 = reinterpret_cast<uint32_t*>(ws + lay.q2);
  uint32_t* o2 = reinterpret_cast<uint32_t*>(ws + lay.o2);
  uint16_t* qq = reinterpret_cast<uint16_t*>(ws + lay.qq);
  uint16_t* oq = reinterpret_cast<uint16_t*>(ws + lay.oq);
  float* dQ = ws + lay.dQ;
  float* msh = ws + lay.msh;
  float* lg = ws + lay.lg;
  float* dl = ws + lay.dl;
  uint32_t* k2 = reinterpret_cast<uint32_t*>(ws + lay.k2);
  uint32_t* v2 = reinterpret_cast<uint32_t*>(ws + lay.v2);
  float* kr = ws + lay.kr;
  float* dKb = ws + lay.dKb;
  float* dVb = ws + lay.dVb;
  float* S = ws + lay.S;
  float* dP = ws + lay.dP;
  uint16_t* dS = reinterpret_cast<uint16_t*>(ws + lay.dS);
  uint16_t* Pt = reinterpret_cast<uint16_t*>(ws + lay.Pt);
  uint16_t* dSt = reinterpret_cast<uint16_t*>(ws + lay.dSt);

  const bf16_t* q = static_cast<const bf16_t*>(p.q) + s.b * p.q_sb + s.h * p.q_sh;
  const bf16_t* go = static_cast<const bf16_t*>(p.go) + s.b * p.go_sb + s.h * p.go_sh;
  rows_as_pairs(q, p.q_sn, N, Nq, p.Dk, a.K2, q2);
  rows_as_pairs(go, p.go_sn, N, Nq, p.Dv, a.V2, o2);
  pairs_of_rows(N, Nq, p.Dk, t.Dkp, [&](int64_t n) { return q + n * p.q_sn; }, qq);
  pairs_of_rows(N, Nq, p.Dv, t.Dvp, [&](int64_t n) { return go + n * p.go_sn; }, oq);
  bwd_load_rows<V, bf16_t>(p, s, t, t.Dkp, nullptr, dQ, msh, lg, dl);
  // P^T and dS^T: the padding queries' columns stay zero (the tiles below write rows < N only),
  // as do the rows of dS past a short tile's end.
  for (int64_t i = 0; i < kKeys * Nq; ++i) Pt[i] = dSt[i] = 0;
  for (int i = 0; i < kRows * kKeys; ++i) dS[i] = 0;
  const bf16_t* kb = static_cast<const bf16_t*>(p.k) + s.b * p.k_sb + s.h * p.k_sh;
  const bf16_t* vb = static_cast<const bf16_t*>(p.v) + s.b * p.v_sb + s.h * p.v_sh;
  const float scale = float(p.scale);
  const AmxTiles tiles;
  for (int64_t i0 = 0; i0 < s.count; i0 += kKeys) {
    const int nb = int(s.count - i0 < kKeys ? s.count - i0 : kKeys);
    const int nk = int(ceil_to(nb, kChunk));
    pack_key_pairs(s, i0, nb, nk, kb, p.k_sl, p.Dk, a.K2, k2);
    pack_key_pairs(s, i0, nb, nk, vb, p.v_sl, p.Dv, a.V2, v2);
    pack_block<V>(s, i0, nb, kb, p.k_sl, t.Dk, t.Dkp, nullptr, kr);
    prefetch_next_block(s, i0, kKeys, kb, p.k_sl, t.Dk, vb, p.v_sl, t.Dv);
    for (int64_t n0 = 0; n0 < N; n0 += kRows) {
      const int M = int(N - n0 < kRows ? N - n0 : kRows);
      tile_products(q2 + n0 * a.K2, a.K2, k2, a.K2, nk / 16, S, kKeys);
      const BlockBias bias{p, s, n0, i0};
      finish_logits(M, S, nb, nk, scale, bias, nullptr);
      tile_products(o2 + n0 * a.V2, a.V2, v2, a.V2, nk / 16, dP, kKeys);
      bwd_probs_rows<V>(M, S, kKeys, nk, msh + n0, lg + n0);
      bwd_ds_rows<V>(M, S, dP, kKeys, nk, dl + n0);
      bias.grad(p, M, nb, dP, kKeys);
      bwd_dq_rows<V>(M, dP, kKeys, nk, kr, t.Dkp, dQ + n0 * t.Dkp);
      rows_to_bf16(M, dP, nk, dS);
      transpose_rows_bf16(M, dS, nk, Nq, n0, dSt);
      uint16_t* P = reinterpret_cast<uint16_t*>(dP);  // dP is spent: P as bf16 in its place
      rows_to_bf16(M, S, nk, P);
      transpose_rows_bf16(M, P, nk, Nq, n0, Pt);
    }
    for (int g = 0; g < nk / 16; ++g) {
      tile_times_pairs<false>(Pt + g * 16 * Nq, Nq, Nq, reinterpret_cast<const uint32_t*>(oq), t.Dvp,
                              dVb + g * 16 * t.Dvp);
      tile_times_pairs<false>(dSt + g * 16 * Nq, Nq, Nq, reinterpret_cast<const uint32_t*>(qq), t.Dkp,
                              dKb + g * 16 * t.Dkp);
    }
    bwd_write_block<V, bf16_t>(p, s, t, i0, nb, dKb, dVb);
  }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t d = 0; d < t.Dk; ++d) dq_out[n * t.Dk + d] = dQ[n * t.Dkp + d] * scale;
}

}  // namespace

void tile_fwd_amx(const FwdParams& p, const Span& s, void* ws, void* acc, void* m, void* l) {
  if (p.dtype != kBF16) return tile_fwd_avx512_bf16(p, s, ws, acc, m, l);
  amx_fwd_span<true>(p, s, static_cast<float*>(ws), static_cast<float*>(acc), static_cast<float*>(m),
                     static_cast<float*>(l));
}
void tile_bwd_amx(const BwdParams& p, const Span& s, void* ws, void* dq) {
  if (p.dtype != kBF16) return tile_bwd_avx512_bf16(p, s, ws, dq);
  amx_bwd_span(p, s, static_cast<float*>(ws), static_cast<float*>(dq));
}
void tile_stats_amx(const FwdParams& p, const Span& s, void* ws, void* m, void* l) {
  if (p.dtype != kBF16) return tile_stats_avx512_bf16(p, s, ws, m, l);
  amx_fwd_span<false>(p, s, static_cast<float*>(ws), nullptr, static_cast<float*>(m), static_cast<float*>(l));
}
// The largest of the AMX layouts and tile_workspace_avx512_bf16's (its kernels serve fp32/fp16).
int64_t tile_workspace_amx(int64_t N, int64_t Dk, int64_t Dv) {
  const AmxDims a = amx_dims(Dk, Dv);
  const int64_t f = amx_fwd_ws(N, a).total, b = amx_bwd_ws(N, a).total, o = tile_workspace_avx512_bf16(N, Dk, Dv);
  return f > b ? (f > o ? f : o) : (b > o ? b : o);
}

}  // namespace cpu
}  // namespace attnkern

#include "target_pop.h"

#endif  // x86-64
