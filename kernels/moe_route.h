// Chunk routing of the mixture of experts on the device (model/moe.h): from the router's weights r
// and activations s [rows = batch * chunks, E], per chunk the max_active largest r_e whose s_e > 0
// (walking r in descending order, ties to the lower expert, stopping at the first s_e <= 0), then
// an optional capacity: expert e keeps the first `capacity` chunks (in chunk order) that chose it,
// the rest are dropped. Outputs the mask, per-expert counts, and the dispatch order: every token of
// every kept (chunk, expert) pair, expert-major, chunks ascending, tokens ascending, as
//   perm[i] = b * L + j * chunk_len + t   (the token's row in [B * L, d])
//   widx[i] = (b * chunks + j) * E + e    (the pair's row in the routing weights [B * chunks * E])
// so that rows perm[c_e .. c_e + counts[e] * chunk_len) go to expert e (c_e the earlier experts'
// rows); and its inverse, each token's dispatch positions i in ascending order (its experts in
// ascending order), padded with -1: inverse[token * K + k], K = min(max_active, experts).
#pragma once

#include "kernels/base/kernel.h"

namespace hydra::kernels {

struct MoeRouteParams {
  DType dtype = DType::kF32;  // of r, s and mask
  int64_t batch = 0, chunks = 0, experts = 0, chunk_len = 0, max_active = 0;
  int64_t capacity = 0;        // chunks per expert; <= 0: no capacity (dropless)
  const void* r = nullptr;     // [batch * chunks, experts] contiguous
  const void* s = nullptr;     // [batch * chunks, experts] contiguous
  void* mask = nullptr;        // [batch * chunks, experts]: 1 kept, 0 not
  int64_t* counts = nullptr;   // [experts]: kept chunks
  int64_t* dropped = nullptr;  // [experts]: chunks that chose e past its capacity
  int64_t* perm = nullptr;     // [batch * chunks * max_active * chunk_len] (a prefix is used)
  int64_t* widx = nullptr;     // the same length
  int64_t* inverse = nullptr;  // [batch * chunks * chunk_len, min(max_active, experts)] or null
  void* workspace = nullptr;   // CUDA: moe_route_workspace(p) bytes
  void* stream = nullptr;
};

HYDRA_DECLARE_KERNEL(moe_route, MoeRouteParams)

namespace cuda {
size_t moe_route_workspace(const MoeRouteParams& p);
}

}  // namespace hydra::kernels
