// The one CPU instruction-set dispatcher of the extension (ISA_DISPATCH.md): which instruction
// set this CPU and build can run, and which one every CPU op family runs in this process.
// Compiled with the baseline flags; included by the launchers only, never by a per-ISA kernel
// translation unit.
#pragma once

#include <string>
#include <vector>

namespace attnkern {
namespace cpu {

// Narrowest first: each set includes every narrower one.
enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };

// The instruction set every CPU op family runs in this process for float32/float16/bfloat16
// inputs (float64 always runs the generic kernels): the widest one this CPU and build run,
// capped by ATTNKERN_CPU_ISA. Decided at the first call; an ATTNKERN_CPU_ISA other than
// generic, avx2, avx512, avx512_bf16, amx or empty is a ValueError at every call.
Isa selected_isa();

// Whether the AVX-512 sets of this build are the emulated ones (the avx512_emulation.h test
// build): they run only when ATTNKERN_CPU_ISA names them.
bool isa_emulated();

}  // namespace cpu

// The one text of each binding's docstring (csrc/extension_module.cpp), kept beside what it describes.
constexpr const char* kCpuIsaDoc =
    "The instruction set the CPU kernels of every op run on in this process for float32, float16 "
    "and bfloat16 inputs (amx, avx512_bf16, avx512, avx2 or generic; '-emulated' in the "
    "avx512_emulation.h test build), chosen once from the CPU and ATTNKERN_CPU_ISA. An op without "
    "kernels for that set runs its widest narrower ones (the activation unit runs its avx512 "
    "kernels under avx512_bf16 and amx); float64 inputs always run the generic kernels.";
constexpr const char* kCpuIsasDoc =
    "Every instruction set ATTNKERN_CPU_ISA can select on this CPU with this build, narrowest first "
    "(the emulated ones of the test build tagged '-emulated').";

// See kCpuIsaDoc and kCpuIsasDoc.
const char* cpu_isa();
std::vector<std::string> cpu_isas();

}  // namespace attnkern
