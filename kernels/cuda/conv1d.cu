// Causal depthwise conv1d. Forward: a thread per (b, t, c), channels contiguous across a warp; the
// element-wise kernels run over a 2-d grid (channels in x, rows b * len + t in y, grid-strided), so a
// thread divides once per row, not per element (64-bit divisions per element cost more than the conv).
// Backward: the pre-activation gradient once into scratch, then a thread per input element, and the
// weight/bias gradients from per-block partials over fixed row groups combined in order.
#include <algorithm>

#include "kernels/conv1d.h"
#include "kernels/cuda/common.cuh"

namespace hydra::kernels::cuda {
namespace {

constexpr int64_t kRows = 64;  // rows per weight-gradient partial
constexpr int kMaxW = 8;       // the widest conv the kernels take; loops over taps unroll to it (guarded
                               // by the real width), so per-tap values stay in registers

template <class T>
struct Conv {
  const T* x;
  const T* prefix;
  int64_t len, channels, width;
  __device__ compute_t<T> at(int64_t b, int64_t s, int64_t c) const {
    if (s >= 0) return load(x, (b * len + s) * channels + c);
    if (!prefix) return compute_t<T>(0);
    return load(prefix, (b * (width - 1) + (width - 1 + s)) * channels + c);
  }
};

template <class T>
__device__ compute_t<T> pre(const Conv<T>& cv, const T* w, const T* bias, int64_t b, int64_t t, int64_t c) {
  compute_t<T> acc = bias ? load(bias, c) : compute_t<T>(0);
#pragma unroll
  for (int k = 0; k < kMaxW; ++k)
    if (k < cv.width) acc += load(w, c * cv.width + k) * cv.at(b, t - (cv.width - 1) + k, c);
  return acc;
}

constexpr int kChannelThreads = 128;

// The 2-d grid of the element-wise kernels: x over channels, y over rows (at most 65535, grid-strided).
inline dim3 row_grid(int64_t rows, int64_t channels) {
  return dim3(static_cast<unsigned>((channels + kChannelThreads - 1) / kChannelThreads),
              static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
}

template <class T>
__global__ void conv_fwd_kernel(Conv<T> cv, const T* __restrict w, const T* __restrict bias, T* __restrict y,
                                int64_t rows, bool silu) {
  using C = compute_t<T>;
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= cv.channels) return;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const C v = pre(cv, w, bias, r / cv.len, r % cv.len, c);
    y[r * cv.channels + c] = convert<T>(silu ? v / (C(1) + exp(-v)) : v);
  }
}

template <class T>
__global__ void conv_gpre_kernel(Conv<T> cv, const T* __restrict w, const T* __restrict bias, const T* __restrict gy,
                                 compute_t<T>* __restrict gpre, int64_t rows, bool silu) {
  using C = compute_t<T>;
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= cv.channels) return;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t e = r * cv.channels + c;
    C g = load(gy, e);
    if (silu) {
      const C v = pre(cv, w, bias, r / cv.len, r % cv.len, c), s = C(1) / (C(1) + exp(-v));
      g *= s * (C(1) + v * (C(1) - s));
    }
    gpre[e] = g;
  }
}

// x at time s feeds outputs t = s..s+W-1 through tap s - t + W - 1. Times -(W-1)..-1 are the prefix.
template <class T>
__global__ void conv_gx_kernel(Conv<T> cv, const T* __restrict w, const compute_t<T>* __restrict gpre,
                               T* __restrict gx, T* __restrict gprefix, int64_t batch) {
  using C = compute_t<T>;
  const int64_t W = cv.width, L = cv.len, Cn = cv.channels;
  const int64_t rows = batch * (L + W - 1), c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= Cn) return;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t b = r / (L + W - 1), s = r % (L + W - 1) - (W - 1);
    if (s < 0 && !gprefix) continue;
    C acc = 0;
#pragma unroll
    for (int k = 0; k < kMaxW; ++k) {
      const int64_t t = s + (W - 1) - k;
      if (k < W && t >= 0 && t < L) acc += load(w, c * W + k) * gpre[(b * L + t) * Cn + c];
    }
    if (s >= 0) gx[(b * L + s) * Cn + c] = convert<T>(acc);
    else gprefix[(b * (W - 1) + (W - 1 + s)) * Cn + c] = convert<T>(acc);
  }
}

