// The attention-weights kernel, written once over the vector type V (vec_common.h) and the key
// element type T, and instantiated per instruction set by attention_weights_{generic,avx2,avx512}.cpp.
//
// One item is (row b, head h, a block of QB queries). Each query takes two passes over its row:
// pass 1 computes the logits s_l = scale <q, k_l> + bias_l of the positions that take part
// (-inf elsewhere) into a scratch row and their max m, then p_l = exp(s_l - m) in place and
// their sum (the row statistics: lse = m + log(sum)); pass 2 writes w_l = p_l / sum into the
// output, once per entry, zeros included. The same arithmetic as the reference's masked
// softmax (attnkern.reference._masked_softmax_parts): a row without a finite max is shifted by
// 0, so that a NaN logit at a valid position makes the whole row NaN and +inf gives NaN / 0 as
// there; a row whose sum is 0 (no position, or every logit -inf) is empty: w = 0, lse = -inf.
// The keys are read as attention_topk reads them (topk_dots: W positions per accumulator set).
#pragma once

#include "attention_weights_kernels.h"
#include "attention_topk_impl.h"
#include "vec_common.h"

namespace attnkern {
namespace cpu {
namespace {

constexpr double kWeightsLog2e = 1.4426950408889634;

// Pass 1 for query row qa of head h: the logits into s[0, len), their max (NaN if any is NaN).
template <class V, class T>
inline typename V::A weights_logits(const WeightsParams& p, const typename V::A* qa, int64_t b, int64_t n,
                                    int64_t h, typename V::A* s) {
  using A = typename V::A;
  constexpr int NP = V::W;
  const T* k = static_cast<const T*>(p.k);
  const A* bias = static_cast<const A*>(p.bias);
  const int64_t start = p.starts[b], len = p.lens[b];
  const uint8_t* mask = p.mask ? p.mask + b * p.L : nullptr;
  const A scale = A(p.scale);
  const A neg_inf = -__builtin_inf();
  int64_t bias_base = 0, bias_stride = 0;
  if (bias) p.bias_offsets(b, n, h, &bias_base, &bias_stride);
  V vmax = V::set1(neg_inf);
  for (int64_t l0 = 0; l0 < len; l0 += NP) {
    const int np = len - l0 < NP ? int(len - l0) : NP;
    const T* kp[NP];
    // A short last block repeats its first position (computed, never stored).
    for (int i = 0; i < NP; ++i) kp[i] = k + ((start + l0 + (i < np ? i : 0)) * p.H + h) * p.Dk;
    V x = topk_dots<V, T>(qa, kp, p.Dk) * V::set1(scale);
    if (bias && bias_stride == 1) x = x + (np == NP ? V::load(bias + bias_base + l0)
                                                      : V::load_partial(bias + bias_base + l0, np));
    if (np == NP) {
      x.store(s + l0);
    } else {
      x.store_partial(s + l0, np);
    }
    if ((bias && bias_stride != 1) || mask) {
      for (int i = 0; i < np; ++i) {
        const int64_t l = l0 + i;
        if (bias && bias_stride != 1) s[l] += bias[bias_base + l * bias_stride];
        // Masked-out positions may hold anything (NaN included): never read.
        if (mask && !mask[l]) s[l] = neg_inf;
      }
      x = np == NP ? V::load(s + l0) : V::load_partial(s + l0, np);
    }
    // A NaN logit need not reach the max (but see the caller's -inf case): it makes the sum of
    // pass 1, hence the whole row, NaN.
    vmax = V::max(vmax, np == NP ? x : x.mask_tail(np));
  }
  return vmax.reduce_max();
}

// Pass 1 then pass 2 for each query of the items [begin, end).
template <class V, class T>
void weights_fwd_entry(const WeightsParams& p, int64_t begin, int64_t end, void* scratch) {
  using A = typename V::A;
  constexpr int NP = V::W;
  const A* q = static_cast<const A*>(p.q);
  A* w = static_cast<A*>(p.w);
  A* lse = static_cast<A*>(p.lse);
  A* s = static_cast<A*>(scratch);
  const A neg_inf = -__builtin_inf();
  const int64_t blocks = (p.N + p.QB - 1) / p.QB;
  // Entry l of query (b, n, h): padded w[((b N + n) H + h) L + l], jagged w[((start + l) N + n) H + h].
  const int64_t wstride = p.jagged ? p.N * p.H : 1;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t bh = item / blocks, n0 = item % blocks * p.QB;
    const int64_t b = bh / p.H, h = bh % p.H;
    const int64_t len = p.lens[b];
    const int64_t n1 = n0 + p.QB < p.N ? n0 + p.QB : p.N;
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t qrow = (b * p.N + n) * p.H + h;
      A* wr = p.jagged ? w + (p.starts[b] * p.N + n) * p.H + h : w + qrow * p.L;
      const int64_t wlen = p.jagged ? len : p.L;  // padded rows also zero their tail
      A m = len > 0 ? weights_logits<V, T>(p, q + qrow * p.Dkp, b, n, h, s) : neg_inf;
      // The vector max may drop a NaN lane (it returns an operand, not NaN); every other max
      // still lets the NaN reach the sum, but -inf would call the row empty: look once more.
      for (int64_t l = 0; m == neg_inf && l < len; ++l)
        if (s[l] != s[l]) m = s[l];
      if (m == neg_inf) {  // no position, or every logit -inf: empty
        for (int64_t l = 0; l < wlen; ++l) wr[l * wstride] = A(0);
        lse[qrow] = neg_inf;
        continue;
      }
      // The max is a shift only; a row without a finite one is shifted by 0 (as the reference).
      if (!(m - m == A(0))) m = A(0);
      const V vm = V::set1(m), l2e = V::set1(A(kWeightsLog2e));
      V vsum = V::zero();
      int64_t l = 0;
      for (; l + NP <= len; l += NP) {
        const V e = exp2_accurate((V::load(s + l) - vm) * l2e);
        e.store(s + l);
        vsum = vsum + e;
      }
      if (l < len) {
        const int r = int(len - l);
        // Lanes past the row: -inf, whose exp is 0 (a shift by m = +inf is 0 here too).
        const V e = exp2_accurate((V::load_partial(s + l, r).mask_tail(r) - vm) * l2e);
        e.store_partial(s + l, r);
        vsum = vsum + e;
      }
      const A sum = vsum.reduce_add();
      lse[qrow] = m + A(__builtin_log(double(sum)));
      const A inv = A(1) / sum;
      if (!p.jagged) {
        const V vinv = V::set1(inv);
        for (l = 0; l + NP <= len; l += NP) (V::load(s + l) * vinv).store(wr + l);
        if (l < len) (V::load_partial(s + l, int(len - l)) * vinv).store_partial(wr + l, int(len - l));
        // Past the row: p = 0, times 1 / sum (NaN for a NaN row, as the reference's 0 / sum).
        const A tail = A(0) * inv;
        for (l = len; l < p.L; ++l) wr[l] = tail;
      } else {
        for (l = 0; l < len; ++l) wr[l * wstride] = s[l] * inv;
      }
    }
  }
}

template <class V>
WeightsKernels weights_kernels_of() {
  return {&weights_fwd_entry<V, float>, &weights_fwd_entry<V, bf16_t>, &weights_fwd_entry<V, fp16_t>};
}

}  // namespace
}  // namespace cpu
}  // namespace attnkern
