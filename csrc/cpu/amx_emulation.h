// Portable stand-ins for the AMX intrinsics attention_pool_tile_amx.cpp uses (AMX-TILE and AMX-BF16), for the
// emulation test build only (-DATTNKERN_EMULATE_AVX512, see avx512_emulation.h): on a CPU
// without AMX the AMX kernels then run, so that their tile shapes, their strides and their
// memory accesses are tested wherever the suite runs. The launcher offers them only when
// ATTNKERN_CPU_ISA=amx asks.
//
// Each stand-in follows the instruction's definition in Intel's architecture manual: a thread's
// eight tile registers and its tile configuration (palette 1: rows and bytes per row of each
// tile) live in thread-local storage, as they are per-thread state on the hardware; tileloadd
// and tilestored touch exactly rows x colsb bytes, row r at base + r * stride; loads zero the
// rest of the register; tdpbf16ps trips the same shape checks the hardware faults on, then adds,
// per output element and pair k in order, the even then the odd product, each exact in fp32,
// with denormal inputs and results flushed to zero and rounding to nearest even, and zeroes the
// rows and columns past the configured shape. A tile used before a configuration traps. Included after
// avx512_emulation.h; the names below then stand for these functions. No torch/STL header.
#pragma once

#include <stdint.h>

namespace attnkern {
namespace cpu {
namespace emu {

struct TileCfg {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
static_assert(sizeof(TileCfg) == 64, "the tile configuration is 64 bytes");

struct TileState {
  bool configured = false;
  TileCfg cfg{};
  uint8_t t[8][16][64];
};
inline thread_local TileState tile_state;

ATTNKERN_EMU_FN void tile_check(int t) {
  if (t < 0 || t > 7 || !tile_state.configured) __builtin_trap();
}
ATTNKERN_EMU_FN void tile_loadconfig(const void* p) {
  TileCfg c;
  __builtin_memcpy(&c, p, 64);
  if (c.palette != 1) __builtin_trap();
  for (int i = 0; i < 8; ++i)
    if (c.rows[i] > 16 || c.colsb[i] > 64 || (c.rows[i] == 0) != (c.colsb[i] == 0)) __builtin_trap();
  tile_state.cfg = c;
  tile_state.configured = true;
  __builtin_memset(tile_state.t, 0, sizeof(tile_state.t));
}
ATTNKERN_EMU_FN void tile_release() {
  tile_state.configured = false;
  __builtin_memset(tile_state.t, 0, sizeof(tile_state.t));
}
ATTNKERN_EMU_FN void tile_loadd(int t, const void* base, long stride) {
  tile_check(t);
  const TileCfg& c = tile_state.cfg;
  __builtin_memset(tile_state.t[t], 0, sizeof(tile_state.t[t]));
  for (int r = 0; r < c.rows[t]; ++r)
    __builtin_memcpy(tile_state.t[t][r], static_cast<const char*>(base) + long(r) * stride, c.colsb[t]);
}
ATTNKERN_EMU_FN void tile_stored(int t, void* base, long stride) {
  tile_check(t);
  const TileCfg& c = tile_state.cfg;
  for (int r = 0; r < c.rows[t]; ++r)
    __builtin_memcpy(static_cast<char*>(base) + long(r) * stride, tile_state.t[t][r], c.colsb[t]);
}
ATTNKERN_EMU_FN void tile_zero(int t) {
  tile_check(t);
  __builtin_memset(tile_state.t[t], 0, sizeof(tile_state.t[t]));
}
// C[m][n] += sum over pairs k of A[m][2k] * B[k][2n] + A[m][2k+1] * B[k][2n+1].
ATTNKERN_EMU_FN void tile_dpbf16ps(int c, int a, int b) {
  tile_check(c);
  tile_check(a);
  tile_check(b);
  const TileCfg& g = tile_state.cfg;
  const int M = g.rows[c], N = g.colsb[c] / 4, K = g.colsb[a] / 4;
  if (c == a || c == b || a == b || g.rows[a] != M || g.rows[b] != K || g.colsb[b] != g.colsb[c] ||
      g.colsb[c] % 4 || g.colsb[a] % 4)
    __builtin_trap();
  for (int m = 0; m < M; ++m) {
    float row[16];
    __builtin_memcpy(row, tile_state.t[c][m], 64);
    for (int n = 0; n < N; ++n) {
      float acc = row[n];
      for (int k = 0; k < K; ++k) {
        uint16_t ae, ao, be, bo;
        __builtin_memcpy(&ae, &tile_state.t[a][m][4 * k], 2);
        __builtin_memcpy(&ao, &tile_state.t[a][m][4 * k + 2], 2);
        __builtin_memcpy(&be, &tile_state.t[b][k][4 * n], 2);
        __builtin_memcpy(&bo, &tile_state.t[b][k][4 * n + 2], 2);
        acc = ftz(ftz(acc) + bf16_daz(ae) * bf16_daz(be));
        acc = ftz(acc + bf16_daz(ao) * bf16_daz(bo));
      }
      row[n] = acc;
    }
    for (int n = N; n < 16; ++n) row[n] = 0.f;
    __builtin_memcpy(tile_state.t[c][m], row, 64);
  }
  for (int m = M; m < 16; ++m) __builtin_memset(tile_state.t[c][m], 0, 64);
}

}  // namespace emu
}  // namespace cpu
}  // namespace attnkern

#undef _tile_loadconfig
#define _tile_loadconfig(p) ATTNKERN_EMU(tile_loadconfig)(p)
#undef _tile_release
#define _tile_release() ATTNKERN_EMU(tile_release)()
#undef _tile_loadd
#define _tile_loadd(t, base, stride) ATTNKERN_EMU(tile_loadd)(t, base, long(stride))
#undef _tile_stored
#define _tile_stored(t, base, stride) ATTNKERN_EMU(tile_stored)(t, base, long(stride))
#undef _tile_zero
#define _tile_zero(t) ATTNKERN_EMU(tile_zero)(t)
#undef _tile_dpbf16ps
#define _tile_dpbf16ps(c, a, b) ATTNKERN_EMU(tile_dpbf16ps)(c, a, b)
