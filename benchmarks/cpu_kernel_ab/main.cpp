// cpu_kernel_ab: the single-query CPU forward (AB_BACKWARD=1: the backward, a dq/dk/dv pass that
// reads K, V and writes dK, dV) of two source trees (A, B) against each other and
// against reading the same K/V bytes, in one process, the order rotated every round (a call
// that follows another runs measurably faster here). Ratios are medians of per-round ratios to
// a read of the valid K/V bytes laid out contiguously (two streams, as the kernel reads K and
// V); "in place" is the same read of the rows where they lie (padding gaps included).
// Build and run: benchmarks/cpu_kernel_ab/run.sh <tree A> <tree B> [threads] [rounds].
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "attention_pool_kernels.h"

using namespace attnkern::cpu;
using FwdCall = void (*)(const FwdParams&, const int64_t*, const int64_t*, int, int, float*, float*, float*);
using BwdCall = void (*)(const BwdParams&, const int64_t*, const int64_t*, int, int, float*);
extern "C" void kernel_a(const FwdParams&, const int64_t*, const int64_t*, int, int, float*, float*, float*);
extern "C" void kernel_b(const FwdParams&, const int64_t*, const int64_t*, int, int, float*, float*, float*);
extern "C" void bwd_a(const BwdParams&, const int64_t*, const int64_t*, int, int, float*);
extern "C" void bwd_b(const BwdParams&, const int64_t*, const int64_t*, int, int, float*);

static double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

__attribute__((target("avx512f"))) static float read_two(const char* k, const char* v, int64_t bytes) {
  __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
  for (int64_t o = 0; o + 64 <= bytes; o += 64) {
    a = _mm512_add_ps(a, _mm512_loadu_ps(reinterpret_cast<const float*>(k + o)));
    b = _mm512_add_ps(b, _mm512_loadu_ps(reinterpret_cast<const float*>(v + o)));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a, b));
}

// The float's bits, or its bfloat16 bits (truncated) in the low half.
static uint32_t bits(float x, bool bf16) {
  uint32_t u;
  memcpy(&u, &x, 4);
  return bf16 ? u >> 16 : u;
}

static double median(std::vector<double> x) {
  std::sort(x.begin(), x.end());
  return x[x.size() / 2];
}

