// Elementwise ops: unary forward/backward over contiguous buffers, binary ops with broadcasting
// (strides of 0 along broadcast dimensions; the output is contiguous).
#pragma once

#include "kernels/base/kernel.h"

namespace hydra::kernels {

enum class UnaryOp : uint8_t {
  kNeg,
  kExp,
  kLog,
  kSigmoid,
  kSilu,
  kSoftplus,
  kGelu,
  kRelu,
  kSqrt,
  kRsqrt,
  kSquare,
  kTanh,
  kAffine,  // alpha * x + beta
  kPow,     // x ^ alpha
};

struct UnaryParams {
  UnaryOp op = UnaryOp::kNeg;
  DType dtype = DType::kF32;
  const void* x = nullptr;
  void* y = nullptr;
  int64_t n = 0;
  double alpha = 1, beta = 0;
  void* stream = nullptr;
};

// gx = gy * dy/dx. Ops whose derivative is cheapest from y (exp, sigmoid, sqrt, tanh) read y; the
// others read x.
struct UnaryBwdParams {
  UnaryOp op = UnaryOp::kNeg;
  DType dtype = DType::kF32;
  const void* x = nullptr;
  const void* y = nullptr;
  const void* gy = nullptr;
  void* gx = nullptr;
  int64_t n = 0;
  double alpha = 1, beta = 0;
  void* stream = nullptr;
};

enum class BinaryOp : uint8_t { kAdd, kSub, kMul, kDiv, kMaximum, kMinimum };

struct BinaryParams {
  BinaryOp op = BinaryOp::kAdd;
  DType dtype = DType::kF32;
  const void* a = nullptr;
  const void* b = nullptr;
  void* out = nullptr;
  int ndim = 0;
  int64_t shape[kMaxDims] = {};  // output shape
  int64_t a_strides[kMaxDims] = {};
  int64_t b_strides[kMaxDims] = {};
  void* stream = nullptr;
};

HYDRA_DECLARE_KERNEL(unary_fwd, UnaryParams)
HYDRA_DECLARE_KERNEL(unary_bwd, UnaryBwdParams)
HYDRA_DECLARE_KERNEL(binary, BinaryParams)

}  // namespace hydra::kernels
