// Same Philox stream as the CPU kernel (kernels/cpu/random.cpp): element i = lane i%4 of block
// offset + i/4; values agree with the CPU up to the last bits of the transcendental functions.
#include "kernels/base/philox.h"
#include "kernels/cuda/common.cuh"
#include "kernels/random.h"

namespace hydra::kernels::cuda {
namespace {

template <class T>
__global__ void random_kernel(T* __restrict__ dst, int64_t n, uint64_t seed, uint64_t offset,
                              double a, double b, bool normal) {
  const int64_t blocks = (n + 3) / 4;
  for (int64_t blk = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; blk < blocks;
       blk += int64_t(gridDim.x) * blockDim.x) {
    const Philox4x32 r = Philox4x32::generate(seed, offset + static_cast<uint64_t>(blk));
    double v[4];
    if (normal) {
      for (int j = 0; j < 4; j += 2) {
        const double u1 = Philox4x32::to_unit(r.v[j]);
        const double u2 = Philox4x32::to_unit(r.v[j + 1]);
        const double rad = sqrt(-2.0 * log(u1));
        v[j] = a + b * rad * cos(6.283185307179586 * u2);
        v[j + 1] = a + b * rad * sin(6.283185307179586 * u2);
      }
    } else {
      for (int j = 0; j < 4; ++j) {
        if constexpr (std::is_integral_v<T>) {
          v[j] = floor(a + (b - a) *
                               (r.v[j] * 2.3283064365386963e-10));  // all 32 bits: wide ranges too
        } else {
          v[j] = a + (b - a) * ((r.v[j] >> 8) * 5.9604644775390625e-8);
        }
      }
    }
    for (int j = 0; j < 4; ++j) {
      const int64_t i = blk * 4 + j;
      if (i < n) dst[i] = convert<T>(v[j]);
    }
  }
}

}  // namespace

void fill_random(const RandomParams& p) {
  if (p.n == 0) return;
  dispatch_all(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    random_kernel<T><<<blocks_for((p.n + 3) / 4, 256), 256, 0, as_stream(p.stream)>>>(
        static_cast<T*>(p.dst), p.n, p.seed, p.offset, p.a, p.b, p.dist == RandomDist::kNormal);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace hydra::kernels::cuda
