// A Hydra block's combine, y = x + sum_i out_i * gate_i * mix_i, and its backward, each one pass
// over the rows (kernels/gated_residual.h). Each thread moves packs of V elements (16 bytes where
// the rows allow: a multiple of the pack, aligned bases; V = 1 otherwise), so that enough bytes are
// in flight to reach the memory's bandwidth. Forward: a warp per row, its lanes along the packs.
// Backward: a block per kRows rows; its 8 warps walk slabs of 32 packs of columns, a warp owning
// every 8th row. Per row a warp writes the outputs' gradients and adds its dot products (the mix's
// gradient) into the row's shared-memory slot; per slab the warps' partial gate sums meet in shared
// memory, are added in warp order and written as the block's partial, summed over the blocks
// afterwards in a fixed tree (column_sum). No atomics: the result is the same on every run.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/rows.cuh"
#include "kernels/gated_residual.h"

namespace hydra::kernels::cuda {
namespace {

constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int64_t kRows = 64;  // rows per backward block (one partial of the gate sums)
constexpr int kMaxPaths = kGatedResidualMaxPaths;

template <class T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <class T, int V>
__device__ __forceinline__ void load_pack(const void* base, int64_t e, compute_t<T> (&out)[V]) {
  const Pack<T, V> p = reinterpret_cast<const Pack<T, V>*>(static_cast<const T*>(base) + e)[0];
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = convert<compute_t<T>>(p.v[j]);
}

template <class T, int V>
__device__ __forceinline__ void store_pack(void* base, int64_t e, const compute_t<T> (&in)[V]) {
  Pack<T, V> p;
#pragma unroll
  for (int j = 0; j < V; ++j) p.v[j] = convert<T>(in[j]);
  reinterpret_cast<Pack<T, V>*>(static_cast<T*>(base) + e)[0] = p;
}

template <class T, int V>
__global__ void __launch_bounds__(kThreads) gated_residual_fwd_kernel(GatedResidualParams p) {
  using C = compute_t<T>;
  const T* mix = static_cast<const T*>(p.mix);
  const int lane = threadIdx.x % 32;
  for (int64_t r = blockIdx.x * int64_t(kWarps) + threadIdx.x / 32; r < p.rows;
       r += int64_t(gridDim.x) * kWarps) {  // a warp per row: no division by the row's width
    C m[kMaxPaths];
#pragma unroll
    for (int i = 0; i < kMaxPaths; ++i)
      m[i] = i < p.paths && mix != nullptr ? load(mix, r * p.paths + i) : C(1);
    for (int64_t c = int64_t(lane) * V; c < p.cols; c += 32 * V) {
      const int64_t e = r * p.cols + c;
      C acc[V], o[kMaxPaths][V], g[kMaxPaths][V];
      load_pack<T, V>(p.x, e, acc);
#pragma unroll
      for (int i = 0; i < kMaxPaths; ++i)
        if (i < p.paths) {
          load_pack<T, V>(p.outs[i], e, o[i]);
          load_pack<T, V>(p.gates[i], c, g[i]);
        }
#pragma unroll
      for (int i = 0; i < kMaxPaths; ++i)
        if (i < p.paths)
#pragma unroll
          for (int j = 0; j < V; ++j) acc[j] += o[i][j] * g[i][j] * m[i];
      store_pack<T, V>(p.y, e, acc);
    }
  }
}

template <class T, int V>
__global__ void __launch_bounds__(kThreads)
    gated_residual_bwd_kernel(GatedResidualBwdParams p, compute_t<T>* __restrict part) {
  using C = compute_t<T>;
  const GatedResidualParams& f = p.fwd;
  const T* mix = static_cast<const T*>(f.mix);
  __shared__ C mix_sum[kRows][kMaxPaths];
  __shared__ C gate_part[kWarps][kMaxPaths][32 * V];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int t = threadIdx.x; t < kRows * kMaxPaths; t += kThreads) (&mix_sum[0][0])[t] = C(0);
  const int64_t r0 = blockIdx.x * kRows, r1 = min(f.rows, r0 + kRows);
  const int64_t width = int64_t(f.paths) * f.cols;
  for (int64_t s0 = 0; s0 < f.cols; s0 += 32 * V) {  // a slab of 32 packs of columns
    const int64_t c = s0 + int64_t(lane) * V;
    const bool in = c < f.cols;
    C g[kMaxPaths][V], acc[kMaxPaths][V];
#pragma unroll
    for (int i = 0; i < kMaxPaths; ++i) {
      if (in && i < f.paths) load_pack<T, V>(f.gates[i], c, g[i]);
#pragma unroll
      for (int j = 0; j < V; ++j) acc[i][j] = C(0);
    }
    for (int64_t r = r0 + warp; r < r1; r += kWarps) {
      const int64_t e = r * f.cols + c;
      C gy[V], o[kMaxPaths][V], m[kMaxPaths];
      if (in) {
        load_pack<T, V>(p.gy, e, gy);
#pragma unroll
        for (int i = 0; i < kMaxPaths; ++i)
          if (i < f.paths) load_pack<T, V>(f.outs[i], e, o[i]);
      }
#pragma unroll
      for (int i = 0; i < kMaxPaths; ++i)
        if (i < f.paths) m[i] = mix != nullptr ? load(mix, r * f.paths + i) : C(1);
#pragma unroll
      for (int i = 0; i < kMaxPaths; ++i) {
        if (i >= f.paths) continue;
        C dot = 0;
        if (in) {
          C go[V];
#pragma unroll
          for (int j = 0; j < V; ++j) {
            go[j] = gy[j] * g[i][j] * m[i];
            acc[i][j] += gy[j] * o[i][j] * m[i];
            dot += gy[j] * o[i][j] * g[i][j];
          }
          if (p.gouts[i] != nullptr) store_pack<T, V>(p.gouts[i], e, go);
        }
        if (p.gmix != nullptr) {
          dot = warp_sum(dot);
          if (lane == 0) mix_sum[r - r0][i] += dot;  // the row's own warp: no race
        }
      }
    }
    // The slab's gate partials: the warps' sums meet in shared memory, added in warp order.
#pragma unroll
    for (int i = 0; i < kMaxPaths; ++i)
      if (i < f.paths)
#pragma unroll
        for (int j = 0; j < V; ++j) gate_part[warp][i][lane * V + j] = acc[i][j];
    __syncthreads();
    for (int t = threadIdx.x; t < f.paths * 32 * V; t += kThreads) {
      const int i = t / (32 * V), j = t % (32 * V);
      if (s0 + j >= f.cols) continue;
      C sum = 0;
      for (int w = 0; w < kWarps; ++w) sum += gate_part[w][i][j];
      part[blockIdx.x * width + int64_t(i) * f.cols + s0 + j] = sum;
    }
    __syncthreads();
  }
  if (p.gmix == nullptr) return;
  for (int t = threadIdx.x; t < kRows * f.paths; t += kThreads) {
    const int64_t r = r0 + t / f.paths;
    if (r < r1)
      store(static_cast<T*>(p.gmix), r * f.paths + t % f.paths, mix_sum[r - r0][t % f.paths]);
  }
}

// The gates' gradients from the column sums of the partials ([blocks, paths * cols]).
template <class C, class T>
struct GateStore {
  T* gates[kMaxPaths];
  int64_t cols;
  __device__ void operator()(int64_t j, C v) const {
    T* g = gates[j / cols];
    if (g != nullptr) g[j % cols] = convert<T>(v);
  }
};

int64_t bwd_blocks(const GatedResidualParams& f) { return (f.rows + kRows - 1) / kRows; }

// Packs of 16 bytes when every row starts on one: the width a multiple of the pack, every base
// aligned.
template <class T>
bool packed(const GatedResidualParams& f) {
  if (f.cols % pack_width<T>() != 0 || !aligned16(f.x) || !aligned16(f.y)) return false;
  for (int i = 0; i < f.paths; ++i)
    if (!aligned16(f.outs[i]) || !aligned16(f.gates[i])) return false;
  return true;
}

void check_paths(int paths) {
  HYDRA_CHECK(paths >= 1 && paths <= kMaxPaths)
      << "gated_residual: " << paths << " paths (1 to " << kMaxPaths << ")";
}

}  // namespace

