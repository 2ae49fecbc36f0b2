// Outputs of the CPU ops from a cache of their own freed blocks.
//
// glibc hands large freed blocks back to the kernel (munmap, heap trimming), so
// a fresh (N, C, H, W) output costs a page fault per 4 KiB on its first write:
// ~1,000-3,000 faults per tiny-UNet training step with glibc's defaults, several
// microseconds each in a VM. A training or sampling loop asks for the same
// sizes every step, so the ops' outputs come from this cache instead: a block
// freed by its last tensor goes back to the cache (up to FASTDDPM_CPU_CACHE_MB
// MiB in all, default 1024; 0 turns it off) and the next request of the same
// size reuses it, already mapped. Blocks over the limit go back to the system.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace fastddpm {

// an uninitialised CPU tensor of `sizes`, `dtype` and layout `fmt` whose block
// comes from (and goes back to) the cache
at::Tensor cached_empty(at::IntArrayRef sizes, at::ScalarType dtype, at::MemoryFormat fmt);

struct CacheStats {
  int64_t cached_bytes;  // held for reuse now
  int64_t hits;          // requests served from the cache
  int64_t misses;        // cacheable requests (>= 64 KiB) the system allocator served
  int64_t limit_bytes;
};
CacheStats cache_stats();
void empty_cache();  // every held block back to the system

}  // namespace fastddpm
