// Fused RMSNorm. Forward: a block per row, sum of squares in fp32, then y = x * rstd * w.
// Backward: a block per row for gx (one extra dot product per row); gw from per-block partials over
// fixed groups of rows, combined in order by a second kernel (deterministic, no atomics).
#include <algorithm>

#include "kernels/cuda/async_copy.cuh"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/rows.cuh"
#include "kernels/rms_norm.h"

namespace hydra::kernels::cuda {
namespace {

constexpr int64_t kGwRows = 64;  // rows per gw partial
constexpr int kBwdWarpItems =
    2;  // the backward holds x, gy, the next row's x and gy, w and gw sums
constexpr int kFwdWarpItems =
    2;  // more packs per lane cost occupancy (measured: 4 and 8 are slower)

template <class T>
__global__ void rms_norm_fwd_kernel(const T* __restrict x, const T* __restrict w, T* __restrict y,
                                    compute_t<T>* __restrict rstd, int64_t cols, double eps) {
  using C = compute_t<T>;
  __shared__ C shared[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * cols;
  C ss = 0;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const C v = load(xr, j);
    ss += v * v;
  }
  ss = block_sum(ss, shared);
  const C rs = fast_rsqrt(ss / C(cols) + C(eps));
  if (threadIdx.x == 0 && rstd) rstd[row] = rs;
  T* yr = y + row * cols;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x)
    yr[j] = convert<T>(load(xr, j) * rs * (w ? load(w, j) : C(1)));
}

template <class T>
__global__ void rms_norm_bwd_kernel(const T* __restrict x, const T* __restrict w,
                                    const compute_t<T>* __restrict rstd, const T* __restrict gy,
                                    T* __restrict gx, int64_t cols) {
  using C = compute_t<T>;
  __shared__ C shared[32];
  const int64_t row = blockIdx.x;
  const T *xr = x + row * cols, *gr = gy + row * cols;
  C dot = 0;  // sum_j gy*w*x
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x)
    dot += load(gr, j) * (w ? load(w, j) : C(1)) * load(xr, j);
  dot = block_sum(dot, shared);
  const C rs = rstd[row], c = rs * rs * dot / C(cols);
  T* gxr = gx + row * cols;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x)
    gxr[j] = convert<T>(rs * (load(gr, j) * (w ? load(w, j) : C(1)) - load(xr, j) * c));
}

// part[blk, j] = sum over rows of block blk of gy * x * rstd (thread per column, rows in order).
template <class T>
__global__ void rms_norm_gw_partial_kernel(const T* __restrict x,
                                           const compute_t<T>* __restrict rstd,
                                           const T* __restrict gy, compute_t<T>* __restrict part,
                                           int64_t rows, int64_t cols) {
  using C = compute_t<T>;
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x, blk = blockIdx.y;
  if (j >= cols) return;
  C acc = 0;
  for (int64_t r = blk * kGwRows, e = min(rows, (blk + 1) * kGwRows); r < e; ++r)
    acc += load(gy, r * cols + j) * load(x, r * cols + j) * rstd[r];
  part[blk * cols + j] = acc;
}

// Rows in registers (rows.cuh): x read once, y written once.
template <class T, int ITEMS, class P>
__global__ void __launch_bounds__(P::kMaxThreads, (row_min_blocks<P, ITEMS, T>()))
    rms_norm_fwd_vec_kernel(const T* __restrict x, const T* __restrict w, T* __restrict y,
                            compute_t<T>* __restrict rstd, int64_t rows, int64_t cols,
                            compute_t<T> inv_cols, compute_t<T> eps) {
  using C = compute_t<T>;
  constexpr int N = pack_width<T>();
  __shared__ C shared[32];
  const int64_t row = P::row(), packs = cols / N;
  if (row >= rows) return;  // whole warps (WarpRow) or nothing (BlockRow)
  wait_for_previous_grid();
  RowRegs<T, ITEMS, P> xr, wr;
  xr.load(x + row * cols, packs);
  if (w)
    wr.load(w, packs);  // before the reduction: its latency overlaps x's instead of following it
  C ss = 0;
#pragma unroll
  for (int k = 0; k < ITEMS; ++k)
    if (xr.in[k])
#pragma unroll
      for (int j = 0; j < N; ++j) ss += xr.at(k, j) * xr.at(k, j);
  ss = P::sum(ss, shared);
  const C rs = fast_rsqrt(ss * inv_cols + eps);
  if (P::lane() == 0 && rstd) rstd[row] = rs;
  auto* out = reinterpret_cast<RowPack<T>*>(y + row * cols);
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    if (!xr.in[k]) continue;
    RowPack<T> o;
#pragma unroll
    for (int j = 0; j < N; ++j) o.v[j] = convert<T>(xr.at(k, j) * rs * (w ? wr.at(k, j) : C(1)));
    out[xr.index(k)] = o;
  }
}

