// CUDA flash-style sparse causal attention (SIMT cores; fp32 arithmetic for f32 and bf16, fp64 for
// f64). A block owns 32 queries of one (batch, head) and walks the keys its pattern reaches in
// tiles of 32, staged in shared memory: the global keys before the window band (a strided run) and
// the band (a contiguous run), the same sets as the CPU kernel; pairs the pattern masks inside a
// tile get -inf. Softmax is online (running max and sum per query). The backward recomputes
// probabilities from the saved log-sum-exp in two kernels without atomics: dQ walks a query tile's
// keys, dK and dV walk a key tile's queries (the mirror sets: the band after the tile plus the
// global queries beyond it). Every sum runs in a fixed order, so results are bit-reproducible.
// bf16 with head sizes that are multiples of 16 (up to 128) goes to the tensor-core kernels
// (attention_mma.cu); dense causal attention and its sliding window over whole sequences to cuDNN's
// fused attention where it takes the shape (attention_cudnn.cu).
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kernels/attention.h"
#include "kernels/cuda/attention_common.cuh"
#include "kernels/cuda/common.cuh"

namespace hydra::kernels::cuda {
namespace {

// Forward: Q (pre-scaled) [kTile][dh], K [kTile][dh + 1], V [kTile][dh], S (scores, then
// probabilities) [kTile][kTile + 1], O [kTile][dh], the running max, sum and correction per query,
// the index lists.
template <class C>
struct FwdSmem {
  C *Qs, *Ks, *Vs, *S, *O, *m, *l, *corr;
  int *qidx, *kidx;
  uintptr_t end;
  __host__ __device__ FwdSmem(unsigned char* base, int64_t dh) {
    Carve c(base);
    Qs = c.take<C>(kTile * dh), Ks = c.take<C>(kTile * (dh + 1)), Vs = c.take<C>(kTile * dh);
    S = c.take<C>(kTile * (kTile + 1)), O = c.take<C>(kTile * dh);
    m = c.take<C>(kTile), l = c.take<C>(kTile), corr = c.take<C>(kTile);
    qidx = c.take<int>(kTile), kidx = c.take<int>(kTile);
    end = c.end();
  }
};

// dQ: Q (pre-scaled) and dO [kTile][dh], K and V [kTile][dh + 1], dS [kTile][kTile + 1], the dQ
// sums [kTile][dh], lse and delta per query, the index lists.
template <class C>
struct DqSmem {
  C *Qs, *dOs, *Ks, *Vs, *dS, *dQ, *lse_s, *delta_s;
  int *qidx, *kidx;
  uintptr_t end;
  __host__ __device__ DqSmem(unsigned char* base, int64_t dh) {
    Carve c(base);
    Qs = c.take<C>(kTile * dh), dOs = c.take<C>(kTile * dh);
    Ks = c.take<C>(kTile * (dh + 1)), Vs = c.take<C>(kTile * (dh + 1));
    dS = c.take<C>(kTile * (kTile + 1)), dQ = c.take<C>(kTile * dh);
    lse_s = c.take<C>(kTile), delta_s = c.take<C>(kTile);
    qidx = c.take<int>(kTile), kidx = c.take<int>(kTile);
    end = c.end();
  }
};

// dK/dV: K and V [kTile][dh], Q (pre-scaled) and dO [kTile][dh + 1], P and dS [key][query]
// [kTile][kTile + 1], the dK and dV sums [kTile][dh], lse and delta per query, the index lists.
template <class C>
struct DkvSmem {
  C *Ks, *Vs, *Qs, *dOs, *P, *dS, *dK, *dV, *lse_s, *delta_s;
  int *kidx, *qidx;
  uintptr_t end;
  __host__ __device__ DkvSmem(unsigned char* base, int64_t dh) {
    Carve c(base);
    Ks = c.take<C>(kTile * dh), Vs = c.take<C>(kTile * dh);
    Qs = c.take<C>(kTile * (dh + 1)), dOs = c.take<C>(kTile * (dh + 1));
    P = c.take<C>(kTile * (kTile + 1)), dS = c.take<C>(kTile * (kTile + 1));
    dK = c.take<C>(kTile * dh), dV = c.take<C>(kTile * dh);
    lse_s = c.take<C>(kTile), delta_s = c.take<C>(kTile);
    kidx = c.take<int>(kTile), qidx = c.take<int>(kTile);
    end = c.end();
  }
};

// Bytes of dynamic shared memory a layout takes at head size dh.
template <template <class> class Layout, class C>
size_t smem_bytes(int64_t dh) {
  return static_cast<size_t>(Layout<C>(nullptr, dh).end);
}
// Copies rows idx[r] (r < kTile; -1: zeros) of `src` (row r at offset off(idx[r])) into dst[r *
// pitch + c].
template <class T, class C, class Off>
__device__ void stage_rows(const T* __restrict src, const int* idx, Off off, int64_t dh, C scale,
                           C* dst, int64_t pitch) {
  for (int64_t e = threadIdx.x; e < kTile * dh; e += blockDim.x) {
    const int64_t r = e / dh, c = e % dh;
    const int j = idx[r];
    dst[r * pitch + c] = j >= 0 ? load(src, off(j) + c) * scale : C(0);
  }
}

template <class C>
__device__ C dot(const C* a, const C* b, int64_t n) {
  C s = 0;
  for (int64_t c = 0; c < n; ++c) s += a[c] * b[c];
  return s;
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    attn_fwd_kernel(AttentionParams p, Layout lay, Pattern pat) {
  using C = compute_t<T>;
  const int64_t dh = p.head_dim, b = blockIdx.y / p.heads, h = blockIdx.y % p.heads;
  const int64_t i0 = int64_t(blockIdx.x) * kTile, nq = min(int64_t(kTile), p.q_len - i0);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const FwdSmem<C> sm(smem_raw, dh);
  C *Qs = sm.Qs, *Ks = sm.Ks, *Vs = sm.Vs, *S = sm.S, *O = sm.O, *m = sm.m, *l = sm.l,
    *corr = sm.corr;
  int *qidx = sm.qidx, *kidx = sm.kidx;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;

  if (threadIdx.x < kTile) {
    qidx[threadIdx.x] = threadIdx.x < nq ? int(i0 + threadIdx.x) : -1;
    m[threadIdx.x] = C(-INFINITY);
    l[threadIdx.x] = 0;
  }
  for (int64_t e = threadIdx.x; e < kTile * dh; e += blockDim.x) O[e] = 0;
  __syncthreads();
  stage_rows(
      q, qidx, [&](int i) { return lay.q(b, i, h); }, dh, C(p.scale), Qs, dh);
  const Runs keys = keys_for_queries(pat, p.k_len, i0, i0 + nq);
  for (int64_t o0 = 0; o0 < keys.count(); o0 += kTile) {
    const int64_t nk = min(int64_t(kTile), keys.count() - o0);
    __syncthreads();  // the previous step is done with kidx, Ks, Vs and S
    if (threadIdx.x < kTile)
      kidx[threadIdx.x] = threadIdx.x < nk ? int(keys.at(o0 + threadIdx.x)) : -1;
    __syncthreads();
    stage_rows(
        k, kidx, [&](int j) { return lay.k(b, j, h); }, dh, C(1), Ks, dh + 1);
    stage_rows(
        v, kidx, [&](int j) { return lay.v(b, j, h); }, dh, C(1), Vs, dh);
    __syncthreads();
    for (int e = threadIdx.x; e < kTile * kTile; e += blockDim.x) {
      const int ii = e / kTile, jj = e % kTile;
      C s = C(-INFINITY);
      if (ii < nq && kidx[jj] >= 0 && pat.visible(pat.q_pos0 + i0 + ii, pat.k_pos0 + kidx[jj]))
        s = dot(Qs + ii * dh, Ks + jj * (dh + 1), dh);
      S[ii * (kTile + 1) + jj] = s;
    }
    __syncthreads();
    for (int ii = warp; ii < kTile;
         ii += warps) {  // online softmax, a warp per query, a lane per key
      const C s = S[ii * (kTile + 1) + lane];
      const C m_old = m[ii], m_new = max(m_old, warp_max(s));
      const C pr = s == C(-INFINITY) ? C(0) : fast_exp(s - m_new);
      S[ii * (kTile + 1) + lane] = pr;
      const C sum = warp_sum(pr);
      __syncwarp();  // every lane has read m[ii] before lane 0 replaces it
      if (lane == 0) {
        const C c = m_old == C(-INFINITY) ? C(0) : fast_exp(m_old - m_new);
        corr[ii] = c;
        l[ii] = l[ii] * c + sum;
        m[ii] = m_new;
      }
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < kTile * dh; e += blockDim.x) {
      const int64_t ii = e / dh, c = e % dh;
      const C* pr = S + ii * (kTile + 1);
      C acc = O[e] * corr[ii];
      for (int64_t jj = 0; jj < nk; ++jj) acc += pr[jj] * Vs[jj * dh + c];
      O[e] = acc;
    }
  }
  __syncthreads();
  T* out = static_cast<T*>(p.out);
  for (int64_t e = threadIdx.x; e < nq * dh; e += blockDim.x) {
    const int64_t ii = e / dh, c = e % dh;
    out[lay.dq(b, i0 + ii, h) + c] = convert<T>(l[ii] > C(0) ? O[e] / l[ii] : C(0));
  }
  if (threadIdx.x < nq) {
    C* lse = static_cast<C*>(p.lse);
    const int ii = threadIdx.x;
    lse[lay.stat(b, h, i0 + ii)] = l[ii] > C(0) ? m[ii] + log(l[ii]) : C(-INFINITY);
  }
}
// delta_i = dO_i . O_i - glse_i (a gradient on lse enters the softmax backward as -glse), a warp
// per query.
template <class T>
__global__ void attn_delta_kernel(AttentionBwdParams q, Layout lay, compute_t<T>* __restrict delta,
                                  int64_t rows) {
  using C = compute_t<T>;
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;  // whole warps leave together
  const int64_t i = row % lay.q_len, bh = row / lay.q_len, b = bh / lay.heads, h = bh % lay.heads;
  const T* go = static_cast<const T*>(q.gout) + lay.dq(b, i, h);
  const T* o = static_cast<const T*>(q.fwd.out) + lay.dq(b, i, h);
  C s = 0;
  for (int64_t c = lane; c < lay.dh; c += 32) s += load(go, c) * load(o, c);
  s = warp_sum(s);
  if (lane == 0) delta[row] = s - (q.glse ? static_cast<const C*>(q.glse)[row] : C(0));
}

// dQ_i = scale * sum_j P_ij (dP_ij - delta_i) K_j over the keys query tile blockIdx.x sees.
template <class T>
__global__ void __launch_bounds__(kThreads)
    attn_dq_kernel(AttentionBwdParams q, Layout lay, Pattern pat,
                   const compute_t<T>* __restrict delta) {
  using C = compute_t<T>;
  const AttentionParams& p = q.fwd;
  const int64_t dh = p.head_dim, b = blockIdx.y / p.heads, h = blockIdx.y % p.heads;
  const int64_t i0 = int64_t(blockIdx.x) * kTile, nq = min(int64_t(kTile), p.q_len - i0);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const DqSmem<C> sm(smem_raw, dh);
  C *Qs = sm.Qs, *dOs = sm.dOs, *Ks = sm.Ks, *Vs = sm.Vs, *dS = sm.dS, *dQ = sm.dQ;
  C *lse_s = sm.lse_s, *delta_s = sm.delta_s;
  int *qidx = sm.qidx, *kidx = sm.kidx;
  const C* lse = static_cast<const C*>(p.lse);

  if (threadIdx.x < kTile) {
    const int ii = threadIdx.x;
    qidx[ii] = ii < nq ? int(i0 + ii) : -1;
    lse_s[ii] = ii < nq ? lse[lay.stat(b, h, i0 + ii)] : C(-INFINITY);
    delta_s[ii] = ii < nq ? delta[lay.stat(b, h, i0 + ii)] : C(0);
  }
  for (int64_t e = threadIdx.x; e < kTile * dh; e += blockDim.x) dQ[e] = 0;
  __syncthreads();
  stage_rows(
      static_cast<const T*>(p.q), qidx, [&](int i) { return lay.q(b, i, h); }, dh, C(p.scale), Qs,
      dh);
  stage_rows(
      static_cast<const T*>(q.gout), qidx, [&](int i) { return lay.dq(b, i, h); }, dh, C(1), dOs,
      dh);
  const Runs keys = keys_for_queries(pat, p.k_len, i0, i0 + nq);
  for (int64_t o0 = 0; o0 < keys.count(); o0 += kTile) {
    const int64_t nk = min(int64_t(kTile), keys.count() - o0);
    __syncthreads();
    if (threadIdx.x < kTile)
      kidx[threadIdx.x] = threadIdx.x < nk ? int(keys.at(o0 + threadIdx.x)) : -1;
    __syncthreads();
    stage_rows(
        static_cast<const T*>(p.k), kidx, [&](int j) { return lay.k(b, j, h); }, dh, C(1), Ks,
        dh + 1);
    stage_rows(
        static_cast<const T*>(p.v), kidx, [&](int j) { return lay.v(b, j, h); }, dh, C(1), Vs,
        dh + 1);
    __syncthreads();
    for (int e = threadIdx.x; e < kTile * kTile; e += blockDim.x) {
      const int ii = e / kTile, jj = e % kTile;
      C ds = 0;
      if (ii < nq && kidx[jj] >= 0 && lse_s[ii] != C(-INFINITY) &&
          pat.visible(pat.q_pos0 + i0 + ii, pat.k_pos0 + kidx[jj])) {
        const C pr = exp(dot(Qs + ii * dh, Ks + jj * (dh + 1), dh) - lse_s[ii]);
        ds = pr * (dot(dOs + ii * dh, Vs + jj * (dh + 1), dh) - delta_s[ii]);
      }
      dS[ii * (kTile + 1) + jj] = ds;
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < kTile * dh; e += blockDim.x) {
      const int64_t ii = e / dh, c = e % dh;
      const C* d = dS + ii * (kTile + 1);
      C acc = dQ[e];
      for (int64_t jj = 0; jj < nk; ++jj) acc += d[jj] * Ks[jj * (dh + 1) + c];
      dQ[e] = acc;
    }
  }
  __syncthreads();
  T* gq = static_cast<T*>(q.gq);
  for (int64_t e = threadIdx.x; e < nq * dh; e += blockDim.x) {
    const int64_t ii = e / dh, c = e % dh;
    gq[lay.dq(b, i0 + ii, h) + c] = convert<T>(dQ[e] * C(p.scale));
  }
}

// dV_j = sum_i P_ij dO_i and dK_j = scale * sum_i P_ij (dP_ij - delta_i) Q_i over the queries that
// see key tile blockIdx.x.
template <class T>
__global__ void __launch_bounds__(kThreads)
    attn_dkv_kernel(AttentionBwdParams q, Layout lay, Pattern pat,
                    const compute_t<T>* __restrict delta) {
  using C = compute_t<T>;
  const AttentionParams& p = q.fwd;
  const int64_t dh = p.head_dim, b = blockIdx.y / p.heads, h = blockIdx.y % p.heads;
  const int64_t j0 = int64_t(blockIdx.x) * kTile, nk = min(int64_t(kTile), p.k_len - j0);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const DkvSmem<C> sm(smem_raw, dh);
  C *Ks = sm.Ks, *Vs = sm.Vs, *Qs = sm.Qs, *dOs = sm.dOs, *P = sm.P, *dS = sm.dS, *dK = sm.dK,
    *dV = sm.dV;
  C *lse_s = sm.lse_s, *delta_s = sm.delta_s;
  int *kidx = sm.kidx, *qidx = sm.qidx;
  const C* lse = static_cast<const C*>(p.lse);

  if (threadIdx.x < kTile) kidx[threadIdx.x] = threadIdx.x < nk ? int(j0 + threadIdx.x) : -1;
  for (int64_t e = threadIdx.x; e < kTile * dh; e += blockDim.x) dK[e] = dV[e] = 0;
  __syncthreads();
  stage_rows(
      static_cast<const T*>(p.k), kidx, [&](int j) { return lay.k(b, j, h); }, dh, C(1), Ks, dh);
  stage_rows(
      static_cast<const T*>(p.v), kidx, [&](int j) { return lay.v(b, j, h); }, dh, C(1), Vs, dh);
  const Runs queries = queries_for_keys(pat, p.q_len, j0, j0 + nk);
  for (int64_t o0 = 0; o0 < queries.count(); o0 += kTile) {
    const int64_t nq = min(int64_t(kTile), queries.count() - o0);
    __syncthreads();
    if (threadIdx.x < kTile) {
      const int ii = threadIdx.x;
      const int i = ii < nq ? int(queries.at(o0 + ii)) : -1;
      qidx[ii] = i;
      lse_s[ii] = i >= 0 ? lse[lay.stat(b, h, i)] : C(-INFINITY);
      delta_s[ii] = i >= 0 ? delta[lay.stat(b, h, i)] : C(0);
    }
    __syncthreads();
    stage_rows(
        static_cast<const T*>(p.q), qidx, [&](int i) { return lay.q(b, i, h); }, dh, C(p.scale), Qs,
        dh + 1);
    stage_rows(
        static_cast<const T*>(q.gout), qidx, [&](int i) { return lay.dq(b, i, h); }, dh, C(1), dOs,
        dh + 1);
    __syncthreads();
    for (int e = threadIdx.x; e < kTile * kTile; e += blockDim.x) {
      const int jj = e / kTile, ii = e % kTile;
      C pr = 0, ds = 0;
      if (kidx[jj] >= 0 && qidx[ii] >= 0 && lse_s[ii] != C(-INFINITY) &&
          pat.visible(pat.q_pos0 + qidx[ii], pat.k_pos0 + kidx[jj])) {
        pr = exp(dot(Qs + ii * (dh + 1), Ks + jj * dh, dh) - lse_s[ii]);
        ds = pr * (dot(dOs + ii * (dh + 1), Vs + jj * dh, dh) - delta_s[ii]);
      }
      P[jj * (kTile + 1) + ii] = pr;
      dS[jj * (kTile + 1) + ii] = ds;
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < kTile * dh; e += blockDim.x) {
      const int64_t jj = e / dh, c = e % dh;
      const C* pr = P + jj * (kTile + 1);
      const C* d = dS + jj * (kTile + 1);
      C av = dV[e], ak = dK[e];
      for (int64_t ii = 0; ii < nq; ++ii) {
        av += pr[ii] * dOs[ii * (dh + 1) + c];
        ak += d[ii] * Qs[ii * (dh + 1) + c];  // Qs carries the scale dK needs
      }
      dV[e] = av;
      dK[e] = ak;
    }
  }
  __syncthreads();
  T* gk = static_cast<T*>(q.gk);
  T* gv = static_cast<T*>(q.gv);
  for (int64_t e = threadIdx.x; e < nk * dh; e += blockDim.x) {
    const int64_t jj = e / dh, c = e % dh;
    gk[lay.dk(b, j0 + jj, h) + c] = convert<T>(dK[e]);
    gv[lay.dk(b, j0 + jj, h) + c] = convert<T>(dV[e]);
  }
}
size_t accumulate_size(DType t) { return t == DType::kF64 ? 8 : 4; }

void check_sizes(const AttentionParams& p) {
  HYDRA_CHECK(p.q_len < (int64_t(1) << 31) && p.k_len < (int64_t(1) << 31) && p.heads < 65536)
      << "attention (CUDA): q_len " << p.q_len << ", k_len " << p.k_len << " or heads " << p.heads
      << " out of range (lengths < 2^31, heads < 65536)";
}

// The kernels place (batch, head) pairs on the grid's y axis (< 65536): larger batches run in
// pieces of whole sequences, each with its operands offset to its first sequence.
int64_t batch_piece(const AttentionParams& p) { return std::max<int64_t>(1, 65535 / p.heads); }

template <class T>
T* advance(T* ptr, int64_t elements, size_t elem_size) {
  if (ptr == nullptr) return ptr;
  using Byte = std::conditional_t<std::is_const_v<T>, const char, char>;
  return reinterpret_cast<T*>(reinterpret_cast<Byte*>(ptr) +
                              elements * static_cast<int64_t>(elem_size));
}

// Sequences [b0, b0 + n) of p.
AttentionParams batch_slice(const AttentionParams& p, int64_t b0, int64_t n) {
  AttentionParams s = p;
  const size_t e = dtype_size(p.dtype), a = accumulate_size(p.dtype);
  s.batch = n;
  s.q = advance(p.q, b0 * p.q_len * p.q_row, e);
  s.k = advance(p.k, b0 * p.k_len * p.k_row, e);
  s.v = advance(p.v, b0 * p.k_len * p.v_row, e);
  s.out = advance(p.out, b0 * p.q_len * p.heads * p.head_dim, e);
  s.lse = advance(p.lse, b0 * p.heads * p.q_len, a);
  return s;
}

void attention_fwd_piece(const AttentionParams& p);
void attention_bwd_piece(const AttentionBwdParams& q);

}  // namespace

void attention_fwd(const AttentionParams& p) {
  if (p.batch * p.heads * p.q_len == 0) return;
  check_sizes(p);
  if (attention_cudnn::applies(p)) return attention_cudnn::forward(p);
  const int64_t per = batch_piece(p);
  for (int64_t b0 = 0; b0 < p.batch; b0 += per)
    attention_fwd_piece(batch_slice(p, b0, std::min(per, p.batch - b0)));
}

void attention_bwd(const AttentionBwdParams& q) {
  const AttentionParams& p = q.fwd;
  if (p.batch * p.heads == 0 || (p.q_len == 0 && p.k_len == 0)) return;
  check_sizes(p);
  if (attention_cudnn::applies(q)) return attention_cudnn::backward(q);
  const int64_t per = batch_piece(p);
  const size_t e = dtype_size(p.dtype), a = accumulate_size(p.dtype);
  for (int64_t b0 = 0; b0 < p.batch;
       b0 += per) {  // the pieces reuse the workspace, in stream order
    AttentionBwdParams s = q;
    s.fwd = batch_slice(p, b0, std::min(per, p.batch - b0));
    s.gout = advance(q.gout, b0 * p.q_len * p.heads * p.head_dim, e);
    s.glse = advance(q.glse, b0 * p.heads * p.q_len, a);
    s.gq = advance(q.gq, b0 * p.q_len * p.heads * p.head_dim, e);
    s.gk = advance(q.gk, b0 * p.k_len * p.heads * p.head_dim, e);
    s.gv = advance(q.gv, b0 * p.k_len * p.heads * p.head_dim, e);
    attention_bwd_piece(s);
  }
}

namespace {
// The backward's workspace: the per-query delta, then the tensor-core kernels' partial rows.
size_t delta_bytes(const AttentionParams& p) {
  return (accumulate_size(p.dtype) * static_cast<size_t>(p.batch * p.heads * p.q_len) + 255) / 256 *
         256;
}
}  // namespace

size_t attention_fwd_workspace(const AttentionParams& p) {
  if (attention_cudnn::applies(p)) return attention_cudnn::forward_workspace(p);
  return attention_mma::applies(p) ? attention_mma::forward_workspace(p) : 0;
}

size_t attention_bwd_workspace(const AttentionBwdParams& q) {
  if (attention_cudnn::applies(q)) return attention_cudnn::backward_workspace(q);
  return delta_bytes(q.fwd) + 256 +
         (attention_mma::applies(q) ? attention_mma::backward_workspace(q.fwd) : 0);
}

namespace {

void attention_fwd_piece(const AttentionParams& p) {
  const Pattern pat = pattern_of(p);
  const dim3 grid(static_cast<unsigned>((p.q_len + kTile - 1) / kTile),
                  static_cast<unsigned>(p.batch * p.heads));
  if (attention_mma::applies(p)) {
    attention_mma::forward(p);
    return;
  }
  dispatch_float(p.dtype, "attention", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const size_t smem = smem_bytes<FwdSmem, compute_t<T>>(p.head_dim);
    allow_dynamic_smem(attn_fwd_kernel<T>, smem, "attention");
    attn_fwd_kernel<T><<<grid, kThreads, smem, as_stream(p.stream)>>>(p, layout_of(p), pat);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

void attention_bwd_piece(const AttentionBwdParams& q) {
  const AttentionParams& p = q.fwd;
  HYDRA_CHECK(q.workspace != nullptr) << "attention_bwd: workspace required";
  cudaStream_t s = as_stream(p.stream);
  dispatch_float(p.dtype, "attention_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    const Layout lay = layout_of(p);
    const Pattern pat = pattern_of(p);
    C* delta = static_cast<C*>(q.workspace);
    const unsigned bh = static_cast<unsigned>(p.batch * p.heads);
    const size_t dq_bytes = smem_bytes<DqSmem, C>(p.head_dim),
                 dkv_bytes = smem_bytes<DkvSmem, C>(p.head_dim);
    if (p.q_len > 0) {
      const int64_t rows = p.batch * p.heads * p.q_len;
      attn_delta_kernel<T>
          <<<blocks_for(rows * 32, 256, int64_t(1) << 31), 256, 0, s>>>(q, lay, delta, rows);
      HYDRA_CUDA_LAUNCH_CHECK();
    }
    if constexpr (std::is_same_v<T, bf16>) {
      if (attention_mma::applies(q)) {
        attention_mma::backward(q, delta,
                                static_cast<unsigned char*>(q.workspace) + delta_bytes(p));
        return;
      }
    }
    if (p.q_len > 0) {
      allow_dynamic_smem(attn_dq_kernel<T>, dq_bytes, "attention_backward");
      attn_dq_kernel<T><<<dim3(static_cast<unsigned>((p.q_len + kTile - 1) / kTile), bh), kThreads,
                          dq_bytes, s>>>(q, lay, pat, delta);
      HYDRA_CUDA_LAUNCH_CHECK();
    }
    if (p.k_len > 0) {
      allow_dynamic_smem(attn_dkv_kernel<T>, dkv_bytes, "attention_backward");
      attn_dkv_kernel<T><<<dim3(static_cast<unsigned>((p.k_len + kTile - 1) / kTile), bh), kThreads,
                           dkv_bytes, s>>>(q, lay, pat, delta);
      HYDRA_CUDA_LAUNCH_CHECK();
    }
  });
}

}  // namespace

}  // namespace hydra::kernels::cuda