void gated_residual_fwd(const GatedResidualParams& p) {
  check_paths(p.paths);
  if (p.rows == 0 || p.cols == 0) return;
  dispatch_float(p.dtype, "gated_residual", [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto launch = [&](auto v) {
      constexpr int V = decltype(v)::value;
      gated_residual_fwd_kernel<T, V>
          <<<blocks_for(p.rows, kWarps), kThreads, 0, as_stream(p.stream)>>>(p);
    };
    if (packed<T>(p))
      launch(std::integral_constant<int, pack_width<T>()>{});
    else
      launch(std::integral_constant<int, 1>{});
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

size_t gated_residual_bwd_workspace(const GatedResidualBwdParams& p) {
  const GatedResidualParams& f = p.fwd;
  const size_t a = f.dtype == DType::kF64 ? 8 : 4;
  return a * static_cast<size_t>(bwd_blocks(f) * f.paths * f.cols);
}

void gated_residual_bwd(const GatedResidualBwdParams& p) {
  const GatedResidualParams& f = p.fwd;
  check_paths(f.paths);
  if (f.rows == 0 || f.cols == 0) return;
  HYDRA_CHECK(p.workspace != nullptr) << "gated_residual_bwd: workspace required";
  dispatch_float(f.dtype, "gated_residual_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    cudaStream_t s = as_stream(f.stream);
    C* part = static_cast<C*>(p.workspace);
    const int64_t blocks = bwd_blocks(f);
    auto launch = [&](auto v) {
      constexpr int V = decltype(v)::value;
      gated_residual_bwd_kernel<T, V>
          <<<static_cast<unsigned int>(blocks), kThreads, 0, s>>>(p, part);
    };
    GatedResidualParams g = f;  // x and y are not read: check the gradients' bases instead
    g.x = p.gy;
    g.y = const_cast<void*>(p.gy);
    bool ok = packed<T>(g);
    for (int i = 0; i < f.paths; ++i) ok = ok && (p.gouts[i] == nullptr || aligned16(p.gouts[i]));
    if (ok)
      launch(std::integral_constant<int, pack_width<T>()>{});
    else
      launch(std::integral_constant<int, 1>{});
    HYDRA_CUDA_LAUNCH_CHECK();
    GateStore<C, T> out{};
    for (int i = 0; i < f.paths; ++i) out.gates[i] = static_cast<T*>(p.ggates[i]);
    out.cols = f.cols;
    column_sum_to(part, blocks, int64_t(f.paths) * f.cols, out, s);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace hydra::kernels::cuda
