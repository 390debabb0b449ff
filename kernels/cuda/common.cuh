// Shared device helpers: dtype dispatch for CUDA kernels (f32, bf16; f64 for reference tests),
// loads and stores that convert to/from the fp32 compute type, and launch geometry.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <string_view>

#include "kernels/base/check.h"
#include "kernels/base/dispatch.h"
#include "kernels/base/dtype.h"
#include "kernels/cuda/check.cuh"

namespace hydra::kernels::cuda {

using kernels::dispatch_all;
using kernels::dispatch_index;
using kernels::TypeTag;

// Floating storage types the CUDA kernels handle: f32, bf16, and f64 (reference precision).
template <class F>
void dispatch_float(DType dtype, std::string_view op, F&& fn) {
  switch (dtype) {
    case DType::kF32:
      return fn(TypeTag<float>{});
    case DType::kBF16:
      return fn(TypeTag<bf16>{});
    case DType::kF64:
      return fn(TypeTag<double>{});
    default:
      HYDRA_FAIL() << op << ": dtype " << dtype_name(dtype) << " is not supported on CUDA";
  }
}

// The type arithmetic happens in: double for f64 storage, float otherwise.
template <class T>
struct ComputeType {
  using type = float;
};
template <>
struct ComputeType<double> {
  using type = double;
};
template <class T>
using compute_t = typename ComputeType<T>::type;

template <class To, class From>
__host__ __device__ __forceinline__ To convert(From v) {
  return kernels::cast<To>(v);
}

template <class T>
__device__ __forceinline__ compute_t<T> load(const T* p, int64_t i) {
  return convert<compute_t<T>>(p[i]);
}
template <class T, class V>
__device__ __forceinline__ void store(T* p, int64_t i, V v) {
  p[i] = convert<T>(v);
}

inline unsigned int blocks_for(int64_t n, int threads, int64_t max_blocks = 65535LL * 16) {
  int64_t b = (n + threads - 1) / threads;
  if (b < 1) b = 1;
  return static_cast<unsigned int>(b < max_blocks ? b : max_blocks);
}

}  // namespace hydra::kernels::cuda
