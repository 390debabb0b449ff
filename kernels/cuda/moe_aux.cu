// BlockFFN's auxiliary losses of one MoE layer on the device (kernels/moe_aux.h): three launches
// forward (a thread per (batch, chunk) row: its normalisers and its balance and locality terms; a
// thread per (batch, group, expert): its sparsity term; one block: the sums, in a fixed order) and
// three backward (the rows' normalisers; each group's coefficient; a thread per row: its
// gradients). Deterministic: no atomics, fixed orders.
#include <algorithm>

#include "kernels/cuda/common.cuh"
#include "kernels/moe_aux.h"

namespace hydra::kernels::cuda {
namespace {

constexpr int kThreads = 256;

inline size_t align256(size_t b) { return (b + 255) / 256 * 256; }

template <class A>
__device__ __forceinline__ A softplus_of(A x) {
  return x > A(20) ? x : log1p(exp(x));
}
template <class A>
__device__ __forceinline__ A sigmoid_of(A x) {
  return A(1) / (A(1) + exp(-x));
}

// The detached target of (b, t, e)'s locality pair; false when it has none.
template <class T, class A>
__device__ __forceinline__ bool pair_target(const MoeAuxParams& p, int64_t b, int64_t t, int64_t e,
                                            A* y) {
  const int64_t E = p.experts;
  if (t + 1 < p.chunks) {
    *y =
        sigmoid_of(A(p.alpha) * load(static_cast<const T*>(p.raw), (b * p.chunks + t + 1) * E + e));
    return true;
  }
  if (p.z_next == nullptr) return false;
  *y = sigmoid_of(load(static_cast<const T*>(p.z_next), b * E + e));
  return true;
}

template <class T, class A>
__device__ __forceinline__ A row_sum(const T* v, int64_t row, int64_t E) {
  A acc = 0;
  for (int64_t e = 0; e < E; ++e) acc += load(v, row * E + e);
  return acc + A(1e-5);
}

// part[row] = (balance term, locality term); inv_s[row] = 1 / (sum_e s + eps).
template <class T, class A>
__global__ void __launch_bounds__(kThreads)
    aux_rows_kernel(MoeAuxParams p, A* __restrict part, A* __restrict inv_s) {
  const int64_t rows = p.batch * p.chunks, E = p.experts;
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const int64_t b = row / p.chunks, t = row - b * p.chunks;
  const T *raw = static_cast<const T*>(p.raw), *s = static_cast<const T*>(p.s),
          *r = static_cast<const T*>(p.r), *ld = static_cast<const T*>(p.load);
  const A sr = row_sum<T, A>(r, row, E);
  inv_s[row] = A(1) / row_sum<T, A>(s, row, E);
  A balance = 0, locality = 0;
  const A within = A(p.chunk_len - 1);
  for (int64_t e = 0; e < E; ++e) {
    balance += load(r, row * E + e) / sr * load(ld, e);
    const A z = A(p.alpha) * load(raw, row * E + e);
    A y = 0;
    if (pair_target<T, A>(p, b, t, e, &y)) locality += softplus_of(z) - z * y;
    if (p.chunk_len > 1) locality += within * (softplus_of(z) - z * sigmoid_of(z));
  }
  part[2 * row] = balance;
  part[2 * row + 1] = locality;
}

// The group (b, g, e)'s sum of log(1 - p + eps) over its chunks.
template <class T, class A>
__device__ __forceinline__ A group_log_sum(const MoeAuxParams& p, const A* inv_s, int64_t b,
                                           int64_t g, int64_t e) {
  const T* s = static_cast<const T*>(p.s);
  A lq = 0;
  for (int64_t t = g * p.group; t < (g + 1) * p.group; ++t) {
    const int64_t row = b * p.chunks + t;
    lq += log(A(1) - load(s, row * p.experts + e) * inv_s[row] + A(1e-5));
  }
  return lq;
}

template <class T, class A>
__global__ void __launch_bounds__(kThreads)
    aux_groups_kernel(MoeAuxParams p, const A* __restrict inv_s, A* __restrict sp) {
  const int64_t ng = p.chunks / p.group, n = p.batch * ng * p.experts;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t e = i % p.experts, bg = i / p.experts, b = bg / ng, g = bg - b * ng;
  sp[i] = A(1) - exp(A(p.chunk_len) * group_log_sum<T, A>(p, inv_s, b, g, e));
}

// One block: the sums in a fixed order (strided per thread, then the block's tree).
template <class T, class A>
__global__ void __launch_bounds__(kThreads)
    aux_finish_kernel(MoeAuxParams p, const A* __restrict part, const A* __restrict sp) {
  __shared__ A shared[32];
  const int64_t rows = p.batch * p.chunks, groups = p.batch * (p.chunks / p.group) * p.experts;
  A bal = 0, loc = 0, spa = 0;
  for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) {
    bal += part[2 * i];
    loc += part[2 * i + 1];
  }
  for (int64_t i = threadIdx.x; i < groups; i += blockDim.x) spa += sp[i];
  bal = block_sum(bal, shared);
  loc = block_sum(loc, shared);
  spa = block_sum(spa, shared);
  if (threadIdx.x != 0) return;
  const A losses[3] = {bal * A(p.balance_scale), loc * A(p.locality_scale),
                       spa * A(p.sparsity_scale)};
  T* out = static_cast<T*>(p.out);
  for (int k = 0; k < 3; ++k) {
    out[k] = convert<T>(losses[k] * A(p.weights[k]));
    out[3 + k] = convert<T>(losses[k]);
  }
}

template <class T, class A>
__global__ void __launch_bounds__(kThreads) aux_inv_s_kernel(MoeAuxParams p, A* __restrict inv_s) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= p.batch * p.chunks) return;
  inv_s[row] = A(1) / row_sum<T, A>(static_cast<const T*>(p.s), row, p.experts);
}

