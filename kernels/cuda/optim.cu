// AdamW: a thread per element (dense) or per (row, column) of the listed rows (row-sparse). Dense
// buffers on 16-byte boundaries go a pack of 16 bytes per array at a time (four loads in flight per
// thread, which an H200's bandwidth needs).
#include <cmath>
#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/multi_tensor.cuh"
#include "kernels/cuda/rows.cuh"
#include "kernels/optim.h"

namespace hydra::kernels::cuda {
namespace {

struct Hyper {
  double lr, beta1, beta2, eps, decay, bc1, bc2, scale;
  const double* sum_squares;  // clipping on the device (optim.h): scale from it
  double clip;
};

// The launch's clipping factor into h.scale (clipping on the device); false: update nothing.
__device__ __forceinline__ bool device_scale(Hyper& h) {
  return h.sum_squares == nullptr || clip_scale(*h.sum_squares, h.clip, &h.scale);
}

Hyper hyper(const AdamWParams& a) {
  return {a.lr,
          a.beta1,
          a.beta2,
          a.eps,
          1 - a.lr * a.weight_decay,
          a.bias_correction1,
          a.bias_correction2,
          a.grad_scale,
          a.sum_squares,
          a.clip};
}

template <class T>
__device__ __forceinline__ void update(T* p, const T* g, T* m, T* v, int64_t pi, int64_t gi,
                                       const Hyper& h) {
  using C = compute_t<T>;
  const C gr = load(g, gi) * C(h.scale);
  const C mi = C(h.beta1) * load(m, pi) + C(1 - h.beta1) * gr;
  const C vi = C(h.beta2) * load(v, pi) + C(1 - h.beta2) * gr * gr;
  m[pi] = convert<T>(mi);
  v[pi] = convert<T>(vi);
  p[pi] = convert<T>(load(p, pi) * C(h.decay) -
                     C(h.lr) * (mi / C(h.bc1)) / (sqrt(vi / C(h.bc2)) + C(h.eps)));
}

template <class T>
using Pack = RowPack<T>;  // 16 bytes of T (rows.cuh)

// One pack of each array, element by element: update's arithmetic (kDivide: bias corrections
// divided, bc1 and bc2 as given) or multi_adamw_kernel's (their inverses, multiplied).
template <bool kDivide, class T, class C>
__device__ __forceinline__ void update_pack(Pack<T>* p, const Pack<T>* g, Pack<T>* m, Pack<T>* v,
                                            int64_t i, C scale, C b1, C omb1, C b2, C omb2, C decay,
                                            C lr, C bc1, C bc2, C eps) {
  const Pack<T> gp = g[i], mp = m[i], vp = v[i], pp = p[i];
  Pack<T> mo, vo, po;
#pragma unroll
  for (int k = 0; k < Pack<T>::kN; ++k) {
    const C gr = convert<C>(gp.v[k]) * scale;
    const C mi = b1 * convert<C>(mp.v[k]) + omb1 * gr;
    const C vi = b2 * convert<C>(vp.v[k]) + omb2 * gr * gr;
    mo.v[k] = convert<T>(mi);
    vo.v[k] = convert<T>(vi);
    const C mh = kDivide ? mi / bc1 : mi * bc1, vh = kDivide ? vi / bc2 : vi * bc2;
    po.v[k] = convert<T>(convert<C>(pp.v[k]) * decay - lr * mh / (sqrt(vh) + eps));
  }
  m[i] = mo;
  v[i] = vo;
  p[i] = po;
}

template <class T>
__global__ void adamw_kernel(T* p, const T* g, T* m, T* v, int64_t n, Hyper h, bool vec) {
  using C = compute_t<T>;
  if (!device_scale(h)) return;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t done = 0;
  if (vec) {
    constexpr int kN = Pack<T>::kN;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n / kN; i += stride)
      update_pack<true>(reinterpret_cast<Pack<T>*>(p), reinterpret_cast<const Pack<T>*>(g),
                        reinterpret_cast<Pack<T>*>(m), reinterpret_cast<Pack<T>*>(v), i, C(h.scale),
                        C(h.beta1), C(1 - h.beta1), C(h.beta2), C(1 - h.beta2), C(h.decay), C(h.lr),
                        C(h.bc1), C(h.bc2), C(h.eps));
    done = n / kN * kN;
  }
  for (int64_t i = done + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += stride)
    update(p, g, m, v, i, i, h);
}

template <class T>
__global__ void adamw_rows_kernel(T* p, const T* g, T* m, T* v, const int64_t* rows, int64_t k,
                                  int64_t cols, Hyper h) {
  if (!device_scale(h)) return;
  const int64_t total = k * cols;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = e / cols, c = e % cols;
    update(p, g, m, v, rows[j] * cols + c, e, h);
  }
}

