// The top-k kernel, written once over the vector type V (vec_common.h) and the key element type
// T, and instantiated per instruction set by attention_topk_{generic,avx2,avx512}.cpp.
//
// One item is (row b, K/V head g): each of its N * G queries (G = H / Hkv query heads share the
// K/V head) scans the row's positions in order and keeps its best K (score, position) pairs in
// its own output row, sorted best first, by insertion. Scanning in increasing position order and
// inserting a score only behind every kept score it does not beat keeps ties in position order
// (the lowest position first) without comparing positions. Cost O(positions * Dk) for the scores
// plus O(K) per insertion: meant for K much smaller than the row (SIM / TWIN keep 50-200).
#pragma once

#include "attention_topk_kernels.h"
#include "vec_common.h"

namespace attnkern {
namespace cpu {
namespace {

// The ranking: a NaN beats every number (torch.topk's and torch.sort's order), numbers by value.
template <class A>
inline bool topk_better(A a, A b) {
  return a > b || (a != a && b == b);
}

// The dot products of the query qa (zero-padded to whole vectors) with the keys of the W
// positions at kp[j]: W accumulators, reduced horizontally all at once by transpose_reduce
// (lane j = <qa, k_j>), so a score costs no shuffle of its own.
template <class V, class T>
inline V topk_dots(const typename V::A* qa, const T* const* kp, int64_t Dk) {
  constexpr int W = V::W;
  V acc[W];
#pragma GCC unroll 16
  for (int j = 0; j < W; ++j) acc[j] = V::zero();
  int64_t d = 0;
  for (; d + W <= Dk; d += W) {
    const V qv = V::load(qa + d);
#pragma GCC unroll 16
    for (int j = 0; j < W; ++j) acc[j] = V::fma(qv, V::load(kp[j] + d), acc[j]);
  }
  if (d < Dk) {
    const int n = int(Dk - d);
    const V qv = V::load(qa + d);
#pragma GCC unroll 16
    for (int j = 0; j < W; ++j) acc[j] = V::fma(qv, V::load_partial(kp[j] + d, n), acc[j]);
  }
  return V::transpose_reduce(acc);
}

// Offers (s, l) to the sorted buffer (sc, ix) holding *count of K entries.
template <class A>
inline void topk_offer(A s, int64_t l, A* sc, int64_t* ix, int64_t K, int64_t* count) {
  int64_t pos;
  if (*count < K) {
    pos = (*count)++;
  } else {
    if (!topk_better(s, sc[K - 1])) return;
    pos = K - 1;
  }
  while (pos > 0 && topk_better(s, sc[pos - 1])) {
    sc[pos] = sc[pos - 1];
    ix[pos] = ix[pos - 1];
    --pos;
  }
  sc[pos] = s;
  ix[pos] = l;
}

template <class V, class T>
void topk_fwd_entry(const TopkParams& p, int64_t begin, int64_t end) {
  using A = typename V::A;
  constexpr int NP = V::W;
  const A* q = static_cast<const A*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const A* bias = static_cast<const A*>(p.bias);
  A* scores = static_cast<A*>(p.scores);
  const int64_t G = p.H / p.Hkv;
  const A scale = A(p.scale);
  const A neg_inf = -__builtin_inf();
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / p.Hkv, g = item % p.Hkv;
    const int64_t start = p.starts[b], len = p.lens[b];
    const uint8_t* mask = p.mask ? p.mask + b * p.L : nullptr;
    for (int64_t n = 0; n < p.N; ++n) {
      for (int64_t h = g * G; h < (g + 1) * G; ++h) {
        const int64_t qrow = (b * p.N + n) * p.H + h;
        const A* qa = q + qrow * p.Dkp;
        A* sc = scores + qrow * p.K;
        int64_t* ix = p.indices + qrow * p.K;
        int64_t bias_base = 0, bias_stride = 0;
        if (bias) p.bias_offsets(b, n, h, &bias_base, &bias_stride);
        int64_t count = 0;
        if (p.K == 0) continue;
        for (int64_t l0 = 0; l0 < len; l0 += NP) {
          const int np = len - l0 < NP ? int(len - l0) : NP;
          const T* kp[NP];
          // A short last block repeats its first position (computed, never offered).
          for (int i = 0; i < NP; ++i) kp[i] = k + ((start + l0 + (i < np ? i : 0)) * p.Hkv + g) * p.Dk;
          A dots[NP];
          topk_dots<V, T>(qa, kp, p.Dk).store(dots);
          for (int i = 0; i < np; ++i) {
            const int64_t l = l0 + i;
            // Masked-out positions may hold anything (NaN included): their scores are dropped.
            if (mask && !mask[l]) continue;
            A s = dots[i] * scale;
            if (bias) s = s + bias[bias_base + l * bias_stride];
            // A -inf score drops the position, as a -inf bias drops it from attention_pool.
            if (s == neg_inf) continue;
            topk_offer(s, l, sc, ix, p.K, &count);
          }
        }
      }
    }
  }
}

template <class V>
TopkKernels topk_kernels_of() {
  return {&topk_fwd_entry<V, float>, &topk_fwd_entry<V, bf16_t>, &topk_fwd_entry<V, fp16_t>};
}

}  // namespace
}  // namespace cpu
}  // namespace attnkern
