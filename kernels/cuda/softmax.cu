// Softmax / log-softmax over rows: a block per row; max and sum in fp32 with fixed trees.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/rows.cuh"
#include "kernels/softmax.h"

namespace hydra::kernels::cuda {
namespace {

// Packs per lane in the warp layout: more would cost occupancy (registers) than they save.
constexpr int kFwdWarpItems = 8, kBwdWarpItems = 4;

template <class T>
__global__ void softmax_fwd_kernel(const T* __restrict x, T* __restrict y, int64_t cols,
                                   bool log_out) {
  using C = compute_t<T>;
  __shared__ C shared[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * cols;
  C mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) mx = max(mx, load(xr, j));
  mx = block_max(mx, shared);
  C sum = 0;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) sum += exp(load(xr, j) - mx);
  sum = block_sum(sum, shared);
  T* yr = y + row * cols;
  if (log_out) {
    const C lse = log(sum) + mx;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) yr[j] = convert<T>(load(xr, j) - lse);
  } else {
    const C inv = C(1) / sum;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x)
      yr[j] = convert<T>(exp(load(xr, j) - mx) * inv);
  }
}

template <class T>
__global__ void softmax_bwd_kernel(const T* __restrict y, const T* __restrict gy, T* __restrict gx,
                                   int64_t cols, bool log_out) {
  using C = compute_t<T>;
  __shared__ C shared[32];
  const int64_t row = blockIdx.x;
  const T *yr = y + row * cols, *gr = gy + row * cols;
  C s = 0;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x)
    s += log_out ? load(gr, j) : load(gr, j) * load(yr, j);
  s = block_sum(s, shared);
  T* gxr = gx + row * cols;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x)
    gxr[j] =
        convert<T>(log_out ? load(gr, j) - exp(load(yr, j)) * s : load(yr, j) * (load(gr, j) - s));
}

template <class T, int ITEMS, class P>
__global__ void __launch_bounds__(P::kMaxThreads, (row_min_blocks<P, ITEMS, T>()))
    softmax_fwd_vec_kernel(const T* __restrict x, T* __restrict y, int64_t rows, int64_t cols,
                           bool log_out) {
  using C = compute_t<T>;
  constexpr int N = pack_width<T>();
  __shared__ C shared_m[32];
  __shared__ C shared_s[32];
  const int64_t row = P::row(), packs = cols / N;
  if (row >= rows) return;  // whole warps (WarpRow) or nothing (BlockRow)
  RowRegs<T, ITEMS, P> xr;
  xr.load(x + row * cols, packs);
  C m = C(-INFINITY);  // the thread's max
#pragma unroll
  for (int k = 0; k < ITEMS; ++k)
    if (xr.in[k])
#pragma unroll
      for (int j = 0; j < N; ++j) m = max(m, xr.at(k, j));
  auto* out = reinterpret_cast<RowPack<T>*>(y + row * cols);
  auto write = [&](auto&& value) {
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      if (!xr.in[k]) continue;
      RowPack<T> o;
#pragma unroll
      for (int j = 0; j < N; ++j) o.v[j] = convert<T>(value(k, j));
      out[xr.index(k)] = o;
    }
  };
  if constexpr (P::kWarp) {
    // Warp rows: the row's max (5 exchanges), then one exp per value kept in registers where they
    // fit, then the sum (5 exchanges). Fewer instructions than the combined (max, sum) reduction,
    // whose every level rescales with two exps; a block row saves a barrier round with it instead.
    m = warp_max(m);
    const C mref =
        m == C(-INFINITY) ? C(0) : m;  // a row of -inf: exp(-inf) = 0, not exp(-inf + inf)
    constexpr bool kKeep = ITEMS * N <= 16;
    C e[kKeep ? ITEMS : 1][kKeep ? N : 1];
    C sum = 0;
#pragma unroll
    for (int k = 0; k < ITEMS; ++k)
      if (xr.in[k])
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const C v = fast_exp_diff(xr.at(k, j), mref);
          sum += v;
          if constexpr (kKeep) e[k][j] = v;
        }
    sum = warp_sum(sum);
    if (log_out) {
      const C lse = log(sum) + m;
      write([&](int k, int j) { return xr.at(k, j) - lse; });
      return;
    }
    const C inv = C(1) / sum;
    if constexpr (kKeep)
      write([&](int k, int j) { return e[k][j] * inv; });
    else
      write([&](int k, int j) { return fast_exp_diff(xr.at(k, j), mref) * inv; });
  } else {
    LocalMaxSum<C> local;  // the thread's max, then one exp per value, then one combined reduction
    local.m = m;
#pragma unroll
    for (int k = 0; k < ITEMS; ++k)
      if (xr.in[k])
#pragma unroll
        for (int j = 0; j < N; ++j) local.sum_of(xr.at(k, j));
    const MaxSum<C> ms = P::max_sum(local.get(), shared_m, shared_s);
    if (log_out) {
      const C lse = log(ms.s) + ms.m;
      write([&](int k, int j) { return xr.at(k, j) - lse; });
      return;
    }
    const C inv = C(1) / ms.s;
    write([&](int k, int j) { return fast_exp_diff(xr.at(k, j), ms.m) * inv; });
  }
}

