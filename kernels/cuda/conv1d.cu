// Causal depthwise conv1d, the width a template argument (1 to 8). A thread per (channel, batch
// entry, segment of time; the forward two channels where the rows allow) slides along time with the
// taps and a window in registers (channels contiguous across a warp), reading each element once.
// The forward slides forward; the backward slides backward through its segment in one pass: the
// pre-activation gradient of step s (from the window of inputs and gy), the input gradient of s
// (from the W pre-activation gradients at s and after, kept in a shift register), and the segment's
// partial weight and bias sums; the partials are then summed over the segments in a fixed tree
// (column_sum). Each of x, gy and gx is read or written once; a thread loads kAhead steps' inputs
// together before using them.
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "kernels/conv1d.h"
#include "kernels/cuda/async_copy.cuh"
#include "kernels/cuda/common.cuh"

namespace hydra::kernels::cuda {
namespace {

constexpr int kMaxW = kCudaMaxConvWidth;

// The forward's V adjacent channels a thread (V = 2: two bf16 in one 4-byte access, so a warp
// moves 128 bytes an access instead of 64; toy shapes: 47 -> 38 us). Lanes<C, V> is the thread's V
// values of one step, the arithmetic applied per lane: the same operations in the same order as
// for one channel. (The backward keeps one channel a thread: in pairs, with its windows, taps and
// partial sums doubled, it took 202 us instead of 133; H200, session 36.)
template <class C, int V>
struct Lanes {
  C v[V];
  Lanes() = default;
  __device__ Lanes(C s) {  // NOLINT(google-explicit-constructor): a scalar broadcasts (C(0))
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = s;
  }
  __device__ Lanes& operator+=(const Lanes& o) {
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] += o.v[i];
    return *this;
  }
};
template <class C, int V>
__device__ Lanes<C, V> operator*(Lanes<C, V> a, const Lanes<C, V>& b) {
#pragma unroll
  for (int i = 0; i < V; ++i) a.v[i] *= b.v[i];
  return a;
}

// V elements from p + i (i a multiple of V, p + i aligned to V elements: conv_pairs checks).
template <int V, class T>
__device__ __forceinline__ Lanes<compute_t<T>, V> load_lanes(const T* p, int64_t i) {
  Lanes<compute_t<T>, V> out;
  if constexpr (V == 1) {
    out.v[0] = load(p, i);
  } else {
    struct alignas(V * sizeof(T)) Raw {
      T v[V];
    };
    const Raw r = *reinterpret_cast<const Raw*>(p + i);
#pragma unroll
    for (int k = 0; k < V; ++k) out.v[k] = convert<compute_t<T>>(r.v[k]);
  }
  return out;
}
template <int V, class T, class C>
__device__ __forceinline__ void store_lanes(T* p, int64_t i, const Lanes<C, V>& x) {
  if constexpr (V == 1) {
    p[i] = convert<T>(x.v[0]);
  } else {
    struct alignas(V * sizeof(T)) Raw {
      T v[V];
    };
    Raw r;
#pragma unroll
    for (int k = 0; k < V; ++k) r.v[k] = convert<T>(x.v[k]);
    *reinterpret_cast<Raw*>(p + i) = r;
  }
}

template <class T>
struct Conv {
  const T* x;
  const T* prefix;
  int64_t len, channels, width, x_row;  // x_row: elements between x's rows
  __device__ compute_t<T> at(int64_t b, int64_t s, int64_t c) const {
    if (s >= 0) return load(x, (b * len + s) * x_row + c);
    if (!prefix) return compute_t<T>(0);
    return load(prefix, (b * (width - 1) + (width - 1 + s)) * channels + c);
  }
};
template <class T, int V>
__device__ Lanes<compute_t<T>, V> at_lanes(const Conv<T>& cv, int64_t b, int64_t s, int64_t c) {
  if (s >= 0) return load_lanes<V>(cv.x, (b * cv.len + s) * cv.x_row + c);
  if (!cv.prefix) return compute_t<T>(0);
  return load_lanes<V>(cv.prefix, (b * (cv.width - 1) + (cv.width - 1 + s)) * cv.channels + c);
}

// The input's view of either direction's parameters.
template <class T, class P>
Conv<T> conv_of(const P& p) {
  return {static_cast<const T*>(p.x),
          static_cast<const T*>(p.prefix),
          p.len,
          p.channels,
          p.width,
          conv_x_row(p)};
}

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

// V channels a thread (the forward's pairs, Lanes).
template <int V = 1>
dim3 seg_grid(int64_t jobs, int64_t channels) {
  const int64_t threads = (channels + V - 1) / V;
  return dim3(static_cast<unsigned>((threads + kChannelThreads - 1) / kChannelThreads),
              static_cast<unsigned>(std::min<int64_t>(jobs, 65535)));
}

// Pairs when every row and pointer allows them (single precision or narrower), one channel a
// thread otherwise (odd channels, odd offsets: the tests' shapes; f64).
template <class T>
bool conv_pairs(int64_t channels, int64_t x_row, std::initializer_list<const void*> ptrs) {
  if constexpr (sizeof(T) > 4) {
    return false;
  } else {
    if (channels % 2 != 0 || x_row % 2 != 0) return false;
    for (const void* p : ptrs)
      if (p != nullptr && reinterpret_cast<uintptr_t>(p) % (2 * sizeof(T)) != 0) return false;
    return true;
  }
}

// Steps whose loads a thread issues together before using them (a thread's steps are otherwise a
// chain of dependent loads, one latency each: the backward took 200 us on toy shapes, 5x its
// memory floor).
constexpr int kAhead = 8;

// SiLU(v) = v sigmoid(v), and SiLU'(v) = sg (1 + v (1 - sg)); single precision on the MUFU.
template <class C>
__device__ __forceinline__ C conv_sigmoid(C v) {
  return C(1) / (C(1) + fast_exp(-v));
}
__device__ __forceinline__ float conv_sigmoid(float v) {
  return __fdividef(1.0f, 1.0f + fast_exp(-v));
}
template <class C, int V>
__device__ __forceinline__ Lanes<C, V> conv_sigmoid(const Lanes<C, V>& x) {
  Lanes<C, V> r;
#pragma unroll
  for (int i = 0; i < V; ++i) r.v[i] = conv_sigmoid(x.v[i]);
  return r;
}

// y = pre or SiLU(pre) over segments of time, V channels a thread.
template <class T, int W, int V>
__global__ void conv_window_kernel(Conv<T> cv, const T* __restrict w, const T* __restrict bias,
                                   T* __restrict y, int64_t batch, int64_t segs, bool silu) {
  using C = Lanes<compute_t<T>, V>;
  const int64_t c = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) * V, Cn = cv.channels,
                L = cv.len;
  if (c >= Cn) return;
  C wk[W];
#pragma unroll
  for (int k = 0; k < W; ++k)
#pragma unroll
    for (int i = 0; i < V; ++i) wk[k].v[i] = load(w, (c + i) * W + k);
  const C bc = bias ? load_lanes<V>(bias, c) : C(0);
  for (int64_t job = blockIdx.y; job < batch * segs; job += gridDim.y) {
    const int64_t b = job / segs, t0 = (job % segs) * kSeg, t1 = min(L, t0 + kSeg);
    C win[W];  // win[k] = x at t - (W - 1) + k
#pragma unroll
    for (int k = 0; k < W - 1; ++k) win[k] = at_lanes<T, V>(cv, b, t0 - (W - 1) + k, c);
    for (int64_t ta = t0; ta < t1; ta += kAhead) {
      C xs[kAhead];
#pragma unroll
      for (int u = 0; u < kAhead; ++u)
        xs[u] = ta + u < t1 ? load_lanes<V>(cv.x, (b * L + ta + u) * cv.x_row + c) : C(0);
#pragma unroll
      for (int u = 0; u < kAhead; ++u) {
        const int64_t t = ta + u;
        if (t >= t1) break;
        win[W - 1] = xs[u];
        C v = bc;
#pragma unroll
        for (int k = 0; k < W; ++k) v += wk[k] * win[k];
        store_lanes<V>(y, (b * L + t) * Cn + c, silu ? v * conv_sigmoid(v) : v);
#pragma unroll
        for (int k = 0; k < W - 1; ++k) win[k] = win[k + 1];
      }
    }
  }
}

