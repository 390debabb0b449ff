#include "kernels/loss.h"

#include <algorithm>
#include <cmath>

#include "kernels/base/parallel.h"
#include "kernels/cpu/common.h"

namespace hydra::kernels::cpu {

void cross_entropy_fwd(const CrossEntropyParams& p) {
  dispatch_float(p.dtype, "cross_entropy", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_index(p.target_dtype, "cross_entropy", [&](auto itag) {
      using I = typename decltype(itag)::type;
      const T* x = static_cast<const T*>(p.logits);
      const I* tgt = static_cast<const I*>(p.targets);
      T* loss = static_cast<T*>(p.loss);
      T* lse = static_cast<T*>(p.lse);
      for (int64_t r = 0; r < p.rows; ++r) {
        HYDRA_CHECK(tgt[r] == p.ignore_index || (tgt[r] >= 0 && tgt[r] < p.vocab))
            << "cross_entropy: target " << static_cast<int64_t>(tgt[r]) << " at row " << r
            << " is outside the vocabulary [0, " << p.vocab << ") and is not ignore_index "
            << p.ignore_index;
      }
      const int64_t V = p.vocab;
      parallel_for(p.rows, grain_for(V), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const T* xr = x + r * V;
          const double mx = *std::max_element(xr, xr + V);
          double sum = 0;
          for (int64_t j = 0; j < V; ++j) sum += std::exp(double(xr[j]) - mx);
          const double l = std::log(sum) + mx;
          lse[r] = static_cast<T>(l);
          loss[r] = tgt[r] == p.ignore_index ? T(0) : static_cast<T>(l - double(xr[tgt[r]]));
          if (p.counted) static_cast<T*>(p.counted)[r] = tgt[r] == p.ignore_index ? T(0) : T(1);
        }
      });
    });
  });
}

void cross_entropy_mean(const CrossEntropyMeanParams& p) {
  dispatch_float(p.dtype, "cross_entropy_mean", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* loss = static_cast<const T*>(p.loss);
    const T* counted = static_cast<const T*>(p.counted);
    double s = 0, c = 0;
    for (int64_t r = 0; r < p.rows; ++r) {
      s += loss[r];
      c += counted[r];
    }
    const double d = std::max(c, 1.0);
    *static_cast<T*>(p.out) = static_cast<T>(s / d);
    *static_cast<T*>(p.inv) = static_cast<T>(1.0 / d);
  });
}

void cross_entropy_bwd(const CrossEntropyBwdParams& p) {
  dispatch_float(p.dtype, "cross_entropy_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_index(p.target_dtype, "cross_entropy_backward", [&](auto itag) {
      using I = typename decltype(itag)::type;
      const T* x = static_cast<const T*>(p.logits);
      const I* tgt = static_cast<const I*>(p.targets);
      const T* lse = static_cast<const T*>(p.lse);
      const T* grow = static_cast<const T*>(p.grow);
      T* gx = static_cast<T*>(p.glogits);
      const int64_t V = p.vocab;
      parallel_for(p.rows, grain_for(V), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          T* gr = gx + r * V;
          if (tgt[r] == p.ignore_index) {
            std::fill(gr, gr + V, T(0));
            continue;
          }
          const T* xr = x + r * V;
          const double g = grow[r], l = lse[r];
          for (int64_t j = 0; j < V; ++j) gr[j] = static_cast<T>(g * std::exp(double(xr[j]) - l));
          gr[tgt[r]] -= static_cast<T>(g);
        }
      });
    });
  });
}

}  // namespace hydra::kernels::cpu
