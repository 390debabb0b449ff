// The selective scan (Mamba, hydra.md section 2; math in spec/algorithms.md sections 1-2), fused
// with the softplus of delta, A = -exp(A_log), the skip term D and the optional SiLU(z) gate:
//   delta_t = softplus(delta_raw_t + dt_bias),  a_t = exp(delta_t * A)
//   h_t = a_t * h_{t-1} + delta_t * B_t * u_t,   y_t = (C_t . h_t + D * u_t) * SiLU(z_t)
// Token-major: u, delta_raw, z are [B, L, D] and B, C are [B, L, N], each a row-major [B*L, *] view
// whose consecutive tokens are `*_row` elements apart (so slices of a projection need no copy).
// States are in the accumulate dtype. The forward saves the state entering each chunk of
// `chunk_len` steps; the backward recomputes the states inside a chunk from it instead of storing
// every h_t.
#pragma once

#include "kernels/base/kernel.h"

namespace hydra::kernels {

struct SelectiveScanParams {
  DType dtype = DType::kF32;
  int64_t batch = 0, len = 0, dim = 0, state = 0;
  int64_t chunk_len = 64;
  const void* u = nullptr;
  int64_t u_row = 0;
  const void* delta = nullptr;  // raw, before dt_bias and softplus
  int64_t delta_row = 0;
  const void* z = nullptr;  // optional gate
  int64_t z_row = 0;
  const void* B = nullptr;
  int64_t B_row = 0;
  const void* C = nullptr;
  int64_t C_row = 0;
  const void* dt_bias = nullptr;  // [D] or null
  const void* A_log = nullptr;    // [D, N]
  const void* D = nullptr;        // [D] or null
  const void* h0 = nullptr;       // [B, D, N] accumulate dtype, or null (zero)
  void* y = nullptr;              // [B, L, D] contiguous
  void* h_last = nullptr;         // [B, D, N] accumulate dtype, or null
  void* chunk_states = nullptr;   // [B, num_chunks, D, N] accumulate dtype, or null (no backward)
  void* workspace = nullptr;      // CUDA: selective_scan_fwd_workspace(p) bytes
  void* stream = nullptr;
};

struct SelectiveScanBwdParams {
  SelectiveScanParams fwd;        // the forward's inputs; fwd.chunk_states as saved by the forward
  const void* gy = nullptr;       // [B, L, D] contiguous
  const void* g_hlast = nullptr;  // [B, D, N] accumulate dtype, or null
  void* gu = nullptr;             // [B, L, D]
  void* gdelta = nullptr;         // [B, L, D], gradient of delta_raw
  void* gz = nullptr;             // [B, L, D], if z
  void* gB = nullptr;             // [B, L, N]
  void* gC = nullptr;             // [B, L, N]
  void* gdt_bias = nullptr;       // [D], if dt_bias
  void* gA_log = nullptr;         // [D, N]
  void* gD = nullptr;             // [D], if D
  void* gh0 = nullptr;            // [B, D, N] accumulate dtype, or null
  void* workspace =
      nullptr;  // CUDA: selective_scan_bwd_workspace(p) bytes (fwd.workspace is unused)
};

inline int64_t ssm_num_chunks(int64_t len, int64_t chunk_len) {
  return (len + chunk_len - 1) / chunk_len;
}

HYDRA_DECLARE_KERNEL(selective_scan_fwd, SelectiveScanParams)
HYDRA_DECLARE_KERNEL(selective_scan_bwd, SelectiveScanBwdParams)

namespace cuda {
size_t selective_scan_fwd_workspace(const SelectiveScanParams& p);
size_t selective_scan_bwd_workspace(const SelectiveScanBwdParams& p);
// Forward calls that ran the lanes form in this process (HYDRA_SCAN_FWD).
int64_t selective_scan_fwd_lanes_calls();
}  // namespace cuda

}  // namespace hydra::kernels
