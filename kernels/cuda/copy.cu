#include "kernels/copy.h"
#include "kernels/cuda/common.cuh"

namespace hydra::kernels::cuda {
namespace {

struct CopyGeometry {
  int ndim;
  int64_t shape[kMaxDims];
  int64_t src_strides[kMaxDims];
  int64_t dst_strides[kMaxDims];
};

template <class S, class D>
__global__ void strided_copy_kernel(const S* __restrict__ src, D* __restrict__ dst, CopyGeometry g,
                                    int64_t n) {
  wait_for_previous_grid();  // launched with launch_after_previous
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t rem = i, so = 0, dof = 0;
    for (int d = g.ndim - 1; d >= 0; --d) {
      const int64_t k = rem % g.shape[d];
      rem /= g.shape[d];
      so += k * g.src_strides[d];
      dof += k * g.dst_strides[d];
    }
    dst[dof] = convert<D>(src[so]);
  }
}

template <class T>
__global__ void fill_kernel(T* __restrict__ dst, int64_t n, T value) {
  wait_for_previous_grid();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = value;
}

}  // namespace

void strided_copy(const StridedCopyParams& p) {
  int64_t n = 1;
  CopyGeometry g{};
  g.ndim = p.ndim;
  for (int d = 0; d < p.ndim; ++d) {
    n *= p.shape[d];
    g.shape[d] = p.shape[d];
    g.src_strides[d] = p.src_strides[d];
    g.dst_strides[d] = p.dst_strides[d];
  }
  if (n == 0) return;
  dispatch_all(p.src_dtype, [&](auto st) {
    using S = typename decltype(st)::type;
    dispatch_all(p.dst_dtype, [&](auto dt) {
      using D = typename decltype(dt)::type;
      launch_after_previous(strided_copy_kernel<S, D>, dim3(blocks_for(n, 256)), dim3(256), 0, as_stream(p.stream),
                            static_cast<const S*>(p.src), static_cast<D*>(p.dst), g, n);
      HYDRA_CUDA_LAUNCH_CHECK();
    });
  });
}

void fill(const FillParams& p) {
  if (p.n == 0) return;
  dispatch_all(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T v = convert<T>(p.value);
    launch_after_previous(fill_kernel<T>, dim3(blocks_for(p.n, 256)), dim3(256), 0, as_stream(p.stream),
                          static_cast<T*>(p.dst), p.n, v);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace hydra::kernels::cuda
