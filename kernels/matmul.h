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
  const void* bias =
      nullptr;  // [n], added to every row of C (after alpha; a fused epilogue on CUDA)
  void* workspace = nullptr;  // CUDA: kGemmWorkspace bytes for cuBLASLt
  void* stream = nullptr;
};

inline constexpr size_t kGemmWorkspace = size_t{32} << 20;

HYDRA_DECLARE_KERNEL(gemm, GemmParams)

// One problem of a grouped GEMM: C = alpha * op(A) op(B) + beta * C with its own shape and operands
// (row-major, as GemmParams).
struct GemmProblem {
  int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;
  int64_t lda = 0;
  const void* b = nullptr;
  int64_t ldb = 0;
  void* c = nullptr;
  int64_t ldc = 0;
  double beta = 0;
};

// Independent GEMMs of different shapes in one launch on CUDA (cuBLAS's grouped batched GEMM), e.g.
// the experts of an MoE layer on their variable row counts. The problems' outputs must not overlap.
struct GroupedGemmParams {
  DType dtype = DType::kF32;  // accumulation as for gemm
  bool trans_a = false, trans_b = false;
  double alpha = 1;
  const GemmProblem* problems = nullptr;  // host array
  int64_t count = 0;
  void* workspace =
      nullptr;  // CUDA: grouped_gemm_workspace(p) bytes (the problems' device pointer tables)
  void* stream = nullptr;
};

HYDRA_DECLARE_KERNEL(grouped_gemm, GroupedGemmParams)

// Problem q of a grouped GEMM as a GEMM of its own (no workspace or stream set).
inline GemmParams gemm_of(const GroupedGemmParams& p, const GemmProblem& q) {
  GemmParams g;
  g.dtype = p.dtype;
  g.trans_a = p.trans_a;
  g.trans_b = p.trans_b;
  g.m = q.m;
  g.n = q.n;
  g.k = q.k;
  g.a = q.a;
  g.lda = q.lda;
  g.b = q.b;
  g.ldb = q.ldb;
  g.c = q.c;
  g.ldc = q.ldc;
  g.alpha = p.alpha;
  g.beta = q.beta;
  return g;
}

// The GEMMs of a tiled grouped layout whose groups live on the device (kernels/moe_route.h's tiled
// dispatch order): for each tile t of `tile` rows, C[rows of t] = A[rows of t] op(W[g]) with
// g = tiles[t]; a tile past the last group (g < 0) uses W[0] (its rows are padding nobody reads).
// W is [groups, w_rows, w_cols] contiguous; op(W) = W^T when trans_w (C has w_rows columns, A
// w_cols), else W (C has w_cols columns, A w_rows). One batched launch on CUDA: the host needs no
// group size.
struct TileGemmParams {
  DType dtype = DType::kF32;  // accumulation as for gemm
  bool trans_w = false;
  int64_t num_tiles = 0, tile = 0;
  const void* a = nullptr;
  int64_t lda = 0;  // row stride of A
  const void* w = nullptr;
  int64_t groups = 0, w_rows = 0, w_cols = 0;
  const int64_t* tiles = nullptr;  // [num_tiles], on the kernel's device
  void* c = nullptr;
  int64_t ldc = 0;
  double beta = 0;            // C = A op(W) + beta C (1: add into C)
  void* workspace = nullptr;  // CUDA: tile_gemm_workspace(p) bytes (the pointer tables)
  void* stream = nullptr;
};

HYDRA_DECLARE_KERNEL(tile_gemm, TileGemmParams)

namespace cuda {
size_t grouped_gemm_workspace(const GroupedGemmParams& p);
size_t tile_gemm_workspace(const TileGemmParams& p);
}  // namespace cuda

}  // namespace hydra::kernels
