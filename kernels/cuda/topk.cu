// Top-k along rows, in the order (value descending, index ascending): ties go to the lower index.
// f32 and bf16 rows of up to 256 elements: a warp sorts the whole row with a bitonic network (each
// element a 64-bit key, the value's order-preserving bits above the complemented index, so that
// keys are distinct and their order is the selection order), 8 rows per block; about 20 shuffle
// stages for 64 elements where picking 32 one at a time takes 32 warp reductions. Longer rows
// (and f64): k times, pick the next element after the previous pick (no marks to store): rows of up
// to 1024 elements in a warp's registers, longer ones a block per row that rereads the row for each
// pick.
#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/topk.h"

namespace hydra::kernels::cuda {
namespace {

// a before b in the selection order.
template <class C>
__device__ __forceinline__ bool before(C va, int64_t ia, C vb, int64_t ib) {
  return va > vb || (va == vb && ia < ib);
}

// Every lane of the warp ends with the warp's first (value, index) in the selection order.
template <class C>
__device__ __forceinline__ void warp_first(C& v, int64_t& i) {
  for (int o = 16; o > 0; o >>= 1) {
    const C ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (before(ov, oi, v, i)) {
      v = ov;
      i = oi;
    }
  }
}

template <class T>
__global__ void topk_kernel(const T* __restrict x, T* __restrict values,
                            int64_t* __restrict indices, int64_t cols, int64_t k) {
  using C = compute_t<T>;
  __shared__ C sv[32];
  __shared__ int64_t si[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * cols;
  C prev_v = INFINITY;
  int64_t prev_i = -1;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int64_t r = 0; r < k; ++r) {
    C best_v = -INFINITY;
    int64_t best_i = INT64_MAX;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      const C v = load(xr, j);
      if (before(prev_v, prev_i, v, j) && before(v, j, best_v, best_i)) {
        best_v = v;
        best_i = j;
      }
    }
    warp_first(best_v, best_i);
    __syncthreads();
    if (lane == 0) {
      sv[warp] = best_v;
      si[warp] = best_i;
    }
    __syncthreads();
    best_v = lane < warps ? sv[lane] : C(-INFINITY);
    best_i = lane < warps ? si[lane] : INT64_MAX;
    warp_first(best_v, best_i);
    if (threadIdx.x == 0) {
      values[row * k + r] = convert<T>(best_v);
      indices[row * k + r] = best_i;
    }
    prev_v = best_v;
    prev_i = best_i;
  }
}

constexpr int kTopkWarpRows = 8;

template <class T, int ITEMS>
__global__ void __launch_bounds__(32 * kTopkWarpRows)
    topk_warp_kernel(const T* __restrict x, T* __restrict values, int64_t* __restrict indices,
                     int64_t rows, int64_t cols, int64_t k) {
  using C = compute_t<T>;
  const int64_t row = blockIdx.x * int64_t(kTopkWarpRows) + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warps
  const int lane = threadIdx.x & 31;
  const T* xr = x + row * cols;
  C v[ITEMS];
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int64_t j = lane + 32 * it;
    v[it] = j < cols ? load(xr, j) : C(-INFINITY);
  }
  C prev_v = INFINITY;
  int64_t prev_i = -1;
  for (int64_t r = 0; r < k; ++r) {
    C best_v = -INFINITY;
    int64_t best_i = INT64_MAX;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int64_t j = lane + 32 * it;
      if (j < cols && before(prev_v, prev_i, v[it], j) && before(v[it], j, best_v, best_i)) {
        best_v = v[it];
        best_i = j;
      }
    }
    warp_first(best_v, best_i);
    if (lane == 0) {
      values[row * k + r] = convert<T>(best_v);
      indices[row * k + r] = best_i;
    }
    prev_v = best_v;
    prev_i = best_i;
  }
}

// The key of value v at index j: larger keys first. -0 counts as +0 (they tie, as on the CPU).
__device__ __forceinline__ uint64_t topk_key(float v, int64_t j) {
  uint32_t u = __float_as_uint(v == 0.0f ? 0.0f : v);
  u ^= (u >> 31) != 0u ? 0xffffffffu : 0x80000000u;  // order-preserving: negative values flipped
  return (uint64_t(u) << 32) | uint64_t(0xffffffffu - uint32_t(j));
}