// The backward's three gradient weights (gout's two rows through `weights`), from the device.
template <class T, class A>
__device__ __forceinline__ A grad_weight(const MoeAuxParams& p, const T* gout, int k) {
  return load(gout, k) * A(p.weights[k]) + load(gout, 3 + k);
}

// coef[b, g, e] = d L / d sparsity * sparsity_scale * chunk_len * N[b, g, e].
template <class T, class A>
__global__ void __launch_bounds__(kThreads)
    aux_coef_kernel(MoeAuxBwdParams q, const A* __restrict inv_s, A* __restrict coef) {
  const MoeAuxParams& p = q.fwd;
  const int64_t ng = p.chunks / p.group, n = p.batch * ng * p.experts;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t e = i % p.experts, bg = i / p.experts, b = bg / ng, g = bg - b * ng;
  const A gsp = grad_weight<T, A>(p, static_cast<const T*>(q.gout), 2) * A(p.sparsity_scale);
  const A c = A(p.chunk_len);
  coef[i] = gsp * c * exp(c * group_log_sum<T, A>(p, inv_s, b, g, e));
}

template <class T, class A>
__global__ void __launch_bounds__(kThreads)
    aux_grads_kernel(MoeAuxBwdParams q, const A* __restrict inv_s, const A* __restrict coef) {
  const MoeAuxParams& p = q.fwd;
  const int64_t rows = p.batch * p.chunks, E = p.experts, ng = p.chunks / p.group;
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const int64_t b = row / p.chunks, t = row - b * p.chunks;
  const T* gout = static_cast<const T*>(q.gout);
  const A gb = grad_weight<T, A>(p, gout, 0) * A(p.balance_scale),
          gl = grad_weight<T, A>(p, gout, 1) * A(p.locality_scale) * A(p.alpha);
  const T *raw = static_cast<const T*>(p.raw), *s = static_cast<const T*>(p.s),
          *r = static_cast<const T*>(p.r), *ld = static_cast<const T*>(p.load);
  const A sr = row_sum<T, A>(r, row, E), is = inv_s[row];
  A qload = 0, gp = 0;
  const bool grouped = t < ng * p.group;
  const A* cg = grouped ? coef + (b * ng + t / p.group) * E : nullptr;
  for (int64_t e = 0; e < E; ++e) {
    qload += load(r, row * E + e) / sr * load(ld, e);
    if (grouped) {
      const A pe = load(s, row * E + e) * is;
      gp += cg[e] / (A(1) - pe + A(1e-5)) * pe;
    }
  }
  T *graw = static_cast<T*>(q.graw), *gs = static_cast<T*>(q.gs), *gr = static_cast<T*>(q.gr);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t i = row * E + e;
    const A pe = load(s, i) * is;
    const A G = grouped ? cg[e] / (A(1) - pe + A(1e-5)) : A(0);
    gr[i] = convert<T>(gb / sr * (load(ld, e) - qload));
    gs[i] = convert<T>((G - gp) * is);
    A y = 0;
    const bool paired = pair_target<T, A>(p, b, t, e, &y);
    graw[i] = convert<T>(paired ? gl * (sigmoid_of(A(p.alpha) * load(raw, i)) - y) : A(0));
  }
}