// A block per group of rows [r0, r1): gx for each row, and the group's gw partial summed in
// registers. BlockRow: the block walks the rows in order. WarpRow: warp w takes rows r0 + w, r0 + w
// + 8, ...; the warps' partials are then added in warp order. The next row is loaded while this one
// is reduced.
// One kernel of about 120 lines: its two row walks (BlockRow, WarpRow) share the registers that
// hold a row and the gw partial; split into functions they would be inlined back.
template <class T, int ITEMS, class P, bool STAGE>
__global__ void __launch_bounds__(P::kMaxThreads)
    rms_norm_bwd_vec_kernel(const T* __restrict x, const T* __restrict w,
                            const compute_t<T>* __restrict rstd, const T* __restrict gy,
                            T* __restrict gx, compute_t<T>* __restrict part, int64_t rows,
                            int64_t cols, compute_t<T> inv_cols, int64_t group) {
  using C = compute_t<T>;
  constexpr int N = pack_width<T>();
  __shared__ C shared[32];
  const int64_t packs = cols / N, r0 = blockIdx.x * group, r1 = min(rows, r0 + group);
  const int64_t step = P::kWarp ? kWarpRowsPerBlock : 1,
                first = r0 + (P::kWarp ? threadIdx.x >> 5 : 0);
  wait_for_previous_grid();
  RowRegs<T, ITEMS, P> wr;
  if (w) wr.load(w, packs);
  C gw_acc[ITEMS][N] = {};
  // The next row is loaded while this one is reduced. Block rows of one pack per thread hold it in
  // registers. Otherwise (STAGE) cp.async copies it into two shared-memory buffers of the thread's
  // own (no barriers; a buffer is refilled one row after its values were read). In registers it
  // cost too much: block rows of 2 items were 2.4x slower under BlockRow's 64-register bound, warp
  // rows took 114 registers.
  constexpr bool kPrefetch = !P::kWarp && ITEMS == 1;
  static_assert(!(STAGE && kPrefetch), "one way of prefetching");
  RowRegs<T, ITEMS, P> xn, gn;
  if (kPrefetch && first < r1) {
    xn.load(x + first * cols, packs);
    gn.load(gy + first * cols, packs);
  }
  extern __shared__ __align__(16) unsigned char stage_raw[];  // [buffer][x, gy][ITEMS][blockDim.x]
  auto* stage = reinterpret_cast<RowPack<T>*>(stage_raw);
  auto slot = [&](int buf, int tensor, int k) -> RowPack<T>& {
    return stage[((buf * 2 + tensor) * ITEMS + k) * blockDim.x + threadIdx.x];
  };
  auto stage_row = [&](int buf, int64_t r) {
    const auto* xs = reinterpret_cast<const RowPack<T>*>(x + r * cols);
    const auto* gs = reinterpret_cast<const RowPack<T>*>(gy + r * cols);
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int64_t i = RowRegs<T, ITEMS, P>::index(k);
      const bool valid = i < packs;
      cp_async16(&slot(buf, 0, k), valid ? xs + i : xs, valid);
      cp_async16(&slot(buf, 1, k), valid ? gs + i : gs, valid);
    }
    cp_async_commit();
  };
  int buf = 0;
  if (STAGE && first < r1) stage_row(0, first);
  for (int64_t r = first; r < r1; r += step) {
    RowRegs<T, ITEMS, P> xr, gr;
    if constexpr (STAGE) {
      if (r + step < r1) {
        stage_row(buf ^ 1, r + step);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) {
        xr.in[k] = gr.in[k] = RowRegs<T, ITEMS, P>::index(k) < packs;
        xr.p[k] = slot(buf, 0, k);
        gr.p[k] = slot(buf, 1, k);
      }
      buf ^= 1;
    } else if constexpr (kPrefetch) {
      xr = xn;
      gr = gn;
      if (r + step < r1) {
        xn.load(x + (r + step) * cols, packs);
        gn.load(gy + (r + step) * cols, packs);
      }
    } else {
      xr.load(x + r * cols, packs);
      gr.load(gy + r * cols, packs);
    }
    const C rs = rstd[r];  // loaded before the reduction, so that its latency is hidden
    C dot = 0;
#pragma unroll
    for (int k = 0; k < ITEMS; ++k)
      if (xr.in[k])
#pragma unroll
        for (int j = 0; j < N; ++j) dot += gr.at(k, j) * (w ? wr.at(k, j) : C(1)) * xr.at(k, j);
    dot = P::sum(dot, shared);
    const C c = rs * rs * dot * inv_cols;
    auto* out = reinterpret_cast<RowPack<T>*>(gx + r * cols);
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      if (!xr.in[k]) continue;
      RowPack<T> o;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        o.v[j] = convert<T>(rs * (gr.at(k, j) * (w ? wr.at(k, j) : C(1)) - xr.at(k, j) * c));
        gw_acc[k][j] += gr.at(k, j) * xr.at(k, j) * rs;
      }
      out[xr.index(k)] = o;
    }
  }
  if (!part) return;
  if constexpr (P::kWarp) {
    // Every warp's partial into shared memory, one barrier, then each column summed over the warps
    // in warp order (the order a sequential warp-by-warp sum would have, so results do not change).
    constexpr int kCols = 32 * ITEMS * N;  // the widest row this layout holds
    __shared__ C sum_sh[kWarpRowsPerBlock][kCols];
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int k = 0; k < ITEMS; ++k)
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const int64_t col = RowRegs<T, ITEMS, P>::col(k, j);
        if (col < cols) sum_sh[warp][col] = gw_acc[k][j];
      }
    __syncthreads();
    for (int64_t col = threadIdx.x; col < cols; col += blockDim.x) {
      C acc = sum_sh[0][col];
      for (int v = 1; v < kWarpRowsPerBlock; ++v) acc += sum_sh[v][col];
      part[blockIdx.x * cols + col] = acc;
    }
  } else {
#pragma unroll
    for (int k = 0; k < ITEMS; ++k)
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const int64_t col = RowRegs<T, ITEMS, P>::col(k, j);
        if (col < cols) part[blockIdx.x * cols + col] = gw_acc[k][j];
      }
  }
}