__device__ __forceinline__ float topk_value(uint64_t key) {
  uint32_t u = uint32_t(key >> 32);
  u ^= (u >> 31) != 0u ? 0x80000000u : 0xffffffffu;
  return __uint_as_float(u);
}

// A warp sorts a row of up to 32 * E elements (position p = lane + 32 e) into descending key order
// with a bitonic network, then writes the first k.
template <class T, int E>
__global__ void __launch_bounds__(32 * kTopkWarpRows)
    topk_bitonic_kernel(const T* __restrict x, T* __restrict values, int64_t* __restrict indices,
                        int64_t rows, int64_t cols, int64_t k) {
  constexpr int N = 32 * E;
  const int64_t row = blockIdx.x * int64_t(kTopkWarpRows) + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warps
  const int lane = threadIdx.x & 31;
  const T* xr = x + row * cols;
  uint64_t key[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int j = lane + 32 * e;
    key[e] = j < cols ? topk_key(float(load(xr, j)), j) : 0;  // padding sorts last
  }
#pragma unroll
  for (int s = 2; s <= N; s <<= 1) {
#pragma unroll
    for (int d = s >> 1; d > 0; d >>= 1) {
      if (d >= 32) {  // the partner is in this lane's registers
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const int e2 = e ^ (d >> 5);
          if (e2 < e) continue;
          const bool desc = ((lane + 32 * e) & s) == 0;
          const uint64_t a = key[e], b = key[e2];
          const bool swap = desc ? a < b : a > b;
          key[e] = swap ? b : a;
          key[e2] = swap ? a : b;
        }
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const int p = lane + 32 * e;
          const uint64_t other = __shfl_xor_sync(0xffffffffu, key[e], d);
          const bool desc = (p & s) == 0, lower = (p & d) == 0;
          const bool take_max = lower == desc;
          key[e] = take_max ? (key[e] > other ? key[e] : other) : (key[e] < other ? key[e] : other);
        }
      }
    }
  }
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int p = lane + 32 * e;
    if (p < k) {
      values[row * k + p] = convert<T>(topk_value(key[e]));
      indices[row * k + p] = int64_t(0xffffffffu - uint32_t(key[e] & 0xffffffffu));
    }
  }
}

}  // namespace

void topk(const TopkParams& p) {
  HYDRA_CHECK(p.k >= 0 && p.k <= p.cols)
      << "topk: k = " << p.k << " must be in [0, " << p.cols << "]";
  if (p.rows == 0 || p.k == 0) return;
  dispatch_float(p.dtype, "topk", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto* x = static_cast<const T*>(p.x);
    auto* values = static_cast<T*>(p.values);
    auto* indices = static_cast<int64_t*>(p.indices);
    // Rows in warps (8 a block): the bitonic sort up to 256 columns, else the repeated picks.
    const auto blocks = static_cast<unsigned>((p.rows + kTopkWarpRows - 1) / kTopkWarpRows);
    auto warp_rows = [&](auto kernel) {
      kernel<<<blocks, 32 * kTopkWarpRows, 0, as_stream(p.stream)>>>(x, values, indices, p.rows,
                                                                     p.cols, p.k);
    };
    if (!std::is_same_v<T, double> && p.cols <= 32 * 8) {
      if (p.cols <= 32)
        warp_rows(topk_bitonic_kernel<T, 1>);
      else if (p.cols <= 64)
        warp_rows(topk_bitonic_kernel<T, 2>);
      else if (p.cols <= 128)
        warp_rows(topk_bitonic_kernel<T, 4>);
      else
        warp_rows(topk_bitonic_kernel<T, 8>);
    } else if (p.cols <= 32 * 32) {
      if (p.cols <= 32 * 4)
        warp_rows(topk_warp_kernel<T, 4>);
      else if (p.cols <= 32 * 8)
        warp_rows(topk_warp_kernel<T, 8>);
      else if (p.cols <= 32 * 16)
        warp_rows(topk_warp_kernel<T, 16>);
      else
        warp_rows(topk_warp_kernel<T, 32>);
    } else {
      topk_kernel<T><<<p.rows, row_threads(p.cols, 4), 0, as_stream(p.stream)>>>(x, values, indices,
                                                                                 p.cols, p.k);
    }
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace hydra::kernels::cuda
