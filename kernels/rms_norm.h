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

// Several RMSNorms of one input (a Hydra block's paths each normalise the residual stream with a
// weight of their own): rstd once, y_k = x * rstd * w_k. Backward, with a = sum_k gy_k * w_k over
// the outputs that got a gradient: gx = rstd * (a - x * rstd^2 * mean(a * x)) (one pass instead of
// a backward per norm and the sums of their gx), gw_k = sum_rows gy_k * x * rstd.
constexpr int kRmsNormMaxWeights = 4;
struct RmsNormMultiParams {
  DType dtype = DType::kF32;
  const void* x = nullptr;                 // [rows, cols]
  int count = 0;                           // weights, 1..kRmsNormMaxWeights
  const void* w[kRmsNormMaxWeights] = {};  // [cols] each
  void* y[kRmsNormMaxWeights] = {};        // [rows, cols] each
  void* rstd = nullptr;                    // [rows], accumulate dtype
  int64_t rows = 0, cols = 0;
  double eps = 1e-6;
  void* stream = nullptr;
};
struct RmsNormMultiBwdParams {
  DType dtype = DType::kF32;
  const void* x = nullptr;
  int count = 0;
  const void* w[kRmsNormMaxWeights] = {};
  const void* rstd = nullptr;
  const void* gy[kRmsNormMaxWeights] = {};  // null: no gradient reached that output
  void* gx = nullptr;
  bool accumulate_gx = false;  // gx += the input's gradient (16-byte aligned on CUDA), not gx =
  void* gw[kRmsNormMaxWeights] = {};  // null: not wanted (or gy null: then written as zeros)
  int64_t rows = 0, cols = 0;
  void* workspace = nullptr;  // CUDA: rms_norm_multi_bwd_workspace(p) bytes
  void* stream = nullptr;
};
HYDRA_DECLARE_KERNEL(rms_norm_multi_fwd, RmsNormMultiParams)
HYDRA_DECLARE_KERNEL(rms_norm_multi_bwd, RmsNormMultiBwdParams)

namespace cuda {
size_t rms_norm_bwd_workspace(const RmsNormBwdParams& p);
// Whether the CUDA kernels take this shape (rows of up to 512 elements); otherwise callers compose
// single norms.
bool rms_norm_multi_supported(DType dtype, int64_t cols, int count);
size_t rms_norm_multi_bwd_workspace(const RmsNormMultiBwdParams& p);
}  // namespace cuda

}  // namespace hydra::kernels
