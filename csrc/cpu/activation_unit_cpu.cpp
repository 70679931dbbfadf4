// CPU launcher and registration of attnkern::activation_unit_pool_fwd/_bwd.
//
// Work decomposition: one task per row b (all N queries of the row together). A task walks its
// valid positions in blocks of kAuBlock keys; each block's key/value rows are read once,
// gathered (and converted to the accumulator type) into small contiguous buffers, and then used
// from L1/L2 by every query of the row. Per query the first layer is one [H1, E] matrix
// M_q = (Wb - Wc) + Wd diag(q) applied to each key (exact split of W1 [q; k; q - k; q * k]),
// so the [4E] concatenation is never formed; a block's hidden activations live in [block, units]
// buffers of a few KiB. The backward recomputes them the same way (nothing [B, L, units] is
// saved) and folds the first layer's weight gradient per query into
// G_q = sum_l dz_l k_l^T and g_q = sum_l dz_l: dWa = sum g q^T, dWb = sum G, dWc = dWa - dWb,
// dWd = sum G diag(q), dq = (Wa + Wc)^T g + sum_u Wd[u] * G[u], dk_l = M_q^T dz_l.
//
// Weight gradients are summed per fixed chunk of rows (a shape-only rule) and the chunks are
// added in order, so results do not depend on the thread count. The arithmetic runs in
// activation_unit_{avx512,avx2,generic}.cpp, chosen by the CPU instruction-set dispatcher
// (isa_dispatch.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "activation_unit.h"
#include "activation_unit_kernels.h"
#include "activation_unit_layers.h"
#include "attention_pool.h"
#include "attention_pool_work.h"
#include "isa_dispatch.h"

