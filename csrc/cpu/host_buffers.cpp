#include "host_buffers.h"

#include <cstdlib>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace attnkern {
namespace cpu {

#if defined(__linux__)
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kMinBytes = size_t(4) << 20;
constexpr size_t kMaxCachedBlocks = 8;

struct Block {
  void* base;    // what mmap returned
  size_t bytes;  // what was mapped
};

struct BlockCache {
  std::mutex mu;
  std::vector<Block> free_blocks;
  size_t cached_bytes = 0;
  size_t cap_bytes = 0;
};

BlockCache& cache() {
  // Never destroyed: tensors may be freed during interpreter shutdown.
  static BlockCache* c = [] {
    auto* bc = new BlockCache();
    const char* env = std::getenv("ATTNKERN_CPU_BUFFER_CACHE_MB");
    const long mb = env ? std::atol(env) : 256;
    bc->cap_bytes = mb > 0 ? size_t(mb) << 20 : 0;
    return bc;
  }();
  return *c;
}

void release(Block b) {
  BlockCache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    if (c.cached_bytes + b.bytes <= c.cap_bytes && c.free_blocks.size() < kMaxCachedBlocks) {
      c.free_blocks.push_back(b);
      c.cached_bytes += b.bytes;
      return;
    }
  }
  munmap(b.base, b.bytes);
}

bool acquire(size_t bytes, Block* out) {
  BlockCache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    for (size_t i = 0; i < c.free_blocks.size(); ++i) {
      if (c.free_blocks[i].bytes == bytes) {
        *out = c.free_blocks[i];
        c.free_blocks.erase(c.free_blocks.begin() + i);
        c.cached_bytes -= bytes;
        return true;
      }
    }
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return false;
  madvise(p, bytes, MADV_HUGEPAGE);  // a hint: without THP this is a no-op
  *out = Block{p, bytes};
  return true;
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t need = size_t(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (need < kMinBytes) return at::empty(sizes, options);
  // One huge page of slack to align the data to 2 MiB, where huge pages can back it.
  const size_t bytes = (need + 2 * kHugePage - 1) / kHugePage * kHugePage;
  Block b;
  if (!acquire(bytes, &b)) return at::empty(sizes, options);
  const uintptr_t aligned = (reinterpret_cast<uintptr_t>(b.base) + kHugePage - 1) & ~(uintptr_t(kHugePage) - 1);
  return at::from_blob(reinterpret_cast<void*>(aligned), sizes, [b](void*) { release(b); }, options);
}

#else

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) { return at::empty(sizes, options); }

#endif

}  // namespace cpu
}  // namespace attnkern
