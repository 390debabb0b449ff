// The gated row update (kernels/gated_update.h): a warp per row; the lanes split the columns, one
// warp reduction for the gate's pre-activation (forward) or for <gout, u - s> (backward). The gated
// scan (the update applied step after step): a block per row walks the steps; its threads split the
// columns and each step is one block reduction. A thread reads back only the columns it wrote the
// step before, so the steps need no other synchronisation than the reduction's.
#include <algorithm>

#include "kernels/cuda/common.cuh"
#include "kernels/gated_update.h"

namespace hydra::kernels::cuda {
namespace {

constexpr int kThreads = 256;

template <class T>
__global__ void gated_update_fwd_kernel(GatedUpdateParams p) {
  using C = compute_t<T>;
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (kThreads / 32), n = p.cols;
  const T *s = static_cast<const T*>(p.s), *u = static_cast<const T*>(p.u),
          *w = static_cast<const T*>(p.w);
  const C b = load(static_cast<const T*>(p.b), 0);
  for (int64_t r = (int64_t(blockIdx.x) * kThreads + threadIdx.x) >> 5; r < p.rows; r += warps) {
    const T *sr = s + r * n, *ur = u + r * n;
    C z = 0;
    for (int64_t c = lane; c < n; c += 32)
      z += load(sr, c) * load(w, c) + load(ur, c) * load(w, n + c);
    z = warp_sum(z) + b;
    const C g = C(1) / (C(1) + exp(-z));
    T* out = static_cast<T*>(p.out) + r * n;
    for (int64_t c = lane; c < n; c += 32) {
      const C sv = load(sr, c);
      store(out, c, sv + g * (load(ur, c) - sv));
    }
    if (lane == 0) store(static_cast<T*>(p.gate), r, g);
  }
}

template <class T>
__global__ void gated_update_bwd_kernel(GatedUpdateBwdParams q) {
  using C = compute_t<T>;
  const GatedUpdateParams& p = q.fwd;
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (kThreads / 32), n = p.cols;
  const T *s = static_cast<const T*>(p.s), *u = static_cast<const T*>(p.u),
          *w = static_cast<const T*>(p.w);
  for (int64_t r = (int64_t(blockIdx.x) * kThreads + threadIdx.x) >> 5; r < p.rows; r += warps) {
    const T *sr = s + r * n, *ur = u + r * n, *go = static_cast<const T*>(q.gout) + r * n;
    C dot = 0;
    for (int64_t c = lane; c < n; c += 32) dot += load(go, c) * (load(ur, c) - load(sr, c));
    dot = warp_sum(dot);
    const C g = load(static_cast<const T*>(p.gate), r), dz = g * (C(1) - g) * dot;
    T *gs = static_cast<T*>(q.gs) + r * n, *gu = static_cast<T*>(q.gu) + r * n;
    for (int64_t c = lane; c < n; c += 32) {
      const C gv = load(go, c);
      store(gs, c, (C(1) - g) * gv + dz * load(w, c));
      store(gu, c, g * gv + dz * load(w, n + c));
    }
    if (lane == 0) static_cast<C*>(q.gz)[r] = dz;
  }
}

// gw[j] = sum_r dz[r] x[r, j] with x = [s | u] (j < 2 cols), gb = sum_r dz[r] (j = 2 cols): a block
// of 32 columns by 8 lanes of rows over group blockIdx.y's rows [y * per, (y + 1) * per); the
// lanes' sums are added in lane order, into `part` [groups][2 cols + 1] (or, one group, into gw and
// gb). With one block per 32 columns, the toy workspace's 32,768 rows took 350 us a call (25
// blocks).
template <class T>
__global__ void gated_update_wgrad_kernel(GatedUpdateBwdParams q, int64_t per,
                                          compute_t<T>* __restrict part) {
  using C = compute_t<T>;
  const GatedUpdateParams& p = q.fwd;
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  const int64_t n = p.cols, j = int64_t(blockIdx.x) * 32 + tx;
  const int64_t lo = int64_t(blockIdx.y) * per, hi = min(p.rows, lo + per);
  const T *s = static_cast<const T*>(p.s), *u = static_cast<const T*>(p.u);
  const C* dz = static_cast<const C*>(q.gz);
  C acc = 0;
  if (j < 2 * n) {
    const T* x = j < n ? s + j : u + (j - n);
    for (int64_t r = lo + ty; r < hi; r += kThreads / 32) acc += dz[r] * load(x, r * n);
  } else if (j == 2 * n) {
    for (int64_t r = lo + ty; r < hi; r += kThreads / 32) acc += dz[r];
  }
  __shared__ C lanes[kThreads / 32][33];
  lanes[ty][tx] = acc;
  __syncthreads();
  if (ty != 0 || j > 2 * n) return;
  C sum = 0;
  for (int k = 0; k < kThreads / 32; ++k) sum += lanes[k][tx];
  if (part != nullptr) {
    part[blockIdx.y * (2 * n + 1) + j] = sum;
    return;
  }
  if (j < 2 * n && q.gw != nullptr) store(static_cast<T*>(q.gw), j, sum);
  if (j == 2 * n && q.gb != nullptr) store(static_cast<T*>(q.gb), 0, sum);
}

// The groups' sums, in group order.
template <class T>
__global__ void gated_update_wgrad_finish_kernel(GatedUpdateBwdParams q, int64_t groups,
                                                 const compute_t<T>* __restrict part) {
  using C = compute_t<T>;
  const int64_t n = q.fwd.cols, j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j > 2 * n) return;
  C sum = 0;
  for (int64_t g = 0; g < groups; ++g) sum += part[g * (2 * n + 1) + j];
  if (j < 2 * n && q.gw != nullptr) store(static_cast<T*>(q.gw), j, sum);
  if (j == 2 * n && q.gb != nullptr) store(static_cast<T*>(q.gb), 0, sum);
}

// Groups of at least 256 rows, at most 256 groups.
int64_t wgrad_groups(int64_t rows) { return std::clamp<int64_t>((rows + 255) / 256, 1, 256); }

size_t wgrad_workspace(int64_t rows, int64_t cols, DType dtype) {
  const int64_t g = wgrad_groups(rows);
  return g == 1 ? 0 : size_t(g * (2 * cols + 1)) * (dtype == DType::kF64 ? 8 : 4);
}

template <class T>
void launch_wgrad(const GatedUpdateBwdParams& q, cudaStream_t s) {
  if (q.gw == nullptr && q.gb == nullptr) return;
  const int64_t groups = wgrad_groups(q.fwd.rows), per = (q.fwd.rows + groups - 1) / groups;
  auto* part = groups > 1 ? static_cast<compute_t<T>*>(q.workspace) : nullptr;
  HYDRA_CHECK(groups == 1 || part != nullptr) << "gated_update backward: workspace required";
  const dim3 grid(static_cast<unsigned>((2 * q.fwd.cols + 1 + 31) / 32),
                  static_cast<unsigned>(groups));
  gated_update_wgrad_kernel<T><<<grid, kThreads, 0, s>>>(q, per, part);
  HYDRA_CUDA_LAUNCH_CHECK();
  if (groups == 1) return;
  gated_update_wgrad_finish_kernel<T>
      <<<blocks_for(2 * q.fwd.cols + 1, 256), 256, 0, s>>>(q, groups, part);
  HYDRA_CUDA_LAUNCH_CHECK();
}

constexpr int kScanThreads = 128;

template <class T>
__global__ void __launch_bounds__(kScanThreads) gated_scan_fwd_kernel(GatedScanParams p) {
  using C = compute_t<T>;
  __shared__ C red[32];
  const int64_t r = blockIdx.x, R = p.rows, n = p.cols, len = R * n;
  const T *u = static_cast<const T*>(p.u), *w = static_cast<const T*>(p.w);
  T* h = static_cast<T*>(p.h);
  const C b = load(static_cast<const T*>(p.b), 0);
  for (int64_t c = threadIdx.x; c < n; c += blockDim.x)
    h[r * n + c] = static_cast<const T*>(p.s)[r * n + c];
  for (int64_t t = 0; t < p.steps; ++t) {
    const T *hr = h + t * len + r * n, *ur = u + t * len + r * n;
    C z = 0;
    for (int64_t c = threadIdx.x; c < n; c += blockDim.x)
      z += load(hr, c) * load(w, c) + load(ur, c) * load(w, n + c);
    z = block_sum(z, red) + b;
    const C g = C(1) / (C(1) + exp(-z));
    if (threadIdx.x == 0) store(static_cast<T*>(p.gate), t * R + r, g);
    T* out = h + (t + 1) * len + r * n;
    for (int64_t c = threadIdx.x; c < n; c += blockDim.x) {
      const C hv = load(hr, c);
      store(out, c, hv + g * (load(ur, c) - hv));
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kScanThreads) gated_scan_bwd_kernel(GatedScanBwdParams q) {
  using C = compute_t<T>;
  const GatedScanParams& p = q.fwd;
  __shared__ C red[32];
  const int64_t r = blockIdx.x, R = p.rows, n = p.cols, len = R * n;
  const T *u = static_cast<const T*>(p.u), *w = static_cast<const T*>(p.w),
          *h = static_cast<const T*>(p.h);
  const T* gh = static_cast<const T*>(q.gh);
  C* lam = static_cast<C*>(q.lambda) + r * n;
  for (int64_t c = threadIdx.x; c < n; c += blockDim.x)
    lam[c] = load(gh, p.steps * len + r * n + c);
  for (int64_t t = p.steps - 1; t >= 0; --t) {
    const T *hr = h + t * len + r * n, *ur = u + t * len + r * n, *gr = gh + t * len + r * n;
    C dot = 0;
    for (int64_t c = threadIdx.x; c < n; c += blockDim.x)
      dot += lam[c] * (load(ur, c) - load(hr, c));
    dot = block_sum(dot, red);
    const C g = load(static_cast<const T*>(p.gate), t * R + r), dz = g * (C(1) - g) * dot;
    if (threadIdx.x == 0) static_cast<C*>(q.gz)[t * R + r] = dz;
    T* gu = static_cast<T*>(q.gu) + t * len + r * n;
    for (int64_t c = threadIdx.x; c < n; c += blockDim.x) {
      const C l = lam[c];
      store(gu, c, g * l + dz * load(w, n + c));
      lam[c] = load(gr, c) + (C(1) - g) * l + dz * load(w, c);
    }
  }
  T* gs = static_cast<T*>(q.gs) + r * n;
  for (int64_t c = threadIdx.x; c < n; c += blockDim.x) store(gs, c, lam[c]);
}

// The scans for rows of up to K * kScanThreads columns (the toy workspace's 384: K = 3): each
// thread keeps its K columns' state (the forward's h_t, rounded to T as stored; the backward's
// lambda) and the gate's weights in registers, and loads the next step's inputs before the step's
// block sum, so that their latency overlaps it; the arithmetic and its order are the kernels' above
// (the same results). A step of the old kernels was a chain of loads, a block sum and stores,
// about 2.8 us.
template <class T, int K>
__global__ void __launch_bounds__(kScanThreads) gated_scan_fwd_reg_kernel(GatedScanParams p) {
  using C = compute_t<T>;
  __shared__ C red[32];
  const int64_t r = blockIdx.x, R = p.rows, n = p.cols, len = R * n;
  const T *u = static_cast<const T*>(p.u), *w = static_cast<const T*>(p.w);
  T* h = static_cast<T*>(p.h);
  const C b = load(static_cast<const T*>(p.b), 0);
  C hv[K], w0[K], w1[K], un[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t c = threadIdx.x + int64_t(k) * kScanThreads;
    const bool in = c < n;
    const T sv = in ? static_cast<const T*>(p.s)[r * n + c] : T();
    if (in) h[r * n + c] = sv;
    hv[k] = in ? convert<C>(sv) : C(0);
    w0[k] = in ? load(w, c) : C(0);
    w1[k] = in ? load(w, n + c) : C(0);
    un[k] = in && p.steps > 0 ? load(u, r * n + c) : C(0);
  }
  for (int64_t t = 0; t < p.steps; ++t) {
    C uc[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t c = threadIdx.x + int64_t(k) * kScanThreads;
      uc[k] = un[k];
      if (t + 1 < p.steps && c < n) un[k] = load(u, (t + 1) * len + r * n + c);
    }
    C z = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) z += hv[k] * w0[k] + uc[k] * w1[k];
    z = block_sum(z, red) + b;
    const C g = C(1) / (C(1) + exp(-z));
    if (threadIdx.x == 0) store(static_cast<T*>(p.gate), t * R + r, g);
    T* out = h + (t + 1) * len + r * n;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t c = threadIdx.x + int64_t(k) * kScanThreads;
      if (c >= n) continue;
      const T nv = convert<T>(hv[k] + g * (uc[k] - hv[k]));
      out[c] = nv;
      hv[k] = convert<C>(nv);
    }
  }
}

template <class T, int K>
__global__ void __launch_bounds__(kScanThreads) gated_scan_bwd_reg_kernel(GatedScanBwdParams q) {
  using C = compute_t<T>;
  const GatedScanParams& p = q.fwd;
  __shared__ C red[32];
  const int64_t r = blockIdx.x, R = p.rows, n = p.cols, len = R * n;
  const T *u = static_cast<const T*>(p.u), *w = static_cast<const T*>(p.w),
          *h = static_cast<const T*>(p.h), *gate = static_cast<const T*>(p.gate);
  const T* gh = static_cast<const T*>(q.gh);
  C lam[K], w0[K], w1[K], hn[K], un[K], gn[K];
  auto fetch = [&](int64_t t) {  // step t's h, u and gh
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t c = threadIdx.x + int64_t(k) * kScanThreads;
      const bool in = c < n;
      hn[k] = in ? load(h, t * len + r * n + c) : C(0);
      un[k] = in ? load(u, t * len + r * n + c) : C(0);
      gn[k] = in ? load(gh, t * len + r * n + c) : C(0);
    }
  };
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t c = threadIdx.x + int64_t(k) * kScanThreads;
    const bool in = c < n;
    lam[k] = in ? load(gh, p.steps * len + r * n + c) : C(0);
    w0[k] = in ? load(w, c) : C(0);
    w1[k] = in ? load(w, n + c) : C(0);
  }
  if (p.steps > 0) fetch(p.steps - 1);
  C gnext = p.steps > 0 ? load(gate, (p.steps - 1) * R + r) : C(0);
  for (int64_t t = p.steps - 1; t >= 0; --t) {
    C hc[K], uc[K], gc[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      hc[k] = hn[k];
      uc[k] = un[k];
      gc[k] = gn[k];
    }
    const C g = gnext;
    if (t > 0) {
      fetch(t - 1);
      gnext = load(gate, (t - 1) * R + r);
    }
    C dot = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) dot += lam[k] * (uc[k] - hc[k]);
    dot = block_sum(dot, red);
    const C dz = g * (C(1) - g) * dot;
    if (threadIdx.x == 0) static_cast<C*>(q.gz)[t * R + r] = dz;
    T* gu = static_cast<T*>(q.gu) + t * len + r * n;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t c = threadIdx.x + int64_t(k) * kScanThreads;
      if (c >= n) continue;
      const C l = lam[k];
      store(gu, c, g * l + dz * w1[k]);
      lam[k] = gc[k] + (C(1) - g) * l + dz * w0[k];
    }
  }
  T* gs = static_cast<T*>(q.gs) + r * n;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t c = threadIdx.x + int64_t(k) * kScanThreads;
    if (c < n) store(gs, c, lam[k]);
  }
}

