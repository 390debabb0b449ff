#include "kernels/random.h"

#include <cmath>

#include "kernels/base/parallel.h"
#include "kernels/base/philox.h"
#include "kernels/cpu/common.h"

namespace hydra::kernels::cpu {

void fill_random(const RandomParams& p) {
  const int64_t blocks = (p.n + 3) / 4;
  dispatch_all(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* dst = static_cast<T*>(p.dst);
    parallel_for(blocks, 4096, [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) {
        const Philox4x32 r = Philox4x32::generate(p.seed, p.offset + static_cast<uint64_t>(blk));
        double v[4];
        if (p.dist == RandomDist::kNormal) {
          for (int j = 0; j < 4; j += 2) {
            const double u1 = Philox4x32::to_unit(r.v[j]);
            const double u2 = Philox4x32::to_unit(r.v[j + 1]);
            const double rad = std::sqrt(-2.0 * std::log(u1));
            v[j] = p.a + p.b * rad * std::cos(6.283185307179586 * u2);
            v[j + 1] = p.a + p.b * rad * std::sin(6.283185307179586 * u2);
          }
        } else {
          for (int j = 0; j < 4; ++j) {
            // u in [0, 1): 24 bits for floating point; all 32 for integers, so that a range wider
            // than 2^24 still reaches every value (24 bits would leave gaps of range / 2^24).
            if constexpr (std::is_integral_v<T>) {
              v[j] = std::floor(p.a + (p.b - p.a) * (r.v[j] * 2.3283064365386963e-10));
            } else {
              v[j] = p.a + (p.b - p.a) * ((r.v[j] >> 8) * 5.9604644775390625e-8);
            }
          }
        }
        for (int j = 0; j < 4; ++j) {
          const int64_t i = blk * 4 + j;
          if (i < p.n) dst[i] = cast<T>(v[j]);
        }
      }
    });
  });
}

}  // namespace hydra::kernels::cpu
