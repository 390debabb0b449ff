#include "kernels/matmul.h"

#include <cblas.h>

#include <algorithm>
#include <type_traits>

#include "kernels/base/parallel.h"
#include "kernels/cpu/common.h"

namespace hydra::kernels::cpu {

namespace {

// C is cut into square tiles whose size depends only on the shape (256, halved down to 64 until
// there are 16 tiles), never on the thread count, and each tile is one single-threaded BLAS call,
// so the result does not depend on the thread count. (OpenBLAS's own threading splits C by the
// thread count, and its edge kernels sum in a different order: with AVX2 "Haswell" kernels 1 and 4
// threads differ in the last bits.)
int64_t tile_for(int64_t batch, int64_t m, int64_t n) {
  int64_t tile = 256;
  auto tiles = [&](int64_t t) { return batch * ((m + t - 1) / t) * ((n + t - 1) / t); };
  while (tile > 64 && tiles(tile) < 16) tile /= 2;
  return tile;
}

template <class T>
void gemm_tile(const GemmParams& p, const T* a, const T* b, T* c, int64_t r0, int64_t r1,
               int64_t c0, int64_t c1) {
  const CBLAS_TRANSPOSE ta = p.trans_a ? CblasTrans : CblasNoTrans;
  const CBLAS_TRANSPOSE tb = p.trans_b ? CblasTrans : CblasNoTrans;
  const T* at = p.trans_a ? a + r0 : a + r0 * p.lda;  // op(A) rows r0..r1
  const T* bt = p.trans_b ? b + c0 * p.ldb : b + c0;  // op(B) columns c0..c1
  T* ct = c + r0 * p.ldc + c0;
  const int64_t m = r1 - r0, n = c1 - c0;
  if constexpr (std::is_same_v<T, float>) {
    cblas_sgemm(CblasRowMajor, ta, tb, m, n, p.k, static_cast<float>(p.alpha), at, p.lda, bt, p.ldb,
                static_cast<float>(p.beta), ct, p.ldc);
  } else {
    cblas_dgemm(CblasRowMajor, ta, tb, m, n, p.k, p.alpha, at, p.lda, bt, p.ldb, p.beta, ct, p.ldc);
  }
  if (p.bias) {
    const T* bias = static_cast<const T*>(p.bias);
    for (int64_t r = 0; r < m; ++r)
      for (int64_t col = 0; col < n; ++col) ct[r * p.ldc + col] += bias[c0 + col];
  }
}

}  // namespace

void gemm(const GemmParams& p) {
  if (p.m == 0 || p.n == 0) return;
  const int64_t tile = tile_for(p.batch, p.m, p.n), tm = (p.m + tile - 1) / tile,
                tn = (p.n + tile - 1) / tile;
  dispatch_float(p.dtype, "gemm", [&](auto tag) {
    using T = typename decltype(tag)::type;
    parallel_for(p.batch * tm * tn, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t i = t / (tm * tn), r = t / tn % tm, col = t % tn;
        gemm_tile<T>(p, static_cast<const T*>(p.a) + i * p.stride_a,
                     static_cast<const T*>(p.b) + i * p.stride_b,
                     static_cast<T*>(p.c) + i * p.stride_c, r * tile, std::min(p.m, (r + 1) * tile),
                     col * tile, std::min(p.n, (col + 1) * tile));
      }
    });
  });
}

void grouped_gemm(const GroupedGemmParams& p) {
  for (int64_t i = 0; i < p.count; ++i) gemm(gemm_of(p, p.problems[i]));
}

void tile_gemm(const TileGemmParams& p) {
  const int64_t k = p.trans_w ? p.w_cols : p.w_rows, n = p.trans_w ? p.w_rows : p.w_cols;
  const int64_t es = static_cast<int64_t>(dtype_size(p.dtype));
  for (int64_t t = 0; t < p.num_tiles; ++t) {
    GemmParams g;
    g.dtype = p.dtype;
    g.trans_b = p.trans_w;
    g.m = p.tile;
    g.n = n;
    g.k = k;
    g.a = static_cast<const char*>(p.a) + t * p.tile * p.lda * es;
    g.lda = p.lda;
    g.b =
        static_cast<const char*>(p.w) + std::max<int64_t>(p.tiles[t], 0) * p.w_rows * p.w_cols * es;
    g.ldb = p.w_cols;
    g.c = static_cast<char*>(p.c) + t * p.tile * p.ldc * es;
    g.ldc = p.ldc;
    g.beta = p.beta;
    gemm(g);
  }
}

}  // namespace hydra::kernels::cpu
