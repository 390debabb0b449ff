// A gated update of rows (the workspace memory's slot write): per row r,
//   z = <s[r], w[0:cols]> + <u[r], w[cols:2 cols]> + b,   g = sigmoid(z),   out[r] = s[r] + g (u[r]
//   - s[r]).
// Backward: dz = g (1 - g) <gout[r], u[r] - s[r]>, gs = (1 - g) gout + dz w_s, gu = g gout + dz
// w_u, and the gate's gradients gw = [sum_r dz s[r], sum_r dz u[r]], gb = sum_r dz (summed in a
// fixed order).
#pragma once

#include "kernels/base/kernel.h"

namespace hydra::kernels {

struct GatedUpdateParams {
  DType dtype = DType::kF32;  // of s, u, w, b, out, gate
  int64_t rows = 0, cols = 0;
  const void* s = nullptr;  // [rows, cols] contiguous
  const void* u = nullptr;  // [rows, cols] contiguous
  const void* w = nullptr;  // [2 * cols]
  const void* b = nullptr;  // [1]
  void* out = nullptr;      // [rows, cols]
  void* gate = nullptr;     // [rows]: g
  void* stream = nullptr;
};

struct GatedUpdateBwdParams {
  GatedUpdateParams fwd;       // s, u, w and the forward's gate
  const void* gout = nullptr;  // [rows, cols]
  void* gs = nullptr;          // [rows, cols]
  void* gu = nullptr;          // [rows, cols]
  void* gz = nullptr;          // [rows], accumulate dtype: dz (scratch for gw, gb)
  void* gw = nullptr;          // [2 * cols] or null
  void* gb = nullptr;          // [1] or null
  void* workspace = nullptr;   // CUDA: gated_update_bwd_workspace(q) bytes (gw's partial sums)
};

// The same update applied `steps` times in a row, each step with its own u (the workspace's
// PARALLEL write: every chunk's candidate update is known up front, only the gated chain is
// serial):
//   h_0 = s,  z_t = <h_t, w[0:cols]> + <u_t, w[cols:2 cols]> + b,  g_t = sigmoid(z_t),
//   h_{t+1} = h_t + g_t (u_t - h_t),  for t = 0 .. steps-1.
// Step t is exactly gated_update(h_t, u_t). The output holds every state: h [steps + 1, rows, cols]
// (h_0 = s included). Backward walks the steps back with the adjoint lambda_t = dL/dh_t:
//   lambda_steps = gh_steps,  dz_t = g_t (1 - g_t) <lambda_{t+1}, u_t - h_t>,
//   gu_t = g_t lambda_{t+1} + dz_t w_u,  lambda_t = gh_t + (1 - g_t) lambda_{t+1} + dz_t w_s,  gs =
//   lambda_0,
// and the gate's gradients gw = [sum_t,r dz h_t, sum_t,r dz u_t], gb = sum_t,r dz (fixed order).
struct GatedScanParams {
  DType dtype = DType::kF32;  // of s, u, w, b, h, gate
  int64_t steps = 0, rows = 0, cols = 0;
  const void* s = nullptr;  // [rows, cols] contiguous: h_0
  const void* u = nullptr;  // [steps, rows, cols] contiguous
  const void* w = nullptr;  // [2 * cols]
  const void* b = nullptr;  // [1]
  void* h = nullptr;        // [steps + 1, rows, cols]
  void* gate = nullptr;     // [steps, rows]: g_t
  void* stream = nullptr;
};

struct GatedScanBwdParams {
  GatedScanParams fwd;        // s, u, w and the forward's h and gate
  const void* gh = nullptr;   // [steps + 1, rows, cols]
  void* gs = nullptr;         // [rows, cols]
  void* gu = nullptr;         // [steps, rows, cols]
  void* lambda = nullptr;     // [rows, cols], accumulate dtype: scratch for the adjoint
  void* gz = nullptr;         // [steps, rows], accumulate dtype: dz (scratch for gw, gb)
  void* gw = nullptr;         // [2 * cols] or null
  void* gb = nullptr;         // [1] or null
  void* workspace = nullptr;  // CUDA: gated_scan_bwd_workspace(q) bytes (gw's partial sums)
};

HYDRA_DECLARE_KERNEL(gated_update_fwd, GatedUpdateParams)
HYDRA_DECLARE_KERNEL(gated_update_bwd, GatedUpdateBwdParams)
HYDRA_DECLARE_KERNEL(gated_scan_fwd, GatedScanParams)
HYDRA_DECLARE_KERNEL(gated_scan_bwd, GatedScanBwdParams)

namespace cuda {
// gw and gb sum over every (step, row): on CUDA in groups of rows, each group's sums in a block of
// its own, then the groups' sums in group order (deterministic); the groups' sums need this much.
size_t gated_update_bwd_workspace(const GatedUpdateBwdParams& q);
size_t gated_scan_bwd_workspace(const GatedScanBwdParams& q);
}  // namespace cuda

}  // namespace hydra::kernels
