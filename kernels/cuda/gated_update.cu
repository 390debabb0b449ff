// The gated row update (kernels/gated_update.h): a warp per row; the lanes split the columns, one
// warp reduction for the gate's pre-activation (forward) or for <gout, u - s> (backward). The gated
// scan (the update applied step after step): a block per row walks the steps; its threads split the
// columns and each step is one block reduction. A thread reads back only the columns it wrote the
// step before, so the steps need no other synchronisation than the reduction's.
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
// of 32 columns by 8 row groups; the groups' sums are added in order (deterministic).
template <class T>
__global__ void gated_update_wgrad_kernel(GatedUpdateBwdParams q) {
  using C = compute_t<T>;
  const GatedUpdateParams& p = q.fwd;
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  const int64_t n = p.cols, j = int64_t(blockIdx.x) * 32 + tx;
  const T *s = static_cast<const T*>(p.s), *u = static_cast<const T*>(p.u);
  const C* dz = static_cast<const C*>(q.gz);
  C acc = 0;
  if (j < 2 * n) {
    const T* x = j < n ? s + j : u + (j - n);
    for (int64_t r = ty; r < p.rows; r += kThreads / 32) acc += dz[r] * load(x, r * n);
  } else if (j == 2 * n) {
    for (int64_t r = ty; r < p.rows; r += kThreads / 32) acc += dz[r];
  }
  __shared__ C part[kThreads / 32][33];
  part[ty][tx] = acc;
  __syncthreads();
  if (ty != 0) return;
  C sum = 0;
  for (int k = 0; k < kThreads / 32; ++k) sum += part[k][tx];
  if (j < 2 * n && q.gw != nullptr) store(static_cast<T*>(q.gw), j, sum);
  if (j == 2 * n && q.gb != nullptr) store(static_cast<T*>(q.gb), 0, sum);
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

}  // namespace

void gated_scan_fwd(const GatedScanParams& p) {
  if (p.rows == 0 || p.cols == 0) return;
  dispatch_float(p.dtype, "gated_scan", [&](auto tag) {
    using T = typename decltype(tag)::type;
    gated_scan_fwd_kernel<T>
        <<<static_cast<unsigned>(p.rows), kScanThreads, 0, as_stream(p.stream)>>>(p);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

void gated_scan_bwd(const GatedScanBwdParams& q) {
  const GatedScanParams& p = q.fwd;
  if (p.rows == 0 || p.cols == 0) return;
  dispatch_float(p.dtype, "gated_scan_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    gated_scan_bwd_kernel<T>
        <<<static_cast<unsigned>(p.rows), kScanThreads, 0, as_stream(p.stream)>>>(q);
    HYDRA_CUDA_LAUNCH_CHECK();
    if ((q.gw == nullptr && q.gb == nullptr) || p.steps == 0) return;
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
    const auto blocks = static_cast<unsigned>((2 * p.cols + 1 + 31) / 32);
    gated_update_wgrad_kernel<T><<<blocks, kThreads, 0, as_stream(p.stream)>>>(wq);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
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
    if (q.gw == nullptr && q.gb == nullptr) return;
    const auto blocks = static_cast<unsigned>((2 * q.fwd.cols + 1 + 31) / 32);
    gated_update_wgrad_kernel<T><<<blocks, kThreads, 0, as_stream(q.fwd.stream)>>>(q);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace hydra::kernels::cuda
