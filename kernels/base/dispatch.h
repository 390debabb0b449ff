// dtype dispatch shared by the CPU and CUDA kernels: fn(TypeTag<T>{}) with the instantiations
// listed here, and a cast that understands bf16 (usable on host and device).
#pragma once

#include <cstdint>
#include <string_view>
#include <type_traits>

#include "base/check.h"
#include "base/dtype.h"

namespace hydra::kernels {

template <class T>
struct TypeTag {
  using type = T;
};

template <class F>
void dispatch_index(DType dtype, std::string_view op, F&& fn) {
  switch (dtype) {
    case DType::kI32:
      return fn(TypeTag<int32_t>{});
    case DType::kI64:
      return fn(TypeTag<int64_t>{});
    default:
      HYDRA_FAIL() << op << ": index dtype must be i32 or i64, got " << dtype_name(dtype);
  }
}

// Every dtype (copies, fills, random draws).
template <class F>
void dispatch_all(DType dtype, F&& fn) {
  switch (dtype) {
    case DType::kF32:
      return fn(TypeTag<float>{});
    case DType::kF64:
      return fn(TypeTag<double>{});
    case DType::kBF16:
      return fn(TypeTag<bf16>{});
    case DType::kI32:
      return fn(TypeTag<int32_t>{});
    case DType::kI64:
      return fn(TypeTag<int64_t>{});
  }
}

template <class To, class From>
HYDRA_HD To cast(From v) {
  if constexpr (std::is_same_v<To, From>) {
    return v;
  } else if constexpr (std::is_same_v<From, bf16>) {
    return static_cast<To>(static_cast<float>(v));
  } else if constexpr (std::is_same_v<To, bf16>) {
    return bf16(static_cast<float>(v));
  } else {
    return static_cast<To>(v);
  }
}

}  // namespace hydra::kernels
