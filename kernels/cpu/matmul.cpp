#include "kernels/matmul.h"

#include <cblas.h>

#include "kernels/cpu/common.h"

namespace hydra::kernels::cpu {

void gemm(const GemmParams& p) {
  if (p.m == 0 || p.n == 0) return;
  const CBLAS_TRANSPOSE ta = p.trans_a ? CblasTrans : CblasNoTrans;
  const CBLAS_TRANSPOSE tb = p.trans_b ? CblasTrans : CblasNoTrans;
  dispatch_float(p.dtype, "gemm", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* a = static_cast<const T*>(p.a);
    const T* b = static_cast<const T*>(p.b);
    T* c = static_cast<T*>(p.c);
    for (int64_t i = 0; i < p.batch; ++i) {
      const T* ai = a + i * p.stride_a;
      const T* bi = b + i * p.stride_b;
      T* ci = c + i * p.stride_c;
      if constexpr (std::is_same_v<T, float>) {
        cblas_sgemm(CblasRowMajor, ta, tb, p.m, p.n, p.k, static_cast<float>(p.alpha), ai, p.lda,
                    bi, p.ldb, static_cast<float>(p.beta), ci, p.ldc);
      } else {
        cblas_dgemm(CblasRowMajor, ta, tb, p.m, p.n, p.k, p.alpha, ai, p.lda, bi, p.ldb, p.beta, ci,
                    p.ldc);
      }
      if (p.bias) {
        const T* bias = static_cast<const T*>(p.bias);
        for (int64_t r = 0; r < p.m; ++r)
          for (int64_t col = 0; col < p.n; ++col) ci[r * p.ldc + col] += bias[col];
      }
    }
  });
}

}  // namespace hydra::kernels::cpu
