// The CPU attention-pooling kernels, written once over a vector type `V` and included by each
// per-ISA translation unit (attention_pool_{avx512,avx2,generic}.cpp) with its set's `V`. Everything here has internal linkage (anonymous namespace), so the
// ISA-specific copies can never be merged by the linker.
//
// V is a vector type of vec_common.h (vec_scalar.h, vec_avx2.h, vec_avx512.h); 2^x is its
// exp2_accurate (exactly 0 below -126 and for -inf, +inf from 128 up, NaN stays NaN: a
// non-finite logit at a valid position must show in the result, never vanish).
//
// Shape of the work: keys are processed in blocks of W positions. For each block the scores of
// a query are W dot products, reduced horizontally all at once by transpose_reduce (or, with
// four or more queries, four queries at a time against the transposed block), so the K/V block
// is read from memory once and then reused from L1 for all N queries. One query with a small
// head dim (the common serving case) has its own register-resident, pipelined kernel
// (fwd_span_single_heads, bwd_span_single). The backward writes each dK/dV row once, straight from
// registers.
//
// Logits: every path computes a logit as s = scale * <q, k> (the dot product of the unscaled q
// and k first, then the scale, as the reference does: a large scale overflows where the
// reference's does), and the backward uses the same dot routine as the forward for each
// (N, head dim) case, so the logits it recomputes are the forward's. Probabilities are
// 2^((s - m) * log2(e)): the shift is subtracted in natural units, where s - m is exact for the
// logits that matter, so that large logits (|s| >> 1) lose nothing to the base change.
#pragma once

#include <cmath>
#include <type_traits>

#include "attention_pool_kernels.h"
#include "vec_common.h"

