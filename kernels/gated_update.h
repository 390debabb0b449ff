// A gated update of rows (the workspace memory's slot write): per row r,
//   z = <s[r], w[0:cols]> + <u[r], w[cols:2 cols]> + b,   g = sigmoid(z),   out[r] = s[r] + g (u[r] - s[r]).
// Backward: dz = g (1 - g) <gout[r], u[r] - s[r]>, gs = (1 - g) gout + dz w_s, gu = g gout + dz w_u, and
// the gate's gradients gw = [sum_r dz s[r], sum_r dz u[r]], gb = sum_r dz (summed in a fixed order).
#pragma once

#include "kernels/base/kernel.h"

namespace hydra::kernels {

struct GatedUpdateParams {
  DType dtype = DType::kF32;      // of s, u, w, b, out, gate
  int64_t rows = 0, cols = 0;
  const void* s = nullptr;        // [rows, cols] contiguous
  const void* u = nullptr;        // [rows, cols] contiguous
  const void* w = nullptr;        // [2 * cols]
  const void* b = nullptr;        // [1]
  void* out = nullptr;            // [rows, cols]
  void* gate = nullptr;           // [rows]: g
  void* stream = nullptr;
};

struct GatedUpdateBwdParams {
  GatedUpdateParams fwd;          // s, u, w and the forward's gate
  const void* gout = nullptr;     // [rows, cols]
  void* gs = nullptr;             // [rows, cols]
  void* gu = nullptr;             // [rows, cols]
  void* gz = nullptr;             // [rows], accumulate dtype: dz (scratch for gw, gb)
  void* gw = nullptr;             // [2 * cols] or null
  void* gb = nullptr;             // [1] or null
};

HYDRA_DECLARE_KERNEL(gated_update_fwd, GatedUpdateParams)
HYDRA_DECLARE_KERNEL(gated_update_bwd, GatedUpdateBwdParams)

}  // namespace hydra::kernels
