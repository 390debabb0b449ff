// Conventions every kernel family follows: a Params struct of raw pointers, sizes and (in elements)
// strides; `stream` is a cudaStream_t on CUDA and ignored on the CPU; pointers of `dtype` unless
// named otherwise; statistics saved for backward are in accumulate_dtype(dtype). Each family header
// declares the same functions in namespace cpu (reference, kernels/cpu/) and namespace cuda
// (kernels/cuda/). Scratch memory: a family that needs more than registers and shared memory
// declares `size_t <kernel>_workspace(const Params&)` in its header and takes `workspace` in its
// Params; the caller (autograd) allocates that many bytes through its caching allocator; CPU
// kernels allocate their own and ignore it. Kernels with a faster non-deterministic path (float
// atomics) take it only when hydra::deterministic() is off (base/determinism.h).
#pragma once

#include <cstdint>

#include "base/check.h"
#include "base/dtype.h"

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
