// Reductions of the middle axis of [outer, R, inner], and the global sum of squares. Every sum runs
// in a fixed order (per-thread strided partials, then a fixed tree; long axes in fixed chunks
// combined in a second pass), so results are bit-reproducible. Accumulation in fp32 (fp64 for f64).
#include <algorithm>
#include <vector>

#include "kernels/cuda/common.cuh"
#include "kernels/reduce.h"

namespace hydra::kernels::cuda {
namespace {

constexpr int64_t kRowChunk = 16384;   // elements per partial when few long rows are reduced
constexpr int64_t kColChunk = 64;      // rows per partial when few long columns are reduced
constexpr int64_t kWarpRowMax = 4096;  // rows up to this long, and many of them: a warp per row

template <class A>
struct Op {
  ReduceOp op;
  __device__ A init() const {
    return op == ReduceOp::kMax ? A(-INFINITY) : op == ReduceOp::kMin ? A(INFINITY) : A(0);
  }
  __device__ A map(A v) const { return op == ReduceOp::kSumSquares ? v * v : v; }
  __device__ A combine(A a, A b) const {
    return op == ReduceOp::kMax ? max(a, b) : op == ReduceOp::kMin ? min(a, b) : a + b;
  }
};

template <class A>
__device__ A block_combine(const Op<A>& op, A v, A* shared) {
  if (op.op == ReduceOp::kMax) return block_max(v, shared);
  if (op.op == ReduceOp::kMin) return -block_max(-v, shared);
  return block_sum(v, shared);
}

// One block per (row, chunk): out[row * chunks + chunk] = reduce of x[row, chunk range] (mapped).
template <class T, class A>
__global__ void rows_kernel(Op<A> op, const T* __restrict x, int64_t R, int64_t chunk,
                            int64_t chunks, A* out, bool mapped) {
  __shared__ A shared[32];
  const int64_t row = blockIdx.x, c = blockIdx.y;  // rows in x: more than 65535 of them
  const int64_t begin = c * chunk, end = min(R, begin + chunk);
  A acc = op.init();
  for (int64_t r = begin + threadIdx.x; r < end; r += blockDim.x) {
    const A v = static_cast<A>(convert<compute_t<T>>(x[row * R + r]));
    acc = op.combine(acc, mapped ? op.map(v) : v);
  }
  acc = block_combine(op, acc, shared);
  if (threadIdx.x == 0) out[row * chunks + c] = acc;
}

// A warp per row (inner == 1, many rows of up to kWarpRowMax): lane-strided partials, then the
// warp's fixed tree; the result goes straight to y.
template <class T, class A>
__global__ void rows_warp_kernel(Op<A> op, const T* __restrict x, int64_t outer, int64_t R,
                                 T* __restrict y, double scale) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5; row < outer;
       row += warps) {
    A acc = op.init();
    for (int64_t r = lane; r < R; r += 32)
      acc = op.combine(acc, op.map(static_cast<A>(convert<compute_t<T>>(x[row * R + r]))));
    if (op.op == ReduceOp::kMax) {
      acc = warp_max(acc);
    } else if (op.op == ReduceOp::kMin) {
      acc = -warp_max(-acc);
    } else {
      acc = warp_sum(acc);
    }
    if (lane == 0) y[row] = convert<T>(acc * static_cast<A>(scale));
  }
}

// Thread per (outer, inner) column over a chunk of R.
template <class T, class A>
__global__ void cols_kernel(Op<A> op, const T* __restrict x, int64_t outer, int64_t R,
                            int64_t inner, int64_t chunk, int64_t chunks, A* out, bool mapped) {
  const int64_t col = blockIdx.x * int64_t(blockDim.x) + threadIdx.x, c = blockIdx.y;
  if (col >= outer * inner) return;
  const int64_t o = col / inner, i = col % inner;
  const int64_t begin = c * chunk, end = min(R, begin + chunk);
  A acc = op.init();
  for (int64_t r = begin; r < end; ++r) {
    const A v = static_cast<A>(convert<compute_t<T>>(x[(o * R + r) * inner + i]));
    acc = op.combine(acc, mapped ? op.map(v) : v);
  }
  out[c * outer * inner + col] = acc;
}