// One shape: B rows of L positions (ragged: lengths uniform in [1, L]), H heads of D elements.
static void run_shape(const char* name, int B, int L, int H, int D, bool ragged, bool bf16, int threads, int rounds) {
  const int64_t es = bf16 ? 2 : 4, row = int64_t(H) * D * es;
  std::vector<int64_t> starts(B), counts(B);
  srand(1);
  int64_t valid = 0;
  for (int b = 0; b < B; ++b) {
    counts[b] = ragged ? 1 + rand() % L : L;
    starts[b] = int64_t(b) * L;
    valid += counts[b];
  }
  const int64_t n = int64_t(B) * L * H * D;
  char* k = static_cast<char*>(aligned_alloc(64, n * es + 64));
  char* v = static_cast<char*>(aligned_alloc(64, n * es + 64));
  // Element i of a K/V/q buffer of this dtype.
  auto put = [&](void* buf, int64_t i, float x) {
    if (bf16)
      static_cast<uint16_t*>(buf)[i] = uint16_t(bits(x, true));
    else
      static_cast<uint32_t*>(buf)[i] = bits(x, false);
  };
  for (int64_t i = 0; i < n; ++i) {
    const float x = float((i * 2654435761u) % 1000) * 0.001f - 0.5f;
    put(k, i, x);
    put(v, i, -x);
  }
  std::vector<uint32_t> q(int64_t(B) * H * D);
  for (size_t i = 0; i < q.size(); ++i) put(q.data(), int64_t(i), 0.01f * float(i % 17));
  BwdParams p;
  p.dtype = bf16 ? kBF16 : kF32;
  p.q = q.data();
  p.k = k;
  p.v = v;
  p.q_sb = p.q_sn = int64_t(H) * D;
  p.q_sh = D;
  p.k_sl = p.v_sl = int64_t(H) * D;
  p.k_sh = p.v_sh = D;
  p.N = 1;
  p.H = H;
  p.Dk = p.Dv = D;
  p.scale = 0.125;
  p.heads = H;
  p.prefetch = std::max<int64_t>(32, (int64_t(64) << 10) / (2 * D * es));  // the launcher's default
  std::vector<float> out(int64_t(B) * H * D), m(int64_t(B) * H), l(int64_t(B) * H);
  const int64_t bytes = valid * row;
  char* rk = static_cast<char*>(aligned_alloc(64, bytes + 64));
  char* rv = static_cast<char*>(aligned_alloc(64, bytes + 64));
  memset(rk, 1, bytes);
  memset(rv, 1, bytes);
  volatile float sink = 0;
  auto read_contiguous = [&] {
#pragma omp parallel num_threads(threads)
    {
      const int t = omp_get_thread_num();
      const int64_t part = (bytes / threads) & ~int64_t(63);
      sink = sink + read_two(rk + t * part, rv + t * part, part);
    }
  };
  auto read_in_place = [&] {
#pragma omp parallel num_threads(threads)
    {
      const int t = omp_get_thread_num(), b0 = B * t / threads, b1 = B * (t + 1) / threads;
      float acc = 0;
      for (int b = b0; b < b1; ++b) acc += read_two(k + starts[b] * row, v + starts[b] * row, counts[b] * row);
      sink = sink + acc;
    }
  };
  const FwdCall fns[2] = {kernel_a, kernel_b};
  const BwdCall bwds[2] = {bwd_a, bwd_b};
  const bool backward = getenv("AB_BACKWARD") != nullptr;
  // The backward's inputs: grad_out, the forward's statistics as its shift, delta 0, and the
  // gradient rows (a backward also writes dK and dV: twice the bytes of the read it is timed
  // against, so its ratio is not comparable with the forward's).
  std::vector<uint32_t> go(q.size()), shift(2 * int64_t(B) * H);
  std::vector<float> delta(int64_t(B) * H, 0.f), dq(int64_t(B) * H * D);
  char *gk = nullptr, *gv = nullptr;
  if (backward) {
    for (size_t i = 0; i < go.size(); ++i) go[i] = q[(i * 7) % q.size()];
    kernel_a(p, starts.data(), counts.data(), B, threads, out.data(), m.data(), l.data());
    for (int64_t r = 0; r < int64_t(B) * H; ++r) {
      const float sh[2] = {m[r], l[r] > 0 ? __builtin_log2f(l[r]) : 0.f};
      memcpy(&shift[2 * r], sh, 8);
    }
    gk = static_cast<char*>(aligned_alloc(64, n * es + 64));
    gv = static_cast<char*>(aligned_alloc(64, n * es + 64));
    memset(gk, 0, n * es);
    memset(gv, 0, n * es);
    p.go = go.data();
    p.go_sb = p.go_sn = int64_t(H) * D;
    p.go_sh = D;
    p.shift = shift.data();
    p.delta = delta.data();
    p.gk = gk;
    p.gv = gv;
    p.gk_sl = p.gv_sl = int64_t(H) * D;
    p.gk_sh = p.gv_sh = D;
    p.heads = 1;  // the backward runs one head per span
  }
  std::vector<double> ratio[3];
  float check[2] = {0, 0};
  for (int r = 0; r < rounds + 2; ++r) {
    for (int i = 0; i < 3; ++i) {
      const int f = (i + r) % 3;  // 0, 1: the kernels, 2: the in-place read
      const double t0 = now();
      if (f < 2 && backward)
        bwds[f](p, starts.data(), counts.data(), B, threads, dq.data());
      else if (f < 2)
        fns[f](p, starts.data(), counts.data(), B, threads, out.data(), m.data(), l.data());
      else
        read_in_place();
      const double t1 = now();
      read_contiguous();
      const double t2 = now();
      if (r >= 2) ratio[f].push_back((t1 - t0) / (t2 - t1));
      if (f < 2) check[f] = backward ? dq[3] + dq[int64_t(H) * D + 5] : out[3] + out[int64_t(H) * D + 5] + l[0];
    }
  }
  printf("%s%-9s %s B=%d L=%d H=%d D=%d %s, %d threads: A %.2f  B %.2f  in place %.2f x the read  (check %.6g %.6g)\n",
         backward ? "bwd " : "", name, bf16 ? "bf16" : "fp32", B, L, H, D, ragged ? "ragged" : "full", threads, median(ratio[0]),
         median(ratio[1]), median(ratio[2]), check[0], check[1]);
  free(k);
  free(v);
  free(rk);
  free(rv);
  free(gk);
  free(gv);
}

int main(int argc, char** argv) {
  const int threads = argc > 1 ? atoi(argv[1]) : 2, rounds = argc > 2 ? atoi(argv[2]) : 15;
  for (bool bf16 : {false, true}) run_shape("training", 1024, 200, 1, 64, true, bf16, threads, rounds);
  if (getenv("AB_BACKWARD")) return 0;  // the backward's tasks are single heads: the training shape only
  for (bool bf16 : {false, true}) run_shape("long", 16, 16384, 4, 32, false, bf16, threads, rounds);
  return 0;
}
