// The execution harness behind cuda_emu.h: fibers, the block scheduler, shuffles and barriers,
// per-block shared memory and its race / uninitialised-read checks.
//
// One launch at a time (a mutex), blocks one after another, the threads of a block as fibers on
// one OS thread: a fiber runs until it reaches a shuffle or a barrier (or ends), then the
// scheduler runs the next. When every fiber is waiting, the scheduler completes the shuffles
// whose lanes have all arrived and the barrier once every thread of the block is at it; when
// nothing can complete, the launch fails with a report of who waits where (a GPU would hang or
// compute garbage there).
//
// Every load and store of this module goes through the __asan_*_noabort hooks at the end (the
// module is compiled with -fsanitize=kernel-address and outlined checks, see build.py): they ask
// the AddressSanitizer runtime whether the bytes are addressable (out of bounds -> its report,
// and the process stops) and, inside a launch, check shared-memory accesses against a per-byte
// record of the last writer and reader since the last barrier.
// The standard headers first: cuda_emu.h makes __noinline__ a macro, which they use as an
// attribute name.
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <vector>

#include "cuda_emu.h"

#if !defined(__x86_64__)
#error "the CUDA emulation's fibers switch stacks with x86-64 code (cuda_emu_swap below)"
#endif

// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores
// the stack pointer to *save, and resumes the context whose stack pointer is `next`.
extern "C" void cuda_emu_swap(void** save, void* next);
__asm__(
    ".text\n"
    ".globl cuda_emu_swap\n"
    ".hidden cuda_emu_swap\n"
    ".type cuda_emu_swap,@function\n"
    "cuda_emu_swap:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  subq $16, %rsp\n  stmxcsr (%rsp)\n  fnstcw 8(%rsp)\n"
    "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n  fldcw 8(%rsp)\n  addq $16, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size cuda_emu_swap, .-cuda_emu_swap\n");

namespace cuda_emu {

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kManyReaders = -2;

enum class Wait { kRunning, kShfl, kBarrier, kDone };

struct ByteShadow {
  uint32_t w_epoch = 0;  // barrier epoch of the last write (0: never written)
  uint32_t r_epoch = 0;
  int32_t writer = -1;
  int32_t reader = -1;  // kManyReaders: more than one thread read in r_epoch
  const void* w_pc = nullptr;
  const void* r_pc = nullptr;
};

struct Region {
  std::string name;
  char* base = nullptr;
  size_t bytes = 0;
  std::vector<ByteShadow> shadow;
};

}  // namespace

struct ThreadState {
  uint3 tid;
  int linear = 0;
  void* sp = nullptr;
  char* stack = nullptr;
  void* fake_stack = nullptr;
  Wait wait = Wait::kRunning;
  Site site{nullptr, 0};
  unsigned mask = 0;
  ShflMode mode = ShflMode::kIdx;
  int b = 0, width = 32;
  uint64_t bits = 0, result = 0;
};

struct Block {
  uint3 idx;
  uint32_t epoch = 1;
  Region dynamic;
  std::map<std::pair<std::string, int>, std::unique_ptr<Region>> statics;
};

