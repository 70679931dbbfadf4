// Plain-data interface between the activation-unit CPU launcher (activation_unit_cpu.cpp) and
// its per-ISA block kernels (activation_unit_{avx512,avx2,generic}.cpp).
//
// The launcher gathers each block of valid key/value rows into contiguous accumulator-typed
// (float, or double for float64) buffers whose rows are padded with zeros to a multiple of
// kAuPad elements; the kernels here are the arithmetic on those L1/L2-resident buffers. Like
// attention_pool_kernels.h this header stays free of torch/STL headers and inline functions: it is
// included by translation units compiled for AVX2 (an inline function defined here could be
// emitted as an AVX2 COMDAT copy that the linker then picks for baseline code).
#pragma once

#include <stdint.h>

namespace attnkern {
namespace cpu {

// Row padding (elements) of every block buffer: a multiple of the widest register tile.
constexpr int64_t kAuPad = 16;

enum AuActivation : int { kAuRelu = 0, kAuSigmoid = 1, kAuPrelu = 2, kAuDice = 3 };

template <class A>
struct AuKernels {
  const char* name;
  // C[i, 0:ncols] += sum_{p < P} a[i * a_si + p * a_sp] * b[p * ldb + 0:ncols] for i < M.
  // ncols is a multiple of kAuPad; a may be read transposed (a_si = 1).
  void (*gemm)(int64_t M, int64_t P, int64_t ncols, const A* a, int64_t a_si, int64_t a_sp,
               const A* b, int64_t ldb, A* c, int64_t ldc);
  // y[r, :] = act(z[r, :]) for r < rows, over ncols (multiple of kAuPad) columns; params
  // [3, ncols] (prelu: row 0 = slope; dice: alpha, scale, shift). y may alias z.
  void (*act_fwd)(int act, int64_t rows, int64_t ncols, const A* z, int64_t ld, const A* params,
                  A* y);
  // dz[r, :] = dy[r, :] * act'(z[r, :]); dparams[3, ncols] += the parameter gradients summed
  // over the rows (prelu: row 0; dice: rows 0..2). dz may alias dy.
  void (*act_bwd)(int act, int64_t rows, int64_t ncols, const A* z, const A* dy, int64_t ld,
                  const A* params, A* dz, A* dparams);
  // sum_{i < n} x[i] * y[i], n a multiple of kAuPad.
  A (*dot)(int64_t n, const A* x, const A* y);
  // y[0:n] = y * beta + a * x, n a multiple of kAuPad.
  void (*axpby)(int64_t n, A a, const A* x, A beta, A* y);
  // out[0:n] += x * y (elementwise), n a multiple of kAuPad.
  void (*muladd)(int64_t n, const A* x, const A* y, A* out);
};

AuKernels<float> au_generic_f32();
AuKernels<double> au_generic_f64();
#if defined(__x86_64__) || defined(_M_X64)
AuKernels<float> au_avx2_f32();    // needs avx2, fma, f16c
AuKernels<float> au_avx512_f32();  // needs avx512f, avx512bw, avx512vl, avx512dq, fma
#endif

// The kernels of the instruction set the dispatcher selected (isa_dispatch.h), built once: this
// family has no kernels of its own for avx512_bf16 and amx, which run the avx512 ones; float64
// runs the generic ones (activation_unit_cpu.cpp).
template <class A>
const AuKernels<A>& au_selected_kernels();
template <>
const AuKernels<float>& au_selected_kernels<float>();
template <>
const AuKernels<double>& au_selected_kernels<double>();

}  // namespace cpu
}  // namespace attnkern