// Rows per backward block, at most kGwRows. Block rows: about 1056 blocks (8 per SM of an H100) to
// hide memory latency. Warp rows: about 264 blocks (2 per SM), a multiple of 8 rows each; each warp
// then walks 8 rows or more and the gw partials (written and summed again) are 4x fewer (at width
// 384: 1.2x faster than 1056 blocks on the H100, and 0.61 / 0.58 / 0.55 of copy for 264 / 528 /
// 1056 on the H200). Depends on the shape only, so the gw summation order is fixed.
int64_t bwd_group(int64_t rows, bool warp) {
  const int64_t target = warp ? 264 : 1056;
  const int64_t g = std::clamp<int64_t>((rows + target - 1) / target, 1, kGwRows);
  return warp ? (g + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock * kWarpRowsPerBlock : g;
}

RowLayout bwd_layout(const RmsNormBwdParams& p) {
  RowLayout l;
  dispatch_float(p.dtype, "rms_norm_backward", [&](auto tag) {
    l = row_layout(p.cols, pack_width<typename decltype(tag)::type>(), kBwdWarpItems);
  });
  return l;
}

// ---- several norms of one input (RmsNormMultiParams): a warp per row, its lanes along the row's
// units (16-byte packs, or elements when the row is not a whole number of packs), ITEMS units a
// lane; the backward keeps each lane's gw partials for its columns in registers over the warp's
// rows, then writes them as the warp's partial (summed over the warps in order afterwards).
constexpr int kMultiThreads = 256, kMultiWarps = kMultiThreads / 32;
constexpr int kMultiBlocks = 264;  // backward blocks at most (2 an SM): the partials' count

template <class T, bool VEC>
struct Units {
  using C = compute_t<T>;
  static constexpr int kN = VEC ? RowPack<T>::kN : 1;
  __device__ static void load(const void* base, int64_t u, C (&v)[kN]) {
    if constexpr (VEC) {
      const RowPack<T> p = reinterpret_cast<const RowPack<T>*>(base)[u];
#pragma unroll
      for (int j = 0; j < kN; ++j) v[j] = convert<C>(p.v[j]);
    } else {
      v[0] = load_one(base, u);
    }
  }
  __device__ static C load_one(const void* base, int64_t u) {
    return ::hydra::kernels::cuda::load(static_cast<const T*>(base), u);
  }
  __device__ static void store(void* base, int64_t u, const C (&v)[kN]) {
    if constexpr (VEC) {
      RowPack<T> p;
#pragma unroll
      for (int j = 0; j < kN; ++j) p.v[j] = convert<T>(v[j]);
      reinterpret_cast<RowPack<T>*>(base)[u] = p;
    } else {
      static_cast<T*>(base)[u] = convert<T>(v[0]);
    }
  }
};

template <class T, bool VEC, int ITEMS>
__global__ void __launch_bounds__(kMultiThreads)
    rms_norm_multi_fwd_kernel(const RmsNormMultiParams p) {
  using C = compute_t<T>;
  using U = Units<T, VEC>;
  constexpr int kN = U::kN;
  const int lane = threadIdx.x & 31;
  const int64_t units = p.cols / kN, warps = int64_t(gridDim.x) * kMultiWarps;
  for (int64_t r = blockIdx.x * int64_t(kMultiWarps) + (threadIdx.x >> 5); r < p.rows; r += warps) {
    const T* xr = static_cast<const T*>(p.x) + r * p.cols;
    C xv[ITEMS][kN];
    C ss = 0;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t u = lane + 32 * i;
      if (u < units) {
        U::load(xr, u, xv[i]);
#pragma unroll
        for (int j = 0; j < kN; ++j) ss += xv[i][j] * xv[i][j];
      }
    }
    ss = warp_sum(ss);
    const C rs = fast_rsqrt(ss / C(p.cols) + C(p.eps));
    if (lane == 0 && p.rstd) static_cast<C*>(p.rstd)[r] = rs;
    for (int k = 0; k < p.count; ++k) {
      T* yr = static_cast<T*>(p.y[k]) + r * p.cols;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int64_t u = lane + 32 * i;
        if (u >= units) continue;
        C wv[kN], o[kN];
        U::load(p.w[k], u, wv);
#pragma unroll
        for (int j = 0; j < kN; ++j) o[j] = xv[i][j] * rs * wv[j];
        U::store(yr, u, o);
      }
    }
  }
}