namespace attnkern {
namespace cpu {
namespace {

constexpr double kLog2e = 1.4426950408889634;

template <class A>
inline A scalar_exp2(A x);
template <>
inline float scalar_exp2<float>(float x) {
  return __builtin_exp2f(x);
}
template <>
inline double scalar_exp2<double>(double x) {
  return __builtin_exp2(x);
}

template <class A>
inline A neg_inf() {
  return -__builtin_inf();
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The shift subtracted from the logits before exp2: the running max, or 0 when that max is
// infinite (all logits so far -inf, or one +inf): as in the reference, masked lanes then still
// give exactly 0 and a +inf logit turns the row into NaN instead of vanishing. NaN stays NaN.
template <class A>
inline A shift_of(A m) {
  return (m == -__builtin_inf() || m == __builtin_inf()) ? A(0) : m;
}

// Workspace layouts (in accumulator elements) of the general kernels, for W lanes and head
// dims padded to Dkp / Dvp: the buffers carved from a workspace ws (null: sizing only, the
// pointers stay null) and its total size. The kernels carve their workspace with these and the
// launcher sizes it with workspace_entry below, so the two can never disagree.
template <class A>
struct Bump {
  A* base = nullptr;
  int64_t used = 0;
  A* take(int64_t n) {
    A* o = base ? base + used : nullptr;
    used += n;
    return o;
  }
};

template <class A>
struct FwdWs {
  A *qs, *acc, *mm, *ll, *pb, *p4, *kt_buf, *rows_buf;
  int64_t total;
};
template <class A>
inline FwdWs<A> fwd_ws(A* ws, int W, int64_t N, int64_t Dkp, int64_t Dvp) {
  Bump<A> b{ws};
  FwdWs<A> w;
  w.qs = b.take(N * Dkp);        // queries, fp32/64, padded with zeros
  w.acc = b.take(N * Dvp);       // output accumulators
  w.mm = b.take(N);              // running max of the logits
  w.ll = b.take(N);              // running sum
  w.pb = b.take(2 * W);          // probabilities of one query's step (2 blocks)
  w.p4 = b.take(4 * W);          // probabilities of four queries [4][W]
  w.kt_buf = b.take(Dkp * W);    // key block transposed [Dkp][W]
  w.rows_buf = b.take(W * Dkp);  // key block as fp32 rows [W][Dkp]
  w.total = b.used;
  return w;
}

template <class A>
struct BwdWs {
  A *qf, *dof, *dqa, *msh, *lg, *dl, *pb, *dsb, *kt_buf, *vt_buf, *rows_buf;
  int64_t total;
};
template <class A>
inline BwdWs<A> bwd_ws(A* ws, int W, int64_t N, int64_t Dkp, int64_t Dvp) {
  Bump<A> b{ws};
  BwdWs<A> w;
  w.qf = b.take(N * Dkp);   // q, fp32/64, padded
  w.dof = b.take(N * Dvp);  // grad_out
  w.dqa = b.take(N * Dkp);  // dq accumulator
  w.msh = b.take(N);        // logit shift
  w.lg = b.take(N);         // log2 of the softmax sum after that shift
  w.dl = b.take(N);         // delta
  w.pb = b.take(N * W);     // probabilities of the block [N][W]
  w.dsb = b.take(N * W);    // scale * ds of the block [N][W]
  w.kt_buf = b.take(Dkp * W);                            // key block transposed [Dkp][W] (N >= 4)
  w.vt_buf = b.take(Dvp * W);                            // value block transposed [Dvp][W]
  w.rows_buf = b.take(W * (Dkp > Dvp ? Dkp : Dvp));      // a block as fp32/64 rows
  w.total = b.used;
  return w;
}

// Loads chunk c of a head vector whose last chunk holds `tail` (1..W) elements.
template <class V, class T>
inline V load_chunk(const T* p, int64_t c, int64_t last, int tail) {
  return (c < last || tail == V::W) ? V::load(p + c * V::W) : V::load_partial(p + c * V::W, tail);
}

// Scores of one query against the W keys of a block: lane j = <x, k_j>. x is a padded fp32/64
// vector in the workspace (zeros past D), kp[j] points at key j (repeated past the block end).
// Keys are read row by row (each row front to back, as the hardware prefetchers like it),
// with up to four chunks of x held in registers.
template <class V, class T>
inline V block_dots(const typename V::A* x, const T* const* kp, int64_t nch, int tail) {
  constexpr int W = V::W;
  V acc[W];
#pragma GCC unroll 16
  for (int j = 0; j < W; ++j) acc[j] = V::zero();
  const int64_t nfull = tail == W ? nch : nch - 1;
  int64_t c = 0;
  for (; c + 4 <= nfull; c += 4) {
    const V x0 = V::load(x + c * W), x1 = V::load(x + (c + 1) * W);
    const V x2 = V::load(x + (c + 2) * W), x3 = V::load(x + (c + 3) * W);
#pragma GCC unroll 16
    for (int j = 0; j < W; ++j) {
      const T* r = kp[j] + c * W;
      V a = V::fma(x0, V::load(r), acc[j]);
      a = V::fma(x1, V::load(r + W), a);
      a = V::fma(x2, V::load(r + 2 * W), a);
      acc[j] = V::fma(x3, V::load(r + 3 * W), a);
    }
  }
  for (; c < nfull; ++c) {
    const V xc = V::load(x + c * W);
#pragma GCC unroll 16
    for (int j = 0; j < W; ++j) acc[j] = V::fma(xc, V::load(kp[j] + c * W), acc[j]);
  }
  if (c < nch) {
    const V xc = V::load(x + c * W);
#pragma GCC unroll 16
    for (int j = 0; j < W; ++j) acc[j] = V::fma(xc, V::load_partial(kp[j] + c * W, tail), acc[j]);
  }
  return V::transpose_reduce(acc);
}

// y[0:nch*W] = y * y_scale + sum_{j < nb} w[j] * row_j, rows read from input rows rp[j]
// (dtype T). Four chunks at a time stay in registers while the rows stream past, so each row is
// read front to back; even and odd rows feed separate accumulators, so eight FMA chains run in
// parallel (one chain per chunk would be bound by the FMA latency, not its throughput).
template <class V, class T>
inline void block_axpy_rows(typename V::A* y, const typename V::A* w, const T* const* rp, int nb,
                            int64_t nch, int tail, typename V::A y_scale) {
  constexpr int W = V::W;
  const V ys = V::set1(y_scale);
  const int64_t nfull = tail == W ? nch : nch - 1;
  int64_t c = 0;
  for (; c + 4 <= nfull; c += 4) {
    V a0 = V::load(y + c * W) * ys, a1 = V::load(y + (c + 1) * W) * ys;
    V a2 = V::load(y + (c + 2) * W) * ys, a3 = V::load(y + (c + 3) * W) * ys;
    V b0 = V::zero(), b1 = V::zero(), b2 = V::zero(), b3 = V::zero();
    int j = 0;
    for (; j + 2 <= nb; j += 2) {
      const V w0 = V::set1(w[j]), w1 = V::set1(w[j + 1]);
      const T* r = rp[j] + c * W;
      const T* u = rp[j + 1] + c * W;
      a0 = V::fma(w0, V::load(r), a0);
      a1 = V::fma(w0, V::load(r + W), a1);
      a2 = V::fma(w0, V::load(r + 2 * W), a2);
      a3 = V::fma(w0, V::load(r + 3 * W), a3);
      b0 = V::fma(w1, V::load(u), b0);
      b1 = V::fma(w1, V::load(u + W), b1);
      b2 = V::fma(w1, V::load(u + 2 * W), b2);
      b3 = V::fma(w1, V::load(u + 3 * W), b3);
    }
    if (j < nb) {
      const V w0 = V::set1(w[j]);
      const T* r = rp[j] + c * W;
      a0 = V::fma(w0, V::load(r), a0);
      a1 = V::fma(w0, V::load(r + W), a1);
      a2 = V::fma(w0, V::load(r + 2 * W), a2);
      a3 = V::fma(w0, V::load(r + 3 * W), a3);
    }
    (a0 + b0).store(y + c * W);
    (a1 + b1).store(y + (c + 1) * W);
    (a2 + b2).store(y + (c + 2) * W);
    (a3 + b3).store(y + (c + 3) * W);
  }
  for (; c < nfull; ++c) {
    V a = V::load(y + c * W) * ys, b = V::zero();
    int j = 0;
    for (; j + 2 <= nb; j += 2) {
      a = V::fma(V::set1(w[j]), V::load(rp[j] + c * W), a);
      b = V::fma(V::set1(w[j + 1]), V::load(rp[j + 1] + c * W), b);
    }
    if (j < nb) a = V::fma(V::set1(w[j]), V::load(rp[j] + c * W), a);
    (a + b).store(y + c * W);
  }
  if (c < nch) {
    V a = V::load(y + c * W) * ys;
    for (int j = 0; j < nb; ++j) a = V::fma(V::set1(w[j]), V::load_partial(rp[j] + c * W, tail), a);
    a.store(y + c * W);
  }
}

// Row pointers of the block starting at valid position i0; past the block end (nb <= j < W)
// they repeat the last row, whose scores are then masked to -inf.
template <int K, class T>
inline void block_rows(const Span& s, int64_t i0, int nb, const T* base, int64_t stride_l, const T** rp) {
  if (!s.idx) {
    const T* r = base + (s.start + i0) * stride_l;
    for (int j = 0; j < K; ++j) rp[j] = r + (j < nb ? j : nb - 1) * stride_l;
  } else {
    for (int j = 0; j < K; ++j) rp[j] = base + (s.start + int64_t(s.idx[i0 + (j < nb ? j : nb - 1)])) * stride_l;
  }
}

// Where the span's row 0 lies in K and V (position i of the span is row start + i, or
// start + idx[i], from there).
template <class T>
struct KvBases {
  const T* k;
  const T* v;
};

template <class T>
inline KvBases<T> kv_bases(const FwdParams& p, const Span& s) {
  return {static_cast<const T*>(p.k) + s.b * p.k_sb + s.h * p.k_sh,
          static_cast<const T*>(p.v) + s.b * p.v_sb + s.h * p.v_sh};
}

// Asks for the K and V rows of valid positions [i0, i1) ahead of use (every cache line of each
// row): a history is a run of short rows, and the hardware prefetchers restart at every row
// and page, so without this the core waits on memory instead of overlapping it with the
// arithmetic.
template <class T>
inline void prefetch_rows(const FwdParams& p, const Span& s, int64_t i0, int64_t i1, const T* kb, const T* vb) {
  const int64_t kbytes = p.Dk * int64_t(sizeof(T)) + (p.heads - 1) * p.k_sh * int64_t(sizeof(T));
  const int64_t vbytes = p.Dv * int64_t(sizeof(T)) + (p.heads - 1) * p.v_sh * int64_t(sizeof(T));
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t pos = s.start + (s.idx ? int64_t(s.idx[i]) : i);
    const char* kr = reinterpret_cast<const char*>(kb + pos * p.k_sl);
    const char* vr = reinterpret_cast<const char*>(vb + pos * p.v_sl);
    for (int64_t o = 0; o < kbytes; o += 64) __builtin_prefetch(kr + o, 0, 3);
    for (int64_t o = 0; o < vbytes; o += 64) __builtin_prefetch(vr + o, 0, 3);
  }
}

// The first p.prefetch positions of a span (the launcher calls this, through
// prefetch_span_head in attention_pool_generic.cpp, for the task that runs next).
template <class T>
inline void prefetch_head(const FwdParams& p, const Span& s) {
  const auto [kb, vb] = kv_bases<T>(p, s);
  prefetch_rows(p, s, 0, s.count < p.prefetch ? s.count : p.prefetch, kb, vb);
}

// Software prefetch of a span processed `step` positions at a time: called at the start of
// each step i0, it asks for the rows p.prefetch positions ahead. The launcher prefetches the
// first p.prefetch positions of a padded/jagged span; a mask span's positions are known only
// here, so its first ones are asked for at i0 = 0.
template <class T>
inline void prefetch_step(const FwdParams& p, const Span& s, int64_t i0, int64_t step, const T* kb, const T* vb) {
  const int64_t pf = p.prefetch;
  if (pf <= 0) return;
  if (i0 == 0 && s.idx) prefetch_rows(p, s, 0, s.count < pf ? s.count : pf, kb, vb);
  if (i0 + pf < s.count) prefetch_rows(p, s, i0 + pf, i0 + pf + step < s.count ? i0 + pf + step : s.count, kb, vb);
}

// The score bias of query n of the span's call (p.n0 + n of the op's), head s.h + dh, at the
// block's lanes j < nb, i.e. valid positions i0 + j (lanes past nb repeat the last one: they are
// masked to -inf after); 0 without bias. Read once per position and query block.
template <class V>
inline V bias_lanes(const FwdParams& p, const Span& s, int64_t n, int64_t dh, int64_t i0, int nb) {
  using A = typename V::A;
  if (!p.bias) return V::zero();
  const A* b = static_cast<const A*>(p.bias) + s.b * p.bias_sb + ((p.n0 + n) % p.bias_nb) * p.bias_sn +
               (s.h + dh) * p.bias_sh;
  alignas(64) A x[V::W];
  for (int j = 0; j < V::W; ++j) {
    const int64_t i = i0 + (j < nb ? j : nb - 1);
    x[j] = b[(s.start + (s.idx ? int64_t(s.idx[i]) : i)) * p.bias_sl];
  }
  return V::load(x);
}

// grad_bias += g (the gradient of query n's logits at the block's lanes j < nb): a span's
// positions and head are its own, so this is the entry's one writer (BwdParams::gbias).
template <class V>
inline void add_grad_bias(const BwdParams& p, const Span& s, int64_t n, int64_t i0, int nb, V g) {
  using A = typename V::A;
  if (!p.gbias) return;
  A* gb = static_cast<A*>(p.gbias) + s.b * p.gb_sb + ((p.n0 + n) % p.bias_nb) * p.gb_sn + s.h * p.gb_sh;
  alignas(64) A x[V::W];
  g.store(x);
  for (int j = 0; j < nb; ++j) gb[(s.start + (s.idx ? int64_t(s.idx[i0 + j]) : i0 + j)) * p.gb_sl] += x[j];
}

// The running max of a query is only moved when a block's max exceeds it by more than
// kLazyMax = 8 ln 2: probabilities then stay <= 2^8 (exact enough and far from overflow in
// fp32), and the common case (no move, alpha = 1) is a predictable branch instead of a chain
// of exp2 and rescaling on every block. Returns alpha, the factor that rescales the accumulator.
constexpr double kLazyMax = 8.0 * 0.6931471805599453;

template <class A>
inline A lazy_max_update(A bmax, A* mm, A* ll) {
  const A m = *mm;
  if (!(bmax > m + A(kLazyMax))) return A(1);
  const A alpha = scalar_exp2<A>((m - bmax) * A(kLog2e));  // 0 when m = -inf (first block)
  *mm = bmax;
  *ll *= alpha;
  return alpha;
}

// exp(s - m) as 2^((s - m) log2 e): exactly 0 for s = -inf (masked lanes).
template <class V>
inline V exp_shifted(V s, typename V::A m) {
  using A = typename V::A;
  return exp2_accurate((s - V::set1(m)) * V::set1(A(kLog2e)));
}

// Online-softmax step of one query for one block: updates its running max/sum and returns
// the block's probabilities (in pb) and the factor alpha that rescales its accumulator.
template <class V>
inline typename V::A softmax_step(V sc, typename V::A* mm, typename V::A* ll, typename V::A* pb) {
  using A = typename V::A;
  const A alpha = lazy_max_update<A>(sc.reduce_max(), mm, ll);
  const V pr = exp_shifted(sc, shift_of(*mm));
  *ll += pr.reduce_add();
  pr.store(pb);
  return alpha;
}

// The same for two blocks at once (keys [0, W) in s0, [W, 2W) in s1): twice the keys per
// running-max decision and two independent exp2 chains.
template <class V>
inline typename V::A softmax_step2(V s0, V s1, typename V::A* mm, typename V::A* ll, typename V::A* pb) {
  using A = typename V::A;
  const A b0 = s0.reduce_max(), b1 = s1.reduce_max();
  const A alpha = lazy_max_update<A>(b0 > b1 ? b0 : b1, mm, ll);
  const A mv = shift_of(*mm);
  const V p0 = exp_shifted(s0, mv), p1 = exp_shifted(s1, mv);
  *ll += (p0 + p1).reduce_add();
  p0.store(pb);
  p1.store(pb + V::W);
  return alpha;
}

// acc_i = acc_i * alpha_i + sum_j pb_i[j] v_j for four queries i at once (G chunks of the value
// rows in flight, 4 x G accumulators in registers): each value row is loaded once for all four.
template <class V, class T, int G>
inline void pv4_chunks(typename V::A* const* acc, const typename V::A* alpha, const typename V::A* pb,
                       const T* const* vp, int nb, int64_t c, int tail) {
  constexpr int W = V::W;
  V a[4][G];
  for (int i = 0; i < 4; ++i)
    for (int g = 0; g < G; ++g) a[i][g] = V::load(acc[i] + (c + g) * W) * V::set1(alpha[i]);
  for (int j = 0; j < nb; ++j) {
    V x[G];
    for (int g = 0; g < G; ++g)
      x[g] = tail == W ? V::load(vp[j] + (c + g) * W) : V::load_partial(vp[j] + (c + g) * W, tail);
    for (int i = 0; i < 4; ++i) {
      const V w = V::set1(pb[i * W + j]);
      for (int g = 0; g < G; ++g) a[i][g] = V::fma(w, x[g], a[i][g]);
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int g = 0; g < G; ++g) a[i][g].store(acc[i] + (c + g) * W);
}

// A block of W rows (dtype T, rows rp[j]) transposed into tb[d][j] (fp32/64), through
// rows_buf [W][nch * W]: done once per block, it lets several queries be scored with broadcast
// FMAs and no horizontal reductions.
template <class V, class T>
inline void transpose_block(const T* const* rp, int64_t nch, int tail, int64_t D, typename V::A* rows_buf,
                            typename V::A* tb) {
  constexpr int W = V::W;
  const int64_t Dp = nch * W;
  for (int j = 0; j < W; ++j)
    for (int64_t c = 0; c < nch; ++c) load_chunk<V>(rp[j], c, nch - 1, tail).store(rows_buf + j * Dp + c * W);
  for (int64_t d = 0; d < D; ++d)
    for (int j = 0; j < W; ++j) tb[d * W + j] = rows_buf[j * Dp + d];
}

// Scores of four vectors x_i (rows of x, stride Dp) against a transposed block tb[d][j]:
// lane j of out[i] = <x_i, row_j>.
template <class V>
inline void dots4(const typename V::A* x, int64_t Dp, const typename V::A* tb, int64_t D, V* out) {
  V s0 = V::zero(), s1 = V::zero(), s2 = V::zero(), s3 = V::zero();
  for (int64_t d = 0; d < D; ++d) {
    const V kd = V::load(tb + d * V::W);
    s0 = V::fma(V::set1(x[d]), kd, s0);
    s1 = V::fma(V::set1(x[Dp + d]), kd, s1);
    s2 = V::fma(V::set1(x[2 * Dp + d]), kd, s2);
    s3 = V::fma(V::set1(x[3 * Dp + d]), kd, s3);
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

// The same for K, V, dK and dV.
template <class T>
struct BwdBases {
  const T* k;
  const T* v;
  T* gk;
  T* gv;
};

template <class T>
inline BwdBases<T> bwd_bases(const BwdParams& p, const Span& s) {
  const KvBases<T> kv = kv_bases<T>(p, s);
  return {kv.k, kv.v, static_cast<T*>(p.gk) + s.b * p.gk_sb + s.h * p.gk_sh,
          static_cast<T*>(p.gv) + s.b * p.gv_sb + s.h * p.gv_sh};
}

// The single-query kernels are compiled for head dims of NC = 1, 2 or 4 vectors, and 8 whole
// ones (the compiler then keeps part of q/dO on the stack, still faster than the general
// kernels); FULL when Dk == Dv == NC * W (no partial chunk). with_single_dims calls
// f(SingleDims<NC, FULL>{}) for the matching instance and returns false when there is none.
template <int NC, bool FULL>
struct SingleDims {
  static constexpr int nc = NC;
  static constexpr bool full = FULL;
};

template <int W, class F>
inline bool with_single_dims(int64_t N, int64_t Dk, int64_t Dv, F&& f) {
  const int64_t nck = ceil_div(Dk, W), ncv = ceil_div(Dv, W);
  if (N != 1 || nck != ncv) return false;
  const bool full = Dk == nck * W && Dv == nck * W;
  switch (nck * 2 + (full ? 1 : 0)) {
    case 2: f(SingleDims<1, false>{}); return true;
    case 3: f(SingleDims<1, true>{}); return true;
    case 4: f(SingleDims<2, false>{}); return true;
    case 5: f(SingleDims<2, true>{}); return true;
    case 8: f(SingleDims<4, false>{}); return true;
    case 9: f(SingleDims<4, true>{}); return true;
    case 17: f(SingleDims<8, true>{}); return true;  // e.g. D = 128 in fp32 on AVX-512
    default: return false;
  }
}

// Chunk c of a row (NC chunks, the last holding `tail` elements unless FULL).
template <class V, int NC, bool FULL, class T>
inline V load_nc(const T* r, int c, int tail) {
  if constexpr (!FULL)
    if (c == NC - 1) return V::load_partial(r + c * V::W, tail);
  return V::load(r + c * V::W);
}

// Forward of one query (N == 1) with Dk and Dv in ((NC - 1) * W, NC * W], for the NH heads
// s.h .. s.h + NH - 1 of a row at once (NH = 1: one head; NH > 1 when p.heads > 1, heads whose
// rows are neighbours in memory). The queries, the output accumulators and a block's scores
// stay in registers (for NH = 1; spilled to L1 beyond), and the loop is software-pipelined:
// each pass over a block's W rows reads key row j of block i (its score) and value row j of
// block i - 1 (weighted by the probabilities found at the end of the previous pass) together,
// which keeps two memory streams in flight and overlaps the arithmetic of the two blocks. With
// NH > 1 each row is read as NH x D elements front to back, every head taking its share while
// it is in L1: a head alone reads D of every H x D elements, a strided stream that ran at about
// half the memory bandwidth here. Each head's arithmetic does not depend on NH (the same
// results, bit for bit). Outputs are stacked: acc_out [NH, Dv], m_out [NH], l_out [NH].
template <class V, class T, int NC, bool FULL, int NH>
void fwd_span_single_heads(const FwdParams& p, const Span& s, typename V::A* acc_out, typename V::A* m_out,
                           typename V::A* l_out) {
  using A = typename V::A;
  constexpr int W = V::W;
  const int kt = int(p.Dk - (NC - 1) * W), vt = int(p.Dv - (NC - 1) * W);
  auto load_k = [&](const T* r, int c) { return load_nc<V, NC, FULL>(r, c, kt); };
  auto load_v = [&](const T* r, int c) { return load_nc<V, NC, FULL>(r, c, vt); };
  // bfloat16 value rows of whole chunk pairs are read as even/odd element vectors
  // (V::load_pairs): o[h][c], o[h][c + 1] then hold the even and odd elements of chunks c, c + 1
  // until the end. Each element still sums the same products in the same order.
  constexpr bool kPairs = std::is_same_v<T, bf16_t> && FULL && NC % 2 == 0;
  auto add_v = [&](V* oh, const T* vr, V w) {
    if constexpr (kPairs) {
      for (int c = 0; c < NC; c += 2) {
        V e, d;
        V::load_pairs(vr + c * W, e, d);
        oh[c] = V::fma(w, e, oh[c]);
        oh[c + 1] = V::fma(w, d, oh[c + 1]);
      }
    } else {
      for (int c = 0; c < NC; ++c) oh[c] = V::fma(w, load_v(vr, c), oh[c]);
    }
  };
  const T* q = static_cast<const T*>(p.q) + s.b * p.q_sb + s.h * p.q_sh;
  const V sv = V::set1(A(p.scale));
  V x[NH][NC], o[NH][NC];
  A m[NH], l[NH];
  alignas(64) A pr[NH][W];
  for (int h = 0; h < NH; ++h) {
    for (int c = 0; c < NC; ++c) {
      x[h][c] = load_k(q + h * p.q_sh, c);
      o[h][c] = V::zero();
    }
    m[h] = neg_inf<A>();
    l[h] = A(0);
  }
  const auto [kb, vb] = kv_bases<T>(p, s);
  const T* kp[W];
  const T* vpa[2][W];
  int cur = 0;
  for (int64_t i0 = 0; i0 < s.count; i0 += W, cur ^= 1) {
    const int nb = int(s.count - i0 < W ? s.count - i0 : W);
    prefetch_step(p, s, i0, W, kb, vb);
    block_rows<W>(s, i0, nb, kb, p.k_sl, kp);
    block_rows<W>(s, i0, nb, vb, p.v_sl, vpa[cur]);
    const T* const* vprev = vpa[cur ^ 1];
    // Rows front to back: position j's K (and the previous block's V) for every head in turn.
    // Each dot product is summed across its lanes at once, into a block of scalars. Holding
    // the block's NH x W lane vectors for one transpose_reduce at the end instead stores a
    // whole vector per (position, head), up to NH KiB per block covering every 64-byte offset
    // of a page, and with the K/V rows in memory that ran 1.2-1.6x slower for float32, the
    // time on the loads, not the arithmetic (docs/serving.md). reduce_add sums the lanes in
    // transpose_reduce's order, so the logits are bit for bit those of the backward
    // (bwd_span_single), which recomputes them with transpose_reduce.
    alignas(64) A dots[NH][W];
    for (int j = 0; j < W; ++j) {
      for (int h = 0; h < NH; ++h) {
        const T* kr = kp[j] + h * p.k_sh;
        V t = V::zero();
        for (int c = 0; c < NC; ++c) t = V::fma(x[h][c], load_k(kr, c), t);
        dots[h][j] = t.reduce_add();
      }
      if (i0 > 0)
        for (int h = 0; h < NH; ++h) {
          add_v(o[h], vprev[j] + h * p.v_sh, V::set1(pr[h][j]));  // weight 0 past the previous block's end
        }
    }
    for (int h = 0; h < NH; ++h) {
      const V sc = (V::load(dots[h]) * sv + bias_lanes<V>(p, s, 0, h, i0, nb)).mask_tail(nb);
      const A alpha = lazy_max_update<A>(sc.reduce_max(), &m[h], &l[h]);
      if (alpha != A(1))
        for (int c = 0; c < NC; ++c) o[h][c] = o[h][c] * V::set1(alpha);
      const V pv = exp_shifted(sc, shift_of(m[h]));
      l[h] += pv.reduce_add();
      pv.store(pr[h]);
    }
  }
  for (int h = 0; h < NH; ++h) {
    if (s.count > 0) {
      const T* const* vprev = vpa[cur ^ 1];
      for (int j = 0; j < W; ++j) add_v(o[h], vprev[j] + h * p.v_sh, V::set1(pr[h][j]));
    }
    if constexpr (kPairs)
      for (int c = 0; c < NC; c += 2) V::interleave_pairs(o[h][c], o[h][c + 1], o[h][c], o[h][c + 1]);
    A ob[NC * W];
    for (int c = 0; c < NC; ++c) o[h][c].store(ob + c * W);
    for (int64_t d = 0; d < p.Dv; ++d) acc_out[h * p.Dv + d] = ob[d];
    m_out[h] = m[h];
    l_out[h] = l[h];
  }
}

// The heads of a p.heads > 1 span, in groups of up to four (the state of four heads of up to
// four vectors each stays within L1-resident spills). Returns false when the head dims have no single-query instance.
template <class V, class T>
bool fwd_span_heads(const FwdParams& p, const Span& s, typename V::A* acc_out, typename V::A* m_out,
                    typename V::A* l_out) {
  constexpr int W = V::W;
  if constexpr (W == 1) {
    return false;
  } else {
    return with_single_dims<W>(p.N, p.Dk, p.Dv, [&](auto d) {
      using D = decltype(d);
      for (int64_t h0 = 0; h0 < p.heads;) {
        const int64_t left = p.heads - h0;
        Span g = s;
        g.h = s.h + h0;
        typename V::A* a = acc_out + h0 * p.Dv;
        if (left >= 4) {
          fwd_span_single_heads<V, T, D::nc, D::full, 4>(p, g, a, m_out + h0, l_out + h0);
          h0 += 4;
        } else if (left >= 2) {
          fwd_span_single_heads<V, T, D::nc, D::full, 2>(p, g, a, m_out + h0, l_out + h0);
          h0 += 2;
        } else {
          fwd_span_single_heads<V, T, D::nc, D::full, 1>(p, g, a, m_out + h0, l_out + h0);
          h0 += 1;
        }
      }
    });
  }
}

template <class V, class T>
void fwd_span(const FwdParams& p, const Span& s, typename V::A* ws, typename V::A* acc_out,
              typename V::A* m_out, typename V::A* l_out) {
  if (p.heads > 1) {  // heads s.h .. s.h + p.heads - 1, outputs stacked
    if (fwd_span_heads<V, T>(p, s, acc_out, m_out, l_out)) return;
    FwdParams one = p;
    one.heads = 1;
    for (int64_t h = 0; h < p.heads; ++h) {
      Span g = s;
      g.h = s.h + h;
      fwd_span<V, T>(one, g, ws, acc_out + h * p.N * p.Dv, m_out + h * p.N, l_out + h * p.N);
    }
    return;
  }
  using A = typename V::A;
  constexpr int W = V::W;
  const int64_t N = p.N, Dk = p.Dk, Dv = p.Dv;
  const int64_t nck = ceil_div(Dk, W), ncv = ceil_div(Dv, W);
  // One query, head dims of 1, 2, 4 (or 8 whole) vectors: the register-resident,
  // K/V-interleaved kernel.
  if constexpr (W > 1) {
    if (with_single_dims<W>(N, Dk, Dv, [&](auto d) {
          using D = decltype(d);
          fwd_span_single_heads<V, T, D::nc, D::full, 1>(p, s, acc_out, m_out, l_out);
        }))
      return;
  }
  const int64_t Dkp = nck * W, Dvp = ncv * W;
  const int kt = int(Dk - (nck - 1) * W), vt = int(Dv - (ncv - 1) * W);
  const auto [qs, acc, mm, ll, pb, p4, kt_buf, rows_buf, total] = fwd_ws(ws, W, N, Dkp, Dvp);

  // Scores are scaled by scale*log2(e) after the dot product: the softmax then runs in base 2.
  const T* q = static_cast<const T*>(p.q) + s.b * p.q_sb + s.h * p.q_sh;
  const V sv = V::set1(A(p.scale));  // logits in natural units
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < nck; ++c)
      load_chunk<V>(q + n * p.q_sn, c, nck - 1, kt).store(qs + n * Dkp + c * W);
    for (int64_t c = 0; c < ncv; ++c) V::zero().store(acc + n * Dvp + c * W);
    mm[n] = neg_inf<A>();
    ll[n] = A(0);
  }

  const auto [kb, vb] = kv_bases<T>(p, s);
  constexpr int KB = 2 * W;  // keys per step
  const T* kp[KB];
  const T* vp[KB];
  for (int64_t i0 = 0; i0 < s.count; i0 += KB) {
    const int nb = int(s.count - i0 < KB ? s.count - i0 : KB);
    prefetch_step(p, s, i0, KB, kb, vb);
    block_rows<KB>(s, i0, nb, kb, p.k_sl, kp);
    block_rows<KB>(s, i0, nb, vb, p.v_sl, vp);
    int64_t n = 0;
    if (W > 1 && N >= 4) {
      // Many queries per history, one W-key half of the step at a time: transpose the key
      // block once (kt_buf[d][j]), then score four queries per pass with broadcast FMAs, and
      // stream each value row once for all four.
      for (int half = 0; half * W < nb; ++half) {
        const T* const* kh = kp + half * W;
        const T* const* vh = vp + half * W;
        const int nh = nb - half * W < W ? nb - half * W : W;
        transpose_block<V>(kh, nck, kt, Dk, rows_buf, kt_buf);
        for (n = 0; n + 4 <= N; n += 4) {
          V sc[4];
          dots4<V>(qs + n * Dkp, Dkp, kt_buf, Dk, sc);
          A alpha[4];
          for (int i = 0; i < 4; ++i)
            alpha[i] = softmax_step<V>((sc[i] * sv + bias_lanes<V>(p, s, n + i, 0, i0 + half * W, nh)).mask_tail(nh),
                                       mm + n + i, ll + n + i, p4 + i * W);
          A* accs[4] = {acc + n * Dvp, acc + (n + 1) * Dvp, acc + (n + 2) * Dvp, acc + (n + 3) * Dvp};
          const int64_t nfull = vt == W ? ncv : ncv - 1;
          int64_t c = 0;
          for (; c + 4 <= nfull; c += 4) pv4_chunks<V, T, 4>(accs, alpha, p4, vh, nh, c, W);
          for (; c < nfull; ++c) pv4_chunks<V, T, 1>(accs, alpha, p4, vh, nh, c, W);
          if (c < ncv) pv4_chunks<V, T, 1>(accs, alpha, p4, vh, nh, c, vt);
        }
      }
    }
    for (; n < N; ++n) {
      const A* x = qs + n * Dkp;
      const int nb0 = nb < W ? nb : W;
      const V s0 = (block_dots<V, T>(x, kp, nck, kt) * sv + bias_lanes<V>(p, s, n, 0, i0, nb0)).mask_tail(nb0);
      const V s1 = nb > W ? (block_dots<V, T>(x, kp + W, nck, kt) * sv + bias_lanes<V>(p, s, n, 0, i0 + W, nb - W))
                                .mask_tail(nb - W)
                          : V::set1(neg_inf<A>());
      const A alpha = softmax_step2<V>(s0, s1, mm + n, ll + n, pb);
      block_axpy_rows<V, T>(acc + n * Dvp, pb, vp, nb, ncv, vt, alpha);
    }
  }
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t d = 0; d < Dv; ++d) acc_out[n * Dv + d] = acc[n * Dvp + d];
    m_out[n] = mm[n];
    l_out[n] = ll[n];
  }
}

// Stores chunk c of a gradient row (dtype T). Whole chunks of aligned rows use streaming
// stores: the gradients are written once and not read back soon, so skipping the
// read-for-ownership of each line saves a third of the backward's memory traffic.
template <class V, class T>
inline void store_chunk(T* dst, V x, int64_t c, int64_t last, int tail, bool aligned) {
  constexpr int W = V::W;
  if (c < last || tail == W) {
    if (aligned) x.stream(dst + c * W); else x.store(dst + c * W);
  } else {
    x.store_partial(dst + c * W, tail);
  }
}

// R gradient rows (keys j .. j + R - 1): dst[r] = sum_{n < N} w[n * W + r] * x_n, where x_n
// (n-th row of a padded fp32/64 workspace matrix with row stride Dp) is q_n for dK and
// grad_out_n for dV, and w points at key j's entry in the block's ds (or p) of query 0. Four
// chunks of the R rows are accumulated in registers at a time, each x_n chunk loaded once for
// all R, and written straight to the output. R = 2 halves the loads per FMA when there are many
// queries; with one query R = 1 is faster (the rows are then store-bound).
template <int R, class V, class T>
inline void row_combine(T* const* dst, const typename V::A* w, const typename V::A* x, int64_t N, int64_t Dp,
                        int64_t nch, int tail) {
  constexpr int W = V::W;
  bool al[R];
  for (int r = 0; r < R; ++r) al[r] = tail == W && (reinterpret_cast<uintptr_t>(dst[r]) % (W * sizeof(T))) == 0;
  int64_t c = 0;
  for (; c + 4 <= nch; c += 4) {
    V a[R][4];
    for (int r = 0; r < R; ++r)
      for (int g = 0; g < 4; ++g) a[r][g] = V::zero();
    for (int64_t n = 0; n < N; ++n) {
      const typename V::A* xn = x + n * Dp + c * W;
      const V x0 = V::load(xn), x1 = V::load(xn + W), x2 = V::load(xn + 2 * W), x3 = V::load(xn + 3 * W);
      for (int r = 0; r < R; ++r) {
        const V wr = V::set1(w[n * W + r]);
        a[r][0] = V::fma(wr, x0, a[r][0]);
        a[r][1] = V::fma(wr, x1, a[r][1]);
        a[r][2] = V::fma(wr, x2, a[r][2]);
        a[r][3] = V::fma(wr, x3, a[r][3]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int g = 0; g < 4; ++g) store_chunk<V>(dst[r], a[r][g], c + g, nch - 1, tail, al[r]);
  }
  for (; c < nch; ++c) {
    V a[R];
    for (int r = 0; r < R; ++r) a[r] = V::zero();
    for (int64_t n = 0; n < N; ++n) {
      const V xn = V::load(x + n * Dp + c * W);
      for (int r = 0; r < R; ++r) a[r] = V::fma(V::set1(w[n * W + r]), xn, a[r]);
    }
    for (int r = 0; r < R; ++r) store_chunk<V>(dst[r], a[r], c, nch - 1, tail, al[r]);
  }
}

// Backward of one query (N == 1) with Dk and Dv in ((NC - 1) * W, NC * W], SIMD widths
// W >= 2 (FULL: no partial chunk). q, grad_out and the dq accumulator stay in registers. Per
// block, each pass over half of its keys reads key row j and value row j side by side (two
// memory streams in flight, as in fwd_span_single_heads): the half's W/2 score dot products and W/2
// dO.v dot products share one transpose_reduce (scores in the low lanes, dp in the high
// lanes). dK and dV rows are written straight from registers (ds_j q and p_j dO).
template <class V, class T, int NC, bool FULL>
void bwd_span_single(const BwdParams& p, const Span& s, typename V::A* dq_out) {
  using A = typename V::A;
  constexpr int W = V::W, H2 = V::W / 2;
  const int kt = int(p.Dk - (NC - 1) * W), vt = int(p.Dv - (NC - 1) * W);
  auto load_k = [&](const T* r, int c) { return load_nc<V, NC, FULL>(r, c, kt); };
  auto load_v = [&](const T* r, int c) { return load_nc<V, NC, FULL>(r, c, vt); };
  const T* q = static_cast<const T*>(p.q) + s.b * p.q_sb + s.h * p.q_sh;
  const T* go = static_cast<const T*>(p.go) + s.b * p.go_sb + s.h * p.go_sh;
  V x[NC], g[NC], dq[NC];
  for (int c = 0; c < NC; ++c) {
    x[c] = load_k(q, c);
    g[c] = load_v(go, c);
    dq[c] = V::zero();
  }
  const int64_t r = s.b * p.H + s.h;  // N == 1
  const A* sh = static_cast<const A*>(p.shift) + 2 * r;
  const V msh = V::set1(shift_of(sh[0])), lg = V::set1(sh[1]), l2e = V::set1(A(kLog2e));
  const V dl = V::set1(A(p.delta[r]));
  const V sv = V::set1(A(p.scale));  // logits in natural units
  const V scale = V::set1(A(p.scale));

  const auto [kb, vb, gkb, gvb] = bwd_bases<T>(p, s);
  const T* kp[W];
  const T* vp[W];
  A prb[W], dsb[W];
  for (int64_t i0 = 0; i0 < s.count; i0 += W) {
    const int nb = int(s.count - i0 < W ? s.count - i0 : W);
    prefetch_step(p, s, i0, W, kb, vb);
    block_rows<W>(s, i0, nb, kb, p.k_sl, kp);
    block_rows<W>(s, i0, nb, vb, p.v_sl, vp);
    V half[2];
    for (int h = 0; h < 2; ++h) {
      V a[W];
      for (int j = 0; j < H2; ++j) {
        V u = V::zero(), w = V::zero();
        for (int c = 0; c < NC; ++c) {
          u = V::fma(x[c], load_k(kp[h * H2 + j], c), u);
          w = V::fma(g[c], load_v(vp[h * H2 + j], c), w);
        }
        a[j] = u;
        a[H2 + j] = w;
      }
      half[h] = V::transpose_reduce(a);
    }
    const V sc = (V::concat_lo(half[0], half[1]) * sv + bias_lanes<V>(p, s, 0, 0, i0, nb)).mask_tail(nb);
    const V dp = V::concat_hi(half[0], half[1]);
    const V pr = exp2_accurate((sc - msh) * l2e - lg);  // masked lanes: exactly 0
    const V dlogit = pr * (dp - dl);
    add_grad_bias<V>(p, s, 0, i0, nb, dlogit);
    const V ds = dlogit * scale;
    pr.store(prb);
    ds.store(dsb);
    for (int j = 0; j < nb; ++j) {
      const V dsj = V::set1(dsb[j]), pj = V::set1(prb[j]);
      const int64_t pos = s.start + (s.idx ? int64_t(s.idx[i0 + j]) : i0 + j);
      T* dk = gkb + pos * p.gk_sl;
      T* dv = gvb + pos * p.gv_sl;
      const bool ak = FULL && (reinterpret_cast<uintptr_t>(dk) % (W * sizeof(T))) == 0;
      const bool av = FULL && (reinterpret_cast<uintptr_t>(dv) % (W * sizeof(T))) == 0;
      for (int c = 0; c < NC; ++c) {
        dq[c] = V::fma(dsj, load_k(kp[j], c), dq[c]);
        store_chunk<V>(dk, dsj * x[c], c, NC - 1, kt, ak);
        store_chunk<V>(dv, pj * g[c], c, NC - 1, vt, av);
      }
    }
  }
  A ob[NC * W];
  for (int c = 0; c < NC; ++c) dq[c].store(ob + c * W);
  for (int64_t d = 0; d < p.Dk; ++d) dq_out[d] = ob[d];
}

template <class V, class T>
void bwd_span(const BwdParams& p, const Span& s, typename V::A* ws, typename V::A* dq_out) {
  using A = typename V::A;
  constexpr int W = V::W;
  const int64_t N = p.N, H = p.H, Dk = p.Dk, Dv = p.Dv;
  const int64_t nck = ceil_div(Dk, W), ncv = ceil_div(Dv, W);
  const int64_t Dkp = nck * W, Dvp = ncv * W;
  const int kt = int(Dk - (nck - 1) * W), vt = int(Dv - (ncv - 1) * W);
  // One query, head dims of 1, 2, 4 (or 8 whole) vectors: the register-resident,
  // K/V-interleaved kernel.
  if constexpr (W > 1) {
    if (with_single_dims<W>(N, Dk, Dv, [&](auto d) {
          using D = decltype(d);
          bwd_span_single<V, T, D::nc, D::full>(p, s, dq_out);
        })) {
      V::fence();
      return;
    }
  }
  const auto [qf, dof, dqa, msh, lg, dl, pb, dsb, kt_buf, vt_buf, rows_buf, total] = bwd_ws(ws, W, N, Dkp, Dvp);

  const T* q = static_cast<const T*>(p.q) + s.b * p.q_sb + s.h * p.q_sh;
  const T* go = static_cast<const T*>(p.go) + s.b * p.go_sb + s.h * p.go_sh;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < nck; ++c) {
      load_chunk<V>(q + n * p.q_sn, c, nck - 1, kt).store(qf + n * Dkp + c * W);
      V::zero().store(dqa + n * Dkp + c * W);
    }
    for (int64_t c = 0; c < ncv; ++c) load_chunk<V>(go + n * p.go_sn, c, ncv - 1, vt).store(dof + n * Dvp + c * W);
    const int64_t r = (s.b * N + n) * H + s.h;
    const A* sh = static_cast<const A*>(p.shift) + 2 * r;
    msh[n] = shift_of(sh[0]);
    lg[n] = sh[1];
    dl[n] = p.delta64 ? A(p.delta64[r]) : A(p.delta[r]);
  }
  const V sv = V::set1(A(p.scale));  // logits in natural units
  const A scale = A(p.scale);

  const auto [kb, vb, gkb, gvb] = bwd_bases<T>(p, s);
  const T* kp[W];
  const T* vp[W];
  int64_t posb[W];
  // The row's every key in one block (float32): delta from the block's own dP where it agrees
  // with the autograd's to dP's rounding (bwd_own_delta, as the tiled backward does).
  const bool own = std::is_same_v<A, float> && s.whole && s.count <= W;
  float vn[W], dn = 0.f;
  for (int64_t i0 = 0; i0 < s.count; i0 += W) {
    const int nb = int(s.count - i0 < W ? s.count - i0 : W);
    prefetch_step(p, s, i0, W, kb, vb);
    for (int j = 0; j < W; ++j) {
      const int64_t i = i0 + (j < nb ? j : nb - 1);
      const int64_t pos = s.start + (s.idx ? int64_t(s.idx[i]) : i);
      posb[j] = pos;
      kp[j] = kb + pos * p.k_sl;
      vp[j] = vb + pos * p.v_sl;
    }
    if (own) {
      for (int j = 0; j < nb; ++j) {
        A sq = A(0);
        for (int64_t c = 0; c < ncv; ++c) {
          const V x = load_chunk<V>(vp[j], c, ncv - 1, vt);
          sq += (x * x).reduce_add();
        }
        vn[j] = float(std::sqrt(sq));
      }
    }
    // Per query: p and ds of the block's keys (kept for the rows below), and dq += ds . K.
    auto query_grads = [&](int64_t n, V sc, V dp) {
      const V lo = (sc * sv + bias_lanes<V>(p, s, n, 0, i0, nb)).mask_tail(nb);
      const V pr = exp2_accurate((lo - V::set1(msh[n])) * V::set1(A(kLog2e)) - V::set1(lg[n]));
      A d = dl[n];
      if constexpr (std::is_same_v<A, float>) {
        if (own) {
          float pb1[W], dp1[W];
          pr.store(pb1);
          dp.store(dp1);
          row_norms(1, dof + n * Dvp, Dvp, Dv, &dn);
          bwd_own_delta(1, pb1, dp1, W, nb, Dv, vn, &dn, dl + n, &d);
        }
      }
      const V dlogit = pr * (dp - V::set1(d));
      add_grad_bias<V>(p, s, n, i0, nb, dlogit);
      const V ds = dlogit * V::set1(scale);
      pr.store(pb + n * W);
      ds.store(dsb + n * W);
      block_axpy_rows<V, T>(dqa + n * Dkp, dsb + n * W, kp, nb, nck, kt, A(1));
    };
    int64_t n = 0;
    if (W > 1 && N >= 4) {
      // Many queries: score four at a time against the transposed K and V blocks.
      transpose_block<V>(kp, nck, kt, Dk, rows_buf, kt_buf);
      transpose_block<V>(vp, ncv, vt, Dv, rows_buf, vt_buf);
      for (; n + 4 <= N; n += 4) {
        V sc[4], dp[4];
        dots4<V>(qf + n * Dkp, Dkp, kt_buf, Dk, sc);
        dots4<V>(dof + n * Dvp, Dvp, vt_buf, Dv, dp);
        for (int i = 0; i < 4; ++i) query_grads(n + i, sc[i], dp[i]);
      }
    }
    for (; n < N; ++n)
      query_grads(n, block_dots<V, T>(qf + n * Dkp, kp, nck, kt), block_dots<V, T>(dof + n * Dvp, vp, ncv, vt));
    // Per key: dK_j = sum_n ds_nj q_n and dV_j = sum_n p_nj grad_out_n, written once.
    int j = 0;
    if (N >= 4) {
      for (; j + 2 <= nb; j += 2) {
        T* gk2[2] = {gkb + posb[j] * p.gk_sl, gkb + posb[j + 1] * p.gk_sl};
        T* gv2[2] = {gvb + posb[j] * p.gv_sl, gvb + posb[j + 1] * p.gv_sl};
        row_combine<2, V>(gk2, dsb + j, qf, N, Dkp, nck, kt);
        row_combine<2, V>(gv2, pb + j, dof, N, Dvp, ncv, vt);
      }
    }
    for (; j < nb; ++j) {
      T* gk1 = gkb + posb[j] * p.gk_sl;
      T* gv1 = gvb + posb[j] * p.gv_sl;
      row_combine<1, V>(&gk1, dsb + j, qf, N, Dkp, nck, kt);
      row_combine<1, V>(&gv1, pb + j, dof, N, Dvp, ncv, vt);
    }
  }
  V::fence();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t d = 0; d < Dk; ++d) dq_out[n * Dk + d] = dqa[n * Dkp + d];
}

// Softmax statistics of a span as the backward recomputes its logits: per query n, the max
// m[n] of the logits s and l[n] = sum_l exp(s_l - m[n]). Each block's scores come from the same
// dot routine the backward uses for this (N, head dim) case (dots4 for groups of four queries,
// block_dots otherwise, which adds in the order of the single-query kernels' chains), so the
// probabilities exp(s - m) / l the backward forms from them sum to 1 to rounding even when
// the forward's float32 lse cannot resolve the logits (|logit| >> 1, or float64 inputs).
template <class V, class T>
void stats_span(const FwdParams& p, const Span& s, typename V::A* ws, typename V::A* m_out, typename V::A* l_out) {
  using A = typename V::A;
  constexpr int W = V::W;
  const int64_t N = p.N, Dk = p.Dk;
  const int64_t nck = ceil_div(Dk, W), ncv = ceil_div(p.Dv, W);
  const int64_t Dkp = nck * W;
  const int kt = int(Dk - (nck - 1) * W);
  const BwdWs<A> lay = bwd_ws(ws, W, N, Dkp, ncv * W);
  A* qf = lay.qf;
  A* kt_buf = lay.kt_buf;
  A* rows_buf = lay.rows_buf;
  const T* q = static_cast<const T*>(p.q) + s.b * p.q_sb + s.h * p.q_sh;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < nck; ++c) load_chunk<V>(q + n * p.q_sn, c, nck - 1, kt).store(qf + n * Dkp + c * W);
    m_out[n] = neg_inf<A>();
    l_out[n] = A(0);
  }
  const V sv = V::set1(A(p.scale));  // logits in natural units
  const auto [kb, vb] = kv_bases<T>(p, s);
  const T* kp[W];
  auto step = [&](int64_t n, V sc, int64_t i0, int nb) {
    const V s2 = (sc * sv + bias_lanes<V>(p, s, n, 0, i0, nb)).mask_tail(nb);
    lazy_max_update<A>(s2.reduce_max(), m_out + n, l_out + n);
    l_out[n] += exp_shifted(s2, shift_of(m_out[n])).reduce_add();
  };
  for (int64_t i0 = 0; i0 < s.count; i0 += W) {
    const int nb = int(s.count - i0 < W ? s.count - i0 : W);
    prefetch_step(p, s, i0, W, kb, vb);
    block_rows<W>(s, i0, nb, kb, p.k_sl, kp);
    int64_t n = 0;
    if (W > 1 && N >= 4) {
      transpose_block<V>(kp, nck, kt, Dk, rows_buf, kt_buf);
      for (; n + 4 <= N; n += 4) {
        V sc[4];
        dots4<V>(qf + n * Dkp, Dkp, kt_buf, Dk, sc);
        for (int i = 0; i < 4; ++i) step(n + i, sc[i], i0, nb);
      }
    }
    for (; n < N; ++n) step(n, block_dots<V, T>(qf + n * Dkp, kp, nck, kt), i0, nb);
  }
}

