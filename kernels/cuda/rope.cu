// Rotary position embedding: a thread per (token, frequency), looping over the heads, so the
// angle's sine and cosine are computed once per token and frequency (in double, as the CPU
// reference: angles reach len * 1 rad, where fp32 argument reduction would lose digits).
#include "kernels/cuda/common.cuh"
#include "kernels/rope.h"

namespace hydra::kernels::cuda {
namespace {

template <class T>
__global__ void rope_kernel(RopeParams p, int64_t total) {
  using C = compute_t<T>;
  const int64_t half = p.head_dim / 2;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e % half, r = e / half;
    const double freq = pow(p.theta, -2.0 * double(i) / double(p.head_dim));
    double sd, cd;
    sincos(double(p.pos0 + r % p.len) * freq, &sd, &cd);
    const C c = C(cd), s = C(p.inverse ? -sd : sd);
    for (int64_t h = 0; h < p.heads; ++h) {
      const T* xi = x + r * p.x_row + h * p.head_dim;
      T* yi = y + (r * p.heads + h) * p.head_dim;
      const C a = load(xi, i), b = load(xi, i + half);
      yi[i] = convert<T>(a * c - b * s);
      yi[i + half] = convert<T>(a * s + b * c);
    }
  }
}

}  // namespace

void rope(const RopeParams& p) {
  HYDRA_CHECK(p.head_dim % 2 == 0) << "rope: head_dim " << p.head_dim << " must be even";
  const int64_t total = p.batch * p.len * (p.head_dim / 2);
  if (total == 0 || p.heads == 0) return;
  dispatch_float(p.dtype, "rope", [&](auto tag) {
    using T = typename decltype(tag)::type;
    rope_kernel<T><<<blocks_for(total, 256), 256, 0, as_stream(p.stream)>>>(p, total);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace hydra::kernels::cuda
