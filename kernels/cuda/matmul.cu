// GEMM through cuBLASLt: bf16 or f32 operands with fp32 accumulation (exact FP32, no TF32), f64
// through cuBLAS. Row-major C = op(A) op(B) is computed as the column-major C^T = op(B)^T op(A)^T,
// so no operand is copied. Descriptors and the heuristic's algorithm are cached per shape; the bias
// is a fused epilogue. The workspace comes from the caller (the caching allocator). Grouped GEMMs
// (problems of different shapes in one launch) go through cuBLAS's grouped batched GEMM.
#include <cublasLt.h>
#include <cublas_v2.h>

#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "kernels/cuda/common.cuh"
#include "kernels/matmul.h"

#define HYDRA_CUBLAS_CHECK(expr)                                                 \
  do {                                                                           \
    const cublasStatus_t hydra_cublas_st_ = (expr);                              \
    HYDRA_CHECK(hydra_cublas_st_ == CUBLAS_STATUS_SUCCESS)                       \
        << #expr << " failed: " << cublasGetStatusName(hydra_cublas_st_) << ": " \
        << cublasGetStatusString(hydra_cublas_st_);                              \
  } while (0)

namespace hydra::kernels::cuda {
namespace {

struct Handles {
  cublasLtHandle_t lt = nullptr;
  cublasHandle_t blas = nullptr;
};

Handles& handles() {
  static std::mutex mu;
  static std::vector<Handles> per_device;
  int dev = 0;
  HYDRA_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  if (per_device.size() <= static_cast<size_t>(dev)) per_device.resize(dev + 1);
  Handles& h = per_device[dev];
  if (!h.lt) {
    HYDRA_CUBLAS_CHECK(cublasLtCreate(&h.lt));
    HYDRA_CUBLAS_CHECK(cublasCreate(&h.blas));
  }
  return h;
}

using Key =
    std::tuple<int, int, bool, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
               int64_t, int64_t, int64_t, bool, bool, uint32_t, uint32_t, uint32_t, uint32_t>;

// The largest power of two (<= 256) dividing the address: the heuristic must know it, since views
// can start anywhere.
uint32_t alignment(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && a % al != 0) al /= 2;
  return al;
}

struct Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
};

cudaDataType_t data_type(DType t) { return t == DType::kBF16 ? CUDA_R_16BF : CUDA_R_32F; }

void set_batch(cublasLtMatrixLayout_t l, int64_t batch, int64_t stride) {
  const int32_t count = static_cast<int32_t>(batch);
  HYDRA_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count,
                                                      sizeof count));
  HYDRA_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(
      l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof stride));
}