// fn(std::integral_constant<int, K>) for the fewest columns per thread (K <= 4) that cover `cols`;
// false when the row is wider.
template <class F>
bool dispatch_scan_cols(int64_t cols, F&& fn) {
  if (cols <= kScanThreads) return fn(std::integral_constant<int, 1>{}), true;
  if (cols <= 2 * kScanThreads) return fn(std::integral_constant<int, 2>{}), true;
  if (cols <= 3 * kScanThreads) return fn(std::integral_constant<int, 3>{}), true;
  if (cols <= 4 * kScanThreads) return fn(std::integral_constant<int, 4>{}), true;
  return false;
}

}  // namespace

void gated_scan_fwd(const GatedScanParams& p) {
  if (p.rows == 0 || p.cols == 0) return;
  dispatch_float(p.dtype, "gated_scan", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto grid = static_cast<unsigned>(p.rows);
    cudaStream_t s = as_stream(p.stream);
    if (!dispatch_scan_cols(p.cols, [&](auto kc) {
          gated_scan_fwd_reg_kernel<T, decltype(kc)::value><<<grid, kScanThreads, 0, s>>>(p);
        }))
      gated_scan_fwd_kernel<T><<<grid, kScanThreads, 0, s>>>(p);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

void gated_scan_bwd(const GatedScanBwdParams& q) {
  const GatedScanParams& p = q.fwd;
  if (p.rows == 0 || p.cols == 0) return;
  dispatch_float(p.dtype, "gated_scan_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto grid = static_cast<unsigned>(p.rows);
    cudaStream_t s = as_stream(p.stream);
    if (!dispatch_scan_cols(p.cols, [&](auto kc) {
          gated_scan_bwd_reg_kernel<T, decltype(kc)::value><<<grid, kScanThreads, 0, s>>>(q);
        }))
      gated_scan_bwd_kernel<T><<<grid, kScanThreads, 0, s>>>(q);
    HYDRA_CUDA_LAUNCH_CHECK();
    if (p.steps == 0) return;
    // The gate's gradients are gated_update's over steps * rows rows: h_t for s, u_t for u.
    GatedUpdateBwdParams wq;
    wq.fwd.dtype = p.dtype;
    wq.fwd.rows = p.steps * p.rows;
    wq.fwd.cols = p.cols;
    wq.fwd.s = p.h;
    wq.fwd.u = p.u;
    wq.gz = q.gz;
    wq.gw = q.gw;
    wq.gb = q.gb;
    wq.workspace = q.workspace;
    launch_wgrad<T>(wq, as_stream(p.stream));
  });
}

size_t gated_update_bwd_workspace(const GatedUpdateBwdParams& q) {
  return wgrad_workspace(q.fwd.rows, q.fwd.cols, q.fwd.dtype);
}

size_t gated_scan_bwd_workspace(const GatedScanBwdParams& q) {
  return wgrad_workspace(q.fwd.steps * q.fwd.rows, q.fwd.cols, q.fwd.dtype);
}

void gated_update_fwd(const GatedUpdateParams& p) {
  if (p.rows == 0) return;
  dispatch_float(p.dtype, "gated_update", [&](auto tag) {
    using T = typename decltype(tag)::type;
    gated_update_fwd_kernel<T>
        <<<blocks_for(p.rows * 32, kThreads), kThreads, 0, as_stream(p.stream)>>>(p);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

void gated_update_bwd(const GatedUpdateBwdParams& q) {
  if (q.fwd.rows == 0) return;
  dispatch_float(q.fwd.dtype, "gated_update_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    gated_update_bwd_kernel<T>
        <<<blocks_for(q.fwd.rows * 32, kThreads), kThreads, 0, as_stream(q.fwd.stream)>>>(q);
    HYDRA_CUDA_LAUNCH_CHECK();
    launch_wgrad<T>(q, as_stream(q.fwd.stream));
  });
}

}  // namespace hydra::kernels::cuda
