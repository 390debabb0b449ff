// The MoE's weighted combine and its backward (kernels/moe_combine.h): a thread per 16-byte pack
// of an output row (or per element when rows are not packs) for out and gy, a warp per pair for
// gw. Every sum runs in a fixed order: deterministic.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/rows.cuh"
#include "kernels/moe_combine.h"

namespace hydra::kernels::cuda {
namespace {

template <class T>
__device__ __forceinline__ compute_t<T> pair_weight(const MoeCombineParams& p, int64_t row) {
  const int64_t pair = p.widx[row];
  return pair >= 0 && pair < p.pairs ? load(static_cast<const T*>(p.w), pair) : compute_t<T>(0);
}

// out[t] = sum_k w[widx[i]] y[i], i = inverse[t, k]: the sources' rows loaded together per k.
template <class T, bool VEC>
__global__ void moe_combine_fwd_kernel(const MoeCombineParams p) {
  using C = compute_t<T>;
  constexpr int kN = VEC ? RowPack<T>::kN : 1;
  const int64_t units = p.cols / kN, total = p.tokens * units;
  const T* y = static_cast<const T*>(p.y);
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = e / units, c = e % units;
    C acc[kN];
#pragma unroll
    for (int j = 0; j < kN; ++j) acc[j] = 0;
    for (int64_t k = 0; k < p.K; ++k) {
      const int64_t i = p.inverse[t * p.K + k];
      if (i < 0) continue;
      const C wi = pair_weight<T>(p, i);
      if constexpr (VEC) {
        const RowPack<T> v = reinterpret_cast<const RowPack<T>*>(y)[i * units + c];
#pragma unroll
        for (int j = 0; j < kN; ++j) acc[j] += wi * convert<C>(v.v[j]);
      } else {
        acc[0] += wi * load(y, i * p.cols + c);
      }
    }
    if constexpr (VEC) {
      RowPack<T> o;
#pragma unroll
      for (int j = 0; j < kN; ++j) o.v[j] = convert<T>(acc[j]);
      reinterpret_cast<RowPack<T>*>(p.out)[e] = o;
    } else {
      static_cast<T*>(p.out)[e] = convert<T>(acc[0]);
    }
  }
}

// gy[i] = w[widx[i]] gout[perm[i]]; padding rows (widx past the pairs) 0.
template <class T, bool VEC>
__global__ void moe_combine_gy_kernel(const MoeCombineBwdParams q) {
  using C = compute_t<T>;
  const MoeCombineParams& p = q.fwd;
  constexpr int kN = VEC ? RowPack<T>::kN : 1;
  const int64_t units = p.cols / kN, total = p.rows * units;
  const T* gout = static_cast<const T*>(q.gout);
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e / units, c = e % units, pair = p.widx[i];
    const bool live = pair >= 0 && pair < p.pairs;
    const C wi = live ? load(static_cast<const T*>(p.w), pair) : C(0);
    const int64_t t = live ? q.perm[i] : 0;
    if constexpr (VEC) {
      RowPack<T> o;
      if (live) {
        const RowPack<T> g = reinterpret_cast<const RowPack<T>*>(gout)[t * units + c];
#pragma unroll
        for (int j = 0; j < kN; ++j) o.v[j] = convert<T>(wi * convert<C>(g.v[j]));
      } else {
#pragma unroll
        for (int j = 0; j < kN; ++j) o.v[j] = convert<T>(C(0));
      }
      reinterpret_cast<RowPack<T>*>(q.gy)[e] = o;
    } else {
      static_cast<T*>(q.gy)[e] = convert<T>(live ? wi * load(gout, t * p.cols + c) : C(0));
    }
  }
}