template <class T, int ITEMS, class P>
__global__ void __launch_bounds__(P::kMaxThreads, (row_min_blocks<P, ITEMS, T>()))
    softmax_bwd_vec_kernel(const T* __restrict y, const T* __restrict gy, T* __restrict gx,
                           int64_t rows, int64_t cols, bool log_out) {
  using C = compute_t<T>;
  constexpr int N = pack_width<T>();
  __shared__ C shared[32];
  const int64_t row = P::row(), packs = cols / N;
  if (row >= rows) return;
  RowRegs<T, ITEMS, P> yr, gr;
  yr.load(y + row * cols, packs);
  gr.load(gy + row * cols, packs);
  C s = 0;
#pragma unroll
  for (int k = 0; k < ITEMS; ++k)
    if (yr.in[k])
#pragma unroll
      for (int j = 0; j < N; ++j) s += log_out ? gr.at(k, j) : gr.at(k, j) * yr.at(k, j);
  s = P::sum(s, shared);
  auto* out = reinterpret_cast<RowPack<T>*>(gx + row * cols);
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    if (!yr.in[k]) continue;
    RowPack<T> o;
#pragma unroll
    for (int j = 0; j < N; ++j)
      o.v[j] = convert<T>(log_out ? gr.at(k, j) - fast_exp(yr.at(k, j)) * s
                                  : yr.at(k, j) * (gr.at(k, j) - s));
    out[yr.index(k)] = o;
  }
}

}  // namespace

void softmax_fwd(const SoftmaxParams& p) {
  if (p.rows == 0 || p.cols == 0) return;
  dispatch_float(p.dtype, "softmax", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const RowLayout l = row_layout(p.cols, pack_width<T>(), kFwdWarpItems);
    if (l.items && aligned16(p.x) && aligned16(p.y)) {
      dispatch_layout<kFwdWarpItems>(l, [&](auto items, auto policy) {
        softmax_fwd_vec_kernel<T, items.value, decltype(policy)>
            <<<l.blocks(p.rows), l.threads, 0, as_stream(p.stream)>>>(
                static_cast<const T*>(p.x), static_cast<T*>(p.y), p.rows, p.cols, p.log);
      });
      HYDRA_CUDA_LAUNCH_CHECK();
      return;
    }
    softmax_fwd_kernel<T><<<p.rows, row_threads(p.cols, 4), 0, as_stream(p.stream)>>>(
        static_cast<const T*>(p.x), static_cast<T*>(p.y), p.cols, p.log);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

void softmax_bwd(const SoftmaxBwdParams& p) {
  if (p.rows == 0 || p.cols == 0) return;
  dispatch_float(p.dtype, "softmax_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const RowLayout l = row_layout(p.cols, pack_width<T>(), kBwdWarpItems);
    if (l.items && aligned16(p.y) && aligned16(p.gy) && aligned16(p.gx)) {
      dispatch_layout<kBwdWarpItems>(l, [&](auto items, auto policy) {
        softmax_bwd_vec_kernel<T, items.value, decltype(policy)>
            <<<l.blocks(p.rows), l.threads, 0, as_stream(p.stream)>>>(
                static_cast<const T*>(p.y), static_cast<const T*>(p.gy), static_cast<T*>(p.gx),
                p.rows, p.cols, p.log);
      });
      HYDRA_CUDA_LAUNCH_CHECK();
      return;
    }
    softmax_bwd_kernel<T><<<p.rows, row_threads(p.cols, 4), 0, as_stream(p.stream)>>>(
        static_cast<const T*>(p.y), static_cast<const T*>(p.gy), static_cast<T*>(p.gx), p.cols,
        p.log);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace hydra::kernels::cuda
