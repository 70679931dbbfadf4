// CPU launcher and registration of attnkern::dice_statistics_fwd/_bwd (schemas and semantics in
// csrc/dice_statistics_ops.cpp): Dice's batch statistics of the activation unit's hidden layers,
// fused, without the [B, N, L, units] pre-activation tensor.
//
// The pass is the activation unit's scoring pass stopped at a hidden layer: per row and query the
// first layer is one [H1, E] matrix M_q = (Wb - Wc) + Wd diag(q) and a vector
// c_q = (Wa + Wc) q + b1 (the exact split of W1 [q; k; q - k; q * k]), applied to blocks of
// gathered keys; the second layer (when asked for) takes the first layer's Dice outputs of the
// same block. Each block's pre-activations are reduced to (count, mean, centred sum of squares)
// and merged into float64 accumulators by Chan's update, so the variance never comes from
// E[z^2] - E[z]^2. Rows are cut into a fixed number of chunks (a shape-only rule) whose partials
// are merged in order: the result does not depend on the thread count.
//
// The backward: with n samples, d mean / dz = 1 / n and d var / dz = 2 (z - mean) / n, so every
// sample's gradient is dz = alpha + beta * z per unit, recomputed block by block and sent back
// through the layers as the activation unit's backward does (G_q = sum_l dz_l k_l^T,
// g_q = sum_l dz_l, dk_l = M_q^T dz_l). The arithmetic is the activation unit's per-ISA block
// kernels (activation_unit_kernels.h), chosen by the instruction-set dispatcher (isa_dispatch.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
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

// Positions per block: the activation unit's block size, so that the block buffers stay in L2.
constexpr int64_t kDsBlock = 48;
// Fixed number of row chunks whose partials are merged in order.
constexpr int64_t kDsChunks = 32;

// The layers up to the one whose statistics are asked for (activation_unit_layers.h) and the
// first layer's Dice parameters.
template <class A>
struct DsNet : AuLayers<A> {
  std::vector<A> act1;  // [3, H1p]
  int64_t hs() const { return this->H2 ? this->H2 : this->H1; }
  int64_t hsp() const { return this->H2 ? this->H2p : this->H1p; }
};

template <class A>
DsNet<A> ds_net(const AuDims& d, const at::Tensor& w1, const at::Tensor& b1, const std::optional<at::Tensor>& act1,
                const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2) {
  DsNet<A> n;
  au_layers<A>(d, w1, b1, w2, b2, n);
  if (n.H2) n.act1 = au_act_params<A>(act1, 3, n.H1, n.H1p);
  return n;
}

// The counted positions of row b (all L of a padded row with all_positions).
struct DsRows {
  Rows rows;
  bool all = false;
  void positions(int64_t b, std::vector<int64_t>& pos) const {
    pos.clear();
    if (!all && rows.mask) {
      for (int64_t l = 0; l < rows.L; ++l)
        if (rows.mask[b * rows.L + l]) pos.push_back(l);
      return;
    }
    const int64_t start = rows.start(b), n = all ? rows.L : rows.count(b, nullptr);
    for (int64_t i = 0; i < n; ++i) pos.push_back(start + i);
  }
};

DsRows ds_rows(const AuDims& d, const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& mask,
               const std::optional<at::Tensor>& offsets, int64_t max_length, bool all_positions) {
  PoolDims pd;
  pd.B = d.B, pd.L = d.L;
  DsRows r;
  r.rows = offsets.has_value() ? jagged_rows(pd, *offsets, max_length) : padded_rows(pd, lengths, mask);
  r.all = all_positions && !offsets.has_value();
  return r;
}

// Per-thread state: one query's first-layer matrices and one block's buffers.
template <class A>
struct DsWork {
  std::vector<A> mt, mm, c, qp, kb, z1, a1, z2;
  std::vector<int64_t> pos;
  explicit DsWork(const DsNet<A>& n)
      : mt(n.E * n.H1p), mm(n.H1 * n.Ep), c(n.H1p), qp(n.Ep, A(0)), kb(kDsBlock * n.Ep, A(0)),
        z1(kDsBlock * n.H1p), a1(kDsBlock * n.H1p), z2(kDsBlock * std::max<int64_t>(n.H2p, 1)) {}
};

