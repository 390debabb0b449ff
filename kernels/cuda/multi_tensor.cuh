// Multi-tensor launches (the fused optimizer step, the parameters' casts): one launch over many
// tensors, its blocks numbered tensor by tensor.
#pragma once

#include <cstdint>

namespace hydra::kernels::cuda {

// first[t] is tensor t's first block (first[0] = 0, ascending); returns the tensor that owns block
// `blk` (a binary search).
__device__ __forceinline__ int multi_tensor_of(const int32_t* first, int count, int32_t blk) {
  int lo = 0, hi = count - 1;  // the last t with first[t] <= blk
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (first[mid] <= blk)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

}  // namespace hydra::kernels::cuda
