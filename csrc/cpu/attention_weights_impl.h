// The attention-weights kernels, written once over the vector type V (vec_common.h) and the key
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
// The backward (weights_bwd_entry) takes the weights and their gradient, one item per (row, head).
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

// The backward of the (row, head) items [begin, end) (WeightsBwdParams). Per query one pass over
// its row's weights for delta = sum_l dW_l w_l - dlse and dS_l = w_l (dW_l - delta) into scratch
// (as the pool's backward kernels use their delta: no dS tensor in memory); then one pass over
// the row's keys for both products, each key read once for every query's dq and its own dk.
template <class V, class T>
void weights_bwd_entry(const WeightsBwdParams& p, int64_t begin, int64_t end, void* scratch) {
  using A = typename V::A;
  constexpr int W = V::W;
  const A* q = static_cast<const A*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const A* dw = static_cast<const A*>(p.dw);
  const A* w = static_cast<const A*>(p.w);
  const A* dlse = static_cast<const A*>(p.dlse);
  A* dq = static_cast<A*>(p.dq);
  A* dk = static_cast<A*>(p.dk);
  A* ds_out = static_cast<A*>(p.ds);
  const int64_t N = p.N, H = p.H, Dk = p.Dk, Dkp = p.Dkp, L = p.L;
  const V vscale = V::set1(A(p.scale));
  // Entry l of query (b, n, h) as in the forward: padded ((b N + n) H + h) L + l, jagged
  // ((start + l) N + n) H + h.
  const int64_t stride = p.jagged ? N * H : 1;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / H, h = item % H, start = p.starts[b], len = p.lens[b];
    const uint8_t* mask = p.mask ? p.mask + b * L : nullptr;
    const bool dense = !mask && stride == 1;
    A* ds = static_cast<A*>(scratch);  // [N, len]
    A* acc = ds + N * len;             // [N, Dkp]: dq / scale
    for (int64_t n = 0; n < N; ++n) {
      const int64_t base = p.jagged ? (start * N + n) * H + h : ((b * N + n) * H + h) * L;
      const A* dwr = dw + base;
      const A* wr = w + base;
      A* dsr = ds + n * len;
      A delta = A(0);
      if (dense) {
        V vd = V::zero();
        int64_t l = 0;
        for (; l + W <= len; l += W) vd = V::fma(V::load(dwr + l), V::load(wr + l), vd);
        if (l < len) vd = V::fma(V::load_partial(dwr + l, int(len - l)), V::load_partial(wr + l, int(len - l)), vd);
        delta = vd.reduce_add();
      } else {
        // Masked-out positions (w = 0 there) may carry any dW: never read.
        for (int64_t l = 0; l < len; ++l)
          if (!mask || mask[l]) delta += dwr[l * stride] * wr[l * stride];
      }
      if (dlse) delta -= dlse[(b * N + n) * H + h];
      if (dense) {
        const V vd = V::set1(delta);
        int64_t l = 0;
        for (; l + W <= len; l += W) (V::load(wr + l) * (V::load(dwr + l) - vd)).store(dsr + l);
        if (l < len) {
          const int r = int(len - l);
          (V::load_partial(wr + l, r) * (V::load_partial(dwr + l, r) - vd)).store_partial(dsr + l, r);
        }
      } else {
        for (int64_t l = 0; l < len; ++l)
          dsr[l] = mask && !mask[l] ? A(0) : wr[l * stride] * (dwr[l * stride] - delta);
      }
      if (ds_out) {
        A* out = ds_out + base;
        for (int64_t l = 0; l < len; ++l) out[l * stride] = dsr[l];
        if (!p.jagged)
          for (int64_t l = len; l < L; ++l) out[l] = A(0);
      }
      for (int64_t d = 0; d < Dkp; d += W) V::zero().store(acc + n * Dkp + d);
    }
    const A* qb = q + b * N * H * Dkp;
    for (int64_t l = 0; l < len; ++l) {
      A* dkr = dk + ((start + l) * H + h) * Dk;
      if (mask && !mask[l]) {
        for (int64_t d = 0; d < Dk; ++d) dkr[d] = A(0);
        continue;
      }
      const T* kr = k + ((start + l) * H + h) * Dk;
      for (int64_t d = 0; d < Dk; d += W) {
        const int r = Dk - d < W ? int(Dk - d) : W;
        const V kv = r == W ? V::load(kr + d) : V::load_partial(kr + d, r);
        V g = V::zero();
        for (int64_t n = 0; n < N; ++n) {
          const V s = V::set1(ds[n * len + l]);
          A* a = acc + n * Dkp + d;
          V::fma(s, kv, V::load(a)).store(a);
          g = V::fma(s, V::load(qb + (n * H + h) * Dkp + d), g);
        }
        g = g * vscale;
        if (r == W) {
          g.store(dkr + d);
        } else {
          g.store_partial(dkr + d, r);
        }
      }
    }
    if (!p.jagged)  // the padding's rows of dk
      for (int64_t l = len; l < L; ++l) {
        A* dkr = dk + ((start + l) * H + h) * Dk;
        for (int64_t d = 0; d < Dk; ++d) dkr[d] = A(0);
      }
    for (int64_t n = 0; n < N; ++n) {
      A* dqr = dq + ((b * N + n) * H + h) * Dk;
      for (int64_t d = 0; d < Dk; d += W) {
        const int r = Dk - d < W ? int(Dk - d) : W;
        const V g = V::load(acc + n * Dkp + d) * vscale;
        if (r == W) {
          g.store(dqr + d);
        } else {
          g.store_partial(dqr + d, r);
        }
      }
    }
  }
}

template <class V>
WeightsKernels weights_kernels_of() {
  return {&weights_fwd_entry<V, float>,     &weights_fwd_entry<V, bf16_t>,     &weights_fwd_entry<V, fp16_t>,
          &weights_bwd_entry<V, float>, &weights_bwd_entry<V, bf16_t>, &weights_bwd_entry<V, fp16_t>};
}

}  // namespace
}  // namespace cpu
}  // namespace attnkern
