// BlockFFN's auxiliary losses of one MoE layer, fused (model/moe.cpp, spec/blockffn.md): from the
// router's raw logits, its ReLU output s = relu(raw) and its RMSNorm output r, all [batch, chunks,
// experts], and each expert's share of the kept pairs load [experts]:
//
//   balance  = balance_scale  * sum_{b,t,e} q[b,t,e] load[e],      q = r / (sum_e r + 1e-5)
//   locality = locality_scale * ( sum_{b, t < chunks-1, e} bce(z[b,t,e], sigmoid(z[b,t+1,e]))
//                                 + [z_next] sum_{b,e} bce(z[b,chunks-1,e], sigmoid(z_next[b,e]))
//                                 + (chunk_len - 1) sum_{b,t,e} bce(z[b,t,e], sigmoid(z[b,t,e])) )
//   sparsity = sparsity_scale * sum_{b, g < chunks / group, e}
//                                 (1 - exp(chunk_len * sum_{t in group g} log(1 - p[b,t,e] +
//                                 1e-5)))
//
// with z = alpha * raw, bce(x, y) = softplus(x) - x y (the target y taken as a constant, so the
// within-chunk term has a value but no gradient), p = s / (sum_e s + 1e-5), and z_next the next
// sequence shard's first chunk logits (alpha * raw there; absent on the last shard). The forward
// writes out[2][3]: row 0 the three losses times `weights`, row 1 the three losses. The backward
// takes gout[2][3] and writes graw, gs and gr. The composed reference (the same mathematics as
// separate ops) is moe_blockffn_{locality,sparsity}_sum in model/moe.cpp; these replace about 95
// launches a layer and step (forward and backward) with 6.
//
// Every sum runs in a fixed order (deterministic); accumulation in fp32 (fp64 for f64).
#pragma once

#include <cstddef>

#include "kernels/base/kernel.h"

namespace hydra::kernels {

struct MoeAuxParams {
  DType dtype = DType::kF32;  // of raw, s, r, load, z_next and out
  int64_t batch = 0, chunks = 0, experts = 0;
  int64_t chunk_len = 1;  // tokens per chunk
  int64_t group = 1;      // chunks per sparsity group (only whole groups count)
  double alpha = 1.0;
  double balance_scale = 0, locality_scale = 0, sparsity_scale = 0;
  double weights[3] = {1, 1, 1};  // row 0 of out: the losses times these
  const void* raw = nullptr;      // [batch, chunks, experts] contiguous
  const void* s = nullptr;
  const void* r = nullptr;
  const void* load = nullptr;    // [experts]
  const void* z_next = nullptr;  // [batch, experts] or null
  void* out = nullptr;           // [2, 3]
  void* workspace = nullptr;     // CUDA: moe_aux_workspace(p) bytes
  void* stream = nullptr;
};

struct MoeAuxBwdParams {
  MoeAuxParams fwd;
  const void* gout = nullptr;  // [2, 3]
  void* graw = nullptr;        // [batch, chunks, experts] each
  void* gs = nullptr;
  void* gr = nullptr;
  void* workspace = nullptr;  // CUDA: moe_aux_bwd_workspace(q) bytes
};

HYDRA_DECLARE_KERNEL(moe_aux_fwd, MoeAuxParams)
HYDRA_DECLARE_KERNEL(moe_aux_bwd, MoeAuxBwdParams)

namespace cuda {
size_t moe_aux_workspace(const MoeAuxParams& p);
size_t moe_aux_bwd_workspace(const MoeAuxBwdParams& q);
}  // namespace cuda

}  // namespace hydra::kernels
