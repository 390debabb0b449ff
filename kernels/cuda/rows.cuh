// Rows held in registers: a block owns one row (or a group of rows); each thread loads ITEMS packs of
// 16 bytes (8 bf16, 4 f32, 2 f64) once, so a kernel reads each element once and writes it once.
// Used when a row's length is a multiple of the pack and its base is 16-byte aligned; the kernels fall
// back to element-wise loops otherwise.
#pragma once

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

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// The register layout for rows of `cols` elements: ITEMS packs per thread over `threads` threads.
struct RowLayout {
  int items = 0;    // 1, 2, 4 or 8; 0 = rows do not fit (use the element-wise kernels)
  int threads = 0;
};

inline RowLayout row_layout(int64_t cols, int width) {
  if (cols % width != 0) return {};
  const int64_t packs = cols / width;
  for (int items : {1, 2, 4, 8}) {
    const int64_t t = (packs + items - 1) / items;
    if (t <= 1024) return {items, static_cast<int>(std::max<int64_t>(32, (t + 31) / 32 * 32))};
  }
  return {};
}

// Calls fn(std::integral_constant<int, ITEMS>{}) for the layout's ITEMS.
template <class F>
void dispatch_items(int items, F&& fn) {
  switch (items) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    case 8: return fn(std::integral_constant<int, 8>{});
    default: HYDRA_FAIL() << "row layout: unsupported items " << items;
  }
}

// Loads pack k of this thread (pack index threadIdx.x + k * blockDim.x) if it is inside the row.
template <class T, int ITEMS>
struct RowRegs {
  RowPack<T> p[ITEMS];
  bool in[ITEMS];
  __device__ void load(const T* row, int64_t packs) {
    const auto* src = reinterpret_cast<const RowPack<T>*>(row);
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int64_t i = threadIdx.x + int64_t(k) * blockDim.x;
      in[k] = i < packs;
      if (in[k]) p[k] = src[i];
    }
  }
  __device__ compute_t<T> at(int k, int j) const { return convert<compute_t<T>>(p[k].v[j]); }
  __device__ static int64_t col(int k, int j) { return (threadIdx.x + int64_t(k) * blockDim.x) * RowPack<T>::kN + j; }
};

}  // namespace hydra::kernels::cuda
