// Fused RMSNorm over the last axis: y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps).
#pragma once

#include "kernels/base/kernel.h"

namespace hydra::kernels {

struct RmsNormParams {
  DType dtype = DType::kF32;
  const void* x = nullptr;  // [rows, cols]
  const void* w = nullptr;  // [cols] or null (no scale)
  void* y = nullptr;        // [rows, cols]
  void* rstd = nullptr;     // [rows], accumulate dtype; saved for backward
  int64_t rows = 0, cols = 0;
  double eps = 1e-6;
  void* stream = nullptr;
};

// gx = rstd * (gy*w - x * rstd^2 * mean(gy*w*x)),  gw = sum_rows gy * x * rstd.
struct RmsNormBwdParams {
  DType dtype = DType::kF32;
  const void* x = nullptr;
  const void* w = nullptr;
  const void* rstd = nullptr;
  const void* gy = nullptr;
  void* gx = nullptr;
  void* gw = nullptr;  // [cols]; written (not accumulated); null when w is null
  int64_t rows = 0, cols = 0;
  void* workspace = nullptr;  // CUDA: rms_norm_bwd_workspace(p) bytes (partial sums of gw)
  void* stream = nullptr;
};

HYDRA_DECLARE_KERNEL(rms_norm_fwd, RmsNormParams)
HYDRA_DECLARE_KERNEL(rms_norm_bwd, RmsNormBwdParams)

namespace cuda {
size_t rms_norm_bwd_workspace(const RmsNormBwdParams& p);
}  // namespace cuda

}  // namespace hydra::kernels