template <class T, bool VEC, int ITEMS>
__global__ void __launch_bounds__(kMultiThreads)
    rms_norm_multi_bwd_kernel(const RmsNormMultiBwdParams p, compute_t<T>* __restrict part) {
  using C = compute_t<T>;
  using U = Units<T, VEC>;
  constexpr int kN = U::kN, kK = kRmsNormMaxWeights;
  const int lane = threadIdx.x & 31;
  const int64_t units = p.cols / kN, warps = int64_t(gridDim.x) * kMultiWarps,
                warp = blockIdx.x * int64_t(kMultiWarps) + (threadIdx.x >> 5);
  C gw[kK][ITEMS][kN];
#pragma unroll
  for (int k = 0; k < kK; ++k)
#pragma unroll
    for (int i = 0; i < ITEMS; ++i)
#pragma unroll
      for (int j = 0; j < kN; ++j) gw[k][i][j] = 0;
  for (int64_t r = warp; r < p.rows; r += warps) {
    const int64_t off = r * p.cols;
    const C rs = static_cast<const C*>(p.rstd)[r];
    C xv[ITEMS][kN], a[ITEMS][kN];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t u = lane + 32 * i;
#pragma unroll
      for (int j = 0; j < kN; ++j) xv[i][j] = a[i][j] = 0;
      if (u < units) U::load(static_cast<const T*>(p.x) + off, u, xv[i]);
    }
#pragma unroll
    for (int k = 0; k < kK; ++k) {
      if (k >= p.count || p.gy[k] == nullptr) continue;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int64_t u = lane + 32 * i;
        if (u >= units) continue;
        C g[kN], wv[kN];
        U::load(static_cast<const T*>(p.gy[k]) + off, u, g);
        U::load(p.w[k], u, wv);
#pragma unroll
        for (int j = 0; j < kN; ++j) {
          a[i][j] += g[j] * wv[j];
          gw[k][i][j] += g[j] * xv[i][j] * rs;
        }
      }
    }
    C dot = 0;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i)