namespace {

struct LaunchState {
  dim3 grid, block;
  size_t smem = 0;
  Entry entry = nullptr;
  void* arg = nullptr;
  std::vector<ThreadState> threads;
  Block* blk = nullptr;
  std::string error;
  void* sched_sp = nullptr;
  void* sched_fake = nullptr;
  const void* main_bottom = nullptr;
  size_t main_size = 0;
};

std::mutex g_mutex;
LaunchState* g_launch = nullptr;
ThreadState* g_cur = nullptr;
cudaError_t g_last_error = cudaSuccess;
std::string g_last_message;
// Set while check_shared runs: its own (instrumented) accesses come back through the hooks.
bool g_in_check = false;

std::string where(const Site& s) {
  std::ostringstream o;
  o << (s.file ? s.file : "?") << ":" << s.line;
  return o.str();
}

std::string code_at(const void* pc) {
  if (pc == nullptr) return "?";
  char buf[512];
  __sanitizer_symbolize_pc(const_cast<void*>(pc), "%F %L", buf, sizeof(buf));
  return buf;
}

std::string who(const ThreadState& t) {
  std::ostringstream o;
  o << "thread " << t.linear << " (warp " << t.linear / 32 << ", lane " << t.linear % 32 << ")";
  return o.str();
}

std::string block_name(const Block& b) {
  std::ostringstream o;
  o << "block (" << b.idx.x << ", " << b.idx.y << ", " << b.idx.z << ")";
  return o.str();
}

// Switches from the scheduler to fiber t, and back when t yields.
void resume(ThreadState* t) {
  LaunchState& L = *g_launch;
  g_cur = t;
  __sanitizer_start_switch_fiber(&L.sched_fake, t->stack, kStackBytes);
  cuda_emu_swap(&L.sched_sp, t->sp);
  __sanitizer_finish_switch_fiber(L.sched_fake, nullptr, nullptr);
  g_cur = nullptr;
}

// From the running fiber back to the scheduler; returns when the scheduler resumes it (never
// when `dying`).
void yield(bool dying) {
  LaunchState& L = *g_launch;
  ThreadState* t = g_cur;
  __sanitizer_start_switch_fiber(dying ? nullptr : &t->fake_stack, L.main_bottom, L.main_size);
  cuda_emu_swap(&t->sp, L.sched_sp);
  __sanitizer_finish_switch_fiber(t->fake_stack, &L.main_bottom, &L.main_size);
}

// The launch fails: the report is kept for the launcher and the fiber that found it stops.
[[noreturn]] void fail_in_fiber(const std::string& msg) {
  LaunchState& L = *g_launch;
  if (L.error.empty()) L.error = msg;
  g_cur->wait = Wait::kDone;
  yield(true);
  std::abort();  // never resumed
}

void fiber_main() {
  LaunchState& L = *g_launch;
  __sanitizer_finish_switch_fiber(nullptr, &L.main_bottom, &L.main_size);
  L.entry(L.arg);
  g_cur->wait = Wait::kDone;
  yield(true);
  std::abort();
}

void start_fiber(ThreadState& t) {
  // The first switch "returns" into fiber_main with the stack aligned as at a function entry.
  char* top = t.stack + kStackBytes;
  top = reinterpret_cast<char*>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t(15));
  void** sp = reinterpret_cast<void**>(top - 80);
  std::memset(sp, 0, 80);
  unsigned mxcsr = 0;
  unsigned short fpucw = 0;
  __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
  __asm__ volatile("fnstcw %0" : "=m"(fpucw));
  std::memcpy(reinterpret_cast<char*>(sp), &mxcsr, sizeof(mxcsr));
  std::memcpy(reinterpret_cast<char*>(sp) + 8, &fpucw, sizeof(fpucw));
  sp[8] = reinterpret_cast<void*>(&fiber_main);  // return address of cuda_emu_swap
  t.sp = sp;
  t.wait = Wait::kRunning;
}

// PTX shfl.sync: the source lane of `lane`, or `lane` itself where the mode's bound says so.
int source_lane(int lane, ShflMode mode, int b, int width) {
  const int segmask = (32 - width) & 31;
  const int c = (mode == ShflMode::kUp) ? 0 : 31;
  const int max_lane = (lane & segmask) | (c & ~segmask);
  const int min_lane = lane & segmask;
  int j = lane;
  bool ok = true;
  switch (mode) {
    case ShflMode::kUp:
      j = lane - b;
      ok = j >= max_lane;
      break;
    case ShflMode::kDown:
      j = lane + b;
      ok = j <= max_lane;
      break;
    case ShflMode::kBfly:
      j = lane ^ b;
      ok = j <= max_lane;
      break;
    case ShflMode::kIdx:
      j = min_lane | (b & ~segmask & 31);
      ok = j <= max_lane;
      break;
  }
  return ok ? j : lane;
}

