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
  AdamWParams base;  // param, m, v: [num_rows, cols]; base.grad: [k, cols] values of `rows`
  const int64_t* rows = nullptr;  // k unique row indices (device memory on CUDA)
  int64_t num_rows = 0, cols = 0, k = 0;
};

// Many dense parameters of one dtype in one launch (the fused optimizer step). Each tensor has its
// own learning rate and weight decay (parameter groups); the rest is shared.
struct AdamWTensor {
  void* param = nullptr;
  const void* grad = nullptr;
  void* m = nullptr;
  void* v = nullptr;
  int64_t n = 0;
  double lr = 0, weight_decay = 0;
};

struct MultiAdamWParams {
  static constexpr int kMax = 160;  // tensors per launch: ~10 KB of kernel parameters
  DType dtype = DType::kF32;
  int count = 0;
  AdamWTensor t[kMax];
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double bias_correction1 = 1, bias_correction2 = 1;
  double grad_scale = 1;
  void* stream = nullptr;

  AdamWParams single(int i) const {  // tensor i alone
    AdamWParams a;
    a.dtype = dtype;
    a.param = t[i].param;
    a.grad = t[i].grad;
    a.m = t[i].m;
    a.v = t[i].v;
    a.n = t[i].n;
    a.lr = t[i].lr;
    a.weight_decay = t[i].weight_decay;
    a.beta1 = beta1;
    a.beta2 = beta2;
    a.eps = eps;
    a.bias_correction1 = bias_correction1;
    a.bias_correction2 = bias_correction2;
    a.grad_scale = grad_scale;
    a.stream = stream;
    return a;
  }
};

HYDRA_DECLARE_KERNEL(adamw_step, AdamWParams)
HYDRA_DECLARE_KERNEL(multi_adamw_step, MultiAdamWParams)
HYDRA_DECLARE_KERNEL(adamw_rows_step, AdamWRowsParams)

}  // namespace hydra::kernels
