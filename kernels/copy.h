// Strided copy with dtype conversion (contiguous(), to(dtype), views materialised), many contiguous
// copies in one launch, and fill.
#pragma once

#include "kernels/base/kernel.h"

namespace hydra::kernels {

struct StridedCopyParams {
  DType src_dtype = DType::kF32;
  DType dst_dtype = DType::kF32;
  const void* src = nullptr;
  void* dst = nullptr;
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t src_strides[kMaxDims] = {};
  int64_t dst_strides[kMaxDims] = {};
  void* stream = nullptr;
};

struct FillParams {
  DType dtype = DType::kF32;
  void* dst = nullptr;
  int64_t n = 0;
  double value = 0;
  void* stream = nullptr;
};

// Many contiguous copies of one dtype pair in one launch: dst[i][j] = src[i][j] converted, j < n[i]
// (mixed precision's cast of every parameter into its compute copy, once a step).
struct MultiCopyParams {
  static constexpr int kMax = 256;  // tensors per launch (~6 KB of kernel parameters)
  DType src_dtype = DType::kF32;
  DType dst_dtype = DType::kF32;
  int count = 0;
  const void* src[kMax] = {};
  void* dst[kMax] = {};
  int64_t n[kMax] = {};
  void* stream = nullptr;
};

HYDRA_DECLARE_KERNEL(strided_copy, StridedCopyParams)
HYDRA_DECLARE_KERNEL(multi_copy, MultiCopyParams)
HYDRA_DECLARE_KERNEL(fill, FillParams)

}  // namespace hydra::kernels
