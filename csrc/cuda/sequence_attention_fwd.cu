// Forward of sequence self-attention: one CTA per (query tile of a row, head). The key tiles of
// the row are walked through shared memory; a tile no query of which attends is skipped. Softmax
// runs online (one warp per query row, a lane per key column); SiLU needs no running state.
#include "sequence_attention_common.cuh"

namespace attnkern {
namespace cuda {
namespace seq {
namespace {

// Shared memory (floats): Q, K [kSeqTile, Dk]; V, O [kSeqTile, Dv]; S [kSeqTile, kSeqTile];
// per query row: alpha (the rescale of O), l, m, attn_scale; the live flags.
struct FwdSmem {
  float *Q, *K, *V, *O, *S, *alpha, *l, *m, *a;
  int* flags;
  __device__ __forceinline__ FwdSmem(float* base, int64_t Dk, int64_t Dv) {
    Q = base;
    K = Q + kSeqTile * Dk;
    V = K + kSeqTile * Dk;
    O = V + kSeqTile * Dv;
    S = O + kSeqTile * Dv;
    alpha = S + kSeqTile * kSeqTile;
    l = alpha + kSeqTile;
    m = l + kSeqTile;
    a = m + kSeqTile;
    flags = reinterpret_cast<int*>(a + kSeqTile);
  }
  static int64_t floats(int64_t Dk, int64_t Dv) { return 2 * kSeqTile * (Dk + Dv) + kSeqTile * kSeqTile + 5 * kSeqTile; }
};

template <typename T>
__global__ void __launch_bounds__(kSeqThreads) seq_fwd_kernel(SeqProblem p, float* out, float* lse) {
  SeqWork w;
  if (!decode_tile(p, blockIdx.x, w)) return;
  extern __shared__ float smem[];
  const FwdSmem sm(smem, p.Dk, p.Dv);
  const int64_t h = blockIdx.y, g = h / (p.H / p.Hkv), i0 = w.pos0, nq = w.count;
  const SeqMask mask(p, w);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  load_tile(static_cast<const T*>(p.q) + h * p.Dk, p.H * p.Dk, w.start + i0, nq, p.Dk, sm.Q);
  for (int64_t e = threadIdx.x; e < kSeqTile * p.Dv; e += kSeqThreads) sm.O[e] = 0.f;
  for (int r = threadIdx.x; r < kSeqTile; r += kSeqThreads)
    sm.a[r] = p.silu && r < nq ? p.attn_scale[(w.start + i0 + r) * p.attn_scale_stride] : 0.f;
  // The running max and sum of this warp's query rows warp, warp + kWarps, ...
  float m[kRowsPerWarp], l[kRowsPerWarp];
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    m[k] = kNegInf;
    l[k] = 0.f;
  }
  for_each_key_tile<T>(p, w, mask, g, i0, nq, sm.K, sm.V, sm.flags, [&](int64_t j0, int64_t nk) {
    for (int e = threadIdx.x; e < kSeqTile * kSeqTile; e += kSeqThreads) {
      const int r = e / kSeqTile, c = e % kSeqTile;
      int bk;
      const float s = pair_logit<T>(p, w, mask, h, i0, nq, j0, nk, r, c, sm.Q, sm.K, &bk);
      // SiLU: the weight itself (masked pairs 0); softmax: the logit, normalised below.
      sm.S[e] = p.silu ? (s == kNegInf ? 0.f : s * sigmoid(s) * sm.a[r]) : s;
    }
    __syncthreads();
    if (!p.silu) {
#pragma unroll
      for (int k = 0; k < kRowsPerWarp; ++k) {
        const int r = warp + k * kWarps;
        const float x = sm.S[r * kSeqTile + lane];
        const float mnew = fmaxf(m[k], detail::cross_group_max<1>(x));
        const float pr = mnew == kNegInf ? 0.f : expf(x - mnew);
        const float alpha = m[k] == kNegInf ? 0.f : expf(m[k] - mnew);
        l[k] = l[k] * alpha + detail::group_sum<32>(pr);
        m[k] = mnew;
        sm.S[r * kSeqTile + lane] = pr;
        if (lane == 0) sm.alpha[r] = alpha;
      }
      __syncthreads();
    }
    for (int64_t e = threadIdx.x; e < nq * p.Dv; e += kSeqThreads) {
      const int64_t r = e / p.Dv, d = e % p.Dv;
      float acc = p.silu ? sm.O[e] : sm.O[e] * sm.alpha[r];
      for (int64_t c = 0; c < nk; ++c) acc = fmaf(sm.S[r * kSeqTile + c], sm.V[c * p.Dv + d], acc);
      sm.O[e] = acc;
    }
  });
  if (lane == 0)
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
      sm.l[warp + k * kWarps] = l[k];
      sm.m[warp + k * kWarps] = m[k];
    }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < nq * p.Dv; e += kSeqThreads) {
    const int64_t r = e / p.Dv, d = e % p.Dv, tok = w.start + i0 + r;
    float o = sm.O[e];
    if (!p.silu) o = sm.l[r] > 0.f ? o / sm.l[r] : 0.f;
    out[(tok * p.H + h) * p.Dv + d] = o;
  }
  for (int64_t r = threadIdx.x; r < nq; r += kSeqThreads) {
    const int64_t tok = w.start + i0 + r;
    // SiLU has no log-sum-exp: 0 for every query of a row (as on the CPU).
    lse[tok * p.H + h] = p.silu ? 0.f : (sm.l[r] > 0.f ? sm.m[r] + logf(sm.l[r]) : kNegInf);
  }
}

template <typename T>
cudaError_t launch(const SeqProblem& p, float* out, float* lse, cudaStream_t stream) {
  const int64_t smem = seq_fwd_smem(p);
  cudaError_t err = cudaFuncSetAttribute(seq_fwd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned(p.tiles), unsigned(p.H));
  seq_fwd_kernel<T><<<grid, kSeqThreads, size_t(smem), stream>>>(p, out, lse);
  return cudaGetLastError();
}

}  // namespace
}  // namespace seq

int64_t seq_fwd_smem(const SeqProblem& p) { return seq::FwdSmem::floats(p.Dk, p.Dv) * int64_t(sizeof(float)); }

cudaError_t launch_seq_fwd(const SeqProblem& p, float* out, float* lse, cudaStream_t stream) {
  if (p.tiles == 0 || p.H == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat16: return seq::launch<__half>(p, out, lse, stream);
    case DType::kBFloat16: return seq::launch<__nv_bfloat16>(p, out, lse, stream);
    default: return seq::launch<float>(p, out, lse, stream);
  }
}

}  // namespace cuda
}  // namespace attnkern
