// AdamW: a thread per element (dense) or per (row, column) of the listed rows (row-sparse).
#include <cmath>

#include "kernels/cuda/common.cuh"
#include "kernels/optim.h"

namespace hydra::kernels::cuda {
namespace {

struct Hyper {
  double lr, beta1, beta2, eps, decay, bc1, bc2, scale;
};

Hyper hyper(const AdamWParams& a) {
  return {a.lr, a.beta1, a.beta2, a.eps, 1 - a.lr * a.weight_decay, a.bias_correction1, a.bias_correction2,
          a.grad_scale};
}

template <class T>
__device__ __forceinline__ void update(T* p, const T* g, T* m, T* v, int64_t pi, int64_t gi, const Hyper& h) {
  using C = compute_t<T>;
  const C gr = load(g, gi) * C(h.scale);
  const C mi = C(h.beta1) * load(m, pi) + C(1 - h.beta1) * gr;
  const C vi = C(h.beta2) * load(v, pi) + C(1 - h.beta2) * gr * gr;
  m[pi] = convert<T>(mi);
  v[pi] = convert<T>(vi);
  p[pi] = convert<T>(load(p, pi) * C(h.decay) - C(h.lr) * (mi / C(h.bc1)) / (sqrt(vi / C(h.bc2)) + C(h.eps)));
}

template <class T>
__global__ void adamw_kernel(T* p, const T* g, T* m, T* v, int64_t n, Hyper h) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    update(p, g, m, v, i, i, h);
}

template <class T>
__global__ void adamw_rows_kernel(T* p, const T* g, T* m, T* v, const int64_t* rows, int64_t k, int64_t cols, Hyper h) {
  const int64_t total = k * cols;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = e / cols, c = e % cols;
    update(p, g, m, v, rows[j] * cols + c, e, h);
  }
}

}  // namespace

void adamw_step(const AdamWParams& a) {
  if (a.n == 0) return;
  dispatch_float(a.dtype, "adamw", [&](auto tag) {
    using T = typename decltype(tag)::type;
    adamw_kernel<T><<<blocks_for(a.n, 256), 256, 0, as_stream(a.stream)>>>(
        static_cast<T*>(a.param), static_cast<const T*>(a.grad), static_cast<T*>(a.m), static_cast<T*>(a.v), a.n,
        hyper(a));
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

void adamw_rows_step(const AdamWRowsParams& r) {
  if (r.k == 0) return;
  const AdamWParams& a = r.base;
  dispatch_float(a.dtype, "adamw_rows", [&](auto tag) {
    using T = typename decltype(tag)::type;
    adamw_rows_kernel<T><<<blocks_for(r.k * r.cols, 256), 256, 0, as_stream(a.stream)>>>(
        static_cast<T*>(a.param), static_cast<const T*>(a.grad), static_cast<T*>(a.m), static_cast<T*>(a.v), r.rows,
        r.k, r.cols, hyper(a));
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace hydra::kernels::cuda