// Column-major view: C'(n x m) = op'(B) (n x k) * op'(A) (k x m), op'(X) = transposed-ness of X
// flipped.
const Plan& plan_for(const GemmParams& p, int device) {
  static std::mutex mu;
  static std::map<Key, Plan> cache;
  const uint32_t align_a = alignment(p.a), align_b = alignment(p.b), align_c = alignment(p.c),
                 align_bias = p.bias ? alignment(p.bias) : 256;
  const Key key{device,
                static_cast<int>(p.dtype),
                p.trans_a,
                p.trans_b,
                p.m,
                p.n,
                p.k,
                p.lda,
                p.ldb,
                p.ldc,
                p.batch,
                p.stride_a,
                p.stride_b,
                p.stride_c,
                p.bias != nullptr,
                p.beta != 0,
                align_a,
                align_b,
                align_c,
                align_bias};
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  Plan pl;
  const cudaDataType_t t = data_type(p.dtype);
  HYDRA_CUBLAS_CHECK(cublasLtMatmulDescCreate(&pl.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t opb = p.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                          opa = p.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  HYDRA_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(pl.op, CUBLASLT_MATMUL_DESC_TRANSA, &opb, sizeof opb));
  HYDRA_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(pl.op, CUBLASLT_MATMUL_DESC_TRANSB, &opa, sizeof opa));
  if (p.bias) {
    const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
    HYDRA_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(pl.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi));
  }
  // Stored shapes (column-major): B as (trans_b ? k x n : n x k)^T ... i.e. rows x cols of the
  // stored row-major matrix swapped.
  const uint64_t b_rows = p.trans_b ? p.k : p.n, b_cols = p.trans_b ? p.n : p.k;
  const uint64_t a_rows = p.trans_a ? p.m : p.k, a_cols = p.trans_a ? p.k : p.m;
  HYDRA_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&pl.a, t, b_rows, b_cols, p.ldb));
  HYDRA_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&pl.b, t, a_rows, a_cols, p.lda));
  HYDRA_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&pl.c, t, p.n, p.m, p.ldc));
  if (p.batch > 1) {
    set_batch(pl.a, p.batch, p.stride_b);
    set_batch(pl.b, p.batch, p.stride_a);
    set_batch(pl.c, p.batch, p.stride_c);
  }
  cublasLtMatmulPreference_t pref = nullptr;
  HYDRA_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t ws = kGemmWorkspace;
  HYDRA_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
  // In cuBLASLt's (column-major) terms A is our B and B is our A.
  for (const auto& [attr, value] : {std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_b},
                                    {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_a},
                                    {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_c},
                                    {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_c}}) {
    const uint32_t v = value;
    HYDRA_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &v, sizeof v));
  }
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  HYDRA_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(handles().lt, pl.op, pl.a, pl.b, pl.c, pl.c,
                                                    pref, 1, &result, &found));
  cublasLtMatmulPreferenceDestroy(pref);
  HYDRA_CHECK(found > 0) << "cuBLASLt found no algorithm for a " << p.m << "x" << p.n << "x" << p.k
                         << " " << dtype_name(p.dtype) << " GEMM";
  pl.algo = result.algo;
  return cache.emplace(key, pl).first->second;
}

// C[b][i][j] += bias[j]: the bias of an f64 GEMM (cuBLAS's f64 GEMM has no epilogue). f64 runs on
// the GPU for tests (float64 grids against the CPU), so a plain kernel will do.
__global__ void add_bias_f64_kernel(double* c, const double* __restrict bias, int64_t rows,
                                    int64_t n, int64_t ldc, int64_t m, int64_t stride_c) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < rows * n;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = e / n, j = e % n;
    c[r / m * stride_c + r % m * ldc + j] += bias[j];
  }
}

}  // namespace

void gemm(const GemmParams& p) {
  if (p.m == 0 || p.n == 0 || p.batch == 0) return;
  cudaStream_t s = as_stream(p.stream);
  if (p.dtype == DType::kF64) {
    cublasHandle_t h = handles().blas;
    HYDRA_CUBLAS_CHECK(cublasSetStream(h, s));
    const double alpha = p.alpha, beta = p.beta;
    HYDRA_CUBLAS_CHECK(cublasDgemmStridedBatched(
        h, p.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, p.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, p.n, p.m,
        p.k, &alpha, static_cast<const double*>(p.b), p.ldb, p.stride_b,
        static_cast<const double*>(p.a), p.lda, p.stride_a, &beta, static_cast<double*>(p.c), p.ldc,
        p.stride_c, p.batch));
    if (p.bias != nullptr) {
      const int64_t rows = p.batch * p.m;
      add_bias_f64_kernel<<<blocks_for(rows * p.n, 256), 256, 0, s>>>(
          static_cast<double*>(p.c), static_cast<const double*>(p.bias), rows, p.n, p.ldc, p.m,
          p.stride_c);
      HYDRA_CUDA_LAUNCH_CHECK();
    }
    return;
  }
  HYDRA_CHECK(p.dtype == DType::kF32 || p.dtype == DType::kBF16)
      << "gemm: dtype " << dtype_name(p.dtype) << " is not supported on CUDA";
  HYDRA_CHECK(p.workspace != nullptr) << "gemm: the cuBLASLt workspace is required";
  int device = 0;
  HYDRA_CUDA_CHECK(cudaGetDevice(&device));
  const Plan& pl = plan_for(p, device);
  if (p.bias) {
    HYDRA_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(pl.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                                                      &p.bias, sizeof p.bias));
  }
  const float alpha = static_cast<float>(p.alpha), beta = static_cast<float>(p.beta);
  HYDRA_CUBLAS_CHECK(cublasLtMatmul(handles().lt, pl.op, &alpha, p.b, pl.a, p.a, pl.b, &beta, p.c,
                                    pl.c, p.c, pl.c, &pl.algo, p.workspace, kGemmWorkspace, s));
}

