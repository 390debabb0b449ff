// Fused cross-entropy with logits on CUDA: a block per row. The forward computes max and sum of
// exponentials in one online pass (MaxSum) and writes only per-row loss and log-sum-exp; the
// backward recomputes softmax from the saved log-sum-exp. Loss, lse and row gradients are in the
// compute type (f32 for f32/bf16 logits, f64 for f64). Targets are not checked on the host (that
// would stop it until the logits exist): a target outside the vocabulary gives its row a NaN loss
// and NaN gradients.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/rows.cuh"
#include "kernels/loss.h"

namespace hydra::kernels::cuda {
namespace {

template <class T, class I>
__global__ void ce_fwd_kernel(const T* __restrict x, const I* __restrict tgt,
                              compute_t<T>* __restrict loss, compute_t<T>* __restrict lse,
                              compute_t<T>* __restrict counted, int64_t vocab,
                              int64_t ignore_index) {
  using C = compute_t<T>;
  __shared__ C shared_m[32];
  __shared__ C shared_s[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * vocab;
  MaxSum<C> ms{C(-INFINITY), C(0)};
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) ms = online_add(ms, load(xr, j));
  ms = block_max_sum(ms, shared_m, shared_s);
  if (threadIdx.x == 0) {
    const C l = log(ms.s) + ms.m;
    lse[row] = l;
    const int64_t t = static_cast<int64_t>(tgt[row]);
    loss[row] = t == ignore_index ? C(0) : t < 0 || t >= vocab ? C(NAN) : l - load(xr, t);
    if (counted) counted[row] = t == ignore_index ? C(0) : C(1);
  }
}

// Aligned rows: a block per row streams over 16-byte packs, UNROLL packs in flight per thread; each
// thread keeps (max, sum) and rescales the sum when a pack raises the max (one exp per value).
// Rows of up to 2048 packs use 128-thread blocks (more rows in flight per SM), longer ones 256.
constexpr int kUnroll = 4;

template <class T, class I, int kFwdThreads>
__global__ void __launch_bounds__(kFwdThreads)
    ce_fwd_vec_kernel(const T* __restrict x, const I* __restrict tgt, compute_t<T>* __restrict loss,
                      compute_t<T>* __restrict lse, compute_t<T>* __restrict counted, int64_t vocab,
                      int64_t ignore_index) {
  using C = compute_t<T>;
  constexpr int N = pack_width<T>();
  __shared__ C shared_m[32];
  __shared__ C shared_s[32];
  const int64_t row = blockIdx.x, packs = vocab / N;
  const T* xr = x + row * vocab;
  const auto* src = reinterpret_cast<const RowPack<T>*>(xr);
  C m = C(-INFINITY), sum = C(0);
  for (int64_t base = threadIdx.x; base < packs; base += int64_t(kUnroll) * kFwdThreads) {
    RowPack<T> buf[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + int64_t(u) * kFwdThreads;
      if (i < packs) buf[u] = src[i];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + int64_t(u) * kFwdThreads >= packs) break;
      C pm = m;
#pragma unroll
      for (int j = 0; j < N; ++j) pm = max(pm, convert<C>(buf[u].v[j]));
      if (pm > m) {
        sum = m == C(-INFINITY) ? C(0) : sum * fast_exp(m - pm);
        m = pm;
      }
      if (m == C(-INFINITY)) continue;  // every value so far is -inf
#pragma unroll
      for (int j = 0; j < N; ++j) sum += fast_exp_diff(convert<C>(buf[u].v[j]), m);
    }
  }
  const MaxSum<C> ms = block_max_sum(MaxSum<C>{m, sum}, shared_m, shared_s);
  if (threadIdx.x == 0) {
    const C l = log(ms.s) + ms.m;
    lse[row] = l;
    const int64_t t = static_cast<int64_t>(tgt[row]);
    loss[row] = t == ignore_index ? C(0) : t < 0 || t >= vocab ? C(NAN) : l - load(xr, t);
    if (counted) counted[row] = t == ignore_index ? C(0) : C(1);
  }
}

template <class T, class I>
__global__ void ce_bwd_kernel(const T* __restrict x, const I* __restrict tgt,
                              const compute_t<T>* __restrict lse,
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
  const C g = t < 0 || t >= vocab ? C(NAN) : grow[row],
          l = lse[row];  // NaN: a target outside the vocabulary
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    const C p = fast_exp(load(xr, j) - l);
    gr[j] = convert<T>(g * (j == t ? p - C(1) : p));
  }
}