const char* mode_name(ShflMode m) {
  switch (m) {
    case ShflMode::kUp:
      return "__shfl_up_sync";
    case ShflMode::kDown:
      return "__shfl_down_sync";
    case ShflMode::kBfly:
      return "__shfl_xor_sync";
    default:
      return "__shfl_sync";
  }
}

std::string describe_wait(const ThreadState& t) {
  switch (t.wait) {
    case Wait::kDone:
      return "has exited";
    case Wait::kBarrier:
      return "waits at __syncthreads " + where(t.site);
    case Wait::kShfl: {
      std::ostringstream o;
      o << "waits at " << mode_name(t.mode) << " " << where(t.site) << " (mask 0x" << std::hex
        << t.mask << ")";
      return o.str();
    }
    default:
      return "is running";
  }
}

// Completes the shuffles whose lanes have all arrived; "" or a report.
std::string complete_shuffles(LaunchState& L, bool* progress) {
  const int n = int(L.threads.size());
  for (int i = 0; i < n; ++i) {
    ThreadState& t = L.threads[i];
    if (t.wait != Wait::kShfl) continue;
    const int base = i / 32 * 32;
    const int lane = i % 32;
    if (!((t.mask >> lane) & 1u)) {
      std::ostringstream o;
      o << mode_name(t.mode) << " " << where(t.site) << ": " << who(t) << " calls it with mask 0x"
        << std::hex << t.mask << ", which does not contain its own lane";
      return o.str();
    }
    if (t.width < 1 || t.width > 32 || (t.width & (t.width - 1)) != 0) {
      std::ostringstream o;
      o << mode_name(t.mode) << " " << where(t.site) << ": width " << t.width
        << " is not a power of two in [1, 32]";
      return o.str();
    }
    bool all = true;
    for (int j = 0; j < 32 && all; ++j) {
      if (!((t.mask >> j) & 1u)) continue;
      all = base + j < n && L.threads[base + j].wait == Wait::kShfl;
    }
    if (!all) continue;
    for (int j = 0; j < 32; ++j) {
      if (!((t.mask >> j) & 1u)) continue;
      const ThreadState& u = L.threads[base + j];
      if (u.site.line != t.site.line || std::strcmp(u.site.file, t.site.file) != 0 ||
          u.mask != t.mask || u.mode != t.mode || u.width != t.width) {
        return "divergent shuffle: " + who(t) + " " + describe_wait(t) + " while " + who(u) +
               ", in its mask, " + describe_wait(u);
      }
    }
    for (int j = 0; j < 32; ++j) {
      if (!((t.mask >> j) & 1u)) continue;
      ThreadState& u = L.threads[base + j];
      const int src = source_lane(j, u.mode, u.b, u.width);
      if (!((t.mask >> src) & 1u)) {
        std::ostringstream o;
        o << mode_name(u.mode) << " " << where(u.site) << ": " << who(u) << " reads lane " << src
          << ", which is not in the mask 0x" << std::hex << t.mask
          << " (its value is undefined on a GPU)";
        return o.str();
      }
      u.result = L.threads[base + src].bits;
    }
    for (int j = 0; j < 32; ++j) {
      if ((t.mask >> j) & 1u) L.threads[base + j].wait = Wait::kRunning;
    }
    *progress = true;
  }
  return "";
}

// Completes the barrier when every thread of the block is at it; "" or a report.
std::string complete_barrier(LaunchState& L, bool* progress) {
  const ThreadState* first = nullptr;
  for (const ThreadState& t : L.threads) {
    if (t.wait == Wait::kRunning || t.wait == Wait::kShfl) return "";
    if (t.wait == Wait::kBarrier && first == nullptr) first = &t;
  }
  if (first == nullptr) return "";
  for (const ThreadState& t : L.threads) {
    if (t.wait == Wait::kDone) {
      return "__syncthreads " + where(first->site) + ": " + who(*first) + " waits there but " +
             who(t) + " has exited (a barrier every thread of the block must reach)";
    }
    if (t.site.line != first->site.line || std::strcmp(t.site.file, first->site.file) != 0) {
      return "divergent __syncthreads: " + who(*first) + " " + describe_wait(*first) + " while " +
             who(t) + " " + describe_wait(t);
    }
  }
  ++L.blk->epoch;
  for (ThreadState& t : L.threads) t.wait = Wait::kRunning;
  *progress = true;
  return "";
}

