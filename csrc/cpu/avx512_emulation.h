// Portable stand-ins for the AVX-512 (and AVX512-BF16) intrinsics the AVX-512 kernels use, for
// a test build only (-DATTNKERN_EMULATE_AVX512, e.g. through ATTNKERN_CPU_EXTRA_FLAGS; the
// sanitizer run of scripts/sanitize_cpu.sh builds so): on a CPU without AVX-512 the AVX-512
// kernels then run, lane by lane, so that their arithmetic, their masks and their memory
// accesses are tested wherever the suite runs. Never part of a normal build: the AVX-512 kernel
// files (avx512_target_push.h) include it instead of compiling for AVX-512, and the dispatcher
// (isa_dispatch.h) selects the emulated kernels only when ATTNKERN_CPU_ISA names them.
//
// Each function follows the instruction's definition in Intel's intrinsics guide, lane for
// lane: masked loads and stores touch only the selected lanes (as the hardware does, so a
// sanitizer sees exactly the accesses a real CPU makes), streaming stores trap on a misaligned
// address (the hardware faults), max/min return the second operand when either is NaN, and the
// horizontal reductions add in the order GCC's own _mm512_reduce_*_ps do. fmadd is fused
// (fmaf), as the instruction is. Included after <immintrin.h>; the names below then stand for
// these functions for the rest of the translation unit. No torch/STL header (attention_pool_kernels.h).
#pragma once

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

namespace attnkern {
namespace cpu {
namespace emu {

// Out of line: inlined into every use in the kernels' many template instances, the lane loops
// made the compile of the emulation build (sanitizers on) take tens of minutes.
#define ATTNKERN_EMU_FN inline __attribute__((noinline))

struct M512 {
  float f[16];
};
struct M512i {
  uint32_t u[16];
};
// 32 bf16 values (bit patterns), as VDPBF16PS reads them; (__m512bh)x of an __m512i x
// reinterprets its bits, as the vector cast does.
struct M512bh {
  uint16_t h[32];
  M512bh() = default;
  explicit M512bh(const M512i& x) { __builtin_memcpy(h, x.u, 64); }
};

ATTNKERN_EMU_FN M512 setzero_ps() { return M512{}; }
ATTNKERN_EMU_FN M512i setzero_si512() { return M512i{}; }
ATTNKERN_EMU_FN M512 set1_ps(float a) {
  M512 r;
  for (int i = 0; i < 16; ++i) r.f[i] = a;
  return r;
}
ATTNKERN_EMU_FN M512i set1_epi32(int a) {
  M512i r;
  for (int i = 0; i < 16; ++i) r.u[i] = uint32_t(a);
  return r;
}
ATTNKERN_EMU_FN M512i setr_epi32(int e0, int e1, int e2, int e3, int e4, int e5, int e6, int e7, int e8, int e9,
                        int e10, int e11, int e12, int e13, int e14, int e15) {
  const int e[16] = {e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15};
  M512i r;
  for (int i = 0; i < 16; ++i) r.u[i] = uint32_t(e[i]);
  return r;
}
ATTNKERN_EMU_FN M512 loadu_ps(const void* p) {
  M512 r;
  __builtin_memcpy(r.f, p, 64);
  return r;
}
ATTNKERN_EMU_FN M512i loadu_si512(const void* p) {
  M512i r;
  __builtin_memcpy(r.u, p, 64);
  return r;
}
ATTNKERN_EMU_FN void storeu_ps(void* p, M512 a) { __builtin_memcpy(p, a.f, 64); }
ATTNKERN_EMU_FN void storeu_si512(void* p, M512i a) { __builtin_memcpy(p, a.u, 64); }
ATTNKERN_EMU_FN M512 maskz_loadu_ps(__mmask16 k, const void* p) {
  M512 r{};
  const float* s = static_cast<const float*>(p);
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1) __builtin_memcpy(&r.f[i], s + i, 4);
  return r;
}
ATTNKERN_EMU_FN void mask_storeu_ps(void* p, __mmask16 k, M512 a) {
  float* d = static_cast<float*>(p);
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1) __builtin_memcpy(d + i, &a.f[i], 4);
}
ATTNKERN_EMU_FN __m256i maskz_loadu_epi16_256(__mmask16 k, const void* p) {
  alignas(32) uint16_t r[16] = {};
  const uint16_t* s = static_cast<const uint16_t*>(p);
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1) __builtin_memcpy(&r[i], s + i, 2);
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(r));
}
ATTNKERN_EMU_FN void mask_storeu_epi16_256(void* p, __mmask16 k, __m256i a) {
  alignas(32) uint16_t v[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(v), a);
  uint16_t* d = static_cast<uint16_t*>(p);
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1) __builtin_memcpy(d + i, &v[i], 2);
}
ATTNKERN_EMU_FN void stream_ps(void* p, M512 a) {
  if (reinterpret_cast<uintptr_t>(p) & 63) __builtin_trap();  // vmovntps faults when misaligned
  __builtin_memcpy(p, a.f, 64);
}
ATTNKERN_EMU_FN void stream_si512(void* p, M512i a) {
  if (reinterpret_cast<uintptr_t>(p) & 63) __builtin_trap();
  __builtin_memcpy(p, a.u, 64);
}