template <class A>
struct FwdScratch {
  A *part, *inv_s, *sp;
};
template <class A>
size_t fwd_scratch_bytes(const MoeAuxParams& p) {
  const int64_t rows = p.batch * p.chunks, groups = p.batch * (p.chunks / p.group) * p.experts;
  return align256(sizeof(A) * 2 * rows) + align256(sizeof(A) * rows) +
         align256(sizeof(A) * std::max<int64_t>(groups, 1));
}
template <class A>
FwdScratch<A> fwd_scratch(const MoeAuxParams& p, void* ws) {
  const int64_t rows = p.batch * p.chunks;
  auto* at = static_cast<char*>(ws);
  FwdScratch<A> f;
  f.part = reinterpret_cast<A*>(at);
  at += align256(sizeof(A) * 2 * rows);
  f.inv_s = reinterpret_cast<A*>(at);
  at += align256(sizeof(A) * rows);
  f.sp = reinterpret_cast<A*>(at);
  return f;
}

size_t acc_bytes(DType t) { return t == DType::kF64 ? 8 : 4; }

}  // namespace

size_t moe_aux_workspace(const MoeAuxParams& p) {
  return acc_bytes(p.dtype) == 8 ? fwd_scratch_bytes<double>(p) : fwd_scratch_bytes<float>(p);
}

size_t moe_aux_bwd_workspace(const MoeAuxBwdParams& q) { return moe_aux_workspace(q.fwd); }

void moe_aux_fwd(const MoeAuxParams& p) {
  HYDRA_CHECK(p.workspace != nullptr) << "moe_aux: workspace required (moe_aux_workspace bytes)";
  HYDRA_CHECK(p.group >= 1) << "moe_aux: group must be >= 1, got " << p.group;
  const int64_t rows = p.batch * p.chunks, groups = p.batch * (p.chunks / p.group) * p.experts;
  dispatch_float(p.dtype, "moe_aux", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = compute_t<T>;
    const FwdScratch<A> f = fwd_scratch<A>(p, p.workspace);
    cudaStream_t st = as_stream(p.stream);
    if (rows > 0) {
      aux_rows_kernel<T, A><<<blocks_for(rows, kThreads), kThreads, 0, st>>>(p, f.part, f.inv_s);
      HYDRA_CUDA_LAUNCH_CHECK();
    }
    if (groups > 0) {
      aux_groups_kernel<T, A><<<blocks_for(groups, kThreads), kThreads, 0, st>>>(p, f.inv_s, f.sp);
      HYDRA_CUDA_LAUNCH_CHECK();
    }
    aux_finish_kernel<T, A><<<1, kThreads, 0, st>>>(p, f.part, f.sp);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

void moe_aux_bwd(const MoeAuxBwdParams& q) {
  const MoeAuxParams& p = q.fwd;
  HYDRA_CHECK(q.workspace != nullptr)
      << "moe_aux_backward: workspace required (moe_aux_bwd_workspace bytes)";
  const int64_t rows = p.batch * p.chunks, groups = p.batch * (p.chunks / p.group) * p.experts;
  if (rows == 0) return;
  dispatch_float(p.dtype, "moe_aux_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = compute_t<T>;
    const FwdScratch<A> f = fwd_scratch<A>(p, q.workspace);
    cudaStream_t st = as_stream(p.stream);
    aux_inv_s_kernel<T, A><<<blocks_for(rows, kThreads), kThreads, 0, st>>>(p, f.inv_s);
    HYDRA_CUDA_LAUNCH_CHECK();
    if (groups > 0) {
      aux_coef_kernel<T, A><<<blocks_for(groups, kThreads), kThreads, 0, st>>>(q, f.inv_s, f.sp);
      HYDRA_CUDA_LAUNCH_CHECK();
    }
    aux_grads_kernel<T, A><<<blocks_for(rows, kThreads), kThreads, 0, st>>>(q, f.inv_s, f.sp);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace hydra::kernels::cuda