// Second pass over column partials [chunks, cols] -> y[cols].
template <class T, class A>
__global__ void finish_cols_kernel(Op<A> op, const A* __restrict part, int64_t chunks, int64_t cols,
                                   T* y, double scale) {
  const int64_t col = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (col >= cols) return;
  A acc = op.init();
  for (int64_t c = 0; c < chunks; ++c) acc = op.combine(acc, part[c * cols + col]);
  y[col] = convert<T>(acc * static_cast<A>(scale));
}

template <class T, class A>
__global__ void finish_rows_kernel(Op<A> op, const A* __restrict part, int64_t chunks, T* y,
                                   double scale) {
  __shared__ A shared[32];
  const int64_t row = blockIdx.x;
  A acc = op.init();
  for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x)
    acc = op.combine(acc, part[row * chunks + c]);
  acc = block_combine(op, acc, shared);
  if (threadIdx.x == 0) y[row] = convert<T>(acc * static_cast<A>(scale));
}

struct Plan {
  bool rows;       // inner == 1
  int64_t chunks;  // > 1: a second pass over partials
  int64_t chunk;
  bool warp_rows = false;  // rows_warp_kernel, no partials
};

Plan plan(const ReduceParams& p) {
  if (p.inner == 1 && p.outer >= 264 && p.reduce <= kWarpRowMax) return {true, 1, p.reduce, true};
  if (p.inner == 1) {
    const int64_t chunks =
        p.outer >= 264 ? 1 : std::max<int64_t>(1, (p.reduce + kRowChunk - 1) / kRowChunk);
    return {true, chunks, chunks == 1 ? p.reduce : kRowChunk};
  }
  const int64_t cols = p.outer * p.inner;
  const int64_t chunk =
      std::max<int64_t>(kColChunk, (p.reduce + 65534) / 65535);  // at most 65535 chunks
  const int64_t chunks = cols >= 8192 ? 1 : std::max<int64_t>(1, (p.reduce + chunk - 1) / chunk);
  return {false, chunks, chunks == 1 ? p.reduce : chunk};
}

template <class T>
using acc_t = compute_t<T>;

}  // namespace

// Partials are always written (chunks x outputs, chunks = 1 for most shapes), then combined by a
// small second kernel: one code path, and the extra traffic is the size of the output.
size_t reduce_axis_workspace(const ReduceParams& p) {
  const Plan pl = plan(p);
  const size_t a = p.dtype == DType::kF64 ? 8 : 4;
  return a * static_cast<size_t>(pl.chunks * p.outer * p.inner);
}

