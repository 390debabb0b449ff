// Conventions every kernel family follows: a Params struct of raw pointers, sizes and (in elements)
// strides; `stream` is a cudaStream_t on CUDA and ignored on the CPU; pointers of `dtype` unless
// named otherwise; statistics saved for backward are in accumulate_dtype(dtype). Each family header
// declares the same functions in namespace cpu (reference, kernels/cpu/) and namespace cuda
// (kernels/cuda/).
#pragma once

#include <cstdint>

#include "kernels/base/check.h"
#include "kernels/base/dtype.h"

namespace hydra::kernels {

inline constexpr int kMaxDims = 8;

}  // namespace hydra::kernels

// Declares fn(const Params&) for both backends.
#define HYDRA_DECLARE_KERNEL(fn, Params) \
  namespace cpu {                        \
  void fn(const Params& p);              \
  }                                      \
  namespace cuda {                       \
  void fn(const Params& p);              \
  }