// The backward of one segment [t0, t1) of one batch entry, walking s from t1 - 1 down to t0 (and
// on to -(W - 1) for the prefix's gradient, in the first segment when it is wanted):
//   gpre(s) = gy(s) * SiLU'(pre(s))            (gy(s) alone without the SiLU)
//   gx(s)   = sum_k w[k] gpre(s + W - 1 - k)   (gpre 0 at and after L, and before 0)
//   gw[k]  += gpre(s) x(s - (W - 1) + k),  gbias += gpre(s)
// win[k] holds x at s - (W - 1) + k, fut[j] gpre at s + j; both shift by one a step.
// The segment's gy and x (from W steps before it) come into shared memory first, by the whole block
// in 16-byte asynchronous copies where the rows allow (async_gy, async_x: stage_tile): a thread's
// own 2-byte loads, 8 steps ahead, left the kernel waiting on memory (131 us on toy shapes, 3.5x
// its floor; docs/PERF.md, session 38). The arithmetic and its order are unchanged.
constexpr size_t conv_bwd_smem(int width, size_t elem) {
  return size_t(2 * kSeg + width) * kChannelThreads * elem;
}
template <class T, int W>
__global__ void __launch_bounds__(kChannelThreads)
    conv_bwd_kernel(Conv<T> cv, const T* __restrict w, const T* __restrict bias,
                    const T* __restrict gy, T* __restrict gx, T* __restrict gprefix,
                    compute_t<T>* __restrict part, int64_t batch, int64_t segs, bool silu,
                    bool async_gy, bool async_x) {
  using C = compute_t<T>;
  const int64_t c0 = blockIdx.x * int64_t(blockDim.x), c = c0 + threadIdx.x, Cn = cv.channels,
                L = cv.len;
  const int tx = threadIdx.x, cols = static_cast<int>(min(int64_t(kChannelThreads), Cn - c0));
  const bool live = c < Cn;
  extern __shared__ __align__(16) unsigned char conv_smem[];
  T* gy_s = reinterpret_cast<T*>(conv_smem);  // [kSeg][kChannelThreads]: gy at t0 + i
  T* x_s = gy_s + kSeg * kChannelThreads;     // [kSeg + W][kChannelThreads]: x at t0 - W + i
  C wk[W];
#pragma unroll
  for (int k = 0; k < W; ++k) wk[k] = live ? load(w, c * W + k) : C(0);
  const C bc = live && bias ? load(bias, c) : C(0);
  auto gpre = [&](C g, const C(&x)[W]) {  // x[k] = x at t - (W - 1) + k, g = gy at t
    C v = bc;
#pragma unroll
    for (int k = 0; k < W; ++k) v += wk[k] * x[k];
    if (silu) {
      const C sg = conv_sigmoid(v);
      g *= sg * (C(1) + v * (C(1) - sg));
    }
    return g;
  };
  for (int64_t job = blockIdx.y; job < batch * segs; job += gridDim.y) {
    const int64_t b = job / segs, t0 = (job % segs) * kSeg, t1 = min(L, t0 + kSeg);
    // x's rows before time 0 (the first segment's): the prefix or zeros, element by element.
    const int64_t xa = max(t0 - W, int64_t{0});
    const int neg = static_cast<int>(xa - (t0 - W));
    __syncthreads();  // every thread is done with the previous job's tiles
    stage_tile(gy_s, kChannelThreads, kSeg, gy + (b * L + t0) * Cn + c0, Cn,
               static_cast<int>(t1 - t0), cols, async_gy);
    stage_tile(x_s + neg * kChannelThreads, kChannelThreads, static_cast<int>(kSeg) + W - neg,
               cv.x + (b * L + xa) * cv.x_row + c0, cv.x_row, static_cast<int>(t1 - xa), cols,
               async_x);
    cp_async_commit();
    for (int e = tx; e < neg * kChannelThreads; e += kChannelThreads)
      x_s[e] = e % kChannelThreads < cols
                   ? convert<T>(cv.at(b, t0 - W + e / kChannelThreads, c0 + e % kChannelThreads))
                   : convert<T>(C(0));
    cp_async_wait<0>();
    __syncthreads();
    if (!live) continue;
    auto x_at = [&](int64_t t) { return convert<C>(x_s[(t - (t0 - W)) * kChannelThreads + tx]); };
    C fut[W] = {};  // gpre at t1 + j for j < W - 1 (zero at and after L)
#pragma unroll
    for (int j = 0; j < W - 1; ++j) {
      const int64_t t = t1 + j;
      if (t < L) {
        C x[W];
#pragma unroll
        for (int k = 0; k < W; ++k) x[k] = cv.at(b, t - (W - 1) + k, c);
        fut[j] = gpre(load(gy, (b * L + t) * Cn + c), x);
      }
    }
    C win[W];
#pragma unroll
    for (int k = 0; k < W; ++k) win[k] = x_at(t1 - 1 - (W - 1) + k);
    C acc[W] = {}, bias_acc = 0;
    const int64_t lo = gprefix != nullptr && t0 == 0 ? -(W - 1) : t0;
    for (int64_t sa = t1 - 1; sa >= lo; sa -= kAhead) {
      // The group's gy and the inputs entering the window, loaded together.
      C gys[kAhead], xs[kAhead];
#pragma unroll
      for (int u = 0; u < kAhead; ++u) {
        const int64_t s = sa - u;
        // (s < t0 only in the first segment's prefix steps, s < 0)
        gys[u] = s >= t0 ? convert<C>(gy_s[(s - t0) * kChannelThreads + tx]) : C(0);
        xs[u] = s >= 1 ? x_at(s - W) : C(0);  // x at s - W (unused at s = 0)
      }
#pragma unroll
      for (int u = 0; u < kAhead; ++u) {
        const int64_t s = sa - u;
        if (s < lo) break;
        C g = 0;
        if (s >= 0) {
          g = gpre(gys[u], win);
          bias_acc += g;
#pragma unroll
          for (int k = 0; k < W; ++k) acc[k] += g * win[k];
#pragma unroll
          for (int k = W - 1; k > 0; --k) win[k] = win[k - 1];
          win[0] = xs[u];
        }
#pragma unroll
        for (int j = W - 1; j > 0; --j) fut[j] = fut[j - 1];
        fut[0] = g;
        C v = 0;
#pragma unroll
        for (int k = 0; k < W; ++k) v += wk[k] * fut[W - 1 - k];
        if (s >= 0)
          gx[(b * L + s) * Cn + c] = convert<T>(v);
        else
          gprefix[(b * (W - 1) + (W - 1 + s)) * Cn + c] = convert<T>(v);
      }
    }
#pragma unroll
    for (int k = 0; k < W; ++k) part[(job * (W + 1) + k) * Cn + c] = acc[k];
    part[(job * (W + 1) + W) * Cn + c] = bias_acc;
  }
}

