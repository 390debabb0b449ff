// Shared device helpers: dtype dispatch for CUDA kernels (f32, bf16; f64 for reference tests),
// loads and stores that convert to/from the fp32 compute type, and launch geometry.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "base/check.h"
#include "base/dtype.h"
#include "kernels/base/dispatch.h"
#include "kernels/cuda/check.cuh"

namespace hydra::kernels::cuda {

using kernels::dispatch_all;
using kernels::dispatch_index;
using kernels::TypeTag;

// Floating storage types the CUDA kernels handle: f32, bf16, and f64 (reference precision).
template <class F>
void dispatch_float(DType dtype, std::string_view op, F&& fn) {
  switch (dtype) {
    case DType::kF32:
      return fn(TypeTag<float>{});
    case DType::kBF16:
      return fn(TypeTag<bf16>{});
    case DType::kF64:
      return fn(TypeTag<double>{});
    default:
      HYDRA_FAIL() << op << ": dtype " << dtype_name(dtype) << " is not supported on CUDA";
  }
}

// The type arithmetic happens in: double for f64 storage, float otherwise.
template <class T>
struct ComputeType {
  using type = float;
};
template <>
struct ComputeType<double> {
  using type = double;
};
template <class T>
using compute_t = typename ComputeType<T>::type;

template <class To, class From>
__host__ __device__ __forceinline__ To convert(From v) {
  return kernels::cast<To>(v);
}

template <class T>
__device__ __forceinline__ compute_t<T> load(const T* p, int64_t i) {
  return convert<compute_t<T>>(p[i]);
}
template <class T, class V>
__device__ __forceinline__ void store(T* p, int64_t i, V v) {
  p[i] = convert<T>(v);
}

inline unsigned int blocks_for(int64_t n, int threads, int64_t max_blocks = 65535LL * 16) {
  int64_t b = (n + threads - 1) / threads;
  if (b < 1) b = 1;
  return static_cast<unsigned int>(b < max_blocks ? b : max_blocks);
}

}  // namespace hydra::kernels::cuda

namespace hydra::kernels::cuda {

// Sum / max over a warp, then over a block (blockDim.x a multiple of 32, <= 1024). Fixed trees: the
// result does not depend on timing. `shared` must hold 32 values.
template <class A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <class A>
__device__ __forceinline__ A warp_max(A v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <class A>
__device__ A block_sum(A v, A* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : A(0);
  return warp_sum(v);  // every thread gets the total
}
template <class A>
__device__ A block_max(A v, A* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : -INFINITY;
  return warp_max(v);
}

// exp and reciprocal for the fp32 compute type with the hardware approximations (max error ~2 ulp,
// far inside bf16 and our f32 tolerance of 1e-5); exact for double. exp2_ftz flushes results below
// 2^-126 to zero, which saves __expf's denormal handling (three instructions of five, measured in
// the cross-entropy's SASS); nothing we compute depends on values that small.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float fast_exp(float x) { return exp2_ftz(x * 1.4426950408889634f); }
// exp(x - m) as one fused multiply-add and ex2 (m * log2(e) is loop-invariant where m is); the
// error grows with |m| like an ulp of m * log2(e) (2e-6 relative at |m| = 30).
__device__ __forceinline__ float fast_exp_diff(float x, float m) {
  return exp2_ftz(fmaf(x, 1.4426950408889634f, -m * 1.4426950408889634f));
}
__device__ __forceinline__ double fast_exp_diff(double x, double m) { return exp(x - m); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }
// 1 / sqrt(x): the special-function unit's approximation (2 ulp) in f32, a handful of instructions
// where 1.0f / sqrtf(x) is two IEEE-rounded sequences of a dozen or more each.
__device__ __forceinline__ float fast_rsqrt(float x) { return rsqrtf(x); }
__device__ __forceinline__ double fast_rsqrt(double x) { return rsqrt(x); }
__device__ __forceinline__ float fast_div(float a, float b) { return __fdividef(a, b); }
__device__ __forceinline__ double fast_div(double a, double b) { return a / b; }

// Online softmax statistics: (running max, sum of exp(x - max)); pairs combine associatively.
template <class A>
struct MaxSum {
  A m, s;
};
template <class A>
__device__ __forceinline__ MaxSum<A> combine(MaxSum<A> a, MaxSum<A> b) {
  const A m = max(a.m, b.m);
  if (m == A(-INFINITY)) return {m, A(0)};
  return {m, a.s * fast_exp(a.m - m) + b.s * fast_exp(b.m - m)};
}
template <class A>
__device__ MaxSum<A> block_max_sum(MaxSum<A> v, A* shared_m, A* shared_s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int o = 16; o > 0; o >>= 1)
    v = combine(
        v, MaxSum<A>{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)});
  __syncthreads();
  if (lane == 0) {
    shared_m[warp] = v.m;
    shared_s[warp] = v.s;
  }
  __syncthreads();
  v = lane < warps ? MaxSum<A>{shared_m[lane], shared_s[lane]} : MaxSum<A>{A(-INFINITY), A(0)};
  for (int o = 16; o > 0; o >>= 1)
    v = combine(
        v, MaxSum<A>{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)});
  return v;
}

// Per-thread statistics of values held in registers: the max first, then one exp per value.
template <class A>
struct LocalMaxSum {
  A m = A(-INFINITY), s = A(0);
  __device__ void max_of(A v) { m = max(m, v); }
  __device__ void sum_of(A v) { s += fast_exp_diff(v, m); }  // after every max_of
  __device__ MaxSum<A> get() const { return {m, m == A(-INFINITY) ? A(0) : s}; }
};

