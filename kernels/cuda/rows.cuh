// Rows held in registers. Each thread loads ITEMS packs of 16 bytes (8 bf16, 4 f32, 2 f64) once, so
// a kernel reads each element once and writes it once. Two ways to own a row:
//   WarpRow:  a warp per row, 8 rows per 256-thread block; reductions are warp shuffles only (rows
//   of
//             up to 256 packs: 2048 bf16, 1024 f32).
//   BlockRow: a block per row (up to 8192 packs); reductions go through shared memory.
// Used when a row's length is a multiple of the pack and its base is 16-byte aligned; the kernels
// fall back to element-wise loops otherwise.
#pragma once

#include <algorithm>
#include <type_traits>

#include "kernels/cuda/common.cuh"

namespace hydra::kernels::cuda {

template <class T>
struct alignas(16) RowPack {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

template <class T>
constexpr int pack_width() {
  return RowPack<T>::kN;
}

__host__ __device__ inline bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

template <class A>
__device__ __forceinline__ MaxSum<A> warp_max_sum(MaxSum<A> v) {
  for (int o = 16; o > 0; o >>= 1)
    v = combine(
        v, MaxSum<A>{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)});
  return v;
}

constexpr int kWarpRowsPerBlock = 8;

struct WarpRow {
  static constexpr bool kWarp = true;
  static constexpr int kMaxThreads = 32 * kWarpRowsPerBlock;
  __device__ static int64_t row() {
    return blockIdx.x * int64_t(kWarpRowsPerBlock) + (threadIdx.x >> 5);
  }
  __device__ static int lane() { return threadIdx.x & 31; }
  __device__ static int width() { return 32; }
  template <class A>
  __device__ static A sum(A v, A*) {
    return warp_sum(v);
  }
  template <class A>
  __device__ static MaxSum<A> max_sum(MaxSum<A> v, A*, A*) {
    return warp_max_sum(v);
  }
};

struct BlockRow {
  static constexpr bool kWarp = false;
  static constexpr int kMaxThreads = 1024;
  __device__ static int64_t row() { return blockIdx.x; }
  __device__ static int lane() { return threadIdx.x; }
  __device__ static int width() { return blockDim.x; }
  template <class A>
  __device__ static A sum(A v, A* shared) {
    return block_sum(v, shared);
  }
  template <class A>
  __device__ static MaxSum<A> max_sum(MaxSum<A> v, A* shared_m, A* shared_s) {
    return block_max_sum(v, shared_m, shared_s);
  }
};

// Blocks per SM a row kernel asks the compiler to fit (__launch_bounds__' second argument): short
// warp rows (one or two packs per lane) are latency-bound, so a kernel holding one row at a time
// trades registers for resident warps (5 blocks of 256 threads: at most 48 registers). Other
// layouts leave the compiler free.
template <class P, int ITEMS, class T>
constexpr int row_min_blocks() {
  return P::kWarp && ITEMS <= 2 && sizeof(T) <= 4 ? 5 : 1;
}

// How rows of `cols` elements are laid out: ITEMS packs per thread.
struct RowLayout {
  int items = 0;  // 1, 2, 4 or 8; 0 = rows do not fit (use the element-wise kernels)
  bool warp = false;
  int threads = 0;  // per block
  unsigned int blocks(int64_t rows) const {
    return static_cast<unsigned int>(warp ? (rows + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock
                                          : rows);
  }
};

// max_warp_items: the most packs per lane a kernel may hold in the warp layout (its register
// budget: a kernel holding several rows at once takes fewer); longer rows use the block layout.
inline RowLayout row_layout(int64_t cols, int width, int max_warp_items = 8) {
  if (cols % width != 0 || cols == 0) return {};
  const int64_t packs = cols / width;
  for (int items : {1, 2, 4, 8})
    if (items <= max_warp_items && packs <= 32 * items)
      return {items, true, 32 * kWarpRowsPerBlock};
  // Block rows: at least two packs per thread where a row allows 64 threads that way, so that a
  // block has twice the loads in flight (one pack per thread left an H200's bandwidth unused).
  for (int items : {1, 2, 4, 8}) {
    const int64_t t = (packs + items - 1) / items;
    if (items == 1 && packs >= 128) continue;
    if (t <= 1024)
      return {items, false, static_cast<int>(std::max<int64_t>(32, (t + 31) / 32 * 32))};
  }
  return {};
}

// Calls fn(std::integral_constant<int, ITEMS>{}, Policy{}) for the layout; kMaxWarpItems must be
// the max_warp_items the layout was made with (warp instantiations above it are not compiled).
template <int kMaxWarpItems, class F>
void dispatch_layout(const RowLayout& l, F&& fn) {
  auto with_items = [&](auto policy, auto max_items) {
    constexpr int kMax = decltype(max_items)::value;
    switch (l.items) {
      case 1:
        return fn(std::integral_constant<int, 1>{}, policy);
      case 2:
        if constexpr (kMax >= 2) return fn(std::integral_constant<int, 2>{}, policy);
        break;
      case 4:
        if constexpr (kMax >= 4) return fn(std::integral_constant<int, 4>{}, policy);
        break;
      case 8:
        if constexpr (kMax >= 8) return fn(std::integral_constant<int, 8>{}, policy);
        break;
      default:
        break;
    }
    HYDRA_FAIL() << "row layout: unsupported items " << l.items;
  };
  if (l.warp) {
    with_items(WarpRow{}, std::integral_constant<int, kMaxWarpItems>{});
  } else {
    with_items(BlockRow{}, std::integral_constant<int, 8>{});
  }
}

// Pack k of this thread is pack lane + k * width of the row, when inside it.
template <class T, int ITEMS, class P>
struct RowRegs {
  RowPack<T> p[ITEMS];
  bool in[ITEMS];
  __device__ void load(const T* row, int64_t packs) {
    const auto* src = reinterpret_cast<const RowPack<T>*>(row);
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int64_t i = index(k);
      in[k] = i < packs;
      if (in[k]) p[k] = src[i];
    }
  }
  __device__ compute_t<T> at(int k, int j) const { return convert<compute_t<T>>(p[k].v[j]); }
  __device__ static int64_t index(int k) { return P::lane() + int64_t(k) * P::width(); }
  __device__ static int64_t col(int k, int j) { return index(k) * RowPack<T>::kN + j; }
};

}  // namespace hydra::kernels::cuda
