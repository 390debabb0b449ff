#include "kernels/index.h"

#include <algorithm>
#include <cstring>

#include "kernels/base/parallel.h"
#include "kernels/cpu/common.h"

namespace hydra::kernels::cpu {
namespace {

constexpr int64_t kColChunk = 64;  // columns per task in the scatter-adds

}  // namespace

void gather_rows(const GatherRowsParams& p) {
  dispatch_float(p.dtype, "gather_rows", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_index(p.index_dtype, "gather_rows", [&](auto itag) {
      using I = typename decltype(itag)::type;
      const I* idx = static_cast<const I*>(p.index);
      check_indices(idx, p.n, p.num_rows, "gather_rows");
      const T* table = static_cast<const T*>(p.table);
      T* out = static_cast<T*>(p.out);
      parallel_for(p.n, grain_for(p.cols), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i)
          std::memcpy(out + i * p.cols, table + static_cast<int64_t>(idx[i]) * p.cols,
                      sizeof(T) * p.cols);
      });
    });
  });
}

// Each task owns a column range and walks the indices in order: no two tasks touch the same
// element.
void scatter_add_rows(const ScatterAddRowsParams& p) {
  dispatch_float(p.dtype, "scatter_add_rows", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_index(p.index_dtype, "scatter_add_rows", [&](auto itag) {
      using I = typename decltype(itag)::type;
      const I* idx = static_cast<const I*>(p.index);
      check_indices(idx, p.n, p.num_rows, "scatter_add_rows");
      const T* src = static_cast<const T*>(p.src);
      T* table = static_cast<T*>(p.table);
      const int64_t chunks = (p.cols + kColChunk - 1) / kColChunk;
      parallel_for(chunks, 1, [&](int64_t c0, int64_t c1) {
        const int64_t j0 = c0 * kColChunk, j1 = std::min(p.cols, c1 * kColChunk);
        for (int64_t i = 0; i < p.n; ++i) {
          T* dst = table + static_cast<int64_t>(idx[i]) * p.cols;
          const T* s = src + i * p.cols;
          for (int64_t j = j0; j < j1; ++j) dst[j] += s[j];
        }
      });
    });
  });
}

void gather_sum_rows(const GatherSumRowsParams& p) {
  dispatch_float(p.dtype, "gather_sum_rows", [&](auto tag) {
    using T = typename decltype(tag)::type;
    for (int64_t i = 0; i < p.rows * p.K; ++i)
      HYDRA_CHECK(p.inverse[i] >= -1 && p.inverse[i] < p.num_src)
          << "gather_sum_rows: index " << p.inverse[i] << " at position " << i
          << " is out of range [-1, " << p.num_src << ")";
    const T* src = static_cast<const T*>(p.src);
    T* out = static_cast<T*>(p.out);
    parallel_for(p.rows, grain_for(p.cols * std::max<int64_t>(p.K, 1)),
                 [&](int64_t r0, int64_t r1) {
                   for (int64_t r = r0; r < r1; ++r) {
                     T* o = out + r * p.cols;
                     if (!p.accumulate) std::fill(o, o + p.cols, T(0));
                     for (int64_t k = 0; k < p.K; ++k) {
                       const int64_t i = p.inverse[r * p.K + k];
                       if (i < 0) continue;
                       const T* s = src + i * p.cols;
                       for (int64_t j = 0; j < p.cols; ++j) o[j] += s[j];
                     }
                   }
                 });
  });
}

void axis_gather(const AxisIndexParams& p) {
  dispatch_float(p.dtype, "gather", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_index(p.index_dtype, "gather", [&](auto itag) {
      using I = typename decltype(itag)::type;
      const I* idx = static_cast<const I*>(p.index);
      check_indices(idx, p.outer * p.count * p.inner, p.axis, "gather");
      const T* x = static_cast<const T*>(p.src);
      T* out = static_cast<T*>(p.dst);
      parallel_for(p.outer * p.count, grain_for(p.inner), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t o = r / p.count;
          for (int64_t j = 0; j < p.inner; ++j) {
            const int64_t k = r * p.inner + j;
            out[k] = x[(o * p.axis + static_cast<int64_t>(idx[k])) * p.inner + j];
          }
        }
      });
    });
  });
}

void axis_scatter_add(const AxisIndexParams& p) {
  dispatch_float(p.dtype, "scatter_add", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_index(p.index_dtype, "scatter_add", [&](auto itag) {
      using I = typename decltype(itag)::type;
      const I* idx = static_cast<const I*>(p.index);
      check_indices(idx, p.outer * p.count * p.inner, p.axis, "scatter_add");
      const T* src = static_cast<const T*>(p.src);
      T* x = static_cast<T*>(p.dst);
      const int64_t chunks = (p.inner + kColChunk - 1) / kColChunk;
      parallel_for(p.outer * chunks, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t o = t / chunks, c = t % chunks;
          const int64_t j0 = c * kColChunk, j1 = std::min(p.inner, (c + 1) * kColChunk);
          for (int64_t i = 0; i < p.count; ++i) {
            for (int64_t j = j0; j < j1; ++j) {
              const int64_t k = (o * p.count + i) * p.inner + j;
              x[(o * p.axis + static_cast<int64_t>(idx[k])) * p.inner + j] += src[k];
            }
          }
        }
      });
    });
  });
}

}  // namespace hydra::kernels::cpu