// Type-erased entry points for the KernelTable of a V: a float V serves float32/16/bfloat16,
// a double V float64.
template <class V>
void fwd_entry(const FwdParams& p, const Span& s, void* ws, void* acc, void* m, void* l) {
  using A = typename V::A;
  A* w = static_cast<A*>(ws);
  A* a = static_cast<A*>(acc);
  A* mm = static_cast<A*>(m);
  A* ll = static_cast<A*>(l);
  if constexpr (sizeof(A) == 8) {
    fwd_span<V, double>(p, s, w, a, mm, ll);
  } else {
    switch (p.dtype) {
      case kF16: fwd_span<V, fp16_t>(p, s, w, a, mm, ll); break;
      case kBF16: fwd_span<V, bf16_t>(p, s, w, a, mm, ll); break;
      default: fwd_span<V, float>(p, s, w, a, mm, ll); break;
    }
  }
}

template <class V>
void stats_entry(const FwdParams& p, const Span& s, void* ws, void* m, void* l) {
  using A = typename V::A;
  A* w = static_cast<A*>(ws);
  A* mm = static_cast<A*>(m);
  A* ll = static_cast<A*>(l);
  if constexpr (sizeof(A) == 8) {
    stats_span<V, double>(p, s, w, mm, ll);
  } else {
    switch (p.dtype) {
      case kF16: stats_span<V, fp16_t>(p, s, w, mm, ll); break;
      case kBF16: stats_span<V, bf16_t>(p, s, w, mm, ll); break;
      default: stats_span<V, float>(p, s, w, mm, ll); break;
    }
  }
}

// Workspace (accumulator elements) that any kernel of this V needs for the given shape.
template <class V>
int64_t workspace_entry(int64_t N, int64_t Dk, int64_t Dv) {
  constexpr int W = V::W;
  const int64_t Dkp = ceil_div(Dk, W) * W, Dvp = ceil_div(Dv, W) * W;
  using A = typename V::A;
  const int64_t f = fwd_ws<A>(nullptr, W, N, Dkp, Dvp).total, b = bwd_ws<A>(nullptr, W, N, Dkp, Dvp).total;
  return f > b ? f : b;
}

template <class V>
void bwd_entry(const BwdParams& p, const Span& s, void* ws, void* dq) {
  using A = typename V::A;
  A* w = static_cast<A*>(ws);
  A* d = static_cast<A*>(dq);
  if constexpr (sizeof(A) == 8) {
    bwd_span<V, double>(p, s, w, d);
  } else {
    switch (p.dtype) {
      case kF16: bwd_span<V, fp16_t>(p, s, w, d); break;
      case kBF16: bwd_span<V, bf16_t>(p, s, w, d); break;
      default: bwd_span<V, float>(p, s, w, d); break;
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace attnkern
