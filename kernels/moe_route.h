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
//
// With tile > 0 the dispatch order is tiled: each expert's rows start at a multiple of `tile`
// (expert e at the earlier experts' rows, each rounded up to whole tiles), the rows between
// groups and after the last are padding (perm 0: a valid token row, whose result nothing reads
// back; widx batch * chunks * experts: one past the last pair, a weight row the caller appends
// with weight 0, so that a padding row adds nothing and gets no gradient), perm and widx hold
// moe_route_slots(p) entries, and tiles[t] (moe_route_tiles(p) entries) names the expert of rows [t
// * tile, (t + 1) * tile), -1 past the last expert's. Every size a GEMM over the tiles needs is
// then known on the host without the counts.
#pragma once

#include <algorithm>

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
  int64_t tile = 0;            // > 0: the tiled dispatch order (above)
  int64_t* tiles = nullptr;    // [moe_route_tiles(p)] with tile > 0
  void* workspace = nullptr;   // CUDA: moe_route_workspace(p) bytes
  void* stream = nullptr;
};

// Entries of perm and widx: every kept pair's tokens (packed), or that rounded up to whole tiles
// plus one tile per expert (tiled: each group's last tile may be partly padding).
inline int64_t moe_route_slots(const MoeRouteParams& p) {
  const int64_t packed = p.batch * p.chunks * std::min(p.max_active, p.experts) * p.chunk_len;
  return p.tile > 0 ? ((packed + p.tile - 1) / p.tile + p.experts) * p.tile : packed;
}
inline int64_t moe_route_tiles(const MoeRouteParams& p) {
  return p.tile > 0 ? moe_route_slots(p) / p.tile : 0;
}
// The first row of expert e's group: the earlier experts' rows (tiled: each rounded up to tiles).
HYDRA_HD int64_t moe_route_group_start(const MoeRouteParams& p, const int64_t* counts, int64_t e) {
  int64_t at = 0;
  for (int64_t k = 0; k < e; ++k) {
    const int64_t rows = counts[k] * p.chunk_len;
    at += p.tile > 0 ? (rows + p.tile - 1) / p.tile * p.tile : rows;
  }
  return at;
}

HYDRA_DECLARE_KERNEL(moe_route, MoeRouteParams)

namespace cuda {
size_t moe_route_workspace(const MoeRouteParams& p);
}

}  // namespace hydra::kernels