// M_q^T, c_q (and M_q for the backward) of the query in w.qp.
template <class A>
void ds_query(const AuKernels<A>& k, const DsNet<A>& n, DsWork<A>& w, bool backward) {
  for (int64_t e = 0; e < n.E; ++e) {
    std::copy(n.wbcT.begin() + e * n.H1p, n.wbcT.begin() + (e + 1) * n.H1p, w.mt.begin() + e * n.H1p);
    k.axpby(n.H1p, w.qp[e], n.wdT.data() + e * n.H1p, A(1), w.mt.data() + e * n.H1p);
  }
  if (backward)
    for (int64_t u = 0; u < n.H1; ++u) {
      std::copy(n.wbc.begin() + u * n.Ep, n.wbc.begin() + (u + 1) * n.Ep, w.mm.begin() + u * n.Ep);
      k.muladd(n.Ep, n.wd.data() + u * n.Ep, w.qp.data(), w.mm.data() + u * n.Ep);
    }
  std::copy(n.b1.begin(), n.b1.end(), w.c.begin());
  k.gemm(1, n.E, n.H1p, w.qp.data(), 0, 1, n.wacT.data(), n.H1p, w.c.data(), n.H1p);
}

// Pre-activations of the block's nb gathered keys: z1 (and a1 = Dice(z1), z2 with two layers).
// Returns the buffer of the layer whose statistics are asked for. The padded columns are set to 0:
// their weights are zero, and zero times an infinite key would make a NaN there.
template <class A>
A* ds_block(const AuKernels<A>& k, const DsNet<A>& n, DsWork<A>& w, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) std::copy(w.c.begin(), w.c.end(), w.z1.begin() + i * n.H1p);
  k.gemm(nb, n.E, n.H1p, w.kb.data(), n.Ep, 1, w.mt.data(), n.H1p, w.z1.data(), n.H1p);
  for (int64_t i = 0; i < nb; ++i) std::fill(w.z1.begin() + i * n.H1p + n.H1, w.z1.begin() + (i + 1) * n.H1p, A(0));
  if (!n.H2) return w.z1.data();
  k.act_fwd(kAuDice, nb, n.H1p, w.z1.data(), n.H1p, n.act1.data(), w.a1.data());
  for (int64_t i = 0; i < nb; ++i) std::copy(n.b2.begin(), n.b2.end(), w.z2.begin() + i * n.H2p);
  k.gemm(nb, n.H1, n.H2p, w.a1.data(), n.H1p, 1, n.w2t.data(), n.H2p, w.z2.data(), n.H2p);
  for (int64_t i = 0; i < nb; ++i) std::fill(w.z2.begin() + i * n.H2p + n.H2, w.z2.begin() + (i + 1) * n.H2p, A(0));
  return w.z2.data();
}

template <class T>
struct DsView {
  T* base;
  int64_t sb, sl, se;  // strides of batch row (0 for jagged), position, element
  T* row(int64_t b, int64_t p) const { return base + b * sb + p * sl; }
};

template <class T>
DsView<T> ds_view(const at::Tensor& t, bool jagged) {
  T* p = t.data_ptr<std::remove_const_t<T>>();
  return jagged ? DsView<T>{p, 0, t.stride(0), t.stride(1)} : DsView<T>{p, t.stride(0), t.stride(1), t.stride(2)};
}

template <class A, class T>
void ds_gather(const DsView<const T>& v, int64_t b, const int64_t* pos, int64_t nb, int64_t E, int64_t ld, A* out) {
  for (int64_t i = 0; i < nb; ++i) {
    const T* s = v.row(b, pos[i]);
    for (int64_t e = 0; e < E; ++e) out[i * ld + e] = A(s[e * v.se]);
  }
}

// Running (count, mean, centred sum of squares) per unit, in float64.
struct DsMoments {
  double n = 0;
  std::vector<double> mean, m2;
  explicit DsMoments(int64_t h) : mean(h, 0.0), m2(h, 0.0) {}
  // Chan's parallel update with another set of moments of nb samples.
  void merge(double nb, const double* bmean, const double* bm2) {
    if (nb == 0) return;
    const double tot = n + nb, f = n * nb / tot;
    for (size_t j = 0; j < mean.size(); ++j) {
      const double delta = bmean[j] - mean[j];
      mean[j] += delta * nb / tot;
      m2[j] += bm2[j] + delta * delta * f;
    }
    n = tot;
  }
};