std::string deadlock_report(const LaunchState& L) {
  std::ostringstream o;
  o << "deadlock: no thread can go on.";
  int shown = 0;
  for (const ThreadState& t : L.threads) {
    if (t.wait == Wait::kShfl) {
      const int base = t.linear / 32 * 32;
      for (int j = 0; j < 32; ++j) {
        if (!((t.mask >> j) & 1u)) continue;
        if (base + j >= int(L.threads.size())) {
          o << " " << who(t) << " " << describe_wait(t) << " but lane " << j
            << " of its mask does not exist in this block;";
          return o.str();
        }
        const ThreadState& u = L.threads[base + j];
        if (u.wait != Wait::kShfl) {
          o << " " << who(t) << " " << describe_wait(t) << " but " << who(u) << ", in its mask, "
            << describe_wait(u) << ";";
          if (++shown == 3) return o.str();
          break;
        }
      }
    }
  }
  if (shown == 0) {
    for (const ThreadState& t : L.threads) {
      if (t.wait != Wait::kDone) {
        o << " " << who(t) << " " << describe_wait(t) << ";";
        if (++shown == 3) break;
      }
    }
  }
  return o.str();
}

void run_block(LaunchState& L, Block& blk) {
  L.blk = &blk;
  blk.dynamic.name = "dynamic shared memory";
  blk.dynamic.bytes = L.smem;
  // At least one byte, so that even an empty buffer is a heap chunk with redzones.
  blk.dynamic.base = static_cast<char*>(std::malloc(L.smem > 0 ? L.smem : 1));
  blk.dynamic.shadow.assign(L.smem, ByteShadow{});
  for (ThreadState& t : L.threads) start_fiber(t);
  for (;;) {
    bool progress = false;
    for (ThreadState& t : L.threads) {
      if (t.wait != Wait::kRunning) continue;
      resume(&t);
      progress = true;
      if (!L.error.empty()) break;
    }
    if (L.error.empty()) L.error = complete_shuffles(L, &progress);
    if (L.error.empty()) L.error = complete_barrier(L, &progress);
    if (!L.error.empty()) break;
    bool done = true;
    for (const ThreadState& t : L.threads) done = done && t.wait == Wait::kDone;
    if (done) break;
    if (!progress) {
      L.error = deadlock_report(L);
      break;
    }
  }
  if (!L.error.empty()) L.error = block_name(blk) + ": " + L.error;
  std::free(blk.dynamic.base);
  for (auto& kv : blk.statics) std::free(kv.second->base);
  L.blk = nullptr;
}

// Where the access [p, p + n) falls in the current block's shared memory, if it does.
Region* shared_region(Block& blk, const char* p) {
  if (p >= blk.dynamic.base && p < blk.dynamic.base + blk.dynamic.bytes) return &blk.dynamic;
  for (auto& kv : blk.statics) {
    Region* r = kv.second.get();  // null while static_shared is creating it
    if (r != nullptr && p >= r->base && p < r->base + r->bytes) return r;
  }
  return nullptr;
}

