// The product-key memory's kernels on the CPU (the reference): the embedding bag and the
// product-key indices (kernels/pkm.h).
#include "kernels/pkm.h"

#include <algorithm>
#include <cstring>

#include "kernels/base/parallel.h"
#include "kernels/cpu/common.h"

namespace hydra::kernels::cpu {

void embedding_bag_fwd(const EmbeddingBagParams& p) {
  dispatch_float(p.dtype, "embedding_bag", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_index(p.index_dtype, "embedding_bag", [&](auto itag) {
      using I = typename decltype(itag)::type;
      const I* idx = static_cast<const I*>(p.index);
      check_indices(idx, p.n * p.m, p.num_rows, "embedding_bag");
      const T* table = static_cast<const T*>(p.table);
      const T* w = static_cast<const T*>(p.weights);
      T* out = static_cast<T*>(p.out);
      parallel_for(p.n, grain_for(p.m * p.cols), [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          T* o = out + t * p.cols;
          std::fill(o, o + p.cols, T(0));
          for (int64_t k = 0; k < p.m; ++k) {
            const T wk = w[t * p.m + k];
            const T* row = table + static_cast<int64_t>(idx[t * p.m + k]) * p.cols;
            for (int64_t c = 0; c < p.cols; ++c) o[c] += wk * row[c];
          }
        }
      });
    });
  });
}

void product_key_indices(const ProductKeyParams& p) {
  if (p.cells) check_indices(p.pick, p.rows * p.count, p.num_cells, "product_key_indices");
  parallel_for(p.rows * p.count, 65536, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t r = e / p.count, c = p.cells ? p.cells[p.pick[e]] : p.pick[e];
      p.out[e] = p.a[r * p.k + c / p.k] * p.n_keys + p.b[r * p.k + c % p.k];
    }
  });
}

void embedding_bag_bwd(const EmbeddingBagBwdParams& q) {
  const EmbeddingBagParams& p = q.fwd;
  dispatch_float(p.dtype, "embedding_bag_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_index(p.index_dtype, "embedding_bag_backward", [&](auto itag) {
      using I = typename decltype(itag)::type;
      const I* idx = static_cast<const I*>(p.index);
      const T* table = static_cast<const T*>(p.table);
      const T* w = static_cast<const T*>(p.weights);
      const T* gout = static_cast<const T*>(q.gout);
      if (T* gw = static_cast<T*>(q.gweights)) {
        parallel_for(p.n, grain_for(p.m * p.cols), [&](int64_t t0, int64_t t1) {
          for (int64_t t = t0; t < t1; ++t)
            for (int64_t k = 0; k < p.m; ++k) {
              const T* g = gout + t * p.cols;
              const T* row = table + static_cast<int64_t>(idx[t * p.m + k]) * p.cols;
              T s = 0;
              for (int64_t c = 0; c < p.cols; ++c) s += g[c] * row[c];
              gw[t * p.m + k] = s;
            }
        });
      }
      if (T* gt = static_cast<T*>(q.gtable)) {
        // Serial in (t, k) order: each row's sum in the order the CUDA kernel uses.
        std::fill(gt, gt + p.num_rows * p.cols, T(0));
        auto* hits = static_cast<int32_t*>(q.hits);
        if (hits) std::fill(hits, hits + p.num_rows, 0);
        for (int64_t e = 0; e < p.n * p.m; ++e) {
          const auto r = static_cast<int64_t>(idx[e]);
          const T* g = gout + (e / p.m) * p.cols;
          T* dst = gt + r * p.cols;
          for (int64_t c = 0; c < p.cols; ++c) dst[c] += w[e] * g[c];
          if (hits) hits[r] = 1;
        }
      }
    });
  });
}

}  // namespace hydra::kernels::cpu