namespace attnkern {
namespace cpu {
namespace {

// Keys per block: a multiple of the 6-row register tile; a block's buffers (keys, values,
// hidden pre-activations and activations of two layers) stay well inside L2 at 256 units.
constexpr int64_t kAuBlock = 48;
// Fixed number of row chunks whose weight-gradient partials are summed in order.
constexpr int64_t kAuChunks = 32;

// The weights, converted once per call into zero-padded accumulator-typed layouts: the hidden
// layers (activation_unit_layers.h), the output layer and the activations' parameters.
template <class A>
struct Weights : AuLayers<A> {
  int64_t Hl, Hlp, Dv, Dvp;
  int act;
  std::vector<A> wout;  // [Hlp]
  A bout = 0;
  std::vector<A> act1, act2;  // [3, H1p], [3, H2p]
};

template <class A>
Weights<A> prepare(const AuDims& d, const at::Tensor& w1_in, const at::Tensor& b1_in,
                   const std::optional<at::Tensor>& w2_in, const std::optional<at::Tensor>& b2_in,
                   const at::Tensor& wout_in, const at::Tensor& bout_in, const std::optional<at::Tensor>& act1_in,
                   const std::optional<at::Tensor>& act2_in) {
  Weights<A> w;
  au_layers<A>(d, w1_in, b1_in, w2_in, b2_in, w);
  w.Hl = d.H2 ? d.H2 : d.H1, w.Hlp = au_pad(w.Hl), w.Dv = d.Dv, w.Dvp = au_pad(d.Dv), w.act = d.act;
  const at::Tensor wo = au_as_acc<A>(wout_in);
  w.wout.assign(w.Hlp, A(0));
  std::copy(wo.data_ptr<A>(), wo.data_ptr<A>() + w.Hl, w.wout.begin());
  const at::Tensor bo = au_as_acc<A>(bout_in);
  w.bout = bo.data_ptr<A>()[0];
  w.act1 = au_act_params<A>(act1_in, d.act_rows, d.H1, w.H1p);
  if (d.H2) w.act2 = au_act_params<A>(act2_in, d.act_rows, d.H2, w.H2p);
  return w;
}

// Which key/value rows take part in row b: positions (row indices of key) in order.
// The batch's rows, as the attention pool reads them (attention_pool_work.h: the same checks of
// lengths and offsets, the same host copies); its constructors read only B and L of the dims.
Rows make_rows(const AuDims& d, const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& mask,
               const std::optional<at::Tensor>& offsets, int64_t max_length) {
  PoolDims pd;
  pd.B = d.B;
  pd.L = d.L;
  return offsets.has_value() ? jagged_rows(pd, *offsets, max_length) : padded_rows(pd, lengths, mask);
}

// Row b's valid key positions (jagged: its key rows).
void row_positions(const Rows& rows, int64_t b, std::vector<int64_t>& pos) {
  pos.clear();
  if (rows.mask) {
    for (int64_t l = 0; l < rows.L; ++l)
      if (rows.mask[b * rows.L + l]) pos.push_back(l);
    return;
  }
  const int64_t start = rows.start(b);
  const int64_t n = rows.count(b, nullptr);
  for (int64_t i = 0; i < n; ++i) pos.push_back(start + i);
}

// A strided [rows, D] view of key/value (or their gradients) for one batch row.
template <class T>
struct RowView {
  T* base;
  int64_t sb, sl, se;  // strides of batch row (0 for jagged), position, element
  T* row(int64_t b, int64_t pos) const { return base + b * sb + pos * sl; }
};

template <class T>
RowView<T> row_view(const at::Tensor& t, bool jagged) {
  T* p = t.data_ptr<std::remove_const_t<T>>();
  if (jagged) return {p, 0, t.stride(0), t.stride(1)};
  return {p, t.stride(0), t.stride(1), t.stride(2)};
}

template <class A, class T>
void gather(const RowView<const T>& v, int64_t b, const int64_t* pos, int64_t nb, int64_t D, int64_t ld, A* out) {
  for (int64_t i = 0; i < nb; ++i) {
    const T* src = v.row(b, pos[i]);
    A* dst = out + i * ld;
    if (v.se == 1)
      for (int64_t e = 0; e < D; ++e) dst[e] = A(src[e]);
    else
      for (int64_t e = 0; e < D; ++e) dst[e] = A(src[e * v.se]);
  }
}

// Per-query first-layer state of one row: M_q^T [E, H1p] (forward), M_q [H1, Ep] (backward) and
// c_q = (Wa + Wc) q + b1 [H1p].
template <class A>
void build_query(const AuKernels<A>& k, const Weights<A>& w, const A* q, A* mt, A* m, A* c) {
  for (int64_t e = 0; e < w.E; ++e) {
    std::copy(w.wbcT.begin() + e * w.H1p, w.wbcT.begin() + (e + 1) * w.H1p, mt + e * w.H1p);
    k.axpby(w.H1p, q[e], w.wdT.data() + e * w.H1p, A(1), mt + e * w.H1p);
  }
  if (m) {
    for (int64_t u = 0; u < w.H1; ++u) {
      std::copy(w.wbc.begin() + u * w.Ep, w.wbc.begin() + (u + 1) * w.Ep, m + u * w.Ep);
      k.muladd(w.Ep, w.wd.data() + u * w.Ep, q, m + u * w.Ep);
    }
  }
  std::copy(w.b1.begin(), w.b1.end(), c);
  k.gemm(1, w.E, w.H1p, q, 0, 1, w.wacT.data(), w.H1p, c, w.H1p);
}

// Block buffers of one task (thread).
template <class A>
struct Block {
  std::vector<A> kb, vb, z1, a1, z2, a2, s;
  Block(const Weights<A>& w)
      : kb(kAuBlock * w.Ep, A(0)), vb(kAuBlock * w.Dvp, A(0)), z1(kAuBlock * w.H1p), a1(kAuBlock * w.H1p),
        z2(kAuBlock * std::max<int64_t>(w.H2p, 1)), a2(kAuBlock * std::max<int64_t>(w.H2p, 1)), s(kAuBlock) {}
};

// Columns [n, np) of nb rows (row stride np) set to 0. The padded units' weights are zero,
// and zero times an infinite key (or activation) is NaN, which the next layer's and the
// score's zero weights would carry into a score that is finite in the reference.
template <class A>
void zero_padding(int64_t nb, int64_t n, int64_t np, A* z) {
  for (int64_t i = 0; i < nb; ++i) std::fill(z + i * np + n, z + (i + 1) * np, A(0));
}

// Scores s[0:nb] of one query against the block's keys; leaves pre-activations z1/z2 and
// activations a1/a2 of the block in `blk`.
template <class A>
void block_scores(const AuKernels<A>& k, const Weights<A>& w, const A* mt, const A* c, int64_t nb, Block<A>& blk) {
  for (int64_t i = 0; i < nb; ++i) std::copy(c, c + w.H1p, blk.z1.data() + i * w.H1p);
  k.gemm(nb, w.E, w.H1p, blk.kb.data(), w.Ep, 1, mt, w.H1p, blk.z1.data(), w.H1p);
  zero_padding(nb, w.H1, w.H1p, blk.z1.data());
  k.act_fwd(w.act, nb, w.H1p, blk.z1.data(), w.H1p, w.act1.data(), blk.a1.data());
  const A* last = blk.a1.data();
  if (w.H2) {
    for (int64_t i = 0; i < nb; ++i) std::copy(w.b2.begin(), w.b2.end(), blk.z2.data() + i * w.H2p);
    k.gemm(nb, w.H1, w.H2p, blk.a1.data(), w.H1p, 1, w.w2t.data(), w.H2p, blk.z2.data(), w.H2p);
    zero_padding(nb, w.H2, w.H2p, blk.z2.data());
    k.act_fwd(w.act, nb, w.H2p, blk.z2.data(), w.H2p, w.act2.data(), blk.a2.data());
    last = blk.a2.data();
  }
  for (int64_t i = 0; i < nb; ++i) blk.s[i] = k.dot(w.Hlp, last + i * w.Hlp, w.wout.data()) + w.bout;
}

// Where the score of query n of row b at key position pos goes in the scores mode: padded
// [B, N, L] (pos = l), jagged [T, N] (pos = the key row).
struct ScoreIndex {
  int64_t N, L;
  bool jagged;
  int64_t at(int64_t b, int64_t n, int64_t pos) const { return jagged ? pos * N + n : (b * N + n) * L + pos; }
};

// Pooling (sc null): out and lse. Scores mode (sc given): the pass is the same up to the scores,
// which go to sc instead of weighting the values (value is not read; out is untouched); with
// softmax a last sweep over the row's written scores turns them into exp(s - m) / l.
template <class scalar_t, class A>
void fwd_impl(const AuDims& d, const Weights<A>& w, const Rows& rows, const at::Tensor& qa, const at::Tensor& key,
              const at::Tensor& value, bool softmax, at::Tensor& out, at::Tensor& lse, A* sc = nullptr) {
  const AuKernels<A>& k = au_selected_kernels<A>();
  const RowView<const scalar_t> kv = row_view<const scalar_t>(key, d.jagged);
  const RowView<const scalar_t> vv = row_view<const scalar_t>(value, d.jagged);
  const A* q = qa.data_ptr<A>();
  A* o = sc ? nullptr : out.data_ptr<A>();
  A* ls = lse.data_ptr<A>();
  const int64_t N = d.N, E = d.E, Dv = d.Dv;
  const ScoreIndex si{N, d.L, d.jagged};
  const int64_t cost = N * std::max<int64_t>(1, d.L) * (w.H1 * (E + w.H2 + 1));
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(1, cost));
  at::parallel_for(0, d.B, grain, [&](int64_t b0, int64_t b1) {
    Block<A> blk(w);
    std::vector<A> mt(N * E * w.H1p), c(N * w.H1p), qp(w.Ep, A(0)), acc(N * w.Dvp), m(N), l(N);
    std::vector<int64_t> pos;
    for (int64_t b = b0; b < b1; ++b) {
      row_positions(rows, b, pos);
      const int64_t cnt = int64_t(pos.size());
      std::fill(acc.begin(), acc.end(), A(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<A>::infinity());
      std::fill(l.begin(), l.end(), A(0));
      if (cnt > 0)
        for (int64_t n = 0; n < N; ++n) {
          std::copy(q + (b * N + n) * E, q + (b * N + n + 1) * E, qp.begin());
          build_query(k, w, qp.data(), mt.data() + n * E * w.H1p, static_cast<A*>(nullptr), c.data() + n * w.H1p);
        }
      for (int64_t i0 = 0; i0 < cnt; i0 += kAuBlock) {
        const int64_t nb = std::min(kAuBlock, cnt - i0);
        gather(kv, b, pos.data() + i0, nb, E, w.Ep, blk.kb.data());
        if (!sc) gather(vv, b, pos.data() + i0, nb, Dv, w.Dvp, blk.vb.data());
        for (int64_t n = 0; n < N; ++n) {
          block_scores(k, w, mt.data() + n * E * w.H1p, c.data() + n * w.H1p, nb, blk);
          A* an = acc.data() + n * w.Dvp;
          if (sc)
            for (int64_t i = 0; i < nb; ++i) sc[si.at(b, n, pos[i0 + i])] = blk.s[i];
          if (sc && !softmax) continue;
          if (!softmax) {
            for (int64_t i = 0; i < nb; ++i) k.axpby(w.Dvp, blk.s[i], blk.vb.data() + i * w.Dvp, A(1), an);
            continue;
          }
          // A NaN score becomes the max (std::max would skip it), so that it reaches l and the
          // output instead of vanishing; while every score so far is -inf the weights are 0.
          A bm = m[n];
          for (int64_t i = 0; i < nb; ++i) bm = blk.s[i] > bm || std::isnan(blk.s[i]) ? blk.s[i] : bm;
          if (bm > m[n] || (std::isnan(bm) && !std::isnan(m[n]))) {
            const A f = m[n] == -std::numeric_limits<A>::infinity() ? A(0) : std::exp(m[n] - bm);
            if (!sc)
              for (int64_t e = 0; e < w.Dvp; ++e) an[e] *= f;
            l[n] *= f;
            m[n] = bm;
          }
          if (m[n] == -std::numeric_limits<A>::infinity()) continue;
          for (int64_t i = 0; i < nb; ++i) {
            const A p = std::exp(blk.s[i] - m[n]);
            l[n] += p;
            if (!sc) k.axpby(w.Dvp, p, blk.vb.data() + i * w.Dvp, A(1), an);
          }
        }
      }
      if (sc) {
        for (int64_t n = 0; n < N; ++n) {
          const int64_t r = b * N + n;
          if (!softmax) {
            ls[r] = A(0);
            continue;
          }
          // l == 0: an empty row (weights 0, lse -inf); a NaN l propagates like the pooling's.
          const bool empty = l[n] == A(0);
          const A inv = empty ? A(0) : A(1) / l[n];
          for (int64_t i = 0; i < cnt; ++i) {
            A& x = sc[si.at(b, n, pos[i])];
            x = empty ? A(0) : std::exp(x - m[n]) * inv;
          }
          ls[r] = empty ? -std::numeric_limits<A>::infinity() : m[n] + std::log(l[n]);
        }
        continue;
      }
      for (int64_t n = 0; n < N; ++n) {
        const int64_t r = b * N + n;
        const A* an = acc.data() + n * w.Dvp;
        A* on = o + r * Dv;
        if (!softmax) {
          for (int64_t e = 0; e < Dv; ++e) on[e] = an[e];
          ls[r] = A(0);
        } else if (l[n] != A(0)) {  // NaN too: a non-finite value at a valid position propagates
          const A inv = A(1) / l[n];
          for (int64_t e = 0; e < Dv; ++e) on[e] = an[e] * inv;
          ls[r] = m[n] + std::log(l[n]);
        } else {
          for (int64_t e = 0; e < Dv; ++e) on[e] = A(0);
          ls[r] = -std::numeric_limits<A>::infinity();
        }
      }
    }
  });
}

// Weight-gradient partials of one chunk of rows.
template <class A>
struct WGrads {
  std::vector<A> P, Gs, Gd;  // [H1, Ep]: sum g q^T, sum G, sum G diag(q)
  std::vector<A> db1;        // [H1p]
  std::vector<A> dw2, db2;   // [H2, H1p], [H2p]
  std::vector<A> dwout;      // [Hlp]
  A dbout = 0;
  std::vector<A> dact1, dact2;  // [3, H1p], [3, H2p]
  explicit WGrads(const Weights<A>& w)
      : P(w.H1 * w.Ep, A(0)), Gs(w.H1 * w.Ep, A(0)), Gd(w.H1 * w.Ep, A(0)), db1(w.H1p, A(0)),
        dw2(w.H2 * w.H1p, A(0)), db2(w.H2p, A(0)), dwout(w.Hlp, A(0)), dact1(3 * w.H1p, A(0)),
        dact2(3 * w.H2p, A(0)) {}
};

template <class scalar_t, class A>
void bwd_impl(const AuDims& d, const Weights<A>& w, const Rows& rows, const at::Tensor& qa, const at::Tensor& key,
              const at::Tensor& value, const at::Tensor& goa, const at::Tensor& lse_a, const at::Tensor& delta_a,
              bool softmax, bool shared, at::Tensor& gq, at::Tensor& gk, at::Tensor& gv,
              std::vector<WGrads<A>>& parts, int64_t nchunks) {
  const AuKernels<A>& k = au_selected_kernels<A>();
  const RowView<const scalar_t> kv = row_view<const scalar_t>(key, d.jagged);
  const RowView<const scalar_t> vv = row_view<const scalar_t>(value, d.jagged);
  // shared: the values are the keys (value None): one gradient, the value contributions are
  // added into grad_key (gv is then an empty placeholder, never touched).
  const RowView<scalar_t> gkv = row_view<scalar_t>(gk, d.jagged);
  const RowView<scalar_t> gvv = shared ? gkv : row_view<scalar_t>(gv, d.jagged);
  const A *q = qa.data_ptr<A>(), *go = goa.data_ptr<A>(), *lse = lse_a.data_ptr<A>(), *delta = delta_a.data_ptr<A>();
  scalar_t* gqp = gq.data_ptr<scalar_t>();
  const int64_t N = d.N, E = d.E, Dv = d.Dv, B = d.B;
  const int64_t Ep = w.Ep, H1 = w.H1, H1p = w.H1p, H2 = w.H2, H2p = w.H2p, Hlp = w.Hlp, Dvp = w.Dvp;
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    Block<A> blk(w);
    std::vector<A> mt(N * E * H1p), mm(N * H1 * Ep), c(N * H1p), qp(N * Ep, A(0)), gop(N * Dvp, A(0));
    std::vector<A> G(N * H1 * Ep), g(N * H1p), dkb(kAuBlock * Ep), dvb(kAuBlock * Dvp), ds(kAuBlock);
    std::vector<A> dl(kAuBlock * std::max(H1p, Hlp)), dq(Ep);
    std::vector<int64_t> pos;
    for (int64_t ch = c0; ch < c1; ++ch) {
      WGrads<A>& wg = parts[ch];
      for (int64_t b = ch * B / nchunks; b < (ch + 1) * B / nchunks; ++b) {
        row_positions(rows, b, pos);
        const int64_t cnt = int64_t(pos.size());
        scalar_t* gqb = gqp + b * N * E;
        // grad_key/grad_value are not pre-zeroed (that would write them twice): a padded row's
        // positions outside the row are zeroed here (jagged rows past offsets[-1] by the caller).
        if (!d.jagged && cnt < d.L) {
          int64_t next = 0;
          for (int64_t l = 0; l < d.L; ++l) {
            if (next < cnt && pos[next] == l) {
              ++next;
              continue;
            }
            scalar_t* rk = gkv.row(b, l);
            scalar_t* rv = gvv.row(b, l);
            for (int64_t e = 0; e < E; ++e) rk[e * gkv.se] = scalar_t(0);
            if (!shared)
              for (int64_t e = 0; e < Dv; ++e) rv[e * gvv.se] = scalar_t(0);
          }
        }
        if (cnt == 0) {
          for (int64_t x = 0; x < N * E; ++x) gqb[x] = scalar_t(0);
          continue;
        }
        for (int64_t n = 0; n < N; ++n) {
          A* qn = qp.data() + n * Ep;
          std::copy(q + (b * N + n) * E, q + (b * N + n + 1) * E, qn);
          std::copy(go + (b * N + n) * Dv, go + (b * N + n + 1) * Dv, gop.data() + n * Dvp);
          build_query(k, w, qn, mt.data() + n * E * H1p, mm.data() + n * H1 * Ep, c.data() + n * H1p);
        }
        std::fill(G.begin(), G.end(), A(0));
        std::fill(g.begin(), g.end(), A(0));
        for (int64_t i0 = 0; i0 < cnt; i0 += kAuBlock) {
          const int64_t nb = std::min(kAuBlock, cnt - i0);
          const int64_t* pb = pos.data() + i0;
          gather(kv, b, pb, nb, E, Ep, blk.kb.data());
          gather(vv, b, pb, nb, Dv, Dvp, blk.vb.data());
          std::fill(dkb.begin(), dkb.begin() + nb * Ep, A(0));
          std::fill(dvb.begin(), dvb.begin() + nb * Dvp, A(0));
          for (int64_t n = 0; n < N; ++n) {
            const A* gon = gop.data() + n * Dvp;
            block_scores(k, w, mt.data() + n * E * H1p, c.data() + n * H1p, nb, blk);
            // Pooling: weights (raw scores or softmax probabilities) and their gradients ds.
            const A lsen = lse[b * N + n], dn = delta[b * N + n];
            for (int64_t i = 0; i < nb; ++i) {
              const A dw = k.dot(Dvp, gon, blk.vb.data() + i * Dvp);
              const A wt = softmax ? std::exp(blk.s[i] - lsen) : blk.s[i];
              ds[i] = softmax ? wt * (dw - dn) : dw;
              k.axpby(Dvp, wt, gon, A(1), dvb.data() + i * Dvp);
            }
            // Output layer: d(last activations) = ds * w_out.
            const A* last = H2 ? blk.a2.data() : blk.a1.data();
            for (int64_t i = 0; i < nb; ++i) {
              A* r = dl.data() + i * Hlp;
              for (int64_t u = 0; u < Hlp; ++u) r[u] = ds[i] * w.wout[u];
              k.axpby(Hlp, ds[i], last + i * Hlp, A(1), wg.dwout.data());
              wg.dbout += ds[i];
            }
            A* dz1 = dl.data();
            if (H2) {
              // dz2 (in dl, over H2p columns), then dW2 += dz2^T a1, db2, and da1 = dz2 W2.
              k.act_bwd(w.act, nb, H2p, blk.z2.data(), dl.data(), H2p, w.act2.data(), dl.data(), wg.dact2.data());
              k.gemm(H2, nb, H1p, dl.data(), 1, H2p, blk.a1.data(), H1p, wg.dw2.data(), H1p);
              for (int64_t i = 0; i < nb; ++i) k.axpby(H2p, A(1), dl.data() + i * H2p, A(1), wg.db2.data());
              // da1 overwrites a1 (its last use was dW2 above).
              std::fill(blk.a1.begin(), blk.a1.begin() + nb * H1p, A(0));
              k.gemm(nb, H2, H1p, dl.data(), H2p, 1, w.w2.data(), H1p, blk.a1.data(), H1p);
              k.act_bwd(w.act, nb, H1p, blk.z1.data(), blk.a1.data(), H1p, w.act1.data(), blk.a1.data(),
                        wg.dact1.data());
              dz1 = blk.a1.data();
            } else {
              k.act_bwd(w.act, nb, H1p, blk.z1.data(), dl.data(), H1p, w.act1.data(), dl.data(), wg.dact1.data());
            }
            // First layer: g_q, G_q and dk = dz1 M_q.
            A* gn = g.data() + n * H1p;
            for (int64_t i = 0; i < nb; ++i) k.axpby(H1p, A(1), dz1 + i * H1p, A(1), gn);
            k.gemm(H1, nb, Ep, dz1, 1, H1p, blk.kb.data(), Ep, G.data() + n * H1 * Ep, Ep);
            k.gemm(nb, H1, Ep, dz1, H1p, 1, mm.data() + n * H1 * Ep, Ep, dkb.data(), Ep);
          }
          for (int64_t i = 0; i < nb; ++i) {
            scalar_t* rk = gkv.row(b, pb[i]);
            scalar_t* rv = gvv.row(b, pb[i]);
            if (shared) {
              for (int64_t e = 0; e < E; ++e) rk[e * gkv.se] = scalar_t(dkb[i * Ep + e] + dvb[i * Dvp + e]);
              continue;
            }
            for (int64_t e = 0; e < E; ++e) rk[e * gkv.se] = scalar_t(dkb[i * Ep + e]);
            for (int64_t e = 0; e < Dv; ++e) rv[e * gvv.se] = scalar_t(dvb[i * Dvp + e]);
          }
        }
        for (int64_t n = 0; n < N; ++n) {
          const A* gn = g.data() + n * H1p;
          const A* Gn = G.data() + n * H1 * Ep;
          const A* qn = qp.data() + n * Ep;
          std::fill(dq.begin(), dq.end(), A(0));
          k.gemm(1, H1, Ep, gn, 0, 1, w.wac.data(), Ep, dq.data(), Ep);
          for (int64_t u = 0; u < H1; ++u) {
            k.muladd(Ep, w.wd.data() + u * Ep, Gn + u * Ep, dq.data());
            k.axpby(Ep, gn[u], qn, A(1), wg.P.data() + u * Ep);
            k.axpby(Ep, A(1), Gn + u * Ep, A(1), wg.Gs.data() + u * Ep);
            k.muladd(Ep, Gn + u * Ep, qn, wg.Gd.data() + u * Ep);
          }
          k.axpby(H1p, A(1), gn, A(1), wg.db1.data());
          for (int64_t e = 0; e < E; ++e) gqb[n * E + e] = scalar_t(dq[e]);
        }
      }
    }
  });
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> activation_unit_pool_fwd_cpu(
    const at::Tensor& query, const at::Tensor& key, const std::optional<at::Tensor>& value_opt,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& offsets, int64_t max_length, const at::Tensor& w1, const at::Tensor& b1,
    const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2, const at::Tensor& w_out,
    const at::Tensor& b_out, const std::optional<at::Tensor>& act1, const std::optional<at::Tensor>& act2,
    c10::string_view activation, bool softmax) {
  const at::Tensor& value = value_opt.has_value() ? *value_opt : key;
  const AuDims d = check_activation_unit_fwd(query, key, value, lengths, mask, offsets, max_length, w1, b1, w2, b2,
                                             w_out, b_out, act1, act2, std::string(activation));
  TORCH_CHECK_VALUE(query.device().is_cpu(), "attnkern: the CPU kernel needs CPU tensors, got ", query.device());
  const Rows rows = make_rows(d, lengths, mask, offsets, max_length);
  const auto acc = acc_type(query.scalar_type());
  // out unrounded, in the accumulator type: the autograd forms delta from it (rounded to
  // float16/bfloat16 first, delta's error would pass into every softmax gradient).
  at::Tensor out = at::empty({d.B, d.N, d.Dv}, query.options().dtype(acc));
  at::Tensor lse = at::empty({d.B, d.N}, query.options().dtype(acc));
  if (d.B == 0) return {out, lse};
  const at::Tensor qa = query.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "activation_unit_pool_fwd_cpu", [&] {
    using A = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const Weights<A> w = prepare<A>(d, w1, b1, w2, b2, w_out, b_out, act1, act2);
    fwd_impl<scalar_t, A>(d, w, rows, qa, key, value, softmax, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> activation_unit_scores_fwd_cpu(
    const at::Tensor& query, const at::Tensor& key, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& offsets, int64_t max_length,
    const at::Tensor& w1, const at::Tensor& b1, const std::optional<at::Tensor>& w2,
    const std::optional<at::Tensor>& b2, const at::Tensor& w_out, const at::Tensor& b_out,
    const std::optional<at::Tensor>& act1, const std::optional<at::Tensor>& act2, c10::string_view activation,
    bool softmax) {
  const AuDims d = check_activation_unit_fwd(query, key, key, lengths, mask, offsets, max_length, w1, b1, w2, b2,
                                             w_out, b_out, act1, act2, std::string(activation));
  TORCH_CHECK_VALUE(query.device().is_cpu(), "attnkern: the CPU kernel needs CPU tensors, got ", query.device());
  const Rows rows = make_rows(d, lengths, mask, offsets, max_length);
  const auto acc = acc_type(query.scalar_type());
  // Zeros first: the kernel writes only the positions that take part in a row.
  at::Tensor scores = d.jagged ? at::zeros({d.L, d.N}, query.options().dtype(acc))
                               : at::zeros({d.B, d.N, d.L}, query.options().dtype(acc));
  at::Tensor lse = at::empty({d.B, d.N}, query.options().dtype(acc));
  // No position at all (L or T = 0): every row is empty. Also keeps the scores pointer non-null
  // below, which is what selects the kernel's scores mode.
  if (scores.numel() == 0) {
    lse.fill_(softmax ? -std::numeric_limits<double>::infinity() : 0.0);
    return {scores, lse};
  }
  const at::Tensor qa = query.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "activation_unit_scores_fwd_cpu",
                                  [&] {
    using A = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const Weights<A> w = prepare<A>(d, w1, b1, w2, b2, w_out, b_out, act1, act2);
    fwd_impl<scalar_t, A>(d, w, rows, qa, key, key, softmax, scores, lse, scores.data_ptr<A>());
  });
  return {scores, lse};
}

using BwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                             at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

BwdResult activation_unit_pool_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const std::optional<at::Tensor>& value_opt,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& offsets, int64_t max_length, const at::Tensor& w1, const at::Tensor& b1,
    const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2, const at::Tensor& w_out,
    const at::Tensor& b_out, const std::optional<at::Tensor>& act1, const std::optional<at::Tensor>& act2,
    c10::string_view activation, bool softmax, const at::Tensor& lse, const at::Tensor& delta) {
  const bool shared = !value_opt.has_value();
  const at::Tensor& value = shared ? key : *value_opt;
  const AuDims d = check_activation_unit_fwd(query, key, value, lengths, mask, offsets, max_length, w1, b1, w2, b2,
                                             w_out, b_out, act1, act2, std::string(activation));
  check_activation_unit_bwd_extras(d, query, grad_out, lse, delta);
  TORCH_CHECK_VALUE(query.device().is_cpu(), "attnkern: the CPU kernel needs CPU tensors, got ", query.device());
  const Rows rows = make_rows(d, lengths, mask, offsets, max_length);
  const auto acc = acc_type(query.scalar_type());
  at::Tensor gq = at::empty({d.B, d.N, d.E}, query.options());
  // Every position is written exactly once by the kernel (zeros outside the rows included).
  at::Tensor gk = at::empty(key.sizes(), key.options());
  at::Tensor gv = shared ? at::empty({0}, value.options()) : at::empty(value.sizes(), value.options());
  if (d.jagged) {
    const int64_t covered = rows.offsets[d.B];
    gk.narrow(0, covered, d.L - covered).zero_();
    if (!shared) gv.narrow(0, covered, d.L - covered).zero_();
  } else if (d.B == 0) {
    gk.zero_(), gv.zero_();
  }
  at::Tensor gw1 = at::empty(w1.sizes(), w1.options());
  at::Tensor gb1 = at::empty(b1.sizes(), b1.options());
  at::Tensor gw2 = w2.has_value() ? at::empty(w2->sizes(), w2->options()) : at::empty({0}, w1.options());
  at::Tensor gb2 = b2.has_value() ? at::empty(b2->sizes(), b2->options()) : at::empty({0}, w1.options());
  at::Tensor gwo = at::empty(w_out.sizes(), w_out.options());
  at::Tensor gbo = at::empty(b_out.sizes(), b_out.options());
  at::Tensor ga1 = act1.has_value() ? at::empty(act1->sizes(), act1->options()) : at::empty({0}, w1.options());
  at::Tensor ga2 = act2.has_value() ? at::empty(act2->sizes(), act2->options()) : at::empty({0}, w1.options());
  const at::Tensor qa = query.to(acc).contiguous(), goa = grad_out.to(acc).contiguous();
  const at::Tensor la = lse.contiguous(), da = delta.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "activation_unit_pool_bwd_cpu", [&] {
    using A = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const Weights<A> w = prepare<A>(d, w1, b1, w2, b2, w_out, b_out, act1, act2);
    const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(d.B, kAuChunks));
    std::vector<WGrads<A>> parts(nchunks, WGrads<A>(w));
    if (d.B > 0) bwd_impl<scalar_t, A>(d, w, rows, qa, key, value, goa, la, da, softmax, shared, gq, gk, gv, parts,
                                     nchunks);
    // Fixed-order sum of the chunk partials.
    WGrads<A>& t = parts[0];
    for (int64_t i = 1; i < nchunks; ++i) {
      const WGrads<A>& p = parts[i];
      auto add = [](std::vector<A>& x, const std::vector<A>& y) {
        for (size_t j = 0; j < x.size(); ++j) x[j] += y[j];
      };
      add(t.P, p.P), add(t.Gs, p.Gs), add(t.Gd, p.Gd), add(t.db1, p.db1), add(t.dw2, p.dw2), add(t.db2, p.db2);
      add(t.dwout, p.dwout), add(t.dact1, p.dact1), add(t.dact2, p.dact2);
      t.dbout += p.dbout;
    }
    const int64_t E = d.E, H1 = d.H1, Ep = w.Ep;
    at::Tensor w1g = at::empty({H1, 4 * E}, query.options().dtype(acc));
    A* o = w1g.data_ptr<A>();
    for (int64_t u = 0; u < H1; ++u)
      for (int64_t e = 0; e < E; ++e) {
        const A pa = t.P[u * Ep + e], gs = t.Gs[u * Ep + e];
        o[u * 4 * E + e] = pa, o[u * 4 * E + E + e] = gs, o[u * 4 * E + 2 * E + e] = pa - gs;
        o[u * 4 * E + 3 * E + e] = t.Gd[u * Ep + e];
      }
    gw1.copy_(w1g);
    auto vec_to = [&](const std::vector<A>& src, int64_t rows_, int64_t cols, int64_t ld, at::Tensor& dst) {
      at::Tensor tmp = at::empty({rows_, cols}, query.options().dtype(acc));
      A* p = tmp.data_ptr<A>();
      for (int64_t r = 0; r < rows_; ++r)
        for (int64_t j = 0; j < cols; ++j) p[r * cols + j] = src[r * ld + j];
      dst.copy_(tmp.view(dst.sizes()));
    };
    vec_to(t.db1, 1, H1, w.H1p, gb1);
    if (d.H2) {
      vec_to(t.dw2, d.H2, H1, w.H1p, gw2);
      vec_to(t.db2, 1, d.H2, w.H2p, gb2);
    }
    vec_to(t.dwout, 1, w.Hl, w.Hlp, gwo);
    gbo.fill_(t.dbout);
    if (act1.has_value()) vec_to(t.dact1, d.act_rows, H1, w.H1p, ga1);
    if (act2.has_value()) vec_to(t.dact2, d.act_rows, d.H2, w.H2p, ga2);
  });
  return BwdResult{gq, gk, gv, gw1, gb1, gw2, gb2, gwo, gbo, ga1, ga2};
}

template <>
const AuKernels<float>& au_selected_kernels<float>() {
  static const AuKernels<float> table = [] {
    switch (selected_isa()) {
#if defined(__x86_64__) || defined(_M_X64)
      case Isa::kAmx:
      case Isa::kAvx512Bf16:
      case Isa::kAvx512: return au_avx512_f32();
      case Isa::kAvx2: return au_avx2_f32();
#endif
      default: return au_generic_f32();
    }
  }();
  return table;
}

template <>
const AuKernels<double>& au_selected_kernels<double>() {
  static const AuKernels<double> table = au_generic_f64();
  return table;
}

}  // namespace cpu
}  // namespace attnkern

TORCH_LIBRARY_IMPL(attnkern, CPU, m) {
  m.impl("activation_unit_pool_fwd", &attnkern::cpu::activation_unit_pool_fwd_cpu);
  m.impl("activation_unit_pool_bwd", &attnkern::cpu::activation_unit_pool_bwd_cpu);
  m.impl("activation_unit_scores_fwd", &attnkern::cpu::activation_unit_scores_fwd_cpu);
}