template <class scalar_t, class A>
void fwd_impl(const AuDims& d, const DsNet<A>& n, const DsRows& rows, const at::Tensor& qa, const at::Tensor& key,
              std::vector<DsMoments>& parts, int64_t nchunks) {
  const AuKernels<A>& k = au_selected_kernels<A>();
  const DsView<const scalar_t> kv = ds_view<const scalar_t>(key, d.jagged);
  const A* q = qa.data_ptr<A>();
  const int64_t hs = n.hs(), hsp = n.hsp();
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    DsWork<A> w(n);
    std::vector<A> bs(hsp);
    std::vector<double> bmean(hs), bm2(hs);
    for (int64_t ch = c0; ch < c1; ++ch)
      for (int64_t b = ch * d.B / nchunks; b < (ch + 1) * d.B / nchunks; ++b) {
        rows.positions(b, w.pos);
        const int64_t cnt = int64_t(w.pos.size());
        for (int64_t i0 = 0; i0 < cnt; i0 += kDsBlock) {
          const int64_t nb = std::min(kDsBlock, cnt - i0);
          ds_gather(kv, b, w.pos.data() + i0, nb, d.E, n.Ep, w.kb.data());
          for (int64_t qi = 0; qi < d.N; ++qi) {
            std::copy(q + (b * d.N + qi) * d.E, q + (b * d.N + qi + 1) * d.E, w.qp.begin());
            ds_query(k, n, w, false);
            A* z = ds_block(k, n, w, nb);
            // The block's mean, then its centred squares (z is not needed afterwards).
            std::fill(bs.begin(), bs.end(), A(0));
            for (int64_t i = 0; i < nb; ++i) k.axpby(hsp, A(1), z + i * hsp, A(1), bs.data());
            for (int64_t j = 0; j < hsp; ++j) bs[j] /= A(nb);
            for (int64_t i = 0; i < nb; ++i) k.axpby(hsp, A(-1), bs.data(), A(1), z + i * hsp);
            for (int64_t j = 0; j < hs; ++j) bmean[j] = double(bs[j]);
            std::fill(bs.begin(), bs.end(), A(0));
            for (int64_t i = 0; i < nb; ++i) k.muladd(hsp, z + i * hsp, z + i * hsp, bs.data());
            for (int64_t j = 0; j < hs; ++j) bm2[j] = double(bs[j]);
            parts[ch].merge(double(nb), bmean.data(), bm2.data());
          }
        }
      }
  });
}

// Gradient partials of one chunk of rows.
template <class A>
struct DsGrads {
  std::vector<A> P, Gs, Gd;   // [H1, Ep]: sum g q^T, sum G, sum G diag(q)
  std::vector<A> db1;         // [H1p]
  std::vector<A> dw2, db2;    // [H2, H1p], [H2p]
  std::vector<A> dact1;       // [3, H1p]
  explicit DsGrads(const DsNet<A>& n)
      : P(n.H1 * n.Ep, A(0)), Gs(n.H1 * n.Ep, A(0)), Gd(n.H1 * n.Ep, A(0)), db1(n.H1p, A(0)),
        dw2(n.H2 * n.H1p, A(0)), db2(n.H2p, A(0)), dact1(3 * n.H1p, A(0)) {}
};