#pragma unroll
      for (int j = 0; j < kN; ++j) dot += a[i][j] * xv[i][j];
    dot = warp_sum(dot);
    const C c = rs * rs * dot / C(p.cols);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t u = lane + 32 * i;
      if (u >= units) continue;
      C o[kN];
#pragma unroll
      for (int j = 0; j < kN; ++j) o[j] = rs * (a[i][j] - xv[i][j] * c);
      if (p.accumulate_gx) {  // into the gradient summed so far: one rounding
        C prev[kN];
        U::load(static_cast<const T*>(p.gx) + off, u, prev);
#pragma unroll
        for (int j = 0; j < kN; ++j) o[j] += prev[j];
      }
      U::store(static_cast<T*>(p.gx) + off, u, o);
    }
  }
  // The warp's partials: part[warp][k][col].
#pragma unroll
  for (int k = 0; k < kK; ++k) {
    if (k >= p.count) continue;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t u = lane + 32 * i;
      if (u >= units) continue;
#pragma unroll
      for (int j = 0; j < kN; ++j) part[(warp * p.count + k) * p.cols + u * kN + j] = gw[k][i][j];
    }
  }
}

// gw_k[c] from the column sums of the partials ([warps, count * cols]).
template <class C, class T>
struct MultiGwStore {
  RmsNormMultiBwdParams p;
  __device__ void operator()(int64_t e, C v) const {
    const int64_t k = e / p.cols, c = e % p.cols;
    if (p.gw[k] != nullptr) static_cast<T*>(p.gw[k])[c] = convert<T>(v);
  }
};

// The layout a shape takes: VEC (whole packs) or elements, and the units a lane holds.
struct MultiLayout {
  bool vec = false;
  int items = 0;  // 0: not supported
};
MultiLayout multi_layout(DType dtype, int64_t cols, int count) {
  MultiLayout l;
  if (count < 1 || count > kRmsNormMaxWeights || cols < 1) return l;
  dispatch_float(dtype, "rms_norm_multi", [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kN = RowPack<T>::kN;
    const bool vec = sizeof(T) <= 4 && cols % kN == 0;
    const int64_t units = vec ? cols / kN : cols;
    // Registers: the backward's partials are 4 * items * (pack elements); at most 64.
    const int64_t max_items = vec ? 64 / (kRmsNormMaxWeights * kN) : 4;
    const int64_t items = (units + 31) / 32;
    if (items > max_items) return;
    l.vec = vec;
    l.items = items <= 1 ? 1 : items <= 2 ? 2 : 4;
  });
  return l;
}

template <class F>
void dispatch_multi_items(int items, F&& f) {
  switch (items) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    default:
      return f(std::integral_constant<int, 4>{});
  }
}

int64_t multi_bwd_blocks(int64_t rows) {
  return std::clamp<int64_t>((rows + kMultiWarps - 1) / kMultiWarps, 1, kMultiBlocks);
}
}  // namespace

