// Fused cross-entropy with logits on CUDA: a block per row. The forward computes max and sum of
// exponentials in one online pass (MaxSum) and writes only per-row loss and log-sum-exp; the backward
// recomputes softmax from the saved log-sum-exp. Loss, lse and row gradients are in the compute type
// (f32 for f32/bf16 logits, f64 for f64). Targets were validated on the host by the autograd op.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/rows.cuh"
#include "kernels/loss.h"

namespace hydra::kernels::cuda {
namespace {

template <class T, class I>
__global__ void ce_fwd_kernel(const T* __restrict x, const I* __restrict tgt, compute_t<T>* __restrict loss,
                              compute_t<T>* __restrict lse, int64_t vocab, int64_t ignore_index) {
  using C = compute_t<T>;
  __shared__ C shared_m[32];
  __shared__ C shared_s[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * vocab;
  MaxSum<C> ms{C(-INFINITY), C(0)};
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) ms = combine(ms, MaxSum<C>{load(xr, j), C(1)});
  ms = block_max_sum(ms, shared_m, shared_s);
  if (threadIdx.x == 0) {
    const C l = log(ms.s) + ms.m;
    lse[row] = l;
    const int64_t t = static_cast<int64_t>(tgt[row]);
    loss[row] = t == ignore_index ? C(0) : l - load(xr, t);
  }
}

template <class T, class I, int ITEMS>
__global__ void __launch_bounds__(1024)
    ce_fwd_vec_kernel(const T* __restrict x, const I* __restrict tgt, compute_t<T>* __restrict loss,
                      compute_t<T>* __restrict lse, int64_t vocab, int64_t ignore_index) {
  using C = compute_t<T>;
  constexpr int N = pack_width<T>();
  __shared__ C shared_m[32];
  __shared__ C shared_s[32];
  const int64_t row = blockIdx.x, packs = vocab / N;
  const T* xr = x + row * vocab;
  RowRegs<T, ITEMS> r;
  r.load(xr, packs);
  MaxSum<C> ms{C(-INFINITY), C(0)};
#pragma unroll
  for (int k = 0; k < ITEMS; ++k)
    if (r.in[k])
#pragma unroll
      for (int j = 0; j < N; ++j) ms = combine(ms, MaxSum<C>{r.at(k, j), C(1)});
  ms = block_max_sum(ms, shared_m, shared_s);
  if (threadIdx.x == 0) {
    const C l = log(ms.s) + ms.m;
    lse[row] = l;
    const int64_t t = static_cast<int64_t>(tgt[row]);
    loss[row] = t == ignore_index ? C(0) : l - load(xr, t);
  }
}

template <class T, class I>
__global__ void ce_bwd_kernel(const T* __restrict x, const I* __restrict tgt, const compute_t<T>* __restrict lse,
                              const compute_t<T>* __restrict grow, T* __restrict gx, int64_t vocab,
                              int64_t ignore_index) {
  using C = compute_t<T>;
  const int64_t row = blockIdx.x;
  const int64_t t = static_cast<int64_t>(tgt[row]);
  const T* xr = x + row * vocab;
  T* gr = gx + row * vocab;
  if (t == ignore_index) {
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) gr[j] = convert<T>(C(0));
    return;
  }
  const C g = grow[row], l = lse[row];
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    const C p = fast_exp(load(xr, j) - l);
    gr[j] = convert<T>(g * (j == t ? p - C(1) : p));
  }
}

template <class T, class I, int ITEMS>
__global__ void __launch_bounds__(1024)
    ce_bwd_vec_kernel(const T* __restrict x, const I* __restrict tgt, const compute_t<T>* __restrict lse,
                      const compute_t<T>* __restrict grow, T* __restrict gx, int64_t vocab, int64_t ignore_index) {
  using C = compute_t<T>;
  constexpr int N = pack_width<T>();
  const int64_t row = blockIdx.x, packs = vocab / N;
  const int64_t t = static_cast<int64_t>(tgt[row]);
  auto* out = reinterpret_cast<RowPack<T>*>(gx + row * vocab);
  if (t == ignore_index) {
    RowPack<T> z;
#pragma unroll
    for (int j = 0; j < N; ++j) z.v[j] = convert<T>(C(0));
    for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) out[i] = z;
    return;
  }
  RowRegs<T, ITEMS> r;
  r.load(x + row * vocab, packs);
  const C g = grow[row], l = lse[row];
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    if (!r.in[k]) continue;
    RowPack<T> o;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const C p = fast_exp(r.at(k, j) - l);
      o.v[j] = convert<T>(g * (RowRegs<T, ITEMS>::col(k, j) == t ? p - C(1) : p));
    }
    out[threadIdx.x + int64_t(k) * blockDim.x] = o;
  }
}

}  // namespace

void cross_entropy_fwd(const CrossEntropyParams& p) {
  if (p.rows == 0) return;
  HYDRA_CHECK(p.vocab > 0) << "cross_entropy: empty vocabulary";
  dispatch_float(p.dtype, "cross_entropy", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    dispatch_index(p.target_dtype, "cross_entropy", [&](auto itag) {
      using I = typename decltype(itag)::type;
      const auto* x = static_cast<const T*>(p.logits);
      const auto* tgt = static_cast<const I*>(p.targets);
      auto* loss = static_cast<C*>(p.loss);
      auto* lse = static_cast<C*>(p.lse);
      const RowLayout l = row_layout(p.vocab, pack_width<T>());
      if (l.items && aligned16(x)) {
        dispatch_items(l.items, [&](auto items) {
          ce_fwd_vec_kernel<T, I, items.value><<<p.rows, l.threads, 0, as_stream(p.stream)>>>(
              x, tgt, loss, lse, p.vocab, p.ignore_index);
        });
      } else {
        ce_fwd_kernel<T, I><<<p.rows, row_threads(p.vocab, 4), 0, as_stream(p.stream)>>>(x, tgt, loss, lse, p.vocab,
                                                                                        p.ignore_index);
      }
      HYDRA_CUDA_LAUNCH_CHECK();
    });
  });
}

void cross_entropy_bwd(const CrossEntropyBwdParams& p) {
  if (p.rows == 0) return;
  dispatch_float(p.dtype, "cross_entropy_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    dispatch_index(p.target_dtype, "cross_entropy_backward", [&](auto itag) {
      using I = typename decltype(itag)::type;
      const auto* x = static_cast<const T*>(p.logits);
      const auto* tgt = static_cast<const I*>(p.targets);
      const auto* lse = static_cast<const C*>(p.lse);
      const auto* grow = static_cast<const C*>(p.grow);
      auto* gx = static_cast<T*>(p.glogits);
      const RowLayout l = row_layout(p.vocab, pack_width<T>());
      if (l.items && aligned16(x) && aligned16(gx)) {
        dispatch_items(l.items, [&](auto items) {
          ce_bwd_vec_kernel<T, I, items.value><<<p.rows, l.threads, 0, as_stream(p.stream)>>>(
              x, tgt, lse, grow, gx, p.vocab, p.ignore_index);
        });
      } else {
        ce_bwd_kernel<T, I><<<p.rows, row_threads(p.vocab, 4), 0, as_stream(p.stream)>>>(x, tgt, lse, grow, gx,
                                                                                        p.vocab, p.ignore_index);
      }
      HYDRA_CUDA_LAUNCH_CHECK();
    });
  });
}

}  // namespace hydra::kernels::cuda
