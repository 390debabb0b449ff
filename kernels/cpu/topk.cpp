#include "kernels/topk.h"

#include <algorithm>
#include <numeric>
#include <vector>

#include "kernels/base/parallel.h"
#include "kernels/cpu/common.h"

namespace hydra::kernels::cpu {

void topk(const TopkParams& p) {
  HYDRA_CHECK(p.k >= 0 && p.k <= p.cols)
      << "topk: k = " << p.k << " must be in [0, " << p.cols << "]";
  dispatch_float(p.dtype, "topk", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* x = static_cast<const T*>(p.x);
    T* values = static_cast<T*>(p.values);
    int64_t* indices = static_cast<int64_t*>(p.indices);
    parallel_for(p.rows, grain_for(p.cols), [&](int64_t r0, int64_t r1) {
      std::vector<int64_t> order(p.cols);
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = x + r * p.cols;
        std::iota(order.begin(), order.end(), int64_t{0});
        std::partial_sort(
            order.begin(), order.begin() + p.k, order.end(),
            [xr](int64_t a, int64_t b) { return xr[a] > xr[b] || (xr[a] == xr[b] && a < b); });
        for (int64_t j = 0; j < p.k; ++j) {
          values[r * p.k + j] = xr[order[j]];
          indices[r * p.k + j] = order[j];
        }
      }
    });
  });
}

}  // namespace hydra::kernels::cpu