// part[blk, k, c] (k < W) and part[blk, W, c] (bias) over the rows of block blk.
template <class T>
__global__ void conv_gw_partial_kernel(Conv<T> cv, const compute_t<T>* __restrict gpre, compute_t<T>* __restrict part,
                                       int64_t rows) {
  using C = compute_t<T>;
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x, blk = blockIdx.y;
  const int64_t W = cv.width, Cn = cv.channels;
  if (c >= Cn) return;
  C acc[kMaxW] = {}, bias_acc = 0;  // the taps' sums and the bias's
  for (int64_t r = blk * kRows, e = min(rows, (blk + 1) * kRows); r < e; ++r) {
    const C g = gpre[r * Cn + c];
    bias_acc += g;
    const int64_t b = r / cv.len, t = r % cv.len;
#pragma unroll
    for (int k = 0; k < kMaxW; ++k)
      if (k < W) acc[k] += g * cv.at(b, t - (W - 1) + k, c);
  }
#pragma unroll
  for (int k = 0; k < kMaxW; ++k)
    if (k < W) part[(blk * (W + 1) + k) * Cn + c] = acc[k];
  part[(blk * (W + 1) + W) * Cn + c] = bias_acc;
}

template <class T>
__global__ void conv_gw_finish_kernel(const compute_t<T>* __restrict part, T* __restrict gw, T* __restrict gbias,
                                      int64_t blocks, int64_t W, int64_t Cn) {
  using C = compute_t<T>;
  const int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (e >= (W + 1) * Cn) return;
  const int64_t k = e / Cn, c = e % Cn;
  C acc = 0;
  for (int64_t b = 0; b < blocks; ++b) acc += part[(b * (W + 1) + k) * Cn + c];
  if (k < W) gw[c * W + k] = convert<T>(acc);
  else if (gbias) gbias[c] = convert<T>(acc);
}

}  // namespace

void causal_conv1d_fwd(const CausalConv1dParams& p) {
  const int64_t total = p.batch * p.len * p.channels;
  if (total == 0) return;
  HYDRA_CHECK(p.width <= kMaxW) << "causal_conv1d: CUDA kernels support widths up to " << kMaxW << ", got " << p.width;
  dispatch_float(p.dtype, "causal_conv1d", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const Conv<T> cv{static_cast<const T*>(p.x), static_cast<const T*>(p.prefix), p.len, p.channels, p.width};
    conv_fwd_kernel<T><<<row_grid(p.batch * p.len, p.channels), kChannelThreads, 0, as_stream(p.stream)>>>(
        cv, static_cast<const T*>(p.w), static_cast<const T*>(p.bias), static_cast<T*>(p.y), p.batch * p.len, p.silu);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

size_t causal_conv1d_bwd_workspace(const CausalConv1dBwdParams& p) {
  const size_t a = p.dtype == DType::kF64 ? 8 : 4;
  const int64_t rows = p.batch * p.len, blocks = (rows + kRows - 1) / kRows;
  return a * static_cast<size_t>(rows * p.channels + blocks * (p.width + 1) * p.channels) + 256;
}

void causal_conv1d_bwd(const CausalConv1dBwdParams& p) {
  const int64_t rows = p.batch * p.len, total = rows * p.channels;
  if (total == 0) return;
  HYDRA_CHECK(p.width <= 8) << "causal_conv1d: CUDA kernels support widths up to 8, got " << p.width;
  HYDRA_CHECK(p.workspace != nullptr) << "causal_conv1d_bwd: workspace required";
  cudaStream_t s = as_stream(p.stream);
  dispatch_float(p.dtype, "causal_conv1d_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    const Conv<T> cv{static_cast<const T*>(p.x), static_cast<const T*>(p.prefix), p.len, p.channels, p.width};
    const T* w = static_cast<const T*>(p.w);
    C* gpre = static_cast<C*>(p.workspace);
    C* part = gpre + total;
    conv_gpre_kernel<T><<<row_grid(rows, p.channels), kChannelThreads, 0, s>>>(
        cv, w, static_cast<const T*>(p.bias), static_cast<const T*>(p.gy), gpre, rows, p.silu);
    HYDRA_CUDA_LAUNCH_CHECK();
    conv_gx_kernel<T><<<row_grid(p.batch * (p.len + p.width - 1), p.channels), kChannelThreads, 0, s>>>(
        cv, w, gpre, static_cast<T*>(p.gx), static_cast<T*>(p.gprefix), p.batch);
    HYDRA_CUDA_LAUNCH_CHECK();
    const int64_t blocks = (rows + kRows - 1) / kRows;
    conv_gw_partial_kernel<T><<<dim3((p.channels + 127) / 128, blocks), 128, 0, s>>>(cv, gpre, part, rows);
    HYDRA_CUDA_LAUNCH_CHECK();
    conv_gw_finish_kernel<T><<<((p.width + 1) * p.channels + 255) / 256, 256, 0, s>>>(
        part, static_cast<T*>(p.gw), static_cast<T*>(p.gbias), blocks, p.width, p.channels);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace hydra::kernels::cuda
