// Merging partial attentions (kernels/attention.h, MergeAttentionParams): a warp per (batch, head,
// query) row; every lane derives the part weights from the P log-sum-exps (P is small: the pieces
// of one query's key set), then the lanes split the head dimension. Plain expf/log: the merge is
// cheap next to the attentions it merges, and this keeps it within rounding of the CPU reference.
#include <cmath>

#include "kernels/attention.h"
#include "kernels/cuda/common.cuh"

namespace hydra::kernels::cuda {
namespace {

struct MergeRows {
  int64_t L, H, dh, rows, out_part, lse_part;
  explicit MergeRows(const MergeAttentionParams& p)
      : L(p.len),
        H(p.heads),
        dh(p.head_dim),
        rows(p.batch * p.heads * p.len),
        out_part(p.batch * p.len * p.heads * p.head_dim),
        lse_part(p.batch * p.heads * p.len) {}
  __device__ int64_t out_offset(int64_t row) const {
    const int64_t l = row % L, bh = row / L;
    return ((bh / H * L + l) * H + bh % H) * dh;
  }
};

template <class C>
__device__ __forceinline__ C neg_inf() {
  return C(-INFINITY);
}

template <class T>
__global__ void merge_fwd_kernel(MergeAttentionParams p, MergeRows m) {
  using C = compute_t<T>;
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  const T* outs = static_cast<const T*>(p.outs);
  const C* lses = static_cast<const C*>(p.lses);
  for (int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; row < m.rows;
       row += warps) {
    C mx = neg_inf<C>();
    for (int64_t i = 0; i < p.parts; ++i) mx = max(mx, lses[i * m.lse_part + row]);
    const int64_t o = m.out_offset(row);
    T* dst = static_cast<T*>(p.out) + o;
    if (mx == neg_inf<C>()) {
      for (int64_t c = lane; c < m.dh; c += 32) store(dst, c, C(0));
      if (lane == 0) static_cast<C*>(p.lse)[row] = mx;
      continue;
    }
    C z = 0;
    for (int64_t i = 0; i < p.parts; ++i) z += exp(lses[i * m.lse_part + row] - mx);
    for (int64_t c = lane; c < m.dh; c += 32) {
      C acc = 0;
      for (int64_t i = 0; i < p.parts; ++i) {
        const C w = exp(lses[i * m.lse_part + row] - mx) / z;
        if (w != C(0)) acc += w * load(outs + i * m.out_part + o, c);
      }
      store(dst, c, acc);
    }
    if (lane == 0) static_cast<C*>(p.lse)[row] = mx + log(z);
  }
}

template <class T>
__global__ void merge_bwd_kernel(MergeAttentionBwdParams q, MergeRows m) {
  using C = compute_t<T>;
  const MergeAttentionParams& p = q.fwd;
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  const T* outs = static_cast<const T*>(p.outs);
  const C* lses = static_cast<const C*>(p.lses);
  const T* gout = static_cast<const T*>(q.gout);
  const C* glse = static_cast<const C*>(q.glse);
  for (int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; row < m.rows;
       row += warps) {
    const int64_t o = m.out_offset(row);
    const C lse = static_cast<const C*>(p.lse)[row];
    C go_o = 0;
    if (gout != nullptr)
      for (int64_t c = lane; c < m.dh; c += 32)
        go_o += load(gout + o, c) * load(static_cast<const T*>(p.out) + o, c);
    go_o = warp_sum(go_o);
    const C extra = glse != nullptr ? glse[row] : C(0);
    for (int64_t i = 0; i < p.parts; ++i) {
      const C li = lses[i * m.lse_part + row];
      const C w = li == neg_inf<C>() || lse == neg_inf<C>() ? C(0) : exp(li - lse);
      const T* oi = outs + i * m.out_part + o;
      T* gi = static_cast<T*>(q.gouts) + i * m.out_part + o;
      C go_oi = 0;
      for (int64_t c = lane; c < m.dh; c += 32) {
        const C g = gout != nullptr ? load(gout + o, c) : C(0);
        store(gi, c, w * g);
        go_oi += g * load(oi, c);
      }
      go_oi = warp_sum(go_oi);
      if (lane == 0)
        static_cast<C*>(q.glses)[i * m.lse_part + row] =
            w == C(0) ? C(0) : w * (go_oi - go_o + extra);
    }
  }
}

constexpr int kThreads = 256;

}  // namespace

void merge_attention_fwd(const MergeAttentionParams& p) {
  const MergeRows m(p);
  if (m.rows == 0 || p.parts == 0) return;
  dispatch_float(p.dtype, "merge_attention", [&](auto tag) {
    using T = typename decltype(tag)::type;
    merge_fwd_kernel<T>
        <<<blocks_for(m.rows * 32, kThreads), kThreads, 0, as_stream(p.stream)>>>(p, m);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

void merge_attention_bwd(const MergeAttentionBwdParams& q) {
  const MergeRows m(q.fwd);
  if (m.rows == 0 || q.fwd.parts == 0) return;
  dispatch_float(q.fwd.dtype, "merge_attention_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    merge_bwd_kernel<T>
        <<<blocks_for(m.rows * 32, kThreads), kThreads, 0, as_stream(q.fwd.stream)>>>(q, m);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace hydra::kernels::cuda
