// Top-k along rows: a block per row picks, k times, the next element in the order (value descending,
// index ascending) among those after the previous pick: no marks to store, ties to the lower index.
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
__global__ void topk_kernel(const T* __restrict x, T* __restrict values, int64_t* __restrict indices, int64_t cols,
                            int64_t k) {
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

}  // namespace

void topk(const TopkParams& p) {
  HYDRA_CHECK(p.k >= 0 && p.k <= p.cols) << "topk: k = " << p.k << " must be in [0, " << p.cols << "]";
  if (p.rows == 0 || p.k == 0) return;
  dispatch_float(p.dtype, "topk", [&](auto tag) {
    using T = typename decltype(tag)::type;
    topk_kernel<T><<<p.rows, row_threads(p.cols, 4), 0, as_stream(p.stream)>>>(
        static_cast<const T*>(p.x), static_cast<T*>(p.values), static_cast<int64_t*>(p.indices), p.cols, p.k);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace hydra::kernels::cuda