// gw[c, k] and gbias[c] from the column sums of the partials ([jobs, (W + 1) * C]).
template <class C, class T>
struct ConvWeightStore {
  T* gw;
  T* gbias;
  int64_t width, channels;
  __device__ void operator()(int64_t j, C v) const {
    const int64_t k = j / channels, c = j % channels;
    if (k < width)
      gw[c * width + k] = convert<T>(v);
    else if (gbias != nullptr)
      gbias[c] = convert<T>(v);
  }
};

}  // namespace

void causal_conv1d_fwd(const CausalConv1dParams& p) {
  const int64_t total = p.batch * p.len * p.channels;
  if (total == 0) return;
  HYDRA_CHECK(p.width <= kMaxW) << "causal_conv1d: CUDA kernels support widths up to " << kMaxW
                                << ", got " << p.width;
  dispatch_float(p.dtype, "causal_conv1d", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const Conv<T> cv = conv_of<T>(p);
    const int64_t segs = (p.len + kSeg - 1) / kSeg;
    const bool pairs = conv_pairs<T>(p.channels, cv.x_row, {p.x, p.prefix, p.y, p.bias});
    dispatch_width(p.width, [&](auto wc) {
      constexpr int W = decltype(wc)::value;
      auto launch = [&](auto vc) {
        constexpr int V = decltype(vc)::value;
        conv_window_kernel<T, W, V>
            <<<seg_grid<V>(p.batch * segs, p.channels), kChannelThreads, 0, as_stream(p.stream)>>>(
                cv, static_cast<const T*>(p.w), static_cast<const T*>(p.bias), static_cast<T*>(p.y),
                p.batch, segs, p.silu);
      };
      if (pairs)
        launch(std::integral_constant<int, 2>{});
      else
        launch(std::integral_constant<int, 1>{});
    });
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

size_t causal_conv1d_bwd_workspace(const CausalConv1dBwdParams& p) {
  const size_t a = p.dtype == DType::kF64 ? 8 : 4;
  const int64_t jobs = p.batch * ((p.len + kSeg - 1) / kSeg);
  return a * static_cast<size_t>(jobs * (p.width + 1) * p.channels);
}

void causal_conv1d_bwd(const CausalConv1dBwdParams& p) {
  const int64_t total = p.batch * p.len * p.channels;
  if (total == 0) return;
  HYDRA_CHECK(p.width <= kMaxW) << "causal_conv1d: CUDA kernels support widths up to " << kMaxW
                                << ", got " << p.width;
  HYDRA_CHECK(p.workspace != nullptr) << "causal_conv1d_bwd: workspace required";
  cudaStream_t s = as_stream(p.stream);
  dispatch_float(p.dtype, "causal_conv1d_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    const Conv<T> cv = conv_of<T>(p);
    C* part = static_cast<C*>(p.workspace);
    const int64_t segs = (p.len + kSeg - 1) / kSeg;
    dispatch_width(p.width, [&](auto wc) {
      constexpr int W = decltype(wc)::value;
      const size_t smem = conv_bwd_smem(W, sizeof(T));
      allow_dynamic_smem(conv_bwd_kernel<T, W>, smem, "causal_conv1d_backward");
      conv_bwd_kernel<T, W><<<seg_grid(p.batch * segs, p.channels), kChannelThreads, smem, s>>>(
          cv, static_cast<const T*>(p.w), static_cast<const T*>(p.bias),
          static_cast<const T*>(p.gy), static_cast<T*>(p.gx), static_cast<T*>(p.gprefix), part,
          p.batch, segs, p.silu, chunk_rows<T>(p.gy, p.channels, p.channels, kChannelThreads),
          chunk_rows<T>(p.x, cv.x_row, p.channels, kChannelThreads));
    });
    HYDRA_CUDA_LAUNCH_CHECK();
    column_sum_to(
        part, p.batch * segs, (p.width + 1) * p.channels,
        ConvWeightStore<C, T>{static_cast<T*>(p.gw), static_cast<T*>(p.gbias), p.width, p.channels},
        s);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace hydra::kernels::cuda
