// Row-major (batched, strided) GEMM: C[i] = alpha * op(A[i]) op(B[i]) + beta * C[i], i < batch.
// op(A) is m x k, op(B) is k x n; lda/ldb/ldc are row strides of the stored matrices.
#pragma once

#include "kernels/base/kernel.h"

namespace hydra::kernels {

struct GemmParams {
  DType dtype = DType::kF32;  // of A, B and C; accumulation is fp32 (fp64 for f64)
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;
  int64_t lda = 0;
  const void* b = nullptr;
  int64_t ldb = 0;
  void* c = nullptr;
  int64_t ldc = 0;
  int64_t batch = 1;
  int64_t stride_a = 0, stride_b = 0, stride_c = 0;  // between batch entries; 0 = shared
  double alpha = 1, beta = 0;
  const void* bias = nullptr;  // [n], added to every row of C (after alpha; a fused epilogue on CUDA)
  void* workspace = nullptr;   // CUDA: kGemmWorkspace bytes for cuBLASLt
  void* stream = nullptr;
};

inline constexpr size_t kGemmWorkspace = size_t{32} << 20;

HYDRA_DECLARE_KERNEL(gemm, GemmParams)

}  // namespace hydra::kernels
