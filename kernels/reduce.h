// Reduction of the middle axis of a contiguous [outer, reduce, inner] view. The summation order
// depends only on the shape (fixed blocks combined in order), never on the thread count.
#pragma once

#include "kernels/base/kernel.h"

namespace hydra::kernels {

enum class ReduceOp : uint8_t { kSum, kSumSquares, kMax, kMin };

struct ReduceParams {
  ReduceOp op = ReduceOp::kSum;
  DType dtype = DType::kF32;  // of x and y
  const void* x = nullptr;
  void* y = nullptr;  // [outer, inner]
  int64_t outer = 1, reduce = 1, inner = 1;
  double scale = 1;  // multiplies the result (mean = sum with scale 1/reduce)
  void* stream = nullptr;
};

HYDRA_DECLARE_KERNEL(reduce_axis, ReduceParams)

}  // namespace hydra::kernels