template <class scalar_t, class A>
void bwd_impl(const AuDims& d, const DsNet<A>& n, const DsRows& rows, const at::Tensor& qa, const at::Tensor& key,
              const std::vector<A>& alpha, const std::vector<A>& beta, at::Tensor& gq, at::Tensor& gk,
              std::vector<DsGrads<A>>& parts, int64_t nchunks) {
  const AuKernels<A>& k = au_selected_kernels<A>();
  const DsView<const scalar_t> kv = ds_view<const scalar_t>(key, d.jagged);
  const DsView<scalar_t> gkv = ds_view<scalar_t>(gk, d.jagged);
  const A* q = qa.data_ptr<A>();
  scalar_t* gqp = gq.data_ptr<scalar_t>();
  const int64_t N = d.N, E = d.E, Ep = n.Ep, H1 = n.H1, H1p = n.H1p, H2 = n.H2, H2p = n.H2p, hsp = n.hsp();
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    DsWork<A> w(n);
    std::vector<A> G(N * H1 * Ep), g(N * H1p), dkb(kDsBlock * Ep), dz(kDsBlock * hsp), da1(kDsBlock * H1p), dq(Ep);
    std::vector<A> qs(N * Ep, A(0));
    for (int64_t ch = c0; ch < c1; ++ch) {
      DsGrads<A>& wg = parts[ch];
      for (int64_t b = ch * d.B / nchunks; b < (ch + 1) * d.B / nchunks; ++b) {
        rows.positions(b, w.pos);
        const int64_t cnt = int64_t(w.pos.size());
        for (int64_t qi = 0; qi < N; ++qi)
          std::copy(q + (b * N + qi) * E, q + (b * N + qi + 1) * E, qs.begin() + qi * Ep);
        std::fill(G.begin(), G.end(), A(0));
        std::fill(g.begin(), g.end(), A(0));
        for (int64_t i0 = 0; i0 < cnt; i0 += kDsBlock) {
          const int64_t nb = std::min(kDsBlock, cnt - i0);
          const int64_t* pb = w.pos.data() + i0;
          ds_gather(kv, b, pb, nb, E, Ep, w.kb.data());
          std::fill(dkb.begin(), dkb.begin() + nb * Ep, A(0));
          for (int64_t qi = 0; qi < N; ++qi) {
            std::copy(qs.begin() + qi * Ep, qs.begin() + (qi + 1) * Ep, w.qp.begin());
            ds_query(k, n, w, true);
            const A* z = ds_block(k, n, w, nb);
            for (int64_t i = 0; i < nb; ++i) {
              std::copy(alpha.begin(), alpha.end(), dz.begin() + i * hsp);
              k.muladd(hsp, beta.data(), z + i * hsp, dz.data() + i * hsp);
            }
            A* dz1 = dz.data();
            if (H2) {
              k.gemm(H2, nb, H1p, dz.data(), 1, H2p, w.a1.data(), H1p, wg.dw2.data(), H1p);
              for (int64_t i = 0; i < nb; ++i) k.axpby(H2p, A(1), dz.data() + i * H2p, A(1), wg.db2.data());
              std::fill(da1.begin(), da1.begin() + nb * H1p, A(0));
              k.gemm(nb, H2, H1p, dz.data(), H2p, 1, n.w2.data(), H1p, da1.data(), H1p);
              k.act_bwd(kAuDice, nb, H1p, w.z1.data(), da1.data(), H1p, n.act1.data(), da1.data(),
                        wg.dact1.data());
              dz1 = da1.data();
            }
            A* gn = g.data() + qi * H1p;
            for (int64_t i = 0; i < nb; ++i) k.axpby(H1p, A(1), dz1 + i * H1p, A(1), gn);
            k.gemm(H1, nb, Ep, dz1, 1, H1p, w.kb.data(), Ep, G.data() + qi * H1 * Ep, Ep);
            k.gemm(nb, H1, Ep, dz1, H1p, 1, w.mm.data(), Ep, dkb.data(), Ep);
          }
          for (int64_t i = 0; i < nb; ++i) {
            scalar_t* rk = gkv.row(b, pb[i]);
            for (int64_t e = 0; e < E; ++e) rk[e * gkv.se] = scalar_t(dkb[i * Ep + e]);
          }
        }
        for (int64_t qi = 0; qi < N; ++qi) {
          const A* gn = g.data() + qi * H1p;
          const A* Gn = G.data() + qi * H1 * Ep;
          const A* qn = qs.data() + qi * Ep;
          std::fill(dq.begin(), dq.end(), A(0));
          k.gemm(1, H1, Ep, gn, 0, 1, n.wac.data(), Ep, dq.data(), Ep);
          for (int64_t u = 0; u < H1; ++u) {
            k.muladd(Ep, n.wd.data() + u * Ep, Gn + u * Ep, dq.data());
            k.axpby(Ep, gn[u], qn, A(1), wg.P.data() + u * Ep);
            k.axpby(Ep, A(1), Gn + u * Ep, A(1), wg.Gs.data() + u * Ep);
            k.muladd(Ep, Gn + u * Ep, qn, wg.Gd.data() + u * Ep);
          }
          k.axpby(H1p, A(1), gn, A(1), wg.db1.data());
          for (int64_t e = 0; e < E; ++e) gqp[(b * N + qi) * E + e] = scalar_t(dq[e]);
        }
      }
    }
  });
}

