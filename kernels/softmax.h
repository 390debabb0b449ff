// Softmax and log-softmax over the last axis of a contiguous [rows, cols] buffer.
#pragma once

#include "kernels/base/kernel.h"

namespace hydra::kernels {

struct SoftmaxParams {
  DType dtype = DType::kF32;
  bool log = false;
  const void* x = nullptr;
  void* y = nullptr;
  int64_t rows = 0, cols = 0;
  void* stream = nullptr;
};

// softmax: gx = y * (gy - sum(gy * y));  log-softmax: gx = gy - exp(y) * sum(gy).
struct SoftmaxBwdParams {
  DType dtype = DType::kF32;
  bool log = false;
  const void* y = nullptr;
  const void* gy = nullptr;
  void* gx = nullptr;
  int64_t rows = 0, cols = 0;
  void* stream = nullptr;
};

HYDRA_DECLARE_KERNEL(softmax_fwd, SoftmaxParams)
HYDRA_DECLARE_KERNEL(softmax_bwd, SoftmaxBwdParams)

}  // namespace hydra::kernels
