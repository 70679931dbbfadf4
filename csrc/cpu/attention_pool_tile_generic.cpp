// Portable tiled kernels (attention_pool_tile_impl.h over one fp32 lane): tiles of 4 queries x 4 keys in
// scalar registers. They serve CPUs without AVX2 (and aarch64), and ATTNKERN_CPU_ISA=generic.
// Compiled with the extension's baseline flags, so torch/c10 headers are safe here.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>

#include "attention_pool_tile_impl.h"

namespace attnkern {
namespace cpu {
namespace {

struct TileScalar {
  static constexpr int W = 1, MR = 4, NV = 4, CG = 4, KB = 64;
  static constexpr bool kPairDot = false;  // no bf16 pair dot products (attention_pool_tile_avx512_vec.h)
  float x;

  static TileScalar zero() { return {0.f}; }
  static TileScalar set1(float a) { return {a}; }
  static TileScalar load(const float* p) { return {*p}; }
  static TileScalar load(const bf16_t* p) { return {to_f32(*p)}; }
  static TileScalar load(const fp16_t* p) { return {to_f32(*p)}; }
  void store(float* p) const { *p = x; }
  static float to_f32(float a) { return a; }
  static float to_f32(bf16_t a) { return c10::detail::f32_from_bits(a.x); }
  static float to_f32(fp16_t a) { return c10::detail::fp16_ieee_to_fp32_value(a.x); }
  static void from_f32(float a, float* d) { *d = a; }
  static void from_f32(float a, bf16_t* d) { d->x = c10::detail::round_to_nearest_even(a); }
  static void from_f32(float a, fp16_t* d) { d->x = c10::detail::fp16_ieee_from_fp32_value(a); }
  TileScalar operator+(TileScalar b) const { return {x + b.x}; }
  TileScalar operator-(TileScalar b) const { return {x - b.x}; }
  TileScalar operator*(TileScalar b) const { return {x * b.x}; }
  // One rounding, as the vector FMA instructions: forward and backward score identically.
  static TileScalar fma(TileScalar a, TileScalar b, TileScalar c) { return {std::fma(a.x, b.x, c.x)}; }
  static TileScalar max(TileScalar a, TileScalar b) { return {a.x > b.x ? a.x : b.x}; }
  float hmax() const { return x; }
  float hsum() const { return x; }
  TileScalar mask_tail(int n) const { return n > 0 ? *this : TileScalar{-std::numeric_limits<float>::infinity()}; }
  static TileScalar exp2(TileScalar a) { return {std::exp2(a.x)}; }  // exp2(-inf) = 0, +inf -> +inf, NaN -> NaN
  // dst[d * NR + j] = rows[j * rs + d] for the W rows j and d < D.
  template <int NR>
  static void transpose_rows(const float* rows, int64_t rs, int64_t D, float* dst) {
    for (int j = 0; j < W; ++j)
      for (int64_t d = 0; d < D; ++d) dst[d * NR + j] = rows[j * rs + d];
  }
};

}  // namespace

int64_t tile_query_chunks(int64_t N, int64_t ntasks) {
  const int64_t by_size = N / 64, by_items = (64 + ntasks - 1) / (ntasks > 0 ? ntasks : 1);
  const int64_t c = by_size < by_items ? by_size : by_items;
  return c > 1 ? c : 1;
}

void tile_fwd_generic(const FwdParams& p, const Span& s, void* ws, void* acc, void* m, void* l) {
  tile_fwd_entry<TileScalar>(p, s, ws, acc, m, l);
}
void tile_bwd_generic(const BwdParams& p, const Span& s, void* ws, void* dq) {
  tile_bwd_entry<TileScalar>(p, s, ws, dq);
}
void tile_stats_generic(const FwdParams& p, const Span& s, void* ws, void* m, void* l) {
  tile_stats_entry<TileScalar>(p, s, ws, m, l);
}
int64_t tile_workspace_generic(int64_t N, int64_t Dk, int64_t Dv) { return tile_ws_elems<TileScalar>(N, Dk, Dv); }

}  // namespace cpu
}  // namespace attnkern
