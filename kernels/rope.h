// Rotary position embedding (GPT-NeoX pairing: element i rotates with element i + dh/2):
//   y_i = x_i cos(p w_i) - x_{i+h} sin(p w_i),  y_{i+h} = x_i sin(p w_i) + x_{i+h} cos(p w_i),
//   w_i = theta^(-2i/dh), p = pos0 + token index. The backward is the inverse rotation (inverse =
//   true).
#pragma once

#include "kernels/base/kernel.h"

namespace hydra::kernels {

struct RopeParams {
  DType dtype = DType::kF32;
  const void* x = nullptr;  // [B, L, H, dh], tokens x_row elements apart
  int64_t x_row = 0;
  void* y = nullptr;  // contiguous [B, L, H, dh]
  int64_t batch = 0, len = 0, heads = 0, head_dim = 0;
  int64_t pos0 = 0;
  double theta = 10000.0;
  bool inverse = false;
  void* stream = nullptr;
};

HYDRA_DECLARE_KERNEL(rope, RopeParams)

}  // namespace hydra::kernels