// The rows r with hits[r] != 0; g holds every row.
template <class T>
__global__ void adamw_hit_rows_kernel(T* p, const T* g, T* m, T* v, const int32_t* hits,
                                      int64_t num_rows, int64_t cols, Hyper h) {
  if (!device_scale(h)) return;
  const int64_t total = num_rows * cols;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x)
    if (hits[e / cols] != 0) update(p, g, m, v, e, e, h);
}

// The fused step over many tensors: block b works on chunk (b - first[t]) of tensor t.
constexpr int64_t kMultiChunk = 8192;  // elements per block

struct MultiTensor {
  void* p;
  const void* g;
  void* m;
  void* v;
  int64_t n;
  float lr, decay;
};

struct MultiLayout {
  int count;
  MultiTensor t[MultiAdamWParams::kMax];
  int32_t first[MultiAdamWParams::kMax + 1];
  float beta1, beta2, eps, bc1, bc2, scale;
  const double* sum_squares;  // clipping on the device (optim.h): scale from it
  double clip;
};

template <class T>
__global__ void __launch_bounds__(256) multi_adamw_kernel(const __grid_constant__ MultiLayout l) {
  using C = compute_t<T>;
  float scale_f = l.scale;
  if (l.sum_squares != nullptr) {
    double s = 1;
    if (!clip_scale(*l.sum_squares, l.clip, &s)) return;
    scale_f = static_cast<float>(s);
  }
  const int32_t blk = blockIdx.x;
  const int lo = multi_tensor_of(l.first, l.count, blk);
  const MultiTensor& d = l.t[lo];
  T* p = static_cast<T*>(d.p);
  const T* g = static_cast<const T*>(d.g);
  T* m = static_cast<T*>(d.m);
  T* v = static_cast<T*>(d.v);
  const int64_t begin = int64_t(blk - l.first[lo]) * kMultiChunk,
                end = min(d.n, begin + kMultiChunk);
  const C b1 = l.beta1, b2 = l.beta2, lr = d.lr, decay = d.decay, eps = l.eps,
          inv_bc1 = C(1) / C(l.bc1), inv_bc2 = C(1) / C(l.bc2), scale = scale_f;
  int64_t from = begin;  // begin is a multiple of the pack width (kMultiChunk is)
  if (aligned16(p) && aligned16(g) && aligned16(m) && aligned16(v)) {
    constexpr int kN = Pack<T>::kN;
    for (int64_t i = begin / kN + threadIdx.x; i < end / kN; i += blockDim.x)
      update_pack<false>(reinterpret_cast<Pack<T>*>(p), reinterpret_cast<const Pack<T>*>(g),
                         reinterpret_cast<Pack<T>*>(m), reinterpret_cast<Pack<T>*>(v), i, scale, b1,
                         C(1) - b1, b2, C(1) - b2, decay, lr, inv_bc1, inv_bc2, eps);
    from = end / kN * kN;
  }
  for (int64_t i = from + threadIdx.x; i < end; i += blockDim.x) {
    const C gr = load(g, i) * scale;
    const C mi = b1 * load(m, i) + (C(1) - b1) * gr;
    const C vi = b2 * load(v, i) + (C(1) - b2) * gr * gr;
    m[i] = convert<T>(mi);
    v[i] = convert<T>(vi);
    p[i] = convert<T>(load(p, i) * decay - lr * (mi * inv_bc1) / (sqrt(vi * inv_bc2) + eps));
  }
}

}  // namespace