__attribute__((no_sanitize_address)) void check_shared(const char* p, size_t n, bool write,
                                                       const void* pc) {
  ThreadState* t = g_cur;
  Block& blk = *g_launch->blk;
  Region* r = shared_region(blk, p);
  if (r == nullptr) return;
  const size_t off = size_t(p - r->base);
  const size_t end = std::min(off + n, r->bytes);
  const uint32_t epoch = blk.epoch;
  for (size_t i = off; i < end; ++i) {
    ByteShadow& s = r->shadow[i];
    std::string problem;
    if (!write && s.w_epoch == 0) {
      problem = "reads byte " + std::to_string(i) + " of " + r->name +
                ", which nothing has written (uninitialised shared memory)";
    } else if (s.w_epoch == epoch && s.writer != t->linear) {
      problem = std::string(write ? "writes" : "reads") + " byte " + std::to_string(i) + " of " +
                r->name + " that thread " + std::to_string(s.writer) + " wrote (" +
                code_at(s.w_pc) + ") since the last __syncthreads (a shared-memory race)";
    } else if (write && s.r_epoch == epoch && s.reader != t->linear) {
      problem = "writes byte " + std::to_string(i) + " of " + r->name + " that " +
                (s.reader == kManyReaders ? std::string("other threads")
                                          : "thread " + std::to_string(s.reader)) +
                " read (" + code_at(s.r_pc) + ") since the last __syncthreads (a shared-memory race)";
    }
    if (!problem.empty()) {
      const std::string report = who(*t) + " (" + code_at(pc) + ") " + problem;
      g_in_check = false;
      fail_in_fiber(report);
    }
    if (write) {
      s.w_epoch = epoch;
      s.writer = t->linear;
      s.w_pc = pc;
    } else if (s.r_epoch != epoch) {
      s.r_epoch = epoch;
      s.reader = t->linear;
      s.r_pc = pc;
    } else if (s.reader != t->linear) {
      s.reader = kManyReaders;
      s.r_pc = pc;
    }
  }
}

// AddressSanitizer's shadow mapping, read once: the common case (an access inside one 8-byte
// granule whose shadow byte says it is addressable) is answered here, the rest by the runtime.
// The constructor must not be instrumented: its stores would call the hooks below, which ask
// poisoned(), whose static this is, while its initialisation guard is held (a self-deadlock at
// the first instrumented access, e.g. a static initialiser of the module).
struct ShadowMapping {
  size_t scale = 3;
  size_t offset = 0;
  __attribute__((no_sanitize_address)) ShadowMapping() { __asan_get_shadow_mapping(&scale, &offset); }
};

__attribute__((no_sanitize_address)) inline bool poisoned(const void* p, size_t n) {
  static const ShadowMapping m;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t granule = uintptr_t(1) << m.scale;
  if (n <= granule && (a & (granule - 1)) + n <= granule) {
    const int8_t k = *reinterpret_cast<const int8_t*>((a >> m.scale) + m.offset);
    if (k == 0 || int8_t((a & (granule - 1)) + n - 1) < k) return false;
  }
  return __asan_region_is_poisoned(const_cast<void*>(p), n) != nullptr;
}

__attribute__((no_sanitize_address)) inline void on_access(const void* p, size_t n, bool write,
                                                            void* pc) {
  if (poisoned(p, n)) {
    void* fp = __builtin_frame_address(0);
    __asan_report_error(pc, fp, fp, const_cast<void*>(p), write ? 1 : 0, n);
  }
  if (g_cur != nullptr && g_launch->blk != nullptr && !g_in_check) {
    g_in_check = true;
    check_shared(static_cast<const char*>(p), n, write, pc);
    g_in_check = false;
  }
}

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == 0) return fallback;
  const int x = std::atoi(v);
  return x > 0 ? x : fallback;
}

}  // namespace

ThreadState* current() { return g_cur; }
const uint3& thread_idx() { return g_cur->tid; }
const uint3& block_idx() { return g_launch->blk->idx; }
const dim3& block_dim() { return g_launch->block; }
const dim3& grid_dim() { return g_launch->grid; }

void syncthreads(const char* file, int line) {
  if (g_cur == nullptr) std::abort();  // only kernels call it
  g_cur->site = Site{file, line};
  g_cur->wait = Wait::kBarrier;
  yield(false);
}

uint64_t shfl(unsigned mask, uint64_t bits, ShflMode mode, int b, int width, const char* file,
              int line) {
  if (g_cur == nullptr) std::abort();
  ThreadState& t = *g_cur;
  t.site = Site{file, line};
  t.mask = mask;
  t.mode = mode;
  t.b = b;
  t.width = width;
  t.bits = bits;
  t.wait = Wait::kShfl;
  yield(false);
  return t.result;
}

