// Where a tensor lives.
#pragma once

#include <cstdint>
#include <string>

namespace hydra {

struct Device {
  enum class Type : uint8_t { kCPU, kCUDA };
  Type type = Type::kCPU;
  int index = 0;

  static Device cpu() { return {Type::kCPU, 0}; }
  static Device cuda(int index = 0) { return {Type::kCUDA, index}; }
  bool is_cpu() const { return type == Type::kCPU; }
  bool is_cuda() const { return type == Type::kCUDA; }
  bool operator==(const Device& o) const {
    return type == o.type && (type == Type::kCPU || index == o.index);
  }
  bool operator!=(const Device& o) const { return !(*this == o); }
  std::string str() const { return is_cpu() ? "cpu" : "cuda:" + std::to_string(index); }
};

// True when this build has the CUDA backend and a device is present.
bool cuda_available();
int cuda_device_count();

}  // namespace hydra