at::ScalarType ds_acc(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The activation unit's input checks (shapes, dtypes, limits, lengths/mask/offsets), with the
// keys as values and a placeholder output layer; plus what is particular to this op.
AuDims ds_check(const at::Tensor& query, const at::Tensor& key, const std::optional<at::Tensor>& lengths,
                const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& offsets, int64_t max_length,
                const at::Tensor& w1, const at::Tensor& b1, const std::optional<at::Tensor>& act1,
                const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2) {
  TORCH_CHECK_VALUE(act1.has_value() == w2.has_value(),
                    "attnkern: dice_statistics takes act1 exactly when it takes w2 (the second layer's "
                    "statistics need the first layer's Dice parameters)");
  TORCH_CHECK_VALUE(w1.dim() == 2 && w2.has_value() == b2.has_value(), "attnkern: w1 must be [H1, 4E]; give w2 and b2 together");
  TORCH_CHECK_VALUE(!w2.has_value() || w2->dim() == 2, "attnkern: w2 must be [H2, H1], got ", w2->sizes());
  const int64_t hlast = w2.has_value() ? w2->size(0) : w1.size(0);
  const at::Tensor wo = at::zeros({1, hlast}, query.options()), bo = at::zeros({1}, query.options());
  std::optional<at::Tensor> act2;
  if (act1.has_value()) act2 = at::zeros({3, hlast}, query.options());
  AuDims d = check_activation_unit_fwd(query, key, key, lengths, mask, offsets, max_length, w1, b1, w2, b2, wo, bo,
                                       act1, act2, act1.has_value() ? "dice" : "relu");
  TORCH_CHECK_VALUE(query.device().is_cpu(), "attnkern: the CPU kernel needs CPU tensors, got ", query.device());
  return d;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> dice_statistics_fwd_cpu(
    const at::Tensor& query, const at::Tensor& key, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& offsets, int64_t max_length,
    bool all_positions, const at::Tensor& w1, const at::Tensor& b1, const std::optional<at::Tensor>& act1,
    const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2) {
  const AuDims d = ds_check(query, key, lengths, mask, offsets, max_length, w1, b1, act1, w2, b2);
  const DsRows rows = ds_rows(d, lengths, mask, offsets, max_length, all_positions);
  const auto acc = ds_acc(query.scalar_type());
  const int64_t hs = d.H2 ? d.H2 : d.H1;
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(d.B, kDsChunks));
  std::vector<DsMoments> parts(nchunks, DsMoments(hs));
  const at::Tensor qa = query.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "dice_statistics_fwd_cpu", [&] {
    using A = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const DsNet<A> n = ds_net<A>(d, w1, b1, act1, w2, b2);
    if (d.B > 0) fwd_impl<scalar_t, A>(d, n, rows, qa, key, parts, nchunks);
  });
  DsMoments& t = parts[0];
  for (int64_t i = 1; i < nchunks; ++i) t.merge(parts[i].n, parts[i].mean.data(), parts[i].m2.data());
  at::Tensor mean = at::empty({hs}, at::kDouble), var = at::empty({hs}, at::kDouble);
  for (int64_t j = 0; j < hs; ++j) {
    mean.data_ptr<double>()[j] = t.mean[j];
    var.data_ptr<double>()[j] = t.n > 0 ? t.m2[j] / t.n : 0.0;
  }
  return {mean.to(acc), var.to(acc)};
}

using DsBwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

