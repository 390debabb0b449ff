// Strided copy with dtype conversion (contiguous(), to(dtype), views materialised), and fill.
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

HYDRA_DECLARE_KERNEL(strided_copy, StridedCopyParams)
HYDRA_DECLARE_KERNEL(fill, FillParams)

}  // namespace hydra::kernels