// gw[p]: a warp per pair; the pair's k from its chunk's first token, then the dot products of its
// chunk_len rows, tokens ascending, each lane over its packs, added across the warp at the end.
template <class T, bool VEC>
__global__ void moe_combine_gw_kernel(const MoeCombineBwdParams q) {
  using C = compute_t<T>;
  const MoeCombineParams& p = q.fwd;
  constexpr int kN = VEC ? RowPack<T>::kN : 1;
  const int64_t pair = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (pair >= p.pairs) return;
  const int64_t first = pair / p.experts * p.chunk_len, units = p.cols / kN;
  int64_t kk = -1;
  for (int64_t k = 0; k < p.K && kk < 0; ++k) {
    const int64_t i0 = p.inverse[first * p.K + k];
    if (i0 >= 0 && p.widx[i0] == pair) kk = k;
  }
  C acc = 0;
  if (kk >= 0) {
    const T* gout = static_cast<const T*>(q.gout);
    const T* y = static_cast<const T*>(p.y);
    // Eight rows at a time: their dispatch rows first, then their loads together.
    constexpr int kRows = 8;
    for (int64_t j0 = 0; j0 < p.chunk_len; j0 += kRows) {
      int64_t rows[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        rows[r] = j0 + r < p.chunk_len ? p.inverse[(first + j0 + r) * p.K + kk] : -1;
      for (int64_t u = lane; u < units; u += 32) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          if (rows[r] < 0) continue;
          const int64_t t = first + j0 + r, i = rows[r];
          if constexpr (VEC) {
            const RowPack<T> g = reinterpret_cast<const RowPack<T>*>(gout)[t * units + u];
            const RowPack<T> v = reinterpret_cast<const RowPack<T>*>(y)[i * units + u];
#pragma unroll
            for (int e = 0; e < kN; ++e) acc += convert<C>(g.v[e]) * convert<C>(v.v[e]);
          } else {
            acc += load(gout, t * p.cols + u) * load(y, i * p.cols + u);
          }
        }
      }
    }
  }
  acc = warp_sum(acc);
  if (lane == 0) static_cast<T*>(q.gw)[pair] = convert<T>(acc);
}

template <class T>
bool packed_rows(const MoeCombineParams& p, const void* a, const void* b) {
  return p.cols % RowPack<T>::kN == 0 && aligned16(a) && aligned16(b);
}

}  // namespace

void moe_combine_fwd(const MoeCombineParams& p) {
  if (p.tokens == 0 || p.cols == 0) return;
  cudaStream_t s = as_stream(p.stream);
  dispatch_float(p.dtype, "moe_combine", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (packed_rows<T>(p, p.y, p.out))
      moe_combine_fwd_kernel<T, true>
          <<<blocks_for(p.tokens * p.cols / RowPack<T>::kN, 256), 256, 0, s>>>(p);
    else
      moe_combine_fwd_kernel<T, false><<<blocks_for(p.tokens * p.cols, 256), 256, 0, s>>>(p);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

void moe_combine_bwd(const MoeCombineBwdParams& q) {
  const MoeCombineParams& p = q.fwd;
  if (p.cols == 0) return;
  cudaStream_t s = as_stream(p.stream);
  dispatch_float(p.dtype, "moe_combine_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool vec = packed_rows<T>(p, p.y, q.gout) && (q.gy == nullptr || aligned16(q.gy));
    if (q.gy != nullptr && p.rows > 0) {
      if (vec)
        moe_combine_gy_kernel<T, true>
            <<<blocks_for(p.rows * p.cols / RowPack<T>::kN, 256), 256, 0, s>>>(q);
      else
        moe_combine_gy_kernel<T, false><<<blocks_for(p.rows * p.cols, 256), 256, 0, s>>>(q);
      HYDRA_CUDA_LAUNCH_CHECK();
    }
    if (q.gw != nullptr && p.pairs > 0) {
      const auto blocks = static_cast<unsigned>((p.pairs * 32 + 255) / 256);
      if (vec)
        moe_combine_gw_kernel<T, true><<<blocks, 256, 0, s>>>(q);
      else
        moe_combine_gw_kernel<T, false><<<blocks, 256, 0, s>>>(q);
      HYDRA_CUDA_LAUNCH_CHECK();
    }
  });
}

}  // namespace hydra::kernels::cuda
