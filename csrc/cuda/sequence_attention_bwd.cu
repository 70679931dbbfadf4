// Backward of sequence self-attention, recomputing the weights from the saved log-sum-exp:
//   dq pass:   one CTA per (query tile, head) walks the key tiles: dQ = scale * dS K.
//   dk/dv pass: one CTA per (key tile, K/V head) walks the query tiles of every query head that
//              shares the K/V head: dV = P^T dO, dK = scale * dS^T Q; it also gathers the logit
//              gradients the time/position tables and the dense bias receive.
//   reduce:    sums the dk/dv CTAs' table slices in slice order.
// Every output element has one writer, and every sum runs in a fixed order: no atomics, the
// result does not depend on the scheduling.
#include <algorithm>

#include "sequence_attention_common.cuh"

namespace attnkern {
namespace cuda {
namespace seq {
namespace {

// Shared memory (floats): Q, dQ or dK [kSeqTile, Dk] x 2, K [kSeqTile, Dk]; V, dO, dV
// [kSeqTile, Dv]; S, dS and the time buckets [kSeqTile, kSeqTile]; the row stats and flags.
struct BwdSmem {
  float *Q, *K, *V, *dO, *accK, *accV, *S, *dS, *lse, *delta, *a;
  int *bucket, *flags;
  __device__ __forceinline__ BwdSmem(float* base, int64_t Dk, int64_t Dv) {
    Q = base;
    K = Q + kSeqTile * Dk;
    accK = K + kSeqTile * Dk;
    V = accK + kSeqTile * Dk;
    dO = V + kSeqTile * Dv;
    accV = dO + kSeqTile * Dv;
    S = accV + kSeqTile * Dv;
    dS = S + kSeqTile * kSeqTile;
    bucket = reinterpret_cast<int*>(dS + kSeqTile * kSeqTile);
    lse = reinterpret_cast<float*>(bucket + kSeqTile * kSeqTile);
    delta = lse + kSeqTile;
    a = delta + kSeqTile;
    flags = reinterpret_cast<int*>(a + kSeqTile);
  }
  static int64_t floats(int64_t Dk, int64_t Dv) { return 3 * kSeqTile * (Dk + Dv) + 3 * kSeqTile * kSeqTile + 4 * kSeqTile; }
};

template <typename T>
__global__ void __launch_bounds__(kSeqThreads) seq_bwd_dq_kernel(SeqProblem p, SeqBwdIO io) {
  SeqWork w;
  if (!decode_tile(p, blockIdx.x, w)) return;
  extern __shared__ float smem[];
  const BwdSmem sm(smem, p.Dk, p.Dv);
  const int64_t h = blockIdx.y, g = h / (p.H / p.Hkv), i0 = w.pos0, nq = w.count;
  const SeqMask mask(p, w);
  const RowStats st{sm.lse, sm.delta, sm.a};
  load_tile(static_cast<const T*>(p.q) + h * p.Dk, p.H * p.Dk, w.start + i0, nq, p.Dk, sm.Q);
  load_tile(static_cast<const T*>(io.grad_out) + h * p.Dv, p.H * p.Dv, w.start + i0, nq, p.Dv, sm.dO);
  load_row_stats(p, w, h, i0, nq, io.lse, io.delta, st);
  for (int64_t e = threadIdx.x; e < kSeqTile * p.Dk; e += kSeqThreads) sm.accK[e] = 0.f;
  for_each_key_tile<T>(p, w, mask, g, i0, nq, sm.K, sm.V, sm.flags, [&](int64_t j0, int64_t nk) {
    backward_pairs<T>(p, w, mask, h, i0, nq, j0, nk, sm.Q, sm.K, sm.V, sm.dO, st, sm.S, sm.dS, nullptr);
    __syncthreads();
    for (int64_t e = threadIdx.x; e < nq * p.Dk; e += kSeqThreads) {
      const int64_t r = e / p.Dk, d = e % p.Dk;
      float acc = 0.f;
      for (int64_t c = 0; c < nk; ++c) acc = fmaf(sm.dS[r * kSeqTile + c], sm.K[c * p.Dk + d], acc);
      sm.accK[e] = fmaf(acc, p.scale, sm.accK[e]);
    }
  });
  T* dq = static_cast<T*>(io.grad_q);
  for (int64_t e = threadIdx.x; e < nq * p.Dk; e += kSeqThreads) {
    const int64_t r = e / p.Dk, d = e % p.Dk;
    dq[((w.start + i0 + r) * p.H + h) * p.Dk + d] = from_float<T>(sm.accK[e]);
  }
}

// Adds the tile's logit gradients to the table entries they were read from, into this CTA's
// slice: thread t owns the entries first + t, first + t + kSeqThreads, ... of [first, last] and
// adds its pairs in row-major order.
__device__ __forceinline__ void gather_position(const SeqProblem& p, int64_t i0, int64_t nq, int64_t j0,
                                                int64_t nk, int64_t hb, const float* dS, float* slice) {
  const int64_t lo = imax(imax(i0 - (j0 + nk - 1), j0 - (i0 + nq - 1)), 0);
  const int64_t hi = imax(iabs(i0 + nq - 1 - j0), iabs(j0 + nk - 1 - i0));
  const int64_t first = imin(lo, p.P - 1), last = imin(hi, p.P - 1);
  for (int64_t e = first + threadIdx.x; e <= last; e += kSeqThreads) {
    float acc = 0.f;
    for (int r = 0; r < nq; ++r)
      for (int c = 0; c < nk; ++c)
        if (position_index(p, i0 + r, j0 + c) == e) acc += dS[r * kSeqTile + c];
    slice[e * p.Hb + hb] += acc;
  }
}

__device__ __forceinline__ void gather_time(const SeqProblem& p, int64_t nq, int64_t nk, int64_t hb,
                                            const float* dS, const int* bucket, float* slice) {
  for (int64_t e = threadIdx.x; e < p.NB; e += kSeqThreads) {
    float acc = 0.f;
    bool hit = false;
    for (int r = 0; r < nq; ++r)
      for (int c = 0; c < nk; ++c)
        if (bucket[r * kSeqTile + c] == e) {
          acc += dS[r * kSeqTile + c];
          hit = true;
        }
    if (hit) slice[e * p.Hb + hb] += acc;
  }
}

// K/V heads per dk/dv CTA: all of them when a dense bias of one head (Hb = 1) must sum every
// head's gradient at each of its entries; else one.
inline int64_t kv_heads_per_cta(const SeqProblem& p) { return p.bias && p.Hb == 1 ? p.Hkv : 1; }

template <typename T>
__global__ void __launch_bounds__(kSeqThreads) seq_bwd_dkdv_kernel(SeqProblem p, SeqBwdIO io, int64_t kv_per_cta) {
  SeqWork w;
  if (!decode_tile(p, blockIdx.x, w)) return;
  extern __shared__ float smem[];
  const BwdSmem sm(smem, p.Dk, p.Dv);
  const int64_t j0 = w.pos0, nk = w.count, G = p.H / p.Hkv;
  const SeqMask mask(p, w);
  const RowStats st{sm.lse, sm.delta, sm.a};
  const int64_t slice = int64_t(blockIdx.y) * gridDim.x + blockIdx.x;
  float* time_slice = io.time_ws ? io.time_ws + slice * p.NB * p.Hb : nullptr;
  float* pos_slice = io.position_ws ? io.position_ws + slice * p.P * p.Hb : nullptr;
  for (int64_t g = int64_t(blockIdx.y) * kv_per_cta; g < (int64_t(blockIdx.y) + 1) * kv_per_cta; ++g) {
    load_tile(static_cast<const T*>(p.k) + g * p.Dk, p.Hkv * p.Dk, w.start + j0, nk, p.Dk, sm.K);
    load_tile(static_cast<const T*>(p.v) + g * p.Dv, p.Hkv * p.Dv, w.start + j0, nk, p.Dv, sm.V);
    for (int64_t e = threadIdx.x; e < kSeqTile * p.Dk; e += kSeqThreads) sm.accK[e] = 0.f;
    for (int64_t e = threadIdx.x; e < kSeqTile * p.Dv; e += kSeqThreads) sm.accV[e] = 0.f;
    for (int64_t h = g * G; h < (g + 1) * G; ++h) {
      const int64_t hb = table_head(p, h);
      for (int64_t i0 = 0; i0 < w.n; i0 += kSeqTile) {
        const int64_t nq = imin(kSeqTile, w.n - i0);
        if (!tile_pair_live(mask, i0, nq, j0, nk, sm.flags)) continue;
        load_tile(static_cast<const T*>(p.q) + h * p.Dk, p.H * p.Dk, w.start + i0, nq, p.Dk, sm.Q);
        load_tile(static_cast<const T*>(io.grad_out) + h * p.Dv, p.H * p.Dv, w.start + i0, nq, p.Dv, sm.dO);
        load_row_stats(p, w, h, i0, nq, io.lse, io.delta, st);
        __syncthreads();
        backward_pairs<T>(p, w, mask, h, i0, nq, j0, nk, sm.Q, sm.K, sm.V, sm.dO, st, sm.S, sm.dS,
                          time_slice ? sm.bucket : nullptr);
        __syncthreads();
        for (int64_t e = threadIdx.x; e < nk * p.Dv; e += kSeqThreads) {
          const int64_t c = e / p.Dv, d = e % p.Dv;
          float acc = sm.accV[e];
          for (int64_t r = 0; r < nq; ++r) acc = fmaf(sm.S[r * kSeqTile + c], sm.dO[r * p.Dv + d], acc);
          sm.accV[e] = acc;
        }
        for (int64_t e = threadIdx.x; e < nk * p.Dk; e += kSeqThreads) {
          const int64_t c = e / p.Dk, d = e % p.Dk;
          float acc = 0.f;
          for (int64_t r = 0; r < nq; ++r) acc = fmaf(sm.dS[r * kSeqTile + c], sm.Q[r * p.Dk + d], acc);
          sm.accK[e] = fmaf(acc, p.scale, sm.accK[e]);
        }
        if (pos_slice) gather_position(p, i0, nq, j0, nk, hb, sm.dS, pos_slice);
        if (time_slice) gather_time(p, nq, nk, hb, sm.dS, sm.bucket, time_slice);
        if (io.grad_bias) {
          float* gb = io.grad_bias + ((w.b * p.Hb + hb) * p.L + i0) * p.L + j0;
          for (int e = threadIdx.x; e < nq * kSeqTile; e += kSeqThreads) {
            const int r = e / kSeqTile, c = e % kSeqTile;
            if (c < nk) gb[r * p.L + c] += sm.dS[e];
          }
        }
        __syncthreads();  // before the next tile overwrites Q, dO, S and dS
      }
    }
    __syncthreads();
    T* dk = static_cast<T*>(io.grad_k);
    T* dv = static_cast<T*>(io.grad_v);
    for (int64_t e = threadIdx.x; e < nk * p.Dk; e += kSeqThreads)
      dk[((w.start + j0 + e / p.Dk) * p.Hkv + g) * p.Dk + e % p.Dk] = from_float<T>(sm.accK[e]);
    for (int64_t e = threadIdx.x; e < nk * p.Dv; e += kSeqThreads)
      dv[((w.start + j0 + e / p.Dv) * p.Hkv + g) * p.Dv + e % p.Dv] = from_float<T>(sm.accV[e]);
    __syncthreads();  // before the next K/V head overwrites K, V and the accumulators
  }
}

// out[e] = sum over the slices, in slice order.
__global__ void __launch_bounds__(kSeqThreads) seq_reduce_slices_kernel(const float* ws, int64_t slices,
                                                                         int64_t entries, float* out) {
  for (int64_t e = int64_t(blockIdx.x) * kSeqThreads + threadIdx.x; e < entries;
       e += int64_t(gridDim.x) * kSeqThreads) {
    float acc = 0.f;
    for (int64_t s = 0; s < slices; ++s) acc += ws[s * entries + e];
    out[e] = acc;
  }
}

cudaError_t reduce_slices(const float* ws, int64_t slices, int64_t entries, float* out, cudaStream_t stream) {
  if (!ws || entries == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((entries + kSeqThreads - 1) / kSeqThreads, 4096);
  seq_reduce_slices_kernel<<<unsigned(blocks), kSeqThreads, 0, stream>>>(ws, slices, entries, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(const SeqProblem& p, const SeqBwdIO& io, cudaStream_t stream) {
  const int64_t smem = seq_bwd_smem(p);
  cudaError_t err = cudaFuncSetAttribute(seq_bwd_dq_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err == cudaSuccess)
    err = cudaFuncSetAttribute(seq_bwd_dkdv_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  seq_bwd_dq_kernel<T><<<dim3(unsigned(p.tiles), unsigned(p.H)), kSeqThreads, size_t(smem), stream>>>(p, io);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  const int64_t kv = kv_heads_per_cta(p);
  seq_bwd_dkdv_kernel<T><<<dim3(unsigned(p.tiles), unsigned(p.Hkv / kv)), kSeqThreads, size_t(smem), stream>>>(
      p, io, kv);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  const int64_t slices = seq_bwd_slices(p);
  if ((err = reduce_slices(io.time_ws, slices, p.NB * p.Hb, io.grad_time, stream)) != cudaSuccess) return err;
  return reduce_slices(io.position_ws, slices, p.P * p.Hb, io.grad_position, stream);
}

}  // namespace
}  // namespace seq

int64_t seq_bwd_slices(const SeqProblem& p) { return p.tiles * (p.Hkv / seq::kv_heads_per_cta(p)); }

int64_t seq_bwd_smem(const SeqProblem& p) { return seq::BwdSmem::floats(p.Dk, p.Dv) * int64_t(sizeof(float)); }

cudaError_t launch_seq_bwd(const SeqProblem& p, const SeqBwdIO& io, cudaStream_t stream) {
  if (p.tiles == 0 || p.H == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat16: return seq::launch<__half>(p, io, stream);
    case DType::kBFloat16: return seq::launch<__nv_bfloat16>(p, io, stream);
    default: return seq::launch<float>(p, io, stream);
  }
}

}  // namespace cuda
}  // namespace attnkern
