// Fused AdamW with decoupled weight decay (Loshchilov & Hutter):
//   g = grad * grad_scale;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
//   p = p * (1 - lr * wd) - lr * (m / bc1) / (sqrt(v / bc2) + eps)
// The row variant updates only the listed rows of a 2-D parameter (lazy, for row-sparse gradients).
//
// Clipping on the device: with `sum_squares` set (one double, device memory on CUDA, host memory on
// the CPU: the sum of squares of every gradient the step clips), grad_scale is ignored and each
// launch computes it as the trainer would on the host (clip_scale below), so the host never waits
// for the gradient norm; a non-finite norm updates nothing (the trainer then stops).
#pragma once

#include <cmath>

#include "kernels/base/kernel.h"

#ifdef __CUDACC__
#define HYDRA_OPTIM_HD __host__ __device__
#else
#define HYDRA_OPTIM_HD
#endif

namespace hydra::kernels {

// The clipping factor of gradients whose sum of squares is ss: clip / (norm + 1e-6) when clip > 0
// and the norm exceeds it, else 1. False (no update) when the norm is not finite.
HYDRA_OPTIM_HD inline bool clip_scale(double ss, double clip, double* scale) {
#ifdef __CUDA_ARCH__
  const double norm = ::sqrt(ss);
  if (!::isfinite(norm)) return false;
#else
  const double norm = std::sqrt(ss);
  if (!std::isfinite(norm)) return false;
#endif
  *scale = clip > 0 && norm > clip ? clip / (norm + 1e-6) : 1.0;
  return true;
}

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
  const double* sum_squares = nullptr;  // clipping on the device (above); grad_scale then unused
  double clip = 0;
  void* stream = nullptr;
};

struct AdamWRowsParams {
  AdamWParams base;  // param, m, v: [num_rows, cols]; base.grad: [k, cols] values of `rows`
  const int64_t* rows = nullptr;  // k unique row indices (device memory on CUDA)
  int64_t num_rows = 0, cols = 0, k = 0;
  // Instead of rows: every row r with hits[r] != 0 (i32 [num_rows]); base.grad is then
  // [num_rows, cols] (the other rows' values are not read) and k is unused.
  const int32_t* hits = nullptr;
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
  const double* sum_squares = nullptr;  // clipping on the device (above)
  double clip = 0;
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
    a.sum_squares = sum_squares;
    a.clip = clip;
    a.stream = stream;
    return a;
  }
};

HYDRA_DECLARE_KERNEL(adamw_step, AdamWParams)
HYDRA_DECLARE_KERNEL(multi_adamw_step, MultiAdamWParams)
HYDRA_DECLARE_KERNEL(adamw_rows_step, AdamWRowsParams)

}  // namespace hydra::kernels
