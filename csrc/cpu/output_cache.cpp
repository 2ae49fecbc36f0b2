// The output block cache of output_cache.h.
#include "output_cache.h"

#include <ATen/Context.h>
#include <ATen/EmptyTensor.h>
#include <ATen/native/TensorFactories.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <mutex>
#include <new>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace fastddpm {
namespace {

constexpr size_t kAlign = 64;      // a cache line (torch's own CPU alignment)
constexpr size_t kPage = 4096;     // sizes are rounded up to pages: one bucket per page count
constexpr size_t kMinBytes = 1 << 16;  // smaller ones stay in glibc's heap anyway: torch's allocator

struct Block {
  void* ptr;
  size_t bytes;
};

class OutputCache final : public c10::Allocator {
 public:
  OutputCache() : limit_(read_limit()) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes || limit_ == 0) return c10::GetCPUAllocator()->allocate(n);  // torch's own
    const size_t bytes = (n + kPage - 1) / kPage * kPage;
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        p = it->second.back();
        it->second.pop_back();
        held_ -= bytes;
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (p == nullptr) {
      p = std::aligned_alloc(kAlign, bytes);  // bytes: a multiple of the page, so of kAlign
      if (p == nullptr) throw std::bad_alloc();
    }
    return {p, new Block{p, bytes}, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  CacheStats stats() {
    std::lock_guard<std::mutex> g(mu_);
    return {static_cast<int64_t>(held_), hits_, misses_, static_cast<int64_t>(limit_)};
  }

  void empty() {
    std::vector<void*> out;
    {
      std::lock_guard<std::mutex> g(mu_);
      for (auto& kv : free_) out.insert(out.end(), kv.second.begin(), kv.second.end());
      free_.clear();
      held_ = 0;
    }
    for (void* p : out) std::free(p);
  }

 private:
  static size_t read_limit() {
    const char* env = std::getenv("FASTDDPM_CPU_CACHE_MB");
    if (env == nullptr || *env == '\0') return size_t{1024} << 20;
    char* end = nullptr;
    const long long mb = std::strtoll(env, &end, 10);
    TORCH_CHECK(end != env && *end == '\0' && mb >= 0, "FASTDDPM_CPU_CACHE_MB must be a whole number of MiB >= 0, "
                "got '", env, "'");
    return static_cast<size_t>(mb) << 20;
  }

  static void release(void* ctx);

  void put(Block* b) {  // only blocks of at least kMinBytes come here
    bool keep = false;
    {
      std::lock_guard<std::mutex> g(mu_);
      if (held_ + b->bytes <= limit_) {
        free_[b->bytes].push_back(b->ptr);
        held_ += b->bytes;
        keep = true;
      }
    }
    if (!keep) std::free(b->ptr);
    delete b;
  }

  const size_t limit_;
  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t held_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

// never destroyed: tensors may outlive static destruction at exit
OutputCache& cache() {
  static OutputCache* c = new OutputCache();
  return *c;
}

void OutputCache::release(void* ctx) { cache().put(static_cast<Block*>(ctx)); }

std::tuple<int64_t, int64_t, int64_t, int64_t> cache_stats_op() {
  const CacheStats s = cache_stats();
  return {s.cached_bytes, s.hits, s.misses, s.limit_bytes};
}

}  // namespace

at::Tensor cached_empty(at::IntArrayRef sizes, at::ScalarType dtype, at::MemoryFormat fmt) {
  at::Tensor t = at::detail::empty_generic(sizes, &cache(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, fmt);
  // as torch.empty does under torch.utils.deterministic.fill_uninitialized_memory
  // (the tests' poisoning: NaN in every output before a kernel writes it)
  const auto& ctx = at::globalContext();
  if (C10_UNLIKELY(ctx.deterministicAlgorithms() && ctx.deterministicFillUninitializedMemory()))
    at::native::fill_empty_deterministic_(t);
  return t;
}

CacheStats cache_stats() { return cache().stats(); }

void empty_cache() { cache().empty(); }

// no tensor arguments: no backend to dispatch on
TORCH_LIBRARY_IMPL(fastddpm_cpp, CompositeExplicitAutograd, m) {
  m.impl("cpu_cache_stats", &cache_stats_op);
  m.impl("cpu_empty_cache", &empty_cache);
}

}  // namespace fastddpm
