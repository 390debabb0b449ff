#include "kernels/rope.h"

#include <cmath>
#include <vector>

#include "kernels/base/parallel.h"
#include "kernels/cpu/common.h"

namespace hydra::kernels::cpu {

void rope(const RopeParams& p) {
  HYDRA_CHECK(p.head_dim % 2 == 0) << "rope: head_dim " << p.head_dim << " must be even";
  dispatch_float(p.dtype, "rope", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* x = static_cast<const T*>(p.x);
    T* y = static_cast<T*>(p.y);
    const int64_t half = p.head_dim / 2;
    std::vector<double> freq(half);
    for (int64_t i = 0; i < half; ++i)
      freq[i] = std::pow(p.theta, -2.0 * double(i) / double(p.head_dim));
    const double sign = p.inverse ? -1.0 : 1.0;
    parallel_for(p.batch * p.len, grain_for(p.heads * p.head_dim), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t pos = p.pos0 + r % p.len;
        for (int64_t i = 0; i < half; ++i) {
          const double ang = double(pos) * freq[i];
          const T c = static_cast<T>(std::cos(ang)), s = static_cast<T>(sign * std::sin(ang));
          for (int64_t h = 0; h < p.heads; ++h) {
            const T* xi = x + r * p.x_row + h * p.head_dim;
            T* yi = y + (r * p.heads + h) * p.head_dim;
            const T a = xi[i], b = xi[i + half];
            yi[i] = a * c - b * s;
            yi[i + half] = a * s + b * c;
          }
        }
      }
    });
  });
}

}  // namespace hydra::kernels::cpu
