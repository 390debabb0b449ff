// Helpers for the CPU kernels: dtype dispatch with the instantiations spelled out, and casts that
// understand bf16.
#pragma once

#include <cmath>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include "base/check.h"
#include "base/dtype.h"
#include "kernels/base/dispatch.h"

namespace hydra::kernels::cpu {

using kernels::cast;
using kernels::dispatch_all;
using kernels::dispatch_index;
using kernels::TypeTag;

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
