// Storage: a reference-counted buffer on a device, obtained from that device's allocator. Tensors
// and their views share one Storage; its version counter detects in-place changes to saved tensors.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "autograd/device.h"

namespace hydra {

class Allocator {
 public:
  virtual ~Allocator() = default;
  // `stream` is the CUDA stream the memory will first be used on (ignored on the CPU).
  virtual void* allocate(std::size_t bytes, void* stream) = 0;
  virtual void deallocate(void* ptr, std::size_t bytes, void* stream) = 0;
};

Allocator& allocator_for(Device device);

class StorageImpl {
 public:
  StorageImpl(std::size_t bytes, Device device, void* stream = nullptr);
  // Host memory from `allocator` (the pinned allocator): device must be the CPU.
  StorageImpl(std::size_t bytes, Allocator& allocator, bool pinned);
  ~StorageImpl();
  StorageImpl(const StorageImpl&) = delete;
  StorageImpl& operator=(const StorageImpl&) = delete;

  void* data() const { return data_; }
  std::size_t bytes() const { return bytes_; }
  Device device() const { return device_; }
  void* stream() const { return stream_; }
  uint32_t version() const { return version_; }
  bool pinned() const { return pinned_; }  // page-locked host memory (async copies to a GPU)
  void bump_version() { ++version_; }

 private:
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
  Device device_;
  void* stream_ = nullptr;
  Allocator* allocator_ = nullptr;
  bool pinned_ = false;
  uint32_t version_ = 0;
};

using Storage = std::shared_ptr<StorageImpl>;

}  // namespace hydra
