// The interface between the sequence-attention launcher (sequence_attention_launch.cpp) and its
// per-ISA kernels (sequence_attention_{generic,avx2,avx512}.cpp over sequence_attention_impl.h).
// Like attention_pool_kernels.h it includes no torch/STL header: the kernel files are compiled
// for AVX2 / AVX-512 by target pragmas.
#pragma once

#include <stdint.h>

namespace attnkern {
namespace cpu {

// Query block x key block of the tiled loops. Every vector width (1, 8, 16 lanes) divides kSeqBK.
constexpr int kSeqBQ = 64;
constexpr int kSeqBK = 64;
// Copies of the block's diagonals that the backward's position-table sums rotate through.
constexpr int kSeqDiagCopies = 4;

// |dt| cells for the time buckets: |dt| itself below 64, else its leading bit and the 6 bits
// after it (a cell spans 1/64 of an octave, less than one log bucket of ln(1.35)).
constexpr int64_t kSeqTimeCells = 64 + 58 * 64;

inline int64_t seq_time_cell(uint64_t a) {
  if (a < 64) return int64_t(a);
  const int e = 63 - __builtin_clzll(a);
  return 64 + int64_t(e - 6) * 64 + int64_t((a >> (e - 6)) & 63);
}

// The smallest |dt| of a cell.
inline uint64_t seq_time_cell_start(int64_t cell) {
  if (cell < 64) return uint64_t(cell);
  const int e = int((cell - 64) / 64) + 6;
  return (uint64_t(1) << e) | (uint64_t((cell - 64) % 64) << (e - 6));
}

// One call. Floating tensors are contiguous and in the accumulator type A (float, or double for
// float64 inputs): the launcher converts 16-bit inputs once. Layout: docs/sequence_attention.md.
struct SeqParams {
  const void* q;  // [T, H, Dk]
  const void* k;  // [T, Hkv, Dk]
  const void* v;  // [T, Hkv, Dv]
  const int64_t* starts;       // [B]
  const int64_t* lengths;      // [B]
  const int64_t* num_targets;  // [B] or null
  int64_t B, T, H, Hkv, Dk, Dv, L;
  int64_t contextual_len, max_attn_len;
  bool causal, silu;
  double scale;
  const void* attn_scale;  // [T] or null: then attn_scale_value for every query
  double attn_scale_value;
  const int64_t* query_times;  // [T] (with time_table)
  const int64_t* key_times;    // [T]
  const void* time_table;      // [NB, Hb] or null
  const int64_t* time_bounds;  // [NB - 1]
  int64_t NB;
  // From time_bounds (the launcher): time_cells[seq_time_cell(a)] <= bucket(a) <=
  // time_cells[seq_time_cell(a) + 1] ([kSeqTimeCells + 1]), and the bounds as unsigned with
  // UINT64_MAX appended ([NB]).
  const int32_t* time_cells;
  const uint64_t* time_ubounds;
  const void* position_table;  // [P, Hb] or null
  int64_t P;
  const void* bias;  // [B, Hb, L, L] or null
  int64_t Hb;
  // forward: outputs, zero / -inf filled by the launcher
  void* out;  // [T, H, Dv]
  void* lse;  // [T, H]
  // backward: inputs and accumulators (zero filled), each (row, K/V head group)'s columns
  // written by its task only
  const void* grad_out;  // [T, H, Dv]
  const void* delta;     // [T, H]
  void* grad_q;          // [T, H, Dk]
  void* grad_k;          // [T, Hkv, Dk]
  void* grad_v;          // [T, Hkv, Dv]
  void* grad_time;       // [tasks, NB, Hb]: each task's partial sums (the launcher adds them in order)
  void* grad_position;   // [tasks, P, Hb]
  void* grad_bias;       // [B, Hb, L, L]
};

// Forward of the query blocks q0[t] .. q0[t] + kSeqBQ of rows row[t] for t in [begin, end); the
// workspace holds seq_workspace() elements of A.
using SeqFwdFn = void (*)(const SeqParams&, const int64_t* row, const int64_t* q0, int64_t begin,
                          int64_t end, void* ws);
// Backward of row b, the query heads of K/V heads [g0, g1); its table sums go to grad_time /
// grad_position + part * NB * Hb (P * Hb).
using SeqBwdFn = void (*)(const SeqParams&, int64_t b, int64_t g0, int64_t g1, int64_t part, void* ws);

struct SeqKernels {
  SeqFwdFn fwd;
  SeqBwdFn bwd;
};

// Workspace elements (of A) of one thread, for either direction.
inline int64_t seq_workspace(const SeqParams& p) {
  const int64_t D = p.Dk > p.Dv ? p.Dk : p.Dv;
  // KT, VT, S/P, dP/dS, the bias tile, the heads' dS sum, a valid flag and two A-sized
  // slots per tile element (the time-bucket runs), the diagonals' copies, the row state (m, l per
  // head), the column indices and the rows' key intervals (4 int64 per query).
  return 2 * D * kSeqBK + 7 * int64_t(kSeqBQ) * kSeqBK + kSeqDiagCopies * (kSeqBQ + kSeqBK) + 2 * p.H * kSeqBQ + kSeqBK +
         8 * kSeqBQ + 64;
}

SeqKernels seq_generic_kernels();      // float
SeqKernels seq_generic_f64_kernels();  // double: float64 inputs on every instruction set
SeqKernels seq_avx2_kernels();
SeqKernels seq_avx512_kernels();

}  // namespace cpu
}  // namespace attnkern