ATTNKERN_EMU_FN M512 castsi512_ps(M512i a) {
  M512 r;
  __builtin_memcpy(r.f, a.u, 64);
  return r;
}
ATTNKERN_EMU_FN M512i castps_si512(M512 a) {
  M512i r;
  __builtin_memcpy(r.u, a.f, 64);
  return r;
}

#define ATTNKERN_EMU_LANEWISE(name, T, expr) \
  ATTNKERN_EMU_FN T name(T a, T b) {                  \
    T r;                                     \
    for (int i = 0; i < 16; ++i) expr;       \
    return r;                                \
  }
ATTNKERN_EMU_LANEWISE(add_ps, M512, r.f[i] = a.f[i] + b.f[i])
ATTNKERN_EMU_LANEWISE(sub_ps, M512, r.f[i] = a.f[i] - b.f[i])
ATTNKERN_EMU_LANEWISE(mul_ps, M512, r.f[i] = a.f[i] * b.f[i])
ATTNKERN_EMU_LANEWISE(div_ps, M512, r.f[i] = a.f[i] / b.f[i])
ATTNKERN_EMU_LANEWISE(max_ps, M512, r.f[i] = a.f[i] > b.f[i] ? a.f[i] : b.f[i])
ATTNKERN_EMU_LANEWISE(min_ps, M512, r.f[i] = a.f[i] < b.f[i] ? a.f[i] : b.f[i])
ATTNKERN_EMU_LANEWISE(add_epi32, M512i, r.u[i] = a.u[i] + b.u[i])
ATTNKERN_EMU_LANEWISE(and_si512, M512i, r.u[i] = a.u[i] & b.u[i])
#undef ATTNKERN_EMU_LANEWISE

ATTNKERN_EMU_FN M512 fmadd_ps(M512 a, M512 b, M512 c) {
  M512 r;
  for (int i = 0; i < 16; ++i) r.f[i] = fmaf(a.f[i], b.f[i], c.f[i]);
  return r;
}
ATTNKERN_EMU_FN M512i slli_epi32(M512i a, unsigned n) {
  M512i r;
  for (int i = 0; i < 16; ++i) r.u[i] = n > 31 ? 0u : a.u[i] << n;
  return r;
}
ATTNKERN_EMU_FN M512i srli_epi32(M512i a, unsigned n) {
  M512i r;
  for (int i = 0; i < 16; ++i) r.u[i] = n > 31 ? 0u : a.u[i] >> n;
  return r;
}

