// Causal attention with the sparse pattern of hydra.md section 3, flash-style: queries in tiles,
// keys in blocks, online softmax, blocks the pattern masks skipped; no L x L matrix. A key at
// position s is visible to a query at position t when s <= t and
//   t - s < window  (window <= 0: unlimited)  or  s is global  or  t is global,
// where p is global when global_stride > 0 and p % global_stride == 0 (so position 0 is global).
// Positions are q_pos0 + i and k_pos0 + j: a shard of queries can attend to keys from elsewhere.
// q, k, v are [B, Lq|Lk, H, dh] views whose consecutive tokens are *_row elements apart (slices of
// a fused qkv projection need no copy); out is contiguous [B, Lq, H, dh]; lse [B, H, Lq].
#pragma once

#include "kernels/base/kernel.h"

namespace hydra::kernels {

struct AttentionParams {
  DType dtype = DType::kF32;
  int64_t batch = 0, heads = 0, q_len = 0, k_len = 0, head_dim = 0;
  const void* q = nullptr;
  int64_t q_row = 0;
  const void* k = nullptr;
  int64_t k_row = 0;
  const void* v = nullptr;
  int64_t v_row = 0;
  void* out = nullptr;
  void* lse = nullptr;  // accumulate dtype; -inf for a query that sees no key
  int64_t window = 0;
  int64_t global_stride = 0;
  int64_t q_pos0 = 0, k_pos0 = 0;
  double scale = 1.0;
  void* stream = nullptr;
  void* workspace = nullptr;  // CUDA: attention_fwd_workspace(p) bytes (the forward alone)
};

// dq, dk, dv are contiguous [B, L, H, dh] and written (not accumulated).
struct AttentionBwdParams {
  AttentionParams fwd;  // with fwd.out and fwd.lse as the forward produced them (not workspace)
  const void* gout = nullptr;  // contiguous [B, Lq, H, dh]
  const void* glse =
      nullptr;  // [B, H, Lq] accumulate dtype, or null: the gradient of lse (merged partials)
  void* gq = nullptr;
  void* gk = nullptr;
  void* gv = nullptr;
  void* workspace = nullptr;  // CUDA: attention_bwd_workspace(p) bytes (dO . O per query, partials)
};

// Merging partial attentions of the same queries over disjoint key sets (sequence parallelism): per
// (batch, head, query), lse = log sum_i exp(lse_i) and out = sum_i w_i out_i with w_i = exp(lse_i -
// lse); a part with lse_i = -inf saw no key and weighs 0 (every part -inf: lse = -inf, out = 0).
// The parts are stacked: outs [P, B, L, H, dh] in `dtype`, lses [P, B, H, L] in its accumulate
// dtype; out and lse as one part.
struct MergeAttentionParams {
  DType dtype = DType::kF32;
  int64_t parts = 0, batch = 0, len = 0, heads = 0, head_dim = 0;
  const void* outs = nullptr;
  const void* lses = nullptr;
  void* out = nullptr;
  void* lse = nullptr;
  void* stream = nullptr;
};

// g_out_i = w_i g_out and g_lse_i = w_i (<g_out, out_i - out> + g_lse), with w_i = exp(lse_i - lse)
// from the forward's lse (0 where lse_i or lse is -inf). Both gradients are written, not
// accumulated.
struct MergeAttentionBwdParams {
  MergeAttentionParams fwd;    // with fwd.out and fwd.lse as the forward produced them
  const void* gout = nullptr;  // [B, L, H, dh], or null (zero)
  const void* glse = nullptr;  // [B, H, L] accumulate dtype, or null (zero)
  void* gouts = nullptr;       // [P, B, L, H, dh]
  void* glses = nullptr;       // [P, B, H, L]
};

HYDRA_DECLARE_KERNEL(attention_fwd, AttentionParams)
HYDRA_DECLARE_KERNEL(attention_bwd, AttentionBwdParams)
HYDRA_DECLARE_KERNEL(merge_attention_fwd, MergeAttentionParams)
HYDRA_DECLARE_KERNEL(merge_attention_bwd, MergeAttentionBwdParams)

namespace cuda {
size_t attention_fwd_workspace(const AttentionParams& p);
size_t attention_bwd_workspace(const AttentionBwdParams& p);
// Whether the runtime's cuDNN release can run its fused attention here (9.10.2 or later), and the
// forward and backward calls it has run in this process (HYDRA_ATTENTION).
bool attention_cudnn_available();
int64_t attention_cudnn_calls();
// The most scratch one cuDNN attention call may take (0: unset, then HYDRA_CUDNN_WORKSPACE_MB or a
// sixteenth of the device's memory, at least 1 GiB): a plan whose whole batch would take more runs
// fewer sequences a call. Returns the previous setting (tests lower it to make the split run).
// Plans built before a change keep their split.
int64_t attention_cudnn_set_max_workspace(int64_t bytes);
}  // namespace cuda

}  // namespace hydra::kernels
