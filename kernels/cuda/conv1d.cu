// Causal depthwise conv1d, the width a template argument (1 to 8). Forward and the backward's
// element-wise passes: a thread per (channel, batch entry, segment of time) slides along time with
// the taps and the window in registers (channels contiguous across a warp), reading each element
// once. Backward: the pre-activation gradient once into fp32 scratch, the input gradient by a
// window over the following ones, and the weight/bias gradients from per-block partials over fixed
// row groups combined in order.
#include <algorithm>
#include <type_traits>

#include "kernels/conv1d.h"
#include "kernels/cuda/common.cuh"

namespace hydra::kernels::cuda {
namespace {

constexpr int64_t kRows = 64;  // rows per weight-gradient partial
constexpr int kMaxW = 8;  // the widest conv the kernels take (the weight gradient's loops unroll to
                          // it, guarded by the real width, so per-tap sums stay in registers)

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

constexpr int kChannelThreads = 128;

// Sliding-window forms: a thread per (channel, batch entry, segment of kSeg time steps) keeps the
// taps in registers and the last W inputs (or the next W pre-activation gradients) in a shift
// register, so it reads each element once (plus W - 1 at the segment's start) instead of W times.
constexpr int64_t kSeg = 64;

template <class F>
void dispatch_width(int64_t width, F&& f) {
  switch (width) {
    case 1:
      f(std::integral_constant<int, 1>{});
      break;
    case 2:
      f(std::integral_constant<int, 2>{});
      break;
    case 3:
      f(std::integral_constant<int, 3>{});
      break;
    case 4:
      f(std::integral_constant<int, 4>{});
      break;
    case 5:
      f(std::integral_constant<int, 5>{});
      break;
    case 6:
      f(std::integral_constant<int, 6>{});
      break;
    case 7:
      f(std::integral_constant<int, 7>{});
      break;
    case 8:
      f(std::integral_constant<int, 8>{});
      break;
    default:
      HYDRA_FAIL() << "causal_conv1d: CUDA kernels support widths 1 to " << kMaxW << ", got "
                   << width;
  }
}

inline dim3 seg_grid(int64_t jobs, int64_t channels) {
  return dim3(static_cast<unsigned>((channels + kChannelThreads - 1) / kChannelThreads),
              static_cast<unsigned>(std::min<int64_t>(jobs, 65535)));
}

// y (forward, GPRE false) or gpre = gy * SiLU'(pre) (GPRE true) over segments of time.
template <class T, int W, bool GPRE>
__global__ void conv_window_kernel(Conv<T> cv, const T* __restrict w, const T* __restrict bias,
                                   const T* __restrict gy, T* __restrict y,
                                   compute_t<T>* __restrict gpre, int64_t batch, int64_t segs,
                                   bool silu) {
  using C = compute_t<T>;
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x, Cn = cv.channels, L = cv.len;
  if (c >= Cn) return;
  C wk[W];
#pragma unroll
  for (int k = 0; k < W; ++k) wk[k] = load(w, c * W + k);
  const C bc = bias ? load(bias, c) : C(0);
  for (int64_t job = blockIdx.y; job < batch * segs; job += gridDim.y) {
    const int64_t b = job / segs, t0 = (job % segs) * kSeg, t1 = min(L, t0 + kSeg);
    C win[W];  // win[k] = x at t - (W - 1) + k
#pragma unroll
    for (int k = 0; k < W - 1; ++k) win[k] = cv.at(b, t0 - (W - 1) + k, c);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e = (b * L + t) * Cn + c;
      win[W - 1] = load(cv.x, e);
      C v = bc;
#pragma unroll
      for (int k = 0; k < W; ++k) v += wk[k] * win[k];
      if constexpr (GPRE) {
        C g = load(gy, e);
        if (silu) {
          const C s = C(1) / (C(1) + exp(-v));
          g *= s * (C(1) + v * (C(1) - s));
        }
        gpre[e] = g;
      } else {
        y[e] = convert<T>(silu ? v / (C(1) + exp(-v)) : v);
      }
#pragma unroll
      for (int k = 0; k < W - 1; ++k) win[k] = win[k + 1];
    }
  }
}

// gx[s] = sum_k w[k] gpre[s + W - 1 - k] over segments of s in [lo, L), lo = -(W - 1) when the
// prefix's gradient is wanted (those land in gprefix), else 0.
template <class T, int W>
__global__ void conv_gx_window_kernel(Conv<T> cv, const T* __restrict w,
                                      const compute_t<T>* __restrict gpre, T* __restrict gx,
                                      T* __restrict gprefix, int64_t batch, int64_t segs) {
  using C = compute_t<T>;
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x, Cn = cv.channels, L = cv.len;
  if (c >= Cn) return;
  C wk[W];
#pragma unroll
  for (int k = 0; k < W; ++k) wk[k] = load(w, c * W + k);
  const int64_t lo = gprefix ? -(W - 1) : 0;
  for (int64_t job = blockIdx.y; job < batch * segs; job += gridDim.y) {
    const int64_t b = job / segs, s0 = lo + (job % segs) * kSeg, s1 = min(L, s0 + kSeg);
    auto g = [&](int64_t t) { return t >= 0 && t < L ? gpre[(b * L + t) * Cn + c] : C(0); };
    C fut[W];  // fut[j] = gpre at s + j
#pragma unroll
    for (int j = 0; j < W; ++j) fut[j] = g(s0 + j);
    for (int64_t s = s0; s < s1; ++s) {
      C acc = 0;
#pragma unroll
      for (int k = 0; k < W; ++k) acc += wk[k] * fut[W - 1 - k];
      if (s >= 0)
        gx[(b * L + s) * Cn + c] = convert<T>(acc);
      else
        gprefix[(b * (W - 1) + (W - 1 + s)) * Cn + c] = convert<T>(acc);
#pragma unroll
      for (int j = 0; j < W - 1; ++j) fut[j] = fut[j + 1];
      fut[W - 1] = g(s + W);
    }
  }
}

// part[blk, k, c] (k < W) and part[blk, W, c] (bias) over the rows of block blk.
template <class T>
__global__ void conv_gw_partial_kernel(Conv<T> cv, const compute_t<T>* __restrict gpre,
                                       compute_t<T>* __restrict part, int64_t rows) {
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
__global__ void conv_gw_finish_kernel(const compute_t<T>* __restrict part, T* __restrict gw,
                                      T* __restrict gbias, int64_t blocks, int64_t W, int64_t Cn) {
  using C = compute_t<T>;
  const int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (e >= (W + 1) * Cn) return;
  const int64_t k = e / Cn, c = e % Cn;
  C acc = 0;
  for (int64_t b = 0; b < blocks; ++b) acc += part[(b * (W + 1) + k) * Cn + c];
  if (k < W)
    gw[c * W + k] = convert<T>(acc);
  else if (gbias)
    gbias[c] = convert<T>(acc);
}

}  // namespace

void causal_conv1d_fwd(const CausalConv1dParams& p) {
  const int64_t total = p.batch * p.len * p.channels;
  if (total == 0) return;
  HYDRA_CHECK(p.width <= kMaxW) << "causal_conv1d: CUDA kernels support widths up to " << kMaxW
                                << ", got " << p.width;
  dispatch_float(p.dtype, "causal_conv1d", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const Conv<T> cv{static_cast<const T*>(p.x), static_cast<const T*>(p.prefix), p.len, p.channels,
                     p.width};
    const int64_t segs = (p.len + kSeg - 1) / kSeg;
    dispatch_width(p.width, [&](auto wc) {
      constexpr int W = decltype(wc)::value;
      conv_window_kernel<T, W, false>
          <<<seg_grid(p.batch * segs, p.channels), kChannelThreads, 0, as_stream(p.stream)>>>(
              cv, static_cast<const T*>(p.w), static_cast<const T*>(p.bias), nullptr,
              static_cast<T*>(p.y), nullptr, p.batch, segs, p.silu);
    });
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
  HYDRA_CHECK(p.width <= 8) << "causal_conv1d: CUDA kernels support widths up to 8, got "
                            << p.width;
  HYDRA_CHECK(p.workspace != nullptr) << "causal_conv1d_bwd: workspace required";
  cudaStream_t s = as_stream(p.stream);
  dispatch_float(p.dtype, "causal_conv1d_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    const Conv<T> cv{static_cast<const T*>(p.x), static_cast<const T*>(p.prefix), p.len, p.channels,
                     p.width};
    const T* w = static_cast<const T*>(p.w);
    C* gpre = static_cast<C*>(p.workspace);
    C* part = gpre + total;
    const int64_t segs = (p.len + kSeg - 1) / kSeg;
    const int64_t gx_segs = (p.len + (p.gprefix ? p.width - 1 : 0) + kSeg - 1) / kSeg;
    dispatch_width(p.width, [&](auto wc) {
      constexpr int W = decltype(wc)::value;
      conv_window_kernel<T, W, true>
          <<<seg_grid(p.batch * segs, p.channels), kChannelThreads, 0, s>>>(
              cv, w, static_cast<const T*>(p.bias), static_cast<const T*>(p.gy), nullptr, gpre,
              p.batch, segs, p.silu);
      HYDRA_CUDA_LAUNCH_CHECK();
      conv_gx_window_kernel<T, W>
          <<<seg_grid(p.batch * gx_segs, p.channels), kChannelThreads, 0, s>>>(
              cv, w, gpre, static_cast<T*>(p.gx), static_cast<T*>(p.gprefix), p.batch, gx_segs);
    });
    HYDRA_CUDA_LAUNCH_CHECK();
    const int64_t blocks = (rows + kRows - 1) / kRows;
    conv_gw_partial_kernel<T>
        <<<dim3((p.channels + 127) / 128, blocks), 128, 0, s>>>(cv, gpre, part, rows);
    HYDRA_CUDA_LAUNCH_CHECK();
    conv_gw_finish_kernel<T><<<((p.width + 1) * p.channels + 255) / 256, 256, 0, s>>>(
        part, static_cast<T*>(p.gw), static_cast<T*>(p.gbias), blocks, p.width, p.channels);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace hydra::kernels::cuda
