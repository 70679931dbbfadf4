// The CPU instruction-set dispatcher (isa_dispatch.h, ISA_DISPATCH.md): one detection, one
// reading of ATTNKERN_CPU_ISA, one error for a bad value.
#include "isa_dispatch.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace attnkern {
namespace cpu {
namespace {

constexpr const char* kIsaNames[] = {"generic", "avx2", "avx512", "avx512_bf16", "amx"};
constexpr int kIsaCount = 5;

// The instruction sets this CPU and build can run. The emulation test build
// (avx512_emulation.h) runs the AVX-512 kernels on any x86-64 CPU, emulated.
struct IsaSupport {
  bool has[kIsaCount] = {true, false, false, false, false};
  bool emulated = false;
};

#if defined(__x86_64__) || defined(_M_X64)
// Linux hands a process the AMX tile data state only on request (arch_prctl
// ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); a tile instruction before that raises SIGILL.
// Asked once per process; false where the kernel refuses or is not Linux.
bool amx_permitted() {
  static const bool ok = [] {
#if defined(__linux__)
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return ok;
}
#endif

IsaSupport isa_support() {
  IsaSupport s;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  bool* h = s.has;
  h[int(Isa::kAvx2)] = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#if defined(ATTNKERN_EMULATE_AVX512)
  h[int(Isa::kAvx512)] = h[int(Isa::kAvx512Bf16)] = h[int(Isa::kAmx)] = s.emulated = true;
#else
  h[int(Isa::kAvx512)] = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("fma") && __builtin_cpu_supports("avx2");
  h[int(Isa::kAvx512Bf16)] = h[int(Isa::kAvx512)] && __builtin_cpu_supports("avx512bf16");
  h[int(Isa::kAmx)] = h[int(Isa::kAvx512Bf16)] && __builtin_cpu_supports("amx-tile") &&
                      __builtin_cpu_supports("amx-bf16") && amx_permitted();
#endif
#endif
  return s;
}

const IsaSupport& support() {
  static const IsaSupport s = isa_support();
  return s;
}

bool runs_emulated(const IsaSupport& s, int isa) { return s.emulated && isa >= int(Isa::kAvx512); }

Isa choose() {
  const char* env = std::getenv("ATTNKERN_CPU_ISA");
  const std::string cap = env ? std::string(env) : std::string();
  int want = kIsaCount - 1;
  if (!cap.empty()) {
    while (want >= 0 && cap != kIsaNames[want]) --want;
    TORCH_CHECK_VALUE(want >= 0, "attnkern: ATTNKERN_CPU_ISA must be generic, avx2, avx512, avx512_bf16 or amx (or unset), got '",
                      cap, "'");
  }
  const IsaSupport& s = support();
  // The widest set within the cap; emulated ones only when asked for, so that the default
  // stays the fastest real path.
  for (int i = want; i > 0; --i)
    if (s.has[i] && (!runs_emulated(s, i) || !cap.empty())) return Isa(i);
  return Isa::kGeneric;
}

}  // namespace

// A static initialiser that throws is retried at the next call: a bad ATTNKERN_CPU_ISA is
// reported every time, by every op.
Isa selected_isa() {
  static const Isa isa = choose();
  return isa;
}

bool isa_emulated() { return support().emulated; }

}  // namespace cpu

namespace {
std::string isa_label(int i) {
  return std::string(cpu::kIsaNames[i]) + (cpu::runs_emulated(cpu::support(), i) ? "-emulated" : "");
}
}  // namespace

const char* cpu_isa() {
  static const std::string name = isa_label(int(cpu::selected_isa()));
  return name.c_str();
}

std::vector<std::string> cpu_isas() {
  std::vector<std::string> r;
  for (int i = 0; i < cpu::kIsaCount; ++i)
    if (cpu::support().has[i]) r.push_back(isa_label(i));
  return r;
}

}  // namespace attnkern
