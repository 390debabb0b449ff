// Causal depthwise conv1d over time, token-major layout:
//   pre[b,t,c] = bias[c] + sum_{k<W} w[c,k] * x[b, t-(W-1)+k, c],  y = pre or SiLU(pre)
// Positions before 0 read `prefix` ([B, W-1, C]: the previous W-1 inputs, for passing state between
// segments and across sequence-parallel ranks) or zero.
#pragma once

#include "kernels/base/kernel.h"

namespace hydra::kernels {

// The widest convolution the CUDA kernels take (their weight-gradient loops unroll to it); the CPU
// takes any width.
constexpr int kCudaMaxConvWidth = 8;

struct CausalConv1dParams {
  DType dtype = DType::kF32;
  const void* x = nullptr;       // [B, L, C], rows x_row elements apart
  int64_t x_row = 0;             // elements from x's row (b, t) to (b, t + 1); 0: C (contiguous)
  const void* w = nullptr;       // [C, W]
  const void* bias = nullptr;    // [C] or null
  const void* prefix = nullptr;  // [B, W-1, C] or null
  void* y = nullptr;             // [B, L, C]
  int64_t batch = 0, len = 0, channels = 0, width = 0;
  bool silu = false;
  void* stream = nullptr;
};

struct CausalConv1dBwdParams {
  DType dtype = DType::kF32;
  const void* x = nullptr;  // rows x_row elements apart, as in the forward
  int64_t x_row = 0;
  const void* w = nullptr;
  const void* bias = nullptr;
  const void* prefix = nullptr;
  const void* gy = nullptr;
  void* gx = nullptr;       // [B, L, C]
  void* gw = nullptr;       // [C, W], written
  void* gbias = nullptr;    // [C], written; null if no bias
  void* gprefix = nullptr;  // [B, W-1, C], written; null if no prefix or not needed
  int64_t batch = 0, len = 0, channels = 0, width = 0;
  bool silu = false;
  void* workspace = nullptr;  // CUDA: causal_conv1d_bwd_workspace(p) bytes
  void* stream = nullptr;
};

// The elements between x's rows in either direction's parameters (x_row 0: rows C apart).
template <class P>
inline int64_t conv_x_row(const P& p) {
  return p.x_row > 0 ? p.x_row : p.channels;
}

HYDRA_DECLARE_KERNEL(causal_conv1d_fwd, CausalConv1dParams)
HYDRA_DECLARE_KERNEL(causal_conv1d_bwd, CausalConv1dBwdParams)

namespace cuda {
size_t causal_conv1d_bwd_workspace(const CausalConv1dBwdParams& p);
}  // namespace cuda

}  // namespace hydra::kernels
