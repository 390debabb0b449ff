#include "autograd/storage.h"

#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "autograd/cuda_context.h"
#include "base/check.h"

namespace hydra {
namespace {

// Large blocks are cached by size class and reused: the C library would return them to the kernel
// (munmap) and fault fresh zeroed pages in on the next step, a large share of a CPU step's time.
// Small blocks go straight to malloc, which already caches them.
class CpuAllocator final : public Allocator {
 public:
  void* allocate(std::size_t bytes, void*) override {
    if (bytes == 0) return nullptr;
    const std::size_t size = bin(bytes);
    if (size >= kCacheFrom) {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(size);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        cached_ -= size;
        return p;
      }
    }
    void* p = std::aligned_alloc(kAlign, size);
    if (p == nullptr) {
      release();
      p = std::aligned_alloc(kAlign, size);
      if (p == nullptr) throw std::bad_alloc();
    }
    return p;
  }
  void deallocate(void* ptr, std::size_t bytes, void*) override {
    if (ptr == nullptr) return;
    const std::size_t size = bin(bytes);
    if (size >= kCacheFrom) {
      std::lock_guard<std::mutex> lock(mu_);
      if (cached_ + size <= kCacheLimit) {
        free_[size].push_back(ptr);
        cached_ += size;
        return;
      }
    }
    std::free(ptr);
  }

 private:
  static constexpr std::size_t kAlign = 64;
  static constexpr std::size_t kCacheFrom = 64 << 10;
  static constexpr std::size_t kCacheLimit = std::size_t{8} << 30;
  // 64-byte steps below 64 KiB; above, four size classes per power of two (<= 25% slack).
  static std::size_t bin(std::size_t bytes) {
    if (bytes < kCacheFrom) return (bytes + kAlign - 1) / kAlign * kAlign;
    std::size_t p = 1;
    while (p * 2 <= bytes) p *= 2;
    const std::size_t step = p / 4;
    return (bytes + step - 1) / step * step;
  }
  void release() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [size, ptrs] : free_)
      for (void* q : ptrs) std::free(q);
    free_.clear();
    cached_ = 0;
  }
  std::mutex mu_;
  std::map<std::size_t, std::vector<void*>> free_;
  std::size_t cached_ = 0;
};

}  // namespace

Allocator& allocator_for(Device device) {
  static CpuAllocator cpu;
  if (device.is_cpu()) return cpu;
  return cuda_allocator(device.index);
}

StorageImpl::StorageImpl(std::size_t bytes, Device device, void* stream)
    : bytes_(bytes), device_(device), stream_(stream), allocator_(&allocator_for(device)) {
  data_ = allocator_->allocate(bytes, stream);
}

StorageImpl::StorageImpl(std::size_t bytes, Allocator& allocator, bool pinned)
    : bytes_(bytes), device_(Device::cpu()), allocator_(&allocator), pinned_(pinned) {
  data_ = allocator_->allocate(bytes, nullptr);
}

StorageImpl::~StorageImpl() {
  if (data_ != nullptr) allocator_->deallocate(data_, bytes_, stream_);
}

}  // namespace hydra
