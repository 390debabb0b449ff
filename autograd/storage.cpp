#include "autograd/storage.h"

#include <cstdlib>
#include <new>
#include <string>

#include "autograd/cuda_context.h"
#include "kernels/base/check.h"

namespace hydra {
namespace {

class CpuAllocator final : public Allocator {
 public:
  void* allocate(std::size_t bytes, void*) override {
    if (bytes == 0) return nullptr;
    const std::size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
    void* p = std::aligned_alloc(kAlign, rounded);
    if (p == nullptr) throw std::bad_alloc();
    return p;
  }
  void deallocate(void* ptr, std::size_t, void*) override { std::free(ptr); }

 private:
  static constexpr std::size_t kAlign = 64;
};

}  // namespace

Allocator& allocator_for(Device device) {
  static CpuAllocator cpu;
  if (device.is_cpu()) return cpu;
  return cuda_allocator(device.index);
}

StorageImpl::StorageImpl(std::size_t bytes, Device device, void* stream)
    : bytes_(bytes), device_(device), stream_(stream) {
  data_ = allocator_for(device).allocate(bytes, stream);
}

StorageImpl::~StorageImpl() {
  if (data_ != nullptr) allocator_for(device_).deallocate(data_, bytes_, stream_);
}

}  // namespace hydra
