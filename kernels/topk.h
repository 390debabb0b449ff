// Top-k along the last axis: the k largest values in descending order with their indices (i64);
// ties go to the lower index.
#pragma once

#include "kernels/base/kernel.h"

namespace hydra::kernels {

struct TopkParams {
  DType dtype = DType::kF32;
  const void* x = nullptr;  // [rows, cols]
  void* values = nullptr;   // [rows, k]
  void* indices = nullptr;  // [rows, k], i64
  int64_t rows = 0, cols = 0, k = 0;
  void* stream = nullptr;
};

HYDRA_DECLARE_KERNEL(topk, TopkParams)

}  // namespace hydra::kernels
