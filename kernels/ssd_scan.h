// Mamba-2's SSD scan (docs/MODEL.md "The SSD form"), fused: one decay rate and one delta per head
// of P channels, states [N, P] per head,
//   h_t = exp(dl_t A) h_{t-1} + dl_t B_t x_t^T,   y_t = h_t^T C_t
// computed in chunks of Q steps as Mamba-2 does: each chunk's state from zero (B^T (decay o dl x)),
// the states passed between chunks (one sequential step a chunk), and each chunk's outputs as a
// causal, decay-weighted product (C B^T o L) (dl x) plus the entering state's part exp(cs_t) C_t h.
// cs_t is the cumulative log-decay dl A within the chunk. The backward runs the same three phases
// in reverse: the gradient entering each chunk's end state is passed from the last chunk to the
// first, then each chunk's gradients are products of the same shapes. The skip term and the gate
// are fused as the selective scan's: y_t = (h_t^T C_t + D x_t) SiLU(z_t); delta's softplus is the
// caller's (autograd/ops_ssd.cpp). Math: spec/algorithms.md section 1; the
// gradients in the CPU kernel's comments (kernels/cpu/ssd_scan.cpp).
#pragma once

#include "kernels/base/kernel.h"

namespace hydra::kernels {

struct SsdScanParams {
  DType dtype =
      DType::kF32;  // of x, B, C, D, z, y (and their gradients); the rest accumulate dtype
  int64_t batch = 0, len = 0, heads = 0, head_dim = 0, state = 0;
  int64_t chunk_len = 64;
  const void* x = nullptr;  // [B, L, H * P] rows `x_row` elements apart
  int64_t x_row = 0;
  const void* dl = nullptr;  // [B, L, H] contiguous, accumulate dtype: delta after its softplus
  const void* A = nullptr;   // [H] accumulate dtype: the (negative) decay rates
  const void* B = nullptr;   // [B, L, N] rows `B_row` apart
  int64_t B_row = 0;
  const void* C = nullptr;  // [B, L, N] rows `C_row` apart
  int64_t C_row = 0;
  const void* D = nullptr;  // [H * P], or null
  const void* z = nullptr;  // [B, L, H * P] rows `z_row` apart, or null (no gate)
  int64_t z_row = 0;
  const void* h0 = nullptr;  // [B, H * P, N] accumulate dtype, or null (zero)
  void* y = nullptr;         // [B, L, H * P] contiguous
  void* pre = nullptr;     // [B, L, H * P] accumulate dtype: y before the gate, or null (not kept;
                           // the backward needs it where z is given)
  void* h_last = nullptr;  // [B, H * P, N] accumulate dtype
  void* states = nullptr;  // [B, H, chunks, N, P] accumulate dtype: the state entering each chunk
  void* workspace = nullptr;  // CUDA: ssd_scan_fwd_workspace(p) bytes
  void* stream = nullptr;
};

struct SsdScanBwdParams {
  SsdScanParams fwd;  // the forward's inputs, fwd.states as the forward wrote them (not workspace)
  const void* gy = nullptr;       // [B, L, H * P] contiguous
  const void* g_hlast = nullptr;  // [B, H * P, N] accumulate dtype, or null
  void* gx = nullptr;             // [B, L, H * P] contiguous, dtype
  void* gdl = nullptr;            // [B, L, H] accumulate dtype
  void* gA = nullptr;             // [H] accumulate dtype
  void* gB = nullptr;             // [B, L, N] contiguous, dtype
  void* gC = nullptr;             // [B, L, N] contiguous, dtype
  void* gD = nullptr;             // [H * P], if D
  void* gz = nullptr;             // [B, L, H * P] contiguous, if z
  void* gh0 = nullptr;            // [B, H * P, N] accumulate dtype, or null
  void* workspace = nullptr;      // CUDA: ssd_scan_bwd_workspace(p) bytes
};

inline int64_t ssd_num_chunks(int64_t len, int64_t chunk_len) {
  return (len + chunk_len - 1) / chunk_len;
}

HYDRA_DECLARE_KERNEL(ssd_scan_fwd, SsdScanParams)
HYDRA_DECLARE_KERNEL(ssd_scan_bwd, SsdScanBwdParams)

namespace cuda {
// Whether the CUDA kernels take these sizes (chunk_len and head_dim at most 64, state at most 16,
// f32 or bf16); the op composes the form from other ops where they do not.
bool ssd_scan_supported(const SsdScanParams& p);
size_t ssd_scan_fwd_workspace(const SsdScanParams& p);
size_t ssd_scan_bwd_workspace(const SsdScanBwdParams& p);
}  // namespace cuda

}  // namespace hydra::kernels