namespace {

// cuBLAS's grouped GEMM reads the problems' operand pointers from device arrays. A kernel writes
// them from its own parameters (up to kTableChunk problems per launch: 3 KiB, within the 4 KiB
// parameter space), so no host-to-device copy or pinned staging buffer is needed.
constexpr int kTableChunk = 128;

struct TableChunk {
  const void* a[kTableChunk];
  const void* b[kTableChunk];
  void* c[kTableChunk];
};

__global__ void fill_tables_kernel(TableChunk chunk, int count, const void** a, const void** b,
                                   void** c) {
  const int i = threadIdx.x;
  if (i < count) {
    a[i] = chunk.a[i];
    b[i] = chunk.b[i];
    c[i] = chunk.c[i];
  }
}

// The tile GEMM's pointer tables, a thread per tile: cuBLAS's A (our W[g]), B (our A rows) and C.
__global__ void tile_tables_kernel(TileGemmParams p, int64_t elem_bytes, const void** wa,
                                   const void** ab, void** cc) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= p.num_tiles) return;
  const int64_t g = p.tiles[t] < 0 ? 0 : p.tiles[t];
  wa[t] = static_cast<const char*>(p.w) + g * p.w_rows * p.w_cols * elem_bytes;
  ab[t] = static_cast<const char*>(p.a) + t * p.tile * p.lda * elem_bytes;
  cc[t] = static_cast<char*>(p.c) + t * p.tile * p.ldc * elem_bytes;
}

}  // namespace

size_t tile_gemm_workspace(const TileGemmParams& p) {
  return 3 * static_cast<size_t>(p.num_tiles) * sizeof(void*) + 256;
}

void tile_gemm(const TileGemmParams& p) {
  if (p.num_tiles == 0 || p.tile == 0) return;
  HYDRA_CHECK(p.workspace != nullptr) << "tile_gemm: workspace required";
  const bool f64 = p.dtype == DType::kF64;
  HYDRA_CHECK(f64 || p.dtype == DType::kF32 || p.dtype == DType::kBF16)
      << "tile_gemm: dtype " << dtype_name(p.dtype) << " is not supported on CUDA";
  const int64_t k = p.trans_w ? p.w_cols : p.w_rows, n = p.trans_w ? p.w_rows : p.w_cols;
  if (n == 0) return;
  const cudaDataType_t t = f64 ? CUDA_R_64F : data_type(p.dtype);
  const cublasComputeType_t compute = f64 ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F;
  cudaStream_t s = as_stream(p.stream);
  auto** table = static_cast<void**>(p.workspace);
  const int64_t T = p.num_tiles;
  tile_tables_kernel<<<blocks_for(T, 128), 128, 0, s>>>(
      p, static_cast<int64_t>(dtype_size(p.dtype)), const_cast<const void**>(table),
      const_cast<const void**>(table + T), table + 2 * T);
  HYDRA_CUDA_LAUNCH_CHECK();
  // Column-major, as gemm: C^T = op(W)^T A^T; W [w_rows, w_cols] row-major is W^T to cuBLAS.
  const double alpha64 = 1, beta64 = p.beta;
  const float alpha32 = 1, beta32 = static_cast<float>(p.beta);
  cublasHandle_t h = handles().blas;
  HYDRA_CUBLAS_CHECK(cublasSetStream(h, s));
  HYDRA_CUBLAS_CHECK(cublasGemmBatchedEx_64(
      h, p.trans_w ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, n, p.tile, k,
      f64 ? static_cast<const void*>(&alpha64) : &alpha32, const_cast<const void* const*>(table), t,
      p.w_cols, const_cast<const void* const*>(table + T), t, p.lda,
      f64 ? static_cast<const void*>(&beta64) : &beta32, table + 2 * T, t, p.ldc, T, compute,
      CUBLAS_GEMM_DEFAULT));
}