void* dynamic_shared() { return g_launch->blk->dynamic.base; }

void* static_shared(const char* name, int line, size_t bytes) {
  Block& blk = *g_launch->blk;
  auto& slot = blk.statics[{name, line}];
  if (!slot) {
    slot.reset(new Region);
    slot->name = std::string("__shared__ ") + name;
    slot->bytes = bytes;
    slot->base = static_cast<char*>(std::malloc(bytes));
    slot->shadow.assign(bytes, ByteShadow{});
  }
  return slot->base;
}

int emulated_sm_count() { return env_int("ATTNKERN_CUDA_EMU_SMS", 4); }
// An H100's opt-in shared memory per block (227 KiB).
int64_t max_shared_per_block() { return 232448; }

cudaError_t launch(dim3 grid, dim3 block, size_t smem, Entry entry, void* arg) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_last_error != cudaSuccess) return g_last_error;  // a failed launch is sticky until read
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      smem > size_t(max_shared_per_block())) {
    g_last_error = cudaErrorInvalidConfiguration;
    g_last_message = "invalid launch configuration";
    return g_last_error;
  }
  LaunchState L{grid, block, smem, entry, arg};
  L.threads.resize(nthreads);
  for (uint64_t i = 0; i < nthreads; ++i) {
    ThreadState& t = L.threads[i];
    t.linear = int(i);
    t.tid = make_uint3(unsigned(i % block.x), unsigned(i / block.x % block.y),
                       unsigned(i / (uint64_t(block.x) * block.y)));
    t.stack = static_cast<char*>(std::malloc(kStackBytes));
  }
  g_launch = &L;
  for (unsigned z = 0; z < grid.z && L.error.empty(); ++z) {
    for (unsigned y = 0; y < grid.y && L.error.empty(); ++y) {
      for (unsigned x = 0; x < grid.x && L.error.empty(); ++x) {
        Block blk;
        blk.idx = make_uint3(x, y, z);
        run_block(L, blk);
      }
    }
  }
  g_launch = nullptr;
  for (ThreadState& t : L.threads) std::free(t.stack);
  if (!L.error.empty()) {
    g_last_error = cudaErrorLaunchFailure;
    g_last_message = "CUDA emulation: " + L.error;
    std::fprintf(stderr, "%s\n", g_last_message.c_str());
  }
  return g_last_error;
}

const char* last_error_message() { return g_last_message.c_str(); }

cudaError_t take_last_error() {
  std::lock_guard<std::mutex> lock(g_mutex);
  const cudaError_t err = g_last_error;
  g_last_error = cudaSuccess;
  return err;
}

}  // namespace cuda_emu

// The outlined checks of -fsanitize=kernel-address (every load and store of this module).
// Hidden: the module's own calls bind here, never to the AddressSanitizer runtime's symbols.
#define CUDA_EMU_HOOK(N)                                                                    \
  extern "C" __attribute__((visibility("hidden"), no_sanitize_address)) void               \
      __asan_load##N##_noabort(void* p) {                                                   \
    cuda_emu::on_access(p, N, false, __builtin_return_address(0));                          \
  }                                                                                         \
  extern "C" __attribute__((visibility("hidden"), no_sanitize_address)) void               \
      __asan_store##N##_noabort(void* p) {                                                  \
    cuda_emu::on_access(p, N, true, __builtin_return_address(0));                           \
  }
CUDA_EMU_HOOK(1)
CUDA_EMU_HOOK(2)
CUDA_EMU_HOOK(4)
CUDA_EMU_HOOK(8)
CUDA_EMU_HOOK(16)
#undef CUDA_EMU_HOOK

extern "C" __attribute__((visibility("hidden"), no_sanitize_address)) void __asan_loadN_noabort(
    void* p, size_t n) {
  cuda_emu::on_access(p, n, false, __builtin_return_address(0));
}
extern "C" __attribute__((visibility("hidden"), no_sanitize_address)) void __asan_storeN_noabort(
    void* p, size_t n) {
  cuda_emu::on_access(p, n, true, __builtin_return_address(0));
}