// Predicates 0..31 of vcmpps (the _CMP_* constants); bit 4 only picks signalling or quiet
// comparisons, which give the same mask.
template <int P>
ATTNKERN_EMU_FN __mmask16 cmp_ps_mask(M512 a, M512 b) {
  static_assert(P >= 0 && P < 32, "vcmpps predicate");
  unsigned k = 0;
  for (int i = 0; i < 16; ++i) {
    const float x = a.f[i], y = b.f[i];
    const bool u = x != x || y != y;
    bool t = false;
    switch (P & 15) {
      case 0: t = !u && x == y; break;    // EQ_OQ
      case 1: t = !u && x < y; break;     // LT_OS
      case 2: t = !u && x <= y; break;    // LE_OS
      case 3: t = u; break;               // UNORD_Q
      case 4: t = u || x != y; break;     // NEQ_UQ
      case 5: t = u || !(x < y); break;   // NLT_US
      case 6: t = u || !(x <= y); break;  // NLE_US
      case 7: t = !u; break;              // ORD_Q
      case 8: t = u || x == y; break;     // EQ_UQ
      case 9: t = u || !(x >= y); break;  // NGE_US
      case 10: t = u || !(x > y); break;  // NGT_US
      case 11: t = false; break;          // FALSE_OQ
      case 12: t = !u && x != y; break;   // NEQ_OQ
      case 13: t = !u && x >= y; break;   // GE_OS
      case 14: t = !u && x > y; break;    // GT_OS
      default: t = true; break;           // TRUE_UQ
    }
    k |= unsigned(t) << i;
  }
  return __mmask16(k);
}
ATTNKERN_EMU_FN M512 mask_blend_ps(__mmask16 k, M512 a, M512 b) {
  M512 r;
  for (int i = 0; i < 16; ++i) r.f[i] = ((k >> i) & 1) ? b.f[i] : a.f[i];
  return r;
}
ATTNKERN_EMU_FN M512 mask_mov_ps(M512 src, __mmask16 k, M512 a) { return mask_blend_ps(k, src, a); }
ATTNKERN_EMU_FN M512 maskz_mov_ps(__mmask16 k, M512 a) { return mask_blend_ps(k, M512{}, a); }
ATTNKERN_EMU_FN M512i mask_mov_epi32(M512i src, __mmask16 k, M512i a) {
  M512i r;
  for (int i = 0; i < 16; ++i) r.u[i] = ((k >> i) & 1) ? a.u[i] : src.u[i];
  return r;
}

// GCC's _mm512_reduce_add_ps / _mm512_reduce_max_ps order: high half op low half, then the
// high and low quarters of that, then lanes (0, 2) and (1, 3), then lanes 0 and 1.
template <typename Op>
ATTNKERN_EMU_FN float reduce_ps(M512 a, Op op) {
  float t[8], u[4];
  for (int i = 0; i < 8; ++i) t[i] = op(a.f[8 + i], a.f[i]);
  for (int i = 0; i < 4; ++i) u[i] = op(t[4 + i], t[i]);
  const float v0 = op(u[0], u[2]), v1 = op(u[1], u[3]);
  return op(v0, v1);
}
ATTNKERN_EMU_FN float reduce_add_ps(M512 a) {
  return reduce_ps(a, [](float x, float y) { return x + y; });
}
ATTNKERN_EMU_FN float reduce_max_ps(M512 a) {
  return reduce_ps(a, [](float x, float y) { return x > y ? x : y; });
}

// vrndscaleps with scale 0 and round-to-nearest-even (the only form the kernels use).
template <int R>
ATTNKERN_EMU_FN M512 roundscale_ps(M512 a) {
  static_assert(R == (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), "only round-to-nearest is emulated");
  M512 r;
  for (int i = 0; i < 16; ++i) r.f[i] = __builtin_rintf(a.f[i]);  // default mode: nearest even
  return r;
}
// vscalefps: a * 2^floor(b) (NaN in either: NaN).
ATTNKERN_EMU_FN M512 scalef_ps(M512 a, M512 b) {
  M512 r;
  for (int i = 0; i < 16; ++i) {
    const float e = b.f[i];
    if (a.f[i] != a.f[i] || e != e) {
      r.f[i] = a.f[i] + e;
      continue;
    }
    const float fe = floorf(e < -512.f ? -512.f : (e > 512.f ? 512.f : e));
    r.f[i] = ldexpf(a.f[i], int(fe));
  }
  return r;
}
template <int I>
ATTNKERN_EMU_FN M512 shuffle_f32x4(M512 a, M512 b) {
  static_assert(I >= 0 && I < 256, "shuffle control");
  const int sel[4] = {I & 3, (I >> 2) & 3, (I >> 4) & 3, (I >> 6) & 3};
  M512 r;
  for (int l = 0; l < 4; ++l)
    for (int e = 0; e < 4; ++e) r.f[4 * l + e] = (l < 2 ? a : b).f[4 * sel[l] + e];
  return r;
}
template <int I>
ATTNKERN_EMU_FN M512 shuffle_ps(M512 a, M512 b) {
  static_assert(I >= 0 && I < 256, "shuffle control");
  const int sel[4] = {I & 3, (I >> 2) & 3, (I >> 4) & 3, (I >> 6) & 3};
  M512 r;
  for (int l = 0; l < 4; ++l)
    for (int e = 0; e < 4; ++e) r.f[4 * l + e] = (e < 2 ? a : b).f[4 * l + sel[e]];
  return r;
}
ATTNKERN_EMU_FN M512 permutexvar_ps(M512i idx, M512 a) {
  M512 r;
  for (int i = 0; i < 16; ++i) r.f[i] = a.f[idx.u[i] & 15u];
  return r;
}