void multi_adamw_step(const MultiAdamWParams& mp) {
  HYDRA_CHECK(mp.count >= 0 && mp.count <= MultiAdamWParams::kMax)
      << "multi_adamw: count " << mp.count;
  if (mp.count == 0) return;
  MultiLayout l{};
  l.count = mp.count;
  l.first[0] = 0;
  for (int i = 0; i < mp.count; ++i) {
    const AdamWTensor& t = mp.t[i];
    l.t[i] = {t.param,
              t.grad,
              t.m,
              t.v,
              t.n,
              static_cast<float>(t.lr),
              static_cast<float>(1 - t.lr * t.weight_decay)};
    const int64_t blocks = l.first[i] + (t.n + kMultiChunk - 1) / kMultiChunk;
    HYDRA_CHECK(blocks < (int64_t(1) << 31)) << "multi_adamw: too many elements in one launch";
    l.first[i + 1] = static_cast<int32_t>(blocks);
  }
  l.beta1 = static_cast<float>(mp.beta1);
  l.beta2 = static_cast<float>(mp.beta2);
  l.eps = static_cast<float>(mp.eps);
  l.bc1 = static_cast<float>(mp.bias_correction1);
  l.bc2 = static_cast<float>(mp.bias_correction2);
  l.scale = static_cast<float>(mp.grad_scale);
  l.sum_squares = mp.sum_squares;
  l.clip = mp.clip;
  const int32_t blocks = l.first[mp.count];
  if (blocks == 0) return;
  dispatch_float(mp.dtype, "multi_adamw", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (std::is_same_v<T, double>) {
      // f64 (reference precision): the per-tensor kernel keeps double hyper-parameters.
      for (int i = 0; i < mp.count; ++i) {
        adamw_step(mp.single(i));
      }
    } else {
      multi_adamw_kernel<T><<<blocks, 256, 0, as_stream(mp.stream)>>>(l);
      HYDRA_CUDA_LAUNCH_CHECK();
    }
  });
}

void adamw_step(const AdamWParams& a) {
  if (a.n == 0) return;
  dispatch_float(a.dtype, "adamw", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool vec = aligned16(a.param) && aligned16(a.grad) && aligned16(a.m) && aligned16(a.v);
    adamw_kernel<T>
        <<<blocks_for(vec ? a.n / Pack<T>::kN + 1 : a.n, 256), 256, 0, as_stream(a.stream)>>>(
            static_cast<T*>(a.param), static_cast<const T*>(a.grad), static_cast<T*>(a.m),
            static_cast<T*>(a.v), a.n, hyper(a), vec);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

void adamw_rows_step(const AdamWRowsParams& r) {
  const AdamWParams& a = r.base;
  if (r.hits != nullptr) {
    if (r.num_rows * r.cols == 0) return;
    dispatch_float(a.dtype, "adamw_rows", [&](auto tag) {
      using T = typename decltype(tag)::type;
      adamw_hit_rows_kernel<T>
          <<<blocks_for(r.num_rows * r.cols, 256), 256, 0, as_stream(a.stream)>>>(
              static_cast<T*>(a.param), static_cast<const T*>(a.grad), static_cast<T*>(a.m),
              static_cast<T*>(a.v), r.hits, r.num_rows, r.cols, hyper(a));
      HYDRA_CUDA_LAUNCH_CHECK();
    });
    return;
  }
  if (r.k == 0) return;
  dispatch_float(a.dtype, "adamw_rows", [&](auto tag) {
    using T = typename decltype(tag)::type;
    adamw_rows_kernel<T><<<blocks_for(r.k * r.cols, 256), 256, 0, as_stream(a.stream)>>>(
        static_cast<T*>(a.param), static_cast<const T*>(a.grad), static_cast<T*>(a.m),
        static_cast<T*>(a.v), r.rows, r.k, r.cols, hyper(a));
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace hydra::kernels::cuda
