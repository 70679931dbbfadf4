// One build of the single-query CPU forward and backward (fwd_span, bwd_span over Vec512) for
// cpu_kernel_ab: compiled once per header tree (-I<tree>/csrc/cpu) with -DAB_NAME and -DAB_BWD
// naming its entry points, so that two trees' kernels can run side by side in one process.
// Spans are split evenly over the threads; before each one the first rows of the next are
// prefetched, as the extension's work loop does.
#include <omp.h>

#include "avx512_target_push.h"
#include "attention_pool_kernels.h"
#include "vec_avx512.h"
#include "attention_pool_impl.h"

using namespace attnkern::cpu;

// f(span, workspace) for each row's span, the rows split evenly over the threads.
template <class T, class F>
static void for_spans(const FwdParams& p, const int64_t* starts, const int64_t* counts, int B, int threads, F&& f) {
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), b0 = B * t / threads, b1 = B * (t + 1) / threads;
    alignas(64) static thread_local float ws[1 << 14];
    for (int b = b0; b < b1; ++b) {
      const Span s{b, 0, starts[b], counts[b], nullptr};
      if (b == b0) prefetch_head<T>(p, s);
      if (b + 1 < b1) prefetch_head<T>(p, Span{b + 1, 0, starts[b + 1], counts[b + 1], nullptr});
      f(s, ws);
    }
  }
}

template <class T>
static void fwd_spans(const FwdParams& p, const int64_t* starts, const int64_t* counts, int B, int threads,
                      float* out, float* m, float* l) {
  for_spans<T>(p, starts, counts, B, threads, [&](const Span& s, float* ws) {
    fwd_span<Vec512, T>(p, s, ws, out + s.b * p.H * p.Dv, m + s.b * p.H, l + s.b * p.H);
  });
}

template <class T>
static void bwd_spans(const BwdParams& p, const int64_t* starts, const int64_t* counts, int B, int threads,
                      float* dq) {
  for_spans<T>(p, starts, counts, B, threads,
               [&](const Span& s, float* ws) { bwd_span<Vec512, T>(p, s, ws, dq + s.b * p.Dk); });
}

extern "C" void AB_BWD(const BwdParams& p, const int64_t* starts, const int64_t* counts, int B, int threads, float* dq) {
  if (p.dtype == kBF16)
    bwd_spans<bf16_t>(p, starts, counts, B, threads, dq);
  else
    bwd_spans<float>(p, starts, counts, B, threads, dq);
}

extern "C" void AB_NAME(const FwdParams& p, const int64_t* starts, const int64_t* counts, int B, int threads,
                        float* out, float* m, float* l) {
  if (p.dtype == kBF16)
    fwd_spans<bf16_t>(p, starts, counts, B, threads, out, m, l);
  else
    fwd_spans<float>(p, starts, counts, B, threads, out, m, l);
}

#include "target_pop.h"