size_t grouped_gemm_workspace(const GroupedGemmParams& p) {
  return 3 * static_cast<size_t>(p.count) * sizeof(void*) + 256;
}

void grouped_gemm(const GroupedGemmParams& p) {
  std::vector<const GemmProblem*> live;
  for (int64_t i = 0; i < p.count; ++i)
    if (p.problems[i].m > 0 && p.problems[i].n > 0) live.push_back(&p.problems[i]);
  if (live.empty()) return;
  HYDRA_CHECK(p.workspace != nullptr) << "grouped_gemm: workspace required";
  const bool f64 = p.dtype == DType::kF64;
  HYDRA_CHECK(f64 || p.dtype == DType::kF32 || p.dtype == DType::kBF16)
      << "grouped_gemm: dtype " << dtype_name(p.dtype) << " is not supported on CUDA";
  const cudaDataType_t t = f64 ? CUDA_R_64F : data_type(p.dtype);
  const cublasComputeType_t compute = f64 ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F;
  cudaStream_t s = as_stream(p.stream);
  const auto n = static_cast<int64_t>(live.size());
  // Column-major, as gemm: C^T = op(B)^T op(A)^T, so cuBLAS's A is our B.
  auto** table = static_cast<void**>(p.workspace);  // [cuBLAS A..., cuBLAS B..., C...]
  for (int64_t base = 0; base < n; base += kTableChunk) {
    TableChunk chunk{};
    const int count = static_cast<int>(std::min<int64_t>(kTableChunk, n - base));
    for (int j = 0; j < count; ++j) {
      chunk.a[j] = live[base + j]->b;
      chunk.b[j] = live[base + j]->a;
      chunk.c[j] = live[base + j]->c;
    }
    fill_tables_kernel<<<1, kTableChunk, 0, s>>>(
        chunk, count, const_cast<const void**>(table + base),
        const_cast<const void**>(table + n + base), table + 2 * n + base);
    HYDRA_CUDA_LAUNCH_CHECK();
  }
  const std::vector<cublasOperation_t> op_a(n, p.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N),
      op_b(n, p.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N);
  std::vector<int64_t> m(n), nn(n), k(n), lda(n), ldb(n), ldc(n), group_size(n, 1);
  std::vector<double> alpha64(n, p.alpha), beta64(n);
  std::vector<float> alpha32(n, static_cast<float>(p.alpha)), beta32(n);
  for (int64_t i = 0; i < n; ++i) {
    const GemmProblem& q = *live[i];
    m[i] = q.n;
    nn[i] = q.m;
    k[i] = q.k;
    lda[i] = q.ldb;
    ldb[i] = q.lda;
    ldc[i] = q.ldc;
    beta64[i] = q.beta;
    beta32[i] = static_cast<float>(q.beta);
  }
  cublasHandle_t h = handles().blas;
  HYDRA_CUBLAS_CHECK(cublasSetStream(h, s));
  HYDRA_CUBLAS_CHECK(
      cublasGemmGroupedBatchedEx_64(h, op_a.data(), op_b.data(), m.data(), nn.data(), k.data(),
                                    f64 ? static_cast<const void*>(alpha64.data()) : alpha32.data(),
                                    const_cast<const void* const*>(table), t, lda.data(),
                                    const_cast<const void* const*>(table + n), t, ldb.data(),
                                    f64 ? static_cast<const void*>(beta64.data()) : beta32.data(),
                                    table + 2 * n, t, ldc.data(), n, group_size.data(), compute));
}

}  // namespace hydra::kernels::cuda
