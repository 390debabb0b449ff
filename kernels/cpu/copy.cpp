#include "kernels/copy.h"

#include "kernels/base/parallel.h"
#include "kernels/cpu/common.h"

namespace hydra::kernels::cpu {

void strided_copy(const StridedCopyParams& p) {
  int64_t rows = 1;
  for (int d = 0; d + 1 < p.ndim; ++d) rows *= p.shape[d];
  const int64_t last = p.ndim > 0 ? p.shape[p.ndim - 1] : 1;
  const int64_t s_last = p.ndim > 0 ? p.src_strides[p.ndim - 1] : 1;
  const int64_t d_last = p.ndim > 0 ? p.dst_strides[p.ndim - 1] : 1;
  if (rows * last == 0) return;
  dispatch_all(p.src_dtype, [&](auto src_tag) {
    using S = typename decltype(src_tag)::type;
    dispatch_all(p.dst_dtype, [&](auto dst_tag) {
      using D = typename decltype(dst_tag)::type;
      const S* src = static_cast<const S*>(p.src);
      D* dst = static_cast<D*>(p.dst);
      parallel_for(rows, grain_for(last), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          int64_t so = 0, dof = 0, rem = r;
          for (int d = p.ndim - 2; d >= 0; --d) {
            const int64_t i = rem % p.shape[d];
            rem /= p.shape[d];
            so += i * p.src_strides[d];
            dof += i * p.dst_strides[d];
          }
          for (int64_t j = 0; j < last; ++j) dst[dof + j * d_last] = cast<D>(src[so + j * s_last]);
        }
      });
    });
  });
}

void multi_copy(const MultiCopyParams& p) {
  dispatch_all(p.src_dtype, [&](auto src_tag) {
    using S = typename decltype(src_tag)::type;
    dispatch_all(p.dst_dtype, [&](auto dst_tag) {
      using D = typename decltype(dst_tag)::type;
      for (int i = 0; i < p.count; ++i) {
        const S* src = static_cast<const S*>(p.src[i]);
        D* dst = static_cast<D*>(p.dst[i]);
        parallel_for(p.n[i], 1 << 16, [&](int64_t b, int64_t e) {
          for (int64_t j = b; j < e; ++j) dst[j] = cast<D>(src[j]);
        });
      }
    });
  });
}

void fill(const FillParams& p) {
  dispatch_all(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T v = cast<T>(p.value);
    T* dst = static_cast<T*>(p.dst);
    parallel_for(p.n, 1 << 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) dst[i] = v;
    });
  });
}

}  // namespace hydra::kernels::cpu