// Online update with a single value: one exp per value.
template <class A>
__device__ __forceinline__ MaxSum<A> online_add(MaxSum<A> a, A v) {
  if (v == A(-INFINITY)) return a;
  if (v <= a.m) return {a.m, a.s + fast_exp(v - a.m)};
  return {v, a.s * fast_exp(a.m - v) + A(1)};
}

// Programmatic dependent launch (Hopper): a kernel launched with launch_after_previous() may be
// scheduled while the kernel before it in the stream is still finishing; it must call
// wait_for_previous_grid() before touching global memory, which returns once that kernel has
// completed and its writes are visible. What overlaps is the launch and the block scheduling, not
// the work. Elsewhere both are plain launches and no-ops.
__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

template <class... KArgs, class... Args>
void launch_after_previous(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                           cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  HYDRA_CUDA_CHECK(
      cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(std::forward<Args>(args))...));
}

// Column sums of per-block partials: out(j, sum over b of part[b * cols + j]). A block is W columns
// x 1024 / W slices; slice y sums b = y, y + 1024 / W, ...; the slices combine in a fixed tree, so
// the result is bit-reproducible. `out` is a functor (the sum's epilogue). Launch with
// column_sum().
template <int W, class A, class Out>
__global__ void __launch_bounds__(1024)
    column_sum_kernel(const A* __restrict part, int64_t blocks, int64_t cols, Out out) {
  constexpr int S = 1024 / W;
  __shared__ A tile[S][W + 1];
  const int64_t j = blockIdx.x * int64_t(W) + threadIdx.x;
  wait_for_previous_grid();  // the partials come from the kernel before (launch_after_previous)
  A acc = 0;
  if (j < cols)
    for (int64_t b = threadIdx.y; b < blocks; b += S) acc += part[b * cols + j];
  tile[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  for (int h = S / 2; h > 0; h >>= 1) {
    if (threadIdx.y < h) tile[threadIdx.y][threadIdx.x] += tile[threadIdx.y + h][threadIdx.x];
    __syncthreads();
  }
  if (threadIdx.y == 0 && j < cols) out(j, tile[0][threadIdx.x]);
}

template <class A, class T>
struct ScaledStore {
  T* out;
  A scale;
  __device__ void operator()(int64_t j, A v) const { out[j] = convert<T>(v * scale); }
};

// The column sums of `blocks` partial rows, through out(j, sum). Narrower blocks where the columns
// are few, so that the grid covers the SMs (at 2048 columns: 128 blocks of 16 columns rather than
// 64 of 32). W depends on `cols` only, so the order of the additions is fixed for a shape.
template <class A, class Out>
void column_sum_to(const A* part, int64_t blocks, int64_t cols, Out out, cudaStream_t stream) {
  auto launch = [&](auto w) {
    constexpr int W = decltype(w)::value;
    launch_after_previous(column_sum_kernel<W, A, Out>,
                          dim3(static_cast<unsigned int>((cols + W - 1) / W)), dim3(W, 1024 / W), 0,
                          stream, part, blocks, cols, out);
  };
  if (cols >= 32 * 128)
    launch(std::integral_constant<int, 32>{});
  else if (cols >= 16 * 64)
    launch(std::integral_constant<int, 16>{});
  else
    launch(std::integral_constant<int, 8>{});
}

// out[j] = scale * the column sum.
template <class A, class T>
void column_sum(const A* part, int64_t blocks, int64_t cols, T* out, A scale, cudaStream_t stream) {
  column_sum_to(part, blocks, cols, ScaledStore<A, T>{out, scale}, stream);
}

// Threads per block for a row of `cols` handled `per_thread` elements at a time.
inline int row_threads(int64_t cols, int per_thread = 1) {
  int64_t t = (cols + per_thread - 1) / per_thread;
  t = (t + 31) / 32 * 32;
  return static_cast<int>(t < 32 ? 32 : (t > 1024 ? 1024 : t));
}

}  // namespace hydra::kernels::cuda

namespace hydra::kernels::cuda {

// Allows `kernel` (a __global__ function) `bytes` of dynamic shared memory, above the default 48
// KiB where the device opts in; a size beyond the device's limit is an error naming the op.
template <class K>
void allow_dynamic_smem(K* kernel, size_t bytes, std::string_view op) {
  static const int limit = [] {
    int dev = 0, v = 0;
    HYDRA_CUDA_CHECK(cudaGetDevice(&dev));
    HYDRA_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    return v;
  }();
  HYDRA_CHECK(bytes <= static_cast<size_t>(limit))
      << op << ": needs " << bytes << " bytes of shared memory per block, the device allows "
      << limit << " (use a smaller head or state dimension, or f32 instead of f64)";
  // Set whatever the size: the kernel's static shared memory counts against the same 48 KB default.
  if (bytes > 0)
    HYDRA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(bytes)));
}

}  // namespace hydra::kernels::cuda

namespace hydra::kernels::cuda {

// The kernel form an environment switch names (HYDRA_SCAN_FWD, HYDRA_ATTENTION): the index of its
// value among `values`, 0 (the default) when unset or empty; any other value is an error naming
// the switch and the values it takes.
inline int env_choice(const char* name, std::initializer_list<std::string_view> values) {
  const char* v = std::getenv(name);
  const std::string_view s = v ? v : "";
  if (s.empty()) return 0;
  int i = 0;
  std::string expected;
  for (const std::string_view value : values) {
    if (s == value) return i;
    expected += (i++ ? ", " : "") + std::string(value);
  }
  HYDRA_FAIL() << name << "='" << s << "': expected one of " << expected;
  return 0;
}

}  // namespace hydra::kernels::cuda