ATTNKERN_EMU_FN M512i cvtepu16_epi32(__m256i a) {
  alignas(32) uint16_t h[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(h), a);
  M512i r;
  for (int i = 0; i < 16; ++i) r.u[i] = h[i];
  return r;
}
ATTNKERN_EMU_FN __m256i cvtepi32_epi16(M512i a) {  // truncation
  alignas(32) uint16_t h[16];
  for (int i = 0; i < 16; ++i) h[i] = uint16_t(a.u[i]);
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(h));
}
ATTNKERN_EMU_FN M512 cvtph_ps(__m256i a) {
  alignas(32) uint16_t h[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(h), a);
  M512 r;
  for (int i = 0; i < 16; ++i) r.f[i] = _cvtsh_ss(h[i]);
  return r;
}
template <int R>
ATTNKERN_EMU_FN __m256i cvtps_ph(M512 a) {
  static_assert(R == (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), "only round-to-nearest is emulated");
  alignas(32) uint16_t h[16];
  for (int i = 0; i < 16; ++i) h[i] = _cvtss_sh(a.f[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(h));
}

// vdpbf16ps: per lane j, src + a[2j+1] * b[2j+1], then + a[2j] * b[2j] (Intel's order), each
// product exact in fp32; denormal inputs and results are flushed to zero (the instruction
// works with DAZ and FTZ whatever MXCSR says), rounding to nearest even.
ATTNKERN_EMU_FN float bf16_daz(uint16_t h) {
  const uint32_t u = (h & 0x7f80u) == 0 ? uint32_t(h & 0x8000u) << 16 : uint32_t(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
ATTNKERN_EMU_FN float ftz(float x) { return (x != 0.f && __builtin_fabsf(x) < 1.17549435e-38f) ? __builtin_copysignf(0.f, x) : x; }
ATTNKERN_EMU_FN M512 dpbf16_ps(M512 src, M512bh a, M512bh b) {
  M512 r;
  for (int j = 0; j < 16; ++j) {
    float t = ftz(src.f[j]);
    t = ftz(t + bf16_daz(a.h[2 * j + 1]) * bf16_daz(b.h[2 * j + 1]));
    r.f[j] = ftz(t + bf16_daz(a.h[2 * j]) * bf16_daz(b.h[2 * j]));
  }
  return r;
}


// The integer operations of the VNNI quantized kernel (attention_pool_quant_vnni.h).
ATTNKERN_EMU_FN M512 load_ps(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) & 63) __builtin_trap();  // vmovaps faults when misaligned
  return loadu_ps(p);
}
ATTNKERN_EMU_FN M512i load_si512(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) & 63) __builtin_trap();
  return loadu_si512(p);
}
ATTNKERN_EMU_FN void store_ps(void* p, M512 a) {
  if (reinterpret_cast<uintptr_t>(p) & 63) __builtin_trap();
  storeu_ps(p, a);
}
ATTNKERN_EMU_FN void store_si512(void* p, M512i a) {
  if (reinterpret_cast<uintptr_t>(p) & 63) __builtin_trap();
  storeu_si512(p, a);
}
ATTNKERN_EMU_FN M512 andnot_ps(M512 a, M512 b) {  // ~a & b
  M512i x = castps_si512(a), y = castps_si512(b);
  for (int i = 0; i < 16; ++i) y.u[i] &= ~x.u[i];
  return castsi512_ps(y);
}
ATTNKERN_EMU_FN M512i xor_si512(M512i a, M512i b) {
  for (int i = 0; i < 16; ++i) a.u[i] ^= b.u[i];
  return a;
}
ATTNKERN_EMU_FN M512i sub_epi32(M512i a, M512i b) {
  for (int i = 0; i < 16; ++i) a.u[i] -= b.u[i];
  return a;
}
ATTNKERN_EMU_FN M512i castsi128_si512(__m128i a) {
  M512i r{};
  __builtin_memcpy(r.u, &a, 16);
  return r;
}
ATTNKERN_EMU_FN M512i castsi256_si512(__m256i a) {
  M512i r{};
  __builtin_memcpy(r.u, &a, 32);
  return r;
}
ATTNKERN_EMU_FN M512i inserti32x4(M512i a, __m128i b, int i) {
  __builtin_memcpy(a.u + 4 * (i & 3), &b, 16);
  return a;
}
ATTNKERN_EMU_FN M512i inserti64x4(M512i a, __m256i b, int i) {
  __builtin_memcpy(a.u + 8 * (i & 1), &b, 32);
  return a;
}
ATTNKERN_EMU_FN M512 cvtepi32_ps(M512i a) {
  M512 r;
  for (int i = 0; i < 16; ++i) r.f[i] = float(int32_t(a.u[i]));
  return r;
}
// vcvtps2dq: round to nearest even (MXCSR's default); out of range and NaN give INT32_MIN.
ATTNKERN_EMU_FN M512i cvtps_epi32(M512 a) {
  M512i r;
  for (int i = 0; i < 16; ++i) {
    const float x = __builtin_nearbyintf(a.f[i]);
    r.u[i] = (x >= -2147483648.f && x < 2147483648.f) ? uint32_t(int32_t(x)) : 0x80000000u;
  }
  return r;
}
// vpmovsxbw / vpmovzxbw: 32 bytes (T = int8_t / uint8_t) widened to 16-bit lanes.
template <class T>
ATTNKERN_EMU_FN M512i widen_bytes(__m256i a) {
  T b[32];
  int16_t w[32];
  __builtin_memcpy(b, &a, 32);
  for (int i = 0; i < 32; ++i) w[i] = int16_t(b[i]);
  M512i r;
  __builtin_memcpy(r.u, w, 64);
  return r;
}
ATTNKERN_EMU_FN M512i cvtepi8_epi16(__m256i a) { return widen_bytes<int8_t>(a); }
ATTNKERN_EMU_FN M512i cvtepu8_epi16(__m256i a) { return widen_bytes<uint8_t>(a); }
// Interleaves within each 128-bit quarter, as vpunpck{l,h}{wd,dq,qdq}: E bytes per element,
// the low (hi = false) or high half of each quarter of a and b, alternating.
template <int E, bool hi>
ATTNKERN_EMU_FN M512i unpack(M512i a, M512i b) {
  uint8_t x[64], y[64], r[64];
  __builtin_memcpy(x, a.u, 64);
  __builtin_memcpy(y, b.u, 64);
  constexpr int n = 8 / E;  // elements taken from each source per quarter
  for (int q = 0; q < 4; ++q)
    for (int i = 0; i < n; ++i) {
      const int src = 16 * q + (hi ? 8 : 0) + E * i;
      __builtin_memcpy(r + 16 * q + 2 * E * i, x + src, E);
      __builtin_memcpy(r + 16 * q + 2 * E * i + E, y + src, E);
    }
  M512i o;
  __builtin_memcpy(o.u, r, 64);
  return o;
}
ATTNKERN_EMU_FN M512i unpacklo_epi16(M512i a, M512i b) { return unpack<2, false>(a, b); }
ATTNKERN_EMU_FN M512i unpackhi_epi16(M512i a, M512i b) { return unpack<2, true>(a, b); }
ATTNKERN_EMU_FN M512i unpacklo_epi32(M512i a, M512i b) { return unpack<4, false>(a, b); }
ATTNKERN_EMU_FN M512i unpackhi_epi32(M512i a, M512i b) { return unpack<4, true>(a, b); }
ATTNKERN_EMU_FN M512i unpacklo_epi64(M512i a, M512i b) { return unpack<8, false>(a, b); }
ATTNKERN_EMU_FN M512i unpackhi_epi64(M512i a, M512i b) { return unpack<8, true>(a, b); }
template <int I>
ATTNKERN_EMU_FN M512i shuffle_i32x4(M512i a, M512i b) {
  M512i r;
  for (int q = 0; q < 4; ++q) {
    const M512i& s = q < 2 ? a : b;
    __builtin_memcpy(r.u + 4 * q, s.u + 4 * ((I >> (2 * q)) & 3), 16);
  }
  return r;
}
ATTNKERN_EMU_FN M512i permutexvar_epi32(M512i idx, M512i a) {
  M512i r;
  for (int i = 0; i < 16; ++i) r.u[i] = a.u[idx.u[i] & 15];
  return r;
}
ATTNKERN_EMU_FN M512i permutexvar_epi16(M512i idx, M512i a) {
  uint16_t x[32], k[32], r[32];
  __builtin_memcpy(x, a.u, 64);
  __builtin_memcpy(k, idx.u, 64);
  for (int i = 0; i < 32; ++i) r[i] = x[k[i] & 31];
  M512i o;
  __builtin_memcpy(o.u, r, 64);
  return o;
}
ATTNKERN_EMU_FN M512 permutex2var_ps(M512 a, M512i idx, M512 b) {
  M512 r;
  for (int i = 0; i < 16; ++i) r.f[i] = (idx.u[i] & 16) ? b.f[idx.u[i] & 15] : a.f[idx.u[i] & 15];
  return r;
}
// vpdpbusd: per lane, src + the four products of a's unsigned bytes and b's signed bytes
// (each product and the sum exact; the lane wraps modulo 2^32).
ATTNKERN_EMU_FN M512i dpbusd_epi32(M512i src, M512i a, M512i b) {
  uint8_t x[64];
  int8_t y[64];
  __builtin_memcpy(x, a.u, 64);
  __builtin_memcpy(y, b.u, 64);
  for (int i = 0; i < 16; ++i) {
    int32_t s = 0;
    for (int j = 0; j < 4; ++j) s += int32_t(x[4 * i + j]) * int32_t(y[4 * i + j]);
    src.u[i] += uint32_t(s);
  }
  return src;
}
// vpdpwssd: per lane, src + the two products of signed 16-bit pairs (wrapping).
ATTNKERN_EMU_FN M512i dpwssd_epi32(M512i src, M512i a, M512i b) {
  int16_t x[32], y[32];
  __builtin_memcpy(x, a.u, 64);
  __builtin_memcpy(y, b.u, 64);
  for (int i = 0; i < 16; ++i)
    src.u[i] += uint32_t(int32_t(x[2 * i]) * y[2 * i]) + uint32_t(int32_t(x[2 * i + 1]) * y[2 * i + 1]);
  return src;
}

}  // namespace emu
}  // namespace cpu
}  // namespace attnkern