void reduce_axis(const ReduceParams& p) {
  if (p.outer * p.inner == 0 || p.reduce == 0) return;
  HYDRA_CHECK(p.workspace != nullptr)
      << "reduce_axis: workspace required (reduce_axis_workspace bytes)";
  const Plan pl = plan(p);
  HYDRA_CHECK(pl.chunks < 65536) << "reduce: " << p.reduce
                                 << " elements per output is beyond the CUDA kernel's "
                                 << 65535 * kRowChunk;
  dispatch_float(p.dtype, "reduce", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const Op<A> op{p.op};
    const T* x = static_cast<const T*>(p.x);
    T* y = static_cast<T*>(p.y);
    A* part = static_cast<A*>(p.workspace);
    cudaStream_t s = as_stream(p.stream);
    if (pl.warp_rows) {
      rows_warp_kernel<T, A>
          <<<blocks_for(p.outer * 32, 256), 256, 0, s>>>(op, x, p.outer, p.reduce, y, p.scale);
    } else if (pl.rows) {
      const int threads = row_threads(pl.chunk, 8);
      rows_kernel<T, A><<<dim3(p.outer, pl.chunks), threads, 0, s>>>(op, x, p.reduce, pl.chunk,
                                                                     pl.chunks, part, true);
      HYDRA_CUDA_LAUNCH_CHECK();
      finish_rows_kernel<T, A>
          <<<p.outer, row_threads(pl.chunks), 0, s>>>(op, part, pl.chunks, y, p.scale);
    } else {
      const int64_t cols = p.outer * p.inner;
      cols_kernel<T, A><<<dim3((cols + 255) / 256, pl.chunks), 256, 0, s>>>(
          op, x, p.outer, p.reduce, p.inner, pl.chunk, pl.chunks, part, true);
      HYDRA_CUDA_LAUNCH_CHECK();
      finish_cols_kernel<T, A>
          <<<(cols + 255) / 256, 256, 0, s>>>(op, part, pl.chunks, cols, y, p.scale);
    }
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

namespace {

constexpr int64_t kSquaresChunk = 65536;  // elements per block in the global sum of squares

struct SquaresLayout {
  int count;
  const void* x[MultiSumSquaresParams::kMax];
  int64_t n[MultiSumSquaresParams::kMax];
  int64_t
      first_block[MultiSumSquaresParams::kMax + 1];  // blocks of tensor i: [first[i], first[i+1])
};

template <class T>
__global__ void squares_kernel(SquaresLayout l, double* part) {
  __shared__ double shared[32];
  const int64_t blk = blockIdx.x;
  int t = 0;
  while (t + 1 < l.count && l.first_block[t + 1] <= blk) ++t;
  const T* x = static_cast<const T*>(l.x[t]);
  const int64_t begin = (blk - l.first_block[t]) * kSquaresChunk,
                end = min(l.n[t], begin + kSquaresChunk);
  double acc = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const double v = static_cast<double>(convert<compute_t<T>>(x[i]));
    acc += v * v;
  }
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) part[blk] = acc;
}

// *out = the sum of the parts (add: *out += it).
__global__ void squares_finish_kernel(const double* part, int64_t blocks, double* out, bool add) {
  __shared__ double shared[32];
  double acc = 0;
  for (int64_t i = threadIdx.x; i < blocks; i += blockDim.x) acc += part[i];
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) *out = add ? *out + acc : acc;
}

SquaresLayout layout(const MultiSumSquaresParams& p) {
  SquaresLayout l{};
  l.count = p.count;
  l.first_block[0] = 0;
  for (int i = 0; i < p.count; ++i) {
    l.x[i] = p.x[i];
    l.n[i] = p.n[i];
    l.first_block[i + 1] = l.first_block[i] + (p.n[i] + kSquaresChunk - 1) / kSquaresChunk;
  }
  return l;
}

}  // namespace

size_t multi_sum_squares_workspace(const MultiSumSquaresParams& p) {
  return sizeof(double) * static_cast<size_t>(layout(p).first_block[p.count] + 1);
}

void multi_sum_squares(const MultiSumSquaresParams& p) {
  HYDRA_CHECK(p.count <= MultiSumSquaresParams::kMax)
      << "multi_sum_squares: at most " << MultiSumSquaresParams::kMax;
  const SquaresLayout l = layout(p);
  const int64_t blocks = l.first_block[p.count];
  double* part = static_cast<double*>(p.workspace);
  cudaStream_t s = as_stream(p.stream);
  if (blocks > 0) {
    dispatch_float(p.dtype, "multi_sum_squares", [&](auto tag) {
      using T = typename decltype(tag)::type;
      squares_kernel<T><<<blocks, 256, 0, s>>>(l, part);
      HYDRA_CUDA_LAUNCH_CHECK();
    });
  }
  if (p.add_to != nullptr) {
    squares_finish_kernel<<<1, 1024, 0, s>>>(part, blocks, p.add_to, true);
    HYDRA_CUDA_LAUNCH_CHECK();
    return;
  }
  squares_finish_kernel<<<1, 1024, 0, s>>>(part, blocks, part + blocks, false);
  HYDRA_CUDA_LAUNCH_CHECK();
  HYDRA_CUDA_CHECK(
      cudaMemcpyAsync(p.out, part + blocks, sizeof(double), cudaMemcpyDeviceToHost, s));
  HYDRA_CUDA_CHECK(cudaStreamSynchronize(s));
}

}  // namespace hydra::kernels::cuda
