// The activation unit's hidden layers in the CPU kernels' zero-padded, accumulator-typed layouts,
// built once per call from the op's weights: by the activation unit's launcher
// (activation_unit_cpu.cpp) and by the Dice statistics' (dice_statistics_cpu.cpp), whose pass is
// the activation unit's scoring pass stopped at a hidden layer. Launcher-side only (torch and STL
// headers): the per-ISA kernel files never include it.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "activation_unit.h"
#include "activation_unit_kernels.h"

namespace attnkern {
namespace cpu {

inline int64_t au_pad(int64_t n) { return (n + kAuPad - 1) / kAuPad * kAuPad; }

template <class A>
at::Tensor au_as_acc(const at::Tensor& t) {
  return t.to(std::is_same<A, double>::value ? at::kDouble : at::kFloat).contiguous();
}

// The first layer in the exact split of W1 [q; k; q - k; q * k] = [Wa Wb Wc Wd]: per query one
// [H1, E] matrix M_q = (Wb - Wc) + Wd diag(q) applied to the keys and a vector
// c_q = (Wa + Wc) q + b1, so the [4E] concatenation is never formed; the second layer as it is.
template <class A>
struct AuLayers {
  int64_t E = 0, Ep = 0, H1 = 0, H1p = 0, H2 = 0, H2p = 0;
  std::vector<A> wacT, wbcT, wdT;  // [E, H1p]: (Wa + Wc)^T, (Wb - Wc)^T, Wd^T (forward M_q^T)
  std::vector<A> wac, wbc, wd;     // [H1, Ep]: the same untransposed (backward M_q, dq)
  std::vector<A> b1;               // [H1p]
  std::vector<A> w2t, w2, b2;      // [H1, H2p], [H2, H1p], [H2p]; empty with one hidden layer
};

template <class A>
void au_layers(const AuDims& d, const at::Tensor& w1_in, const at::Tensor& b1_in,
               const std::optional<at::Tensor>& w2_in, const std::optional<at::Tensor>& b2_in, AuLayers<A>& w) {
  w.E = d.E, w.Ep = au_pad(d.E), w.H1 = d.H1, w.H1p = au_pad(d.H1), w.H2 = d.H2, w.H2p = d.H2 ? au_pad(d.H2) : 0;
  const int64_t E = w.E, H1 = w.H1;
  const at::Tensor w1 = au_as_acc<A>(w1_in);
  const A* p1 = w1.data_ptr<A>();  // [H1, 4E]
  w.wacT.assign(E * w.H1p, A(0)), w.wbcT.assign(E * w.H1p, A(0)), w.wdT.assign(E * w.H1p, A(0));
  w.wac.assign(H1 * w.Ep, A(0)), w.wbc.assign(H1 * w.Ep, A(0)), w.wd.assign(H1 * w.Ep, A(0));
  for (int64_t u = 0; u < H1; ++u)
    for (int64_t e = 0; e < E; ++e) {
      const A* r = p1 + u * 4 * E;
      const A ac = r[e] + r[2 * E + e], bc = r[E + e] - r[2 * E + e], dd = r[3 * E + e];
      w.wacT[e * w.H1p + u] = ac, w.wbcT[e * w.H1p + u] = bc, w.wdT[e * w.H1p + u] = dd;
      w.wac[u * w.Ep + e] = ac, w.wbc[u * w.Ep + e] = bc, w.wd[u * w.Ep + e] = dd;
    }
  const at::Tensor b1 = au_as_acc<A>(b1_in);
  w.b1.assign(w.H1p, A(0));
  std::copy(b1.data_ptr<A>(), b1.data_ptr<A>() + H1, w.b1.begin());
  if (!d.H2) return;
  const at::Tensor w2 = au_as_acc<A>(*w2_in), b2 = au_as_acc<A>(*b2_in);
  const A* p2 = w2.data_ptr<A>();  // [H2, H1]
  w.w2t.assign(H1 * w.H2p, A(0)), w.w2.assign(d.H2 * w.H1p, A(0)), w.b2.assign(w.H2p, A(0));
  for (int64_t v = 0; v < d.H2; ++v)
    for (int64_t u = 0; u < H1; ++u) w.w2t[u * w.H2p + v] = w.w2[v * w.H1p + u] = p2[v * H1 + u];
  std::copy(b2.data_ptr<A>(), b2.data_ptr<A>() + d.H2, w.b2.begin());
}

// The first `rows` rows of a layer's activation parameters [rows, h] as [3, hp], zero-padded
// (all zeros when absent).
template <class A>
std::vector<A> au_act_params(const std::optional<at::Tensor>& a, int64_t rows, int64_t h, int64_t hp) {
  std::vector<A> out(size_t(3 * hp), A(0));
  if (!a.has_value()) return out;
  const at::Tensor t = au_as_acc<A>(*a);
  for (int64_t r = 0; r < rows; ++r)
    std::copy(t.data_ptr<A>() + r * h, t.data_ptr<A>() + (r + 1) * h, out.begin() + r * hp);
  return out;
}

}  // namespace cpu
}  // namespace attnkern
