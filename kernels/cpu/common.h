// Helpers for the CPU kernels: dtype dispatch with the instantiations spelled out, and casts that
// understand bf16.
#pragma once

#include <cmath>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include "kernels/base/check.h"
#include "kernels/base/dtype.h"

namespace hydra::kernels::cpu {

template <class T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) for the floating types the CPU computes in: f32 and f64.
template <class F>
void dispatch_float(DType dtype, std::string_view op, F&& fn) {
  switch (dtype) {
    case DType::kF32:
      return fn(TypeTag<float>{});
    case DType::kF64:
      return fn(TypeTag<double>{});
    default:
      HYDRA_FAIL() << op << ": dtype " << dtype_name(dtype)
                   << " is not supported on the CPU (use f32 or f64)";
  }
}

// Calls fn(TypeTag<I>{}) for index types i32 and i64.
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

// Calls fn(TypeTag<T>{}) for every dtype (copies and fills).
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
inline To cast(From v) {
  if constexpr (std::is_same_v<To, From>) {
    return v;
  } else if constexpr (std::is_same_v<From, bf16>) {
    return cast<To>(static_cast<float>(v));
  } else if constexpr (std::is_same_v<To, bf16>) {
    return bf16(static_cast<float>(v));
  } else {
    return static_cast<To>(v);
  }
}

template <class T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// softplus(x) = log(1 + exp(x)), linear above 20 as in PyTorch.
template <class T>
inline T softplus(T x) {
  return x > T(20) ? x : std::log1p(std::exp(x));
}

// Validates every index before any thread starts, so no exception leaves a parallel region.
template <class I>
void check_indices(const I* index, int64_t n, int64_t limit, std::string_view op) {
  for (int64_t i = 0; i < n; ++i) {
    HYDRA_CHECK(index[i] >= 0 && index[i] < limit)
        << op << ": index " << static_cast<int64_t>(index[i]) << " at position " << i
        << " is out of range [0, " << limit << ")";
  }
}

}  // namespace hydra::kernels::cpu
