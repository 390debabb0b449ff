#include "kernels/softmax.h"

#include <algorithm>
#include <cmath>

#include "kernels/base/parallel.h"
#include "kernels/cpu/common.h"

namespace hydra::kernels::cpu {

void softmax_fwd(const SoftmaxParams& p) {
  dispatch_float(p.dtype, "softmax", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* x = static_cast<const T*>(p.x);
    T* y = static_cast<T*>(p.y);
    const int64_t cols = p.cols;
    parallel_for(p.rows, grain_for(cols), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = x + r * cols;
        T* yr = y + r * cols;
        const T mx = *std::max_element(xr, xr + cols);
        double sum = 0;
        for (int64_t j = 0; j < cols; ++j) sum += std::exp(double(xr[j] - mx));
        if (p.log) {
          const T lse = static_cast<T>(std::log(sum)) + mx;
          for (int64_t j = 0; j < cols; ++j) yr[j] = xr[j] - lse;
        } else {
          const double inv = 1.0 / sum;
          for (int64_t j = 0; j < cols; ++j)
            yr[j] = static_cast<T>(std::exp(double(xr[j] - mx)) * inv);
        }
      }
    });
  });
}

void softmax_bwd(const SoftmaxBwdParams& p) {
  dispatch_float(p.dtype, "softmax_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* y = static_cast<const T*>(p.y);
    const T* gy = static_cast<const T*>(p.gy);
    T* gx = static_cast<T*>(p.gx);
    const int64_t cols = p.cols;
    parallel_for(p.rows, grain_for(cols), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* yr = y + r * cols;
        const T* gr = gy + r * cols;
        T* gxr = gx + r * cols;
        double s = 0;
        if (p.log) {
          for (int64_t j = 0; j < cols; ++j) s += double(gr[j]);
          for (int64_t j = 0; j < cols; ++j)
            gxr[j] = static_cast<T>(double(gr[j]) - std::exp(double(yr[j])) * s);
        } else {
          for (int64_t j = 0; j < cols; ++j) s += double(gr[j]) * double(yr[j]);
          for (int64_t j = 0; j < cols; ++j)
            gxr[j] = static_cast<T>(double(yr[j]) * (double(gr[j]) - s));
        }
      }
    });
  });
}

}  // namespace hydra::kernels::cpu