// Aligned rows: the gradient is element-wise given the row's lse, so a flat grid-stride loop over
// packs (a pack never crosses a row: vocab is a multiple of the pack width).
template <class T, class I>
__global__ void ce_bwd_vec_kernel(const T* __restrict x, const I* __restrict tgt,
                                  const compute_t<T>* __restrict lse,
                                  const compute_t<T>* __restrict grow, T* __restrict gx,
                                  int64_t rows, int64_t vocab, int64_t ignore_index) {
  using C = compute_t<T>;
  constexpr int N = pack_width<T>();
  const int64_t row_packs = vocab / N, total = rows * row_packs;
  const auto* src = reinterpret_cast<const RowPack<T>*>(x);
  auto* out = reinterpret_cast<RowPack<T>*>(gx);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / row_packs, col0 = (i - row * row_packs) * N;
    const int64_t t = static_cast<int64_t>(tgt[row]);
    RowPack<T> o;
    if (t == ignore_index) {
#pragma unroll
      for (int j = 0; j < N; ++j) o.v[j] = convert<T>(C(0));
    } else {
      const RowPack<T> in = src[i];
      const C g = t < 0 || t >= vocab ? C(NAN) : grow[row], l = lse[row];
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const C p = fast_exp_diff(convert<C>(in.v[j]), l);
        o.v[j] = convert<T>(g * (col0 + j == t ? p - C(1) : p));
      }
    }
    out[i] = o;
  }
}

// One block: the loss and count sums over all rows (a thread per strided set of rows, then the
// block's fixed tree), then the mean and the inverse denominator.
template <class C>
__global__ void __launch_bounds__(1024)
    ce_mean_kernel(const C* __restrict loss, const C* __restrict counted, C* out, C* inv,
                   int64_t rows) {
  __shared__ C shared[32];
  C s = 0, c = 0;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    s += loss[r];
    c += counted[r];
  }
  s = block_sum(s, shared);
  c = block_sum(c, shared);
  if (threadIdx.x == 0) {
    const C d = max(c, C(1));
    *out = s / d;
    *inv = C(1) / d;
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
      auto* counted = static_cast<C*>(p.counted);
      if (p.vocab % pack_width<T>() == 0 && aligned16(x)) {
        if (p.vocab / pack_width<T>() <= 2048) {
          ce_fwd_vec_kernel<T, I, 128><<<p.rows, 128, 0, as_stream(p.stream)>>>(
              x, tgt, loss, lse, counted, p.vocab, p.ignore_index);
        } else {
          ce_fwd_vec_kernel<T, I, 256><<<p.rows, 256, 0, as_stream(p.stream)>>>(
              x, tgt, loss, lse, counted, p.vocab, p.ignore_index);
        }
      } else {
        ce_fwd_kernel<T, I><<<p.rows, row_threads(p.vocab, 4), 0, as_stream(p.stream)>>>(
            x, tgt, loss, lse, counted, p.vocab, p.ignore_index);
      }
      HYDRA_CUDA_LAUNCH_CHECK();
    });
  });
}

void cross_entropy_mean(const CrossEntropyMeanParams& p) {
  HYDRA_CHECK(p.dtype == DType::kF32 || p.dtype == DType::kF64)
      << "cross_entropy_mean: f32 or f64 expected, got " << dtype_name(p.dtype);
  auto launch = [&](auto zero) {
    using C = decltype(zero);
    ce_mean_kernel<C><<<1, 1024, 0, as_stream(p.stream)>>>(
        static_cast<const C*>(p.loss), static_cast<const C*>(p.counted), static_cast<C*>(p.out),
        static_cast<C*>(p.inv), p.rows);
  };
  if (p.dtype == DType::kF32)
    launch(0.0f);
  else
    launch(0.0);
  HYDRA_CUDA_LAUNCH_CHECK();
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
      if (p.vocab % pack_width<T>() == 0 && aligned16(x) && aligned16(gx)) {
        ce_bwd_vec_kernel<T, I>
            <<<blocks_for(p.rows * (p.vocab / pack_width<T>()), 256), 256, 0,
               as_stream(p.stream)>>>(x, tgt, lse, grow, gx, p.rows, p.vocab, p.ignore_index);
      } else {
        ce_bwd_kernel<T, I><<<p.rows, row_threads(p.vocab, 4), 0, as_stream(p.stream)>>>(
            x, tgt, lse, grow, gx, p.vocab, p.ignore_index);
      }
      HYDRA_CUDA_LAUNCH_CHECK();
    });
  });
}

}  // namespace hydra::kernels::cuda
