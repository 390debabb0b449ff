// MoE chunk routing on the device (kernels/moe_route.h) in three launches, no host round trip:
//   1. a thread per chunk picks its experts (max_active argmax passes over E: ties to the lower
//   expert,
//      as a stable descending sort walks them), into `cand`;
//   2. a block per expert scans `cand` down the chunks: each chosen pair's rank among the expert's
//      chunks (in chunk order), which decides the capacity and the pair's place in the dispatch
//      order; the expert's kept and dropped counts;
//   3. a thread per (chunk, expert, token) writes perm and widx at (earlier experts' kept chunks +
//      rank) * chunk_len + token, and that position into the token's inverse entry (its place
//      among the chunk's kept experts; the rest were set to -1 before).
// Every output is a function of the inputs alone (fixed scans, no atomics).
#include <algorithm>

#include "kernels/cuda/common.cuh"
#include "kernels/moe_route.h"

namespace hydra::kernels::cuda {
namespace {

constexpr int kSelectThreads = 128, kRankThreads = 1024, kScatterThreads = 256;

template <class T>
__global__ void __launch_bounds__(kSelectThreads)
    route_select_kernel(MoeRouteParams p, int32_t* __restrict cand) {
  const int64_t rows = p.batch * p.chunks, E = p.experts;
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const T *r = static_cast<const T*>(p.r) + row * E, *s = static_cast<const T*>(p.s) + row * E;
  int32_t* c = cand + row * E;
  for (int64_t e = 0; e < E; ++e) c[e] = 0;
  for (int64_t k = 0; k < p.max_active && k < E; ++k) {
    int64_t best = -1;
    compute_t<T> bv = 0;
    for (int64_t e = 0; e < E; ++e) {
      if (c[e]) continue;
      const compute_t<T> v = load(r, e);
      if (best < 0 || v > bv) {
        best = e;
        bv = v;
      }
    }
    if (best < 0 || !(load(s, best) > compute_t<T>(0))) break;
    c[best] = 1;
  }
}

template <class T>
__global__ void __launch_bounds__(kRankThreads)
    route_rank_kernel(MoeRouteParams p, const int32_t* __restrict cand, int32_t* __restrict rank) {
  __shared__ int32_t warp_total[kRankThreads / 32];
  const int64_t rows = p.batch * p.chunks, E = p.experts, e = blockIdx.x;
  const int64_t cap = p.capacity > 0 ? p.capacity : rows + 1;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t total = 0;
  for (int64_t base = 0; base < rows; base += kRankThreads) {
    const int64_t row = base + threadIdx.x;
    const int32_t v = row < rows ? cand[row * E + e] : 0;
    int32_t incl = v;  // inclusive scan over the warp, then over the warps' totals
    for (int o = 1; o < 32; o <<= 1) {
      const int32_t n = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += n;
    }
    if (lane == 31) warp_total[warp] = incl;
    __syncthreads();
    int32_t before = 0, block_total = 0;
    for (int w = 0; w < kRankThreads / 32; ++w) {
      if (w < warp) before += warp_total[w];
      block_total += warp_total[w];
    }
    if (row < rows) {
      const int64_t excl = total + before + incl - v;
      rank[row * E + e] = static_cast<int32_t>(excl);
      store(static_cast<T*>(p.mask), row * E + e, (v && excl < cap) ? 1.0f : 0.0f);
    }
    total += block_total;
    __syncthreads();  // warp_total is rewritten by the next tile
  }
  if (threadIdx.x == 0) {
    p.counts[e] = total < cap ? total : cap;
    p.dropped[e] = total - p.counts[e];
  }
}

__global__ void __launch_bounds__(kScatterThreads)
    route_scatter_kernel(MoeRouteParams p, const int32_t* __restrict cand,
                         const int32_t* __restrict rank) {
  const int64_t E = p.experts, c = p.chunk_len, n = p.batch * p.chunks * E * c;
  const int64_t cap = p.capacity > 0 ? p.capacity : p.batch * p.chunks + 1;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i % c, pair = i / c, e = pair % E, row = pair / E;
    if (!cand[pair] || rank[pair] >= cap) continue;
    const int64_t at = moe_route_group_start(p, p.counts, e) + rank[pair] * c + t,
                  b = row / p.chunks, j = row % p.chunks;
    const int64_t token = b * p.chunks * c + j * c + t;
    p.perm[at] = token;
    p.widx[at] = pair;
    if (p.inverse) {
      int64_t slot = 0;  // kept experts of this chunk below e
      for (int64_t k = 0; k < e; ++k) slot += cand[row * E + k] && rank[row * E + k] < cap;
      p.inverse[token * min(p.max_active, E) + slot] = at;
    }
  }
}

__global__ void fill_i64_kernel(int64_t* __restrict out, int64_t n, int64_t value) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = value;
}

// Tiled order: the expert of each tile (-1 past the last group), a thread per tile.
__global__ void route_tiles_kernel(MoeRouteParams p, int64_t ntiles) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= ntiles) return;
  int64_t owner = -1, start = 0;
  for (int64_t e = 0; e < p.experts && owner < 0; ++e) {
    const int64_t n = (p.counts[e] * p.chunk_len + p.tile - 1) / p.tile;
    if (t * p.tile >= start && t * p.tile < start + n * p.tile) owner = e;
    start += n * p.tile;
  }
  p.tiles[t] = owner;
}

}  // namespace

size_t moe_route_workspace(const MoeRouteParams& p) {
  return 2 * static_cast<size_t>(p.batch * p.chunks * p.experts) * sizeof(int32_t) + 16;
}

void moe_route(const MoeRouteParams& p) {
  const int64_t rows = p.batch * p.chunks;
  if (p.experts == 0) return;
  auto* cand = static_cast<int32_t*>(p.workspace);
  int32_t* rank = cand + rows * p.experts;
  cudaStream_t st = as_stream(p.stream);
  dispatch_float(p.dtype, "moe_route", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (rows > 0) {
      route_select_kernel<T><<<blocks_for(rows, kSelectThreads), kSelectThreads, 0, st>>>(p, cand);
      HYDRA_CUDA_LAUNCH_CHECK();
    }
    route_rank_kernel<T><<<static_cast<unsigned>(p.experts), kRankThreads, 0, st>>>(p, cand, rank);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
  const int64_t n = rows * p.experts * p.chunk_len;
  if (p.tile > 0) {  // padding rows name token 0 and the pair past the last
    const int64_t slots = moe_route_slots(p), ntiles = moe_route_tiles(p);
    HYDRA_CUDA_CHECK(cudaMemsetAsync(p.perm, 0, sizeof(int64_t) * slots, st));
    fill_i64_kernel<<<blocks_for(slots, 256), 256, 0, st>>>(p.widx, slots, rows * p.experts);
    HYDRA_CUDA_LAUNCH_CHECK();
    if (ntiles > 0) {
      route_tiles_kernel<<<blocks_for(ntiles, 128), 128, 0, st>>>(p, ntiles);
      HYDRA_CUDA_LAUNCH_CHECK();
    }
  }
  if (p.inverse && n > 0 && p.max_active > 0)
    HYDRA_CUDA_CHECK(cudaMemsetAsync(
        p.inverse, 0xff, sizeof(int64_t) * rows * p.chunk_len * std::min(p.max_active, p.experts),
        st));
  if (n > 0) {
    route_scatter_kernel<<<blocks_for(n, kScatterThreads), kScatterThreads, 0, st>>>(p, cand, rank);
    HYDRA_CUDA_LAUNCH_CHECK();
  }
}

}  // namespace hydra::kernels::cuda
