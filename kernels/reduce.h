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
  double scale = 1;           // multiplies the result (mean = sum with scale 1/reduce)
  void* workspace = nullptr;  // CUDA: reduce_axis_workspace(p) bytes
  void* stream = nullptr;
};

// Sum of squares of many tensors at once (the global gradient norm): *out = sum_i sum_j x_i[j]^2.
struct MultiSumSquaresParams {
  static constexpr int kMax = 128;  // fits the kernel parameter space on the GPU
  DType dtype = DType::kF32;        // of every x_i
  int count = 0;
  const void* x[kMax] = {};
  int64_t n[kMax] = {};
  double* out = nullptr;      // one double, host memory: the sum, once the device has it
  double* add_to = nullptr;   // instead of out: one double of device memory (host on the CPU) the
                              // sum is added to; nothing waits for the device
  void* workspace = nullptr;  // CUDA: multi_sum_squares_workspace(p) bytes
  void* stream = nullptr;
};

HYDRA_DECLARE_KERNEL(reduce_axis, ReduceParams)
HYDRA_DECLARE_KERNEL(multi_sum_squares, MultiSumSquaresParams)

namespace cuda {
size_t reduce_axis_workspace(const ReduceParams& p);
size_t multi_sum_squares_workspace(const MultiSumSquaresParams& p);
}  // namespace cuda

}  // namespace hydra::kernels