DsBwd dice_statistics_bwd_cpu(const at::Tensor& grad_mean, const at::Tensor& grad_var, const at::Tensor& query,
                              const at::Tensor& key, const std::optional<at::Tensor>& lengths,
                              const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& offsets,
                              int64_t max_length, bool all_positions, const at::Tensor& w1, const at::Tensor& b1,
                              const std::optional<at::Tensor>& act1, const std::optional<at::Tensor>& w2,
                              const std::optional<at::Tensor>& b2, const at::Tensor& mean) {
  const AuDims d = ds_check(query, key, lengths, mask, offsets, max_length, w1, b1, act1, w2, b2);
  const int64_t hs = d.H2 ? d.H2 : d.H1;
  const auto acc = ds_acc(query.scalar_type());
  for (const auto* t : {&grad_mean, &grad_var, &mean}) {
    const char* name = t == &grad_mean ? "grad_mean" : t == &grad_var ? "grad_var" : "mean";
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == hs, "attnkern: ", name, " must be [", hs, "], got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == acc, "attnkern: ", name, " must be ", acc, ", got ", t->scalar_type());
  }
  const DsRows rows = ds_rows(d, lengths, mask, offsets, max_length, all_positions);
  int64_t total = 0;
  {
    std::vector<int64_t> pos;
    for (int64_t b = 0; b < d.B; ++b) rows.positions(b, pos), total += int64_t(pos.size());
  }
  const double count = double(total) * double(d.N);
  at::Tensor gq = at::zeros({d.B, d.N, d.E}, query.options());
  at::Tensor gk = at::zeros(key.sizes(), key.options());
  at::Tensor gw1 = at::zeros(w1.sizes(), w1.options()), gb1 = at::zeros(b1.sizes(), b1.options());
  auto like = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() ? at::zeros(t->sizes(), t->options()) : at::empty({0}, query.options());
  };
  at::Tensor ga1 = like(act1), gw2 = like(w2), gb2 = like(b2);
  if (count == 0 || d.B == 0) return DsBwd{gq, gk, gw1, gb1, ga1, gw2, gb2};
  const at::Tensor qa = query.to(acc).contiguous();
  const at::Tensor gm = grad_mean.to(at::kDouble).contiguous(), gv = grad_var.to(at::kDouble).contiguous();
  const at::Tensor mu = mean.to(at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "dice_statistics_bwd_cpu", [&] {
    using A = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const DsNet<A> n = ds_net<A>(d, w1, b1, act1, w2, b2);
    // dz = grad_mean / count + grad_var * 2 (z - mean) / count = alpha + beta * z per unit.
    std::vector<A> alpha(n.hsp(), A(0)), beta(n.hsp(), A(0));
    for (int64_t j = 0; j < hs; ++j) {
      const double bj = 2.0 * gv.data_ptr<double>()[j] / count;
      beta[j] = A(bj);
      alpha[j] = A(gm.data_ptr<double>()[j] / count - bj * mu.data_ptr<double>()[j]);
    }
    const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(d.B, kDsChunks));
    std::vector<DsGrads<A>> parts(nchunks, DsGrads<A>(n));
    bwd_impl<scalar_t, A>(d, n, rows, qa, key, alpha, beta, gq, gk, parts, nchunks);
    DsGrads<A>& t = parts[0];
    auto add = [](std::vector<A>& x, const std::vector<A>& y) {
      for (size_t j = 0; j < x.size(); ++j) x[j] += y[j];
    };
    for (int64_t i = 1; i < nchunks; ++i) {
      const DsGrads<A>& p = parts[i];
      add(t.P, p.P), add(t.Gs, p.Gs), add(t.Gd, p.Gd), add(t.db1, p.db1), add(t.dw2, p.dw2), add(t.db2, p.db2);
      add(t.dact1, p.dact1);
    }
    const auto opts = query.options().dtype(acc);
    const int64_t E = d.E, H1 = d.H1, Ep = n.Ep;
    at::Tensor w1g = at::empty({H1, 4 * E}, opts);
    A* o = w1g.data_ptr<A>();
    for (int64_t u = 0; u < H1; ++u)
      for (int64_t e = 0; e < E; ++e) {
        const A pa = t.P[u * Ep + e], gs = t.Gs[u * Ep + e];
        A* r = o + u * 4 * E;
        r[e] = pa, r[E + e] = gs, r[2 * E + e] = pa - gs, r[3 * E + e] = t.Gd[u * Ep + e];
      }
    gw1.copy_(w1g);
    auto put = [&](const std::vector<A>& src, int64_t nr, int64_t nc, int64_t ld, at::Tensor& dst) {
      at::Tensor tmp = at::empty({nr, nc}, opts);
      for (int64_t r = 0; r < nr; ++r) std::copy(src.begin() + r * ld, src.begin() + r * ld + nc, tmp.data_ptr<A>() + r * nc);
      dst.copy_(tmp.view(dst.sizes()));
    };
    put(t.db1, 1, H1, n.H1p, gb1);
    if (d.H2) {
      put(t.dw2, d.H2, H1, n.H1p, gw2);
      put(t.db2, 1, d.H2, n.H2p, gb2);
      put(t.dact1, 3, H1, n.H1p, ga1);
    }
  });
  return DsBwd{gq, gk, gw1, gb1, ga1, gw2, gb2};
}

}  // namespace cpu
}  // namespace attnkern

TORCH_LIBRARY_IMPL(attnkern, CPU, m) {
  m.impl("dice_statistics_fwd", &attnkern::cpu::dice_statistics_fwd_cpu);
  m.impl("dice_statistics_bwd", &attnkern::cpu::dice_statistics_bwd_cpu);
}
