// Fused AdamW with decoupled weight decay (Loshchilov & Hutter):
//   g = grad * grad_scale;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
//   p = p * (1 - lr * wd) - lr * (m / bc1) / (sqrt(v / bc2) + eps)
// The row variant updates only the listed rows of a 2-D parameter (lazy, for row-sparse gradients).
#pragma once

#include "kernels/base/kernel.h"

namespace hydra::kernels {

struct AdamWParams {
  DType dtype = DType::kF32;  // of param, grad, m, v
  void* param = nullptr;
  const void* grad = nullptr;
  void* m = nullptr;
  void* v = nullptr;
  int64_t n = 0;
  double lr = 0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0;
  double bias_correction1 = 1, bias_correction2 = 1;  // 1 - beta^t
  double grad_scale = 1;
  void* stream = nullptr;
};

struct AdamWRowsParams {
  AdamWParams base;             // param, m, v: [num_rows, cols]; base.grad: [k, cols] values of `rows`
  const int64_t* rows = nullptr;  // k unique row indices (device memory on CUDA)
  int64_t num_rows = 0, cols = 0, k = 0;
};

HYDRA_DECLARE_KERNEL(adamw_step, AdamWParams)
HYDRA_DECLARE_KERNEL(adamw_rows_step, AdamWRowsParams)

}  // namespace hydra::kernels