void rms_norm_fwd(const RmsNormParams& p) {
  if (p.rows == 0) return;
  dispatch_float(p.dtype, "rms_norm", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const RowLayout l = row_layout(p.cols, pack_width<T>(), kFwdWarpItems);
    if (l.items && aligned16(p.x) && aligned16(p.y) && (!p.w || aligned16(p.w))) {
      dispatch_layout<kFwdWarpItems>(l, [&](auto items, auto policy) {
        launch_after_previous(rms_norm_fwd_vec_kernel<T, items.value, decltype(policy)>,
                              dim3(l.blocks(p.rows)), dim3(l.threads), 0, as_stream(p.stream),
                              static_cast<const T*>(p.x), static_cast<const T*>(p.w),
                              static_cast<T*>(p.y), static_cast<compute_t<T>*>(p.rstd), p.rows,
                              p.cols, compute_t<T>(1.0 / double(p.cols)), compute_t<T>(p.eps));
      });
      HYDRA_CUDA_LAUNCH_CHECK();
      return;
    }
    rms_norm_fwd_kernel<T><<<p.rows, row_threads(p.cols, 4), 0, as_stream(p.stream)>>>(
        static_cast<const T*>(p.x), static_cast<const T*>(p.w), static_cast<T*>(p.y),
        static_cast<compute_t<T>*>(p.rstd), p.cols, p.eps);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

size_t rms_norm_bwd_workspace(const RmsNormBwdParams& p) {
  if (!p.gw || p.rows == 0) return 0;
  const size_t a = p.dtype == DType::kF64 ? 8 : 4;
  const RowLayout l = bwd_layout(p);
  const int64_t g =
      l.items ? bwd_group(p.rows, l.warp) : kGwRows;  // the element-wise path uses kGwRows
  return a * static_cast<size_t>((p.rows + g - 1) / g * p.cols);
}

void rms_norm_bwd(const RmsNormBwdParams& p) {
  if (p.rows == 0) return;
  dispatch_float(p.dtype, "rms_norm_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    cudaStream_t s = as_stream(p.stream);
    const T* x = static_cast<const T*>(p.x);
    const C* rstd = static_cast<const C*>(p.rstd);
    const T* gy = static_cast<const T*>(p.gy);
    const RowLayout l = bwd_layout(p);
    if (l.items && aligned16(p.x) && aligned16(p.gy) && aligned16(p.gx) &&
        (!p.w || aligned16(p.w))) {
      HYDRA_CHECK(!p.gw || p.workspace != nullptr) << "rms_norm_bwd: workspace required for gw";
      const int64_t group = bwd_group(p.rows, l.warp), blocks = (p.rows + group - 1) / group;
      C* part = p.gw ? static_cast<C*>(p.workspace) : nullptr;
      dispatch_layout<kBwdWarpItems>(l, [&](auto items, auto policy) {
        constexpr int kItems = items.value;
        using Policy = decltype(policy);
        // Staging takes two buffers of x and gy: up to 2 packs per thread, within 48 KB.
        const size_t smem = size_t(2) * 2 * kItems * l.threads * sizeof(RowPack<T>);
        if constexpr (kItems <= 2 && (Policy::kWarp || kItems > 1)) {
          if (smem <= 48 * 1024) {
            launch_after_previous(rms_norm_bwd_vec_kernel<T, kItems, Policy, true>, dim3(blocks),
                                  dim3(l.threads), smem, s, x, static_cast<const T*>(p.w), rstd, gy,
                                  static_cast<T*>(p.gx), part, p.rows, p.cols,
                                  C(1.0 / double(p.cols)), group);
            return;
          }
        }
        launch_after_previous(rms_norm_bwd_vec_kernel<T, kItems, Policy, false>, dim3(blocks),
                              dim3(l.threads), 0, s, x, static_cast<const T*>(p.w), rstd, gy,
                              static_cast<T*>(p.gx), part, p.rows, p.cols, C(1.0 / double(p.cols)),
                              group);
      });
      HYDRA_CUDA_LAUNCH_CHECK();
      if (p.gw) {
        column_sum<C, T>(part, blocks, p.cols, static_cast<T*>(p.gw), C(1), s);
        HYDRA_CUDA_LAUNCH_CHECK();
      }
      return;
    }
    rms_norm_bwd_kernel<T><<<p.rows, row_threads(p.cols, 4), 0, s>>>(
        x, static_cast<const T*>(p.w), rstd, gy, static_cast<T*>(p.gx), p.cols);
    HYDRA_CUDA_LAUNCH_CHECK();
    if (p.gw) {
      HYDRA_CHECK(p.workspace != nullptr) << "rms_norm_bwd: workspace required for gw";
      const int64_t blocks = (p.rows + kGwRows - 1) / kGwRows;
      C* part = static_cast<C*>(p.workspace);
      rms_norm_gw_partial_kernel<T>
          <<<dim3((p.cols + 127) / 128, blocks), 128, 0, s>>>(x, rstd, gy, part, p.rows, p.cols);
      HYDRA_CUDA_LAUNCH_CHECK();
      column_sum<C, T>(part, blocks, p.cols, static_cast<T*>(p.gw), C(1), s);
      HYDRA_CUDA_LAUNCH_CHECK();
    }
  });
}

bool rms_norm_multi_supported(DType dtype, int64_t cols, int count) {
  return multi_layout(dtype, cols, count).items > 0;
}

size_t rms_norm_multi_bwd_workspace(const RmsNormMultiBwdParams& p) {
  if (p.rows == 0) return 0;
  const size_t a = p.dtype == DType::kF64 ? 8 : 4;
  return a * static_cast<size_t>(multi_bwd_blocks(p.rows) * kMultiWarps * p.count * p.cols);
}

void rms_norm_multi_fwd(const RmsNormMultiParams& p) {
  if (p.rows == 0) return;
  const MultiLayout l = multi_layout(p.dtype, p.cols, p.count);
  HYDRA_CHECK(l.items > 0) << "rms_norm_multi: " << p.count << " weights of " << p.cols
                           << " columns are not supported on CUDA (rms_norm_multi_supported)";
  dispatch_float(p.dtype, "rms_norm_multi", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto blocks = blocks_for(p.rows * 32, kMultiThreads);
    auto launch = [&](auto vec) {
      constexpr bool kVec = decltype(vec)::value;
      dispatch_multi_items(l.items, [&](auto items) {
        rms_norm_multi_fwd_kernel<T, kVec, decltype(items)::value>
            <<<blocks, kMultiThreads, 0, as_stream(p.stream)>>>(p);
      });
    };
    if (l.vec)
      launch(std::true_type{});
    else
      launch(std::false_type{});
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

void rms_norm_multi_bwd(const RmsNormMultiBwdParams& p) {
  if (p.rows == 0) return;
  const MultiLayout l = multi_layout(p.dtype, p.cols, p.count);
  HYDRA_CHECK(l.items > 0) << "rms_norm_multi_backward: " << p.count << " weights of " << p.cols
                           << " columns are not supported on CUDA";
  HYDRA_CHECK(p.workspace != nullptr) << "rms_norm_multi_backward: workspace required";
  cudaStream_t s = as_stream(p.stream);
  dispatch_float(p.dtype, "rms_norm_multi_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    C* part = static_cast<C*>(p.workspace);
    const int64_t blocks = multi_bwd_blocks(p.rows);
    auto launch = [&](auto vec) {
      constexpr bool kVec = decltype(vec)::value;
      dispatch_multi_items(l.items, [&](auto items) {
        rms_norm_multi_bwd_kernel<T, kVec, decltype(items)::value>
            <<<static_cast<unsigned>(blocks), kMultiThreads, 0, s>>>(p, part);
      });
    };
    if (l.vec)
      launch(std::true_type{});
    else
      launch(std::false_type{});
    HYDRA_CUDA_LAUNCH_CHECK();
    column_sum_to(part, blocks * kMultiWarps, p.count * p.cols, MultiGwStore<C, T>{p}, s);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace hydra::kernels::cuda