// The intrinsic names stand for the functions above from here on (GCC's own declarations of
// them, from <immintrin.h>, are hidden behind these macros).
#define ATTNKERN_EMU(name) ::attnkern::cpu::emu::name
#undef __m512
#undef __m512i
#define __m512 ::attnkern::cpu::emu::M512
#define __m512i ::attnkern::cpu::emu::M512i
#define __m512bh ::attnkern::cpu::emu::M512bh
#undef _mm512_setzero_ps
#define _mm512_setzero_ps ATTNKERN_EMU(setzero_ps)
#undef _mm512_setzero_si512
#define _mm512_setzero_si512 ATTNKERN_EMU(setzero_si512)
#undef _mm512_set1_ps
#define _mm512_set1_ps ATTNKERN_EMU(set1_ps)
#undef _mm512_set1_epi32
#define _mm512_set1_epi32 ATTNKERN_EMU(set1_epi32)
#undef _mm512_setr_epi32
#define _mm512_setr_epi32 ATTNKERN_EMU(setr_epi32)
#undef _mm512_loadu_ps
#define _mm512_loadu_ps ATTNKERN_EMU(loadu_ps)
#undef _mm512_loadu_si512
#define _mm512_loadu_si512 ATTNKERN_EMU(loadu_si512)
#undef _mm512_storeu_ps
#define _mm512_storeu_ps ATTNKERN_EMU(storeu_ps)
#undef _mm512_storeu_si512
#define _mm512_storeu_si512 ATTNKERN_EMU(storeu_si512)
#undef _mm512_maskz_loadu_ps
#define _mm512_maskz_loadu_ps ATTNKERN_EMU(maskz_loadu_ps)
#undef _mm512_mask_storeu_ps
#define _mm512_mask_storeu_ps ATTNKERN_EMU(mask_storeu_ps)
#undef _mm256_maskz_loadu_epi16
#define _mm256_maskz_loadu_epi16 ATTNKERN_EMU(maskz_loadu_epi16_256)
#undef _mm256_mask_storeu_epi16
#define _mm256_mask_storeu_epi16 ATTNKERN_EMU(mask_storeu_epi16_256)
#undef _mm512_stream_ps
#define _mm512_stream_ps ATTNKERN_EMU(stream_ps)
#undef _mm512_stream_si512
#define _mm512_stream_si512 ATTNKERN_EMU(stream_si512)
#undef _mm512_castsi512_ps
#define _mm512_castsi512_ps ATTNKERN_EMU(castsi512_ps)
#undef _mm512_castps_si512
#define _mm512_castps_si512 ATTNKERN_EMU(castps_si512)
#undef _mm512_add_ps
#define _mm512_add_ps ATTNKERN_EMU(add_ps)
#undef _mm512_sub_ps
#define _mm512_sub_ps ATTNKERN_EMU(sub_ps)
#undef _mm512_mul_ps
#define _mm512_mul_ps ATTNKERN_EMU(mul_ps)
#undef _mm512_div_ps
#define _mm512_div_ps ATTNKERN_EMU(div_ps)
#undef _mm512_max_ps
#define _mm512_max_ps ATTNKERN_EMU(max_ps)
#undef _mm512_min_ps
#define _mm512_min_ps ATTNKERN_EMU(min_ps)
#undef _mm512_add_epi32
#define _mm512_add_epi32 ATTNKERN_EMU(add_epi32)
#undef _mm512_and_si512
#define _mm512_and_si512 ATTNKERN_EMU(and_si512)
#undef _mm512_fmadd_ps
#define _mm512_fmadd_ps ATTNKERN_EMU(fmadd_ps)
#undef _mm512_slli_epi32
#define _mm512_slli_epi32 ATTNKERN_EMU(slli_epi32)
#undef _mm512_srli_epi32
#define _mm512_srli_epi32 ATTNKERN_EMU(srli_epi32)
#undef _mm512_cmp_ps_mask
#define _mm512_cmp_ps_mask(a, b, p) ATTNKERN_EMU(cmp_ps_mask<(p)>)(a, b)
#undef _mm512_mask_blend_ps
#define _mm512_mask_blend_ps ATTNKERN_EMU(mask_blend_ps)
#undef _mm512_mask_mov_ps
#define _mm512_mask_mov_ps ATTNKERN_EMU(mask_mov_ps)
#undef _mm512_maskz_mov_ps
#define _mm512_maskz_mov_ps ATTNKERN_EMU(maskz_mov_ps)
#undef _mm512_mask_mov_epi32
#define _mm512_mask_mov_epi32 ATTNKERN_EMU(mask_mov_epi32)
#undef _mm512_reduce_add_ps
#define _mm512_reduce_add_ps ATTNKERN_EMU(reduce_add_ps)
#undef _mm512_reduce_max_ps
#define _mm512_reduce_max_ps ATTNKERN_EMU(reduce_max_ps)
#undef _mm512_roundscale_ps
#define _mm512_roundscale_ps(a, r) ATTNKERN_EMU(roundscale_ps<(r)>)(a)
#undef _mm512_scalef_ps
#define _mm512_scalef_ps ATTNKERN_EMU(scalef_ps)
#undef _mm512_shuffle_f32x4
#define _mm512_shuffle_f32x4(a, b, i) ATTNKERN_EMU(shuffle_f32x4<(i)>)(a, b)
#undef _mm512_shuffle_ps
#define _mm512_shuffle_ps(a, b, i) ATTNKERN_EMU(shuffle_ps<(i)>)(a, b)
#undef _mm512_permutexvar_ps
#define _mm512_permutexvar_ps ATTNKERN_EMU(permutexvar_ps)
#undef _mm512_cvtepu16_epi32
#define _mm512_cvtepu16_epi32 ATTNKERN_EMU(cvtepu16_epi32)
#undef _mm512_cvtepi32_epi16
#define _mm512_cvtepi32_epi16 ATTNKERN_EMU(cvtepi32_epi16)
#undef _mm512_cvtph_ps
#define _mm512_cvtph_ps ATTNKERN_EMU(cvtph_ps)
#undef _mm512_cvtps_ph
#define _mm512_cvtps_ph(a, r) ATTNKERN_EMU(cvtps_ph<(r)>)(a)
#undef _mm512_dpbf16_ps
#define _mm512_dpbf16_ps ATTNKERN_EMU(dpbf16_ps)
#undef _mm512_load_ps
#define _mm512_load_ps ATTNKERN_EMU(load_ps)
#undef _mm512_load_si512
#define _mm512_load_si512 ATTNKERN_EMU(load_si512)
#undef _mm512_store_ps
#define _mm512_store_ps ATTNKERN_EMU(store_ps)
#undef _mm512_store_si512
#define _mm512_store_si512 ATTNKERN_EMU(store_si512)
#undef _mm512_andnot_ps
#define _mm512_andnot_ps ATTNKERN_EMU(andnot_ps)
#undef _mm512_xor_si512
#define _mm512_xor_si512 ATTNKERN_EMU(xor_si512)
#undef _mm512_sub_epi32
#define _mm512_sub_epi32 ATTNKERN_EMU(sub_epi32)
#undef _mm512_castsi128_si512
#define _mm512_castsi128_si512 ATTNKERN_EMU(castsi128_si512)
#undef _mm512_castsi256_si512
#define _mm512_castsi256_si512 ATTNKERN_EMU(castsi256_si512)
#undef _mm512_inserti32x4
#define _mm512_inserti32x4 ATTNKERN_EMU(inserti32x4)
#undef _mm512_inserti64x4
#define _mm512_inserti64x4 ATTNKERN_EMU(inserti64x4)
#undef _mm512_cvtepi32_ps
#define _mm512_cvtepi32_ps ATTNKERN_EMU(cvtepi32_ps)
#undef _mm512_cvtps_epi32
#define _mm512_cvtps_epi32 ATTNKERN_EMU(cvtps_epi32)
#undef _mm512_cvtepi8_epi16
#define _mm512_cvtepi8_epi16 ATTNKERN_EMU(cvtepi8_epi16)
#undef _mm512_cvtepu8_epi16
#define _mm512_cvtepu8_epi16 ATTNKERN_EMU(cvtepu8_epi16)
#undef _mm512_unpacklo_epi16
#define _mm512_unpacklo_epi16 ATTNKERN_EMU(unpacklo_epi16)
#undef _mm512_unpackhi_epi16
#define _mm512_unpackhi_epi16 ATTNKERN_EMU(unpackhi_epi16)
#undef _mm512_unpacklo_epi32
#define _mm512_unpacklo_epi32 ATTNKERN_EMU(unpacklo_epi32)
#undef _mm512_unpackhi_epi32
#define _mm512_unpackhi_epi32 ATTNKERN_EMU(unpackhi_epi32)
#undef _mm512_unpacklo_epi64
#define _mm512_unpacklo_epi64 ATTNKERN_EMU(unpacklo_epi64)
#undef _mm512_unpackhi_epi64
#define _mm512_unpackhi_epi64 ATTNKERN_EMU(unpackhi_epi64)
#undef _mm512_permutexvar_epi32
#define _mm512_permutexvar_epi32 ATTNKERN_EMU(permutexvar_epi32)
#undef _mm512_permutexvar_epi16
#define _mm512_permutexvar_epi16 ATTNKERN_EMU(permutexvar_epi16)
#undef _mm512_permutex2var_ps
#define _mm512_permutex2var_ps ATTNKERN_EMU(permutex2var_ps)
#undef _mm512_dpbusd_epi32
#define _mm512_dpbusd_epi32 ATTNKERN_EMU(dpbusd_epi32)
#undef _mm512_dpwssd_epi32
#define _mm512_dpwssd_epi32 ATTNKERN_EMU(dpwssd_epi32)
#undef _mm512_shuffle_i32x4
#define _mm512_shuffle_i32x4(a, b, i) ATTNKERN_EMU(shuffle_i32x4<(i)>)(a, b)
