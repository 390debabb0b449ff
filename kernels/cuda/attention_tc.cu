// Sparse attention on tensor cores, for bf16 with head sizes that are multiples of 16: the same tiles
// and walks as the SIMT kernels (attention.cu), with their products (Q K^T, P V, and in the backward
// dO V^T, dS K, P^T dO, dS^T Q) as wmma 16 x 16 x 16 blocks with fp32 accumulation; P and dS are
// rounded to bf16 as they enter a product. The masks and the online softmax stay on the SIMT cores.
// Every sum runs in a fixed order, so results are bit-reproducible.
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "kernels/attention.h"
#include "kernels/cuda/attention_common.cuh"
#include "kernels/cuda/common.cuh"

namespace hydra::kernels::cuda {
namespace {

// Tensor-core forward (bf16): Q, K and V as bf16 [kTile][dh + 8], the scores S as fp32
// [kTile][kTile + 4], the probabilities P as bf16 [kTile][kTile + 8], the output sums O as fp32
// [kTile][dh + 4], the running max, sum and correction per query, the index lists. Every matrix starts
// at a multiple of 32 bytes and its pitch keeps 16-row and 16-column steps on 32-byte boundaries.
struct TcFwdSmem {
  __nv_bfloat16 *Qs, *Ks, *Vs, *P;
  float *S, *O, *m, *l, *corr;
  int *qidx, *kidx;
  int64_t ld_qkv, ld_o;
  uintptr_t end;
  static constexpr int kLdS = kTile + 4, kLdP = kTile + 8;
  __host__ __device__ TcFwdSmem(unsigned char* base, int64_t dh) : ld_qkv(dh + 8), ld_o(dh + 4) {
    Carve c(base);
    Qs = c.take_aligned<__nv_bfloat16>(kTile * ld_qkv), Ks = c.take_aligned<__nv_bfloat16>(kTile * ld_qkv);
    Vs = c.take_aligned<__nv_bfloat16>(kTile * ld_qkv), P = c.take_aligned<__nv_bfloat16>(kTile * kLdP);
    S = c.take_aligned<float>(kTile * kLdS), O = c.take_aligned<float>(kTile * ld_o);
    m = c.take<float>(kTile), l = c.take<float>(kTile), corr = c.take<float>(kTile);
    qidx = c.take<int>(kTile), kidx = c.take<int>(kTile);
    end = c.end() + 32;  // room to align the base
  }
};

// Tensor-core backward (bf16): the block's own rows (dQ: Q and dO; dK/dV: K and V) and the walked
// rows (dQ: K and V; dK/dV: Q and dO) as bf16 [kTile][dh + 8]; S and dP as fp32 [query][key]; P and dS
// as bf16 [query][key]; the fp32 sums (dQ, or dK and dV) [kTile][dh + 4]; lse and delta per query
// and the index lists. Alignment as TcFwdSmem.
struct TcBwdSmem {
  __nv_bfloat16 *own0, *own1, *walk0, *walk1, *P, *dS;
  float *S, *dP, *acc0, *acc1, *lse_s, *delta_s;
  int *own_idx, *walk_idx;
  int64_t ld_qkv, ld_acc;
  uintptr_t end;
  static constexpr int kLdS = kTile + 4, kLdP = kTile + 8;
  __host__ __device__ TcBwdSmem(unsigned char* base, int64_t dh, bool two_sums) : ld_qkv(dh + 8), ld_acc(dh + 4) {
    Carve c(base);
    own0 = c.take_aligned<__nv_bfloat16>(kTile * ld_qkv), own1 = c.take_aligned<__nv_bfloat16>(kTile * ld_qkv);
    walk0 = c.take_aligned<__nv_bfloat16>(kTile * ld_qkv), walk1 = c.take_aligned<__nv_bfloat16>(kTile * ld_qkv);
    P = c.take_aligned<__nv_bfloat16>(kTile * kLdP), dS = c.take_aligned<__nv_bfloat16>(kTile * kLdP);
    S = c.take_aligned<float>(kTile * kLdS), dP = c.take_aligned<float>(kTile * kLdS);
    acc0 = c.take_aligned<float>(kTile * ld_acc), acc1 = two_sums ? c.take_aligned<float>(kTile * ld_acc) : nullptr;
    lse_s = c.take<float>(kTile), delta_s = c.take<float>(kTile);
    own_idx = c.take<int>(kTile), walk_idx = c.take<int>(kTile);
    end = c.end() + 32;  // room to align the base
  }
};
// Copies rows idx[r] (r < kTile; -1: zeros) of bf16 `src` into dst[r * pitch + c], as bf16.
template <class Off>
__device__ void stage_rows_bf16(const bf16* __restrict src, const int* idx, Off off, int64_t dh, __nv_bfloat16* dst,
                                int64_t pitch) {
  for (int64_t e = threadIdx.x; e < kTile * dh; e += blockDim.x) {
    const int64_t r = e / dh, c = e % dh;
    const int j = idx[r];
    dst[r * pitch + c] = __ushort_as_bfloat16(j >= 0 ? src[off(j) + c].bits : uint16_t(0));
  }
}

namespace wmma = nvcuda::wmma;
using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// out[kTile][ld_out] (fp32) = X Y^T for X and Y bf16 [kTile][ld] with dh columns: warp w of 4 computes
// the 16 x 16 block (w / 2, w % 2).
__device__ void tc_xyt(const __nv_bfloat16* X, const __nv_bfloat16* Y, int64_t ld, int64_t dh, float* out,
                       unsigned ld_out) {
  const int warp = threadIdx.x >> 5, r = (warp >> 1) * 16, c = (warp & 1) * 16;
  FragAcc acc;
  wmma::fill_fragment(acc, 0.0f);
  for (int64_t kk = 0; kk < dh; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;  // Y^T
    wmma::load_matrix_sync(fa, X + r * ld + kk, static_cast<unsigned>(ld));
    wmma::load_matrix_sync(fb, Y + c * ld + kk, static_cast<unsigned>(ld));
    wmma::mma_sync(acc, fa, fb, acc);
  }
  wmma::store_matrix_sync(out + r * ld_out + c, acc, ld_out, wmma::mem_row_major);
}

// acc[kTile][ld_acc] (fp32) += A B with B bf16 [kTile][ld] (dh columns) and A bf16 [kTile][kTile]
// at pitch lda, used as stored (kTransA false) or transposed; the warps take the 16 x 16 output blocks
// in turn.
template <bool kTransA>
__device__ void tc_acc_ab(float* acc_s, int64_t ld_acc, const __nv_bfloat16* A, unsigned lda,
                          const __nv_bfloat16* B, int64_t ld, int64_t dh) {
  using LayoutA = std::conditional_t<kTransA, wmma::col_major, wmma::row_major>;
  const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int64_t blk = warp; blk < 2 * (dh / 16); blk += warps) {
    const int64_t orow = (blk & 1) * 16, ocol = (blk >> 1) * 16;
    FragAcc acc;
    wmma::load_matrix_sync(acc, acc_s + orow * ld_acc + ocol, static_cast<unsigned>(ld_acc), wmma::mem_row_major);
    for (int kk = 0; kk < kTile; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, LayoutA> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb;
      wmma::load_matrix_sync(fa, kTransA ? A + kk * lda + orow : A + orow * lda + kk, lda);
      wmma::load_matrix_sync(fb, B + kk * ld + ocol, static_cast<unsigned>(ld));
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(acc_s + orow * ld_acc + ocol, acc, static_cast<unsigned>(ld_acc), wmma::mem_row_major);
  }
}

// The forward on tensor cores (bf16, head_dim a multiple of 16): the same tiles and key walk as
// attn_fwd_kernel. Each of the 4 warps computes one 16 x 16 block of S = Q K^T with wmma (fp32
// accumulation); the online softmax runs on the SIMT cores as before, scaling the scores in fp32 and
// rounding P to bf16; O (fp32, in shared memory) is rescaled by the correction, then each warp adds
// its share of the 16 x 16 blocks of P V with wmma.
__global__ void __launch_bounds__(kThreads) attn_fwd_tc_kernel(AttentionParams p, Layout lay, Pattern pat) {
  const int64_t dh = p.head_dim, b = blockIdx.y / p.heads, h = blockIdx.y % p.heads;
  const int64_t i0 = int64_t(blockIdx.x) * kTile, nq = min(int64_t(kTile), p.q_len - i0);
  extern __shared__ __align__(32) unsigned char smem_raw[];
  const TcFwdSmem sm(smem_raw, dh);
  const int64_t ld = sm.ld_qkv, ld_o = sm.ld_o;
  const bf16* q = static_cast<const bf16*>(p.q);
  const bf16* k = static_cast<const bf16*>(p.k);
  const bf16* v = static_cast<const bf16*>(p.v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const float scale = static_cast<float>(p.scale);

  if (threadIdx.x < kTile) {
    sm.qidx[threadIdx.x] = threadIdx.x < nq ? int(i0 + threadIdx.x) : -1;
    sm.m[threadIdx.x] = -INFINITY;
    sm.l[threadIdx.x] = 0;
  }
  for (int64_t e = threadIdx.x; e < kTile * ld_o; e += blockDim.x) sm.O[e] = 0;
  __syncthreads();
  stage_rows_bf16(q, sm.qidx, [&](int i) { return lay.q(b, i, h); }, dh, sm.Qs, ld);
  const Runs keys = keys_for_queries(pat, p.k_len, i0, i0 + nq);
  for (int64_t o0 = 0; o0 < keys.count(); o0 += kTile) {
    const int64_t nk = min(int64_t(kTile), keys.count() - o0);
    __syncthreads();  // the previous step is done with kidx, Ks, Vs, S and P
    if (threadIdx.x < kTile) sm.kidx[threadIdx.x] = threadIdx.x < nk ? int(keys.at(o0 + threadIdx.x)) : -1;
    __syncthreads();
    stage_rows_bf16(k, sm.kidx, [&](int j) { return lay.k(b, j, h); }, dh, sm.Ks, ld);
    stage_rows_bf16(v, sm.kidx, [&](int j) { return lay.v(b, j, h); }, dh, sm.Vs, ld);
    __syncthreads();
    tc_xyt(sm.Qs, sm.Ks, ld, dh, sm.S, TcFwdSmem::kLdS);
    __syncthreads();
    for (int ii = warp; ii < kTile; ii += warps) {  // online softmax, a warp per query, a lane per key
      const int jj = lane;
      const bool vis = ii < nq && sm.kidx[jj] >= 0 && pat.visible(pat.q_pos0 + i0 + ii, pat.k_pos0 + sm.kidx[jj]);
      const float s = vis ? sm.S[ii * TcFwdSmem::kLdS + jj] * scale : -INFINITY;
      const float m_old = sm.m[ii], m_new = max(m_old, warp_max(s));
      const float pr = s == -INFINITY ? 0.0f : fast_exp(s - m_new);
      sm.P[ii * TcFwdSmem::kLdP + jj] = __float2bfloat16(pr);  // P meets V in bf16; the sum stays fp32
      const float sum = warp_sum(pr);
      if (lane == 0) {
        const float c = m_old == -INFINITY ? 0.0f : fast_exp(m_old - m_new);
        sm.corr[ii] = c;
        sm.l[ii] = sm.l[ii] * c + sum;
        sm.m[ii] = m_new;
      }
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < kTile * dh; e += blockDim.x) {
      const int64_t ii = e / dh, c = e % dh;
      sm.O[ii * ld_o + c] *= sm.corr[ii];
    }
    __syncthreads();
    tc_acc_ab<false>(sm.O, ld_o, sm.P, TcFwdSmem::kLdP, sm.Vs, ld, dh);  // O += P V
  }
  __syncthreads();
  bf16* out = static_cast<bf16*>(p.out);
  for (int64_t e = threadIdx.x; e < nq * dh; e += blockDim.x) {
    const int64_t ii = e / dh, c = e % dh;
    out[lay.dq(b, i0 + ii, h) + c] = bf16(sm.l[ii] > 0.0f ? sm.O[ii * ld_o + c] / sm.l[ii] : 0.0f);
  }
  if (threadIdx.x < nq) {
    float* lse = static_cast<float*>(p.lse);
    const int ii = threadIdx.x;
    lse[lay.stat(b, h, i0 + ii)] = sm.l[ii] > 0.0f ? sm.m[ii] + log(sm.l[ii]) : -INFINITY;
  }
}
// dQ on tensor cores (bf16, head_dim a multiple of 16), the walk of attn_dq_kernel: per key tile, S = Q
// K^T and dP = dO V^T (wmma), dS = P (dP - delta) with P from the saved lse (SIMT, fp32, rounded to
// bf16), then dQ += dS K (wmma).
__global__ void __launch_bounds__(kThreads)
    attn_dq_tc_kernel(AttentionBwdParams q, Layout lay, Pattern pat, const float* __restrict delta) {
  const AttentionParams& p = q.fwd;
  const int64_t dh = p.head_dim, b = blockIdx.y / p.heads, h = blockIdx.y % p.heads;
  const int64_t i0 = int64_t(blockIdx.x) * kTile, nq = min(int64_t(kTile), p.q_len - i0);
  extern __shared__ __align__(32) unsigned char smem_raw[];
  const TcBwdSmem sm(smem_raw, dh, false);
  const int64_t ld = sm.ld_qkv, ld_acc = sm.ld_acc;
  const float scale = static_cast<float>(p.scale);
  const float* lse = static_cast<const float*>(p.lse);
  if (threadIdx.x < kTile) {
    const int ii = threadIdx.x;
    sm.own_idx[ii] = ii < nq ? int(i0 + ii) : -1;
    sm.lse_s[ii] = ii < nq ? lse[lay.stat(b, h, i0 + ii)] : -INFINITY;
    sm.delta_s[ii] = ii < nq ? delta[lay.stat(b, h, i0 + ii)] : 0.0f;
  }
  for (int64_t e = threadIdx.x; e < kTile * ld_acc; e += blockDim.x) sm.acc0[e] = 0;
  __syncthreads();
  stage_rows_bf16(static_cast<const bf16*>(p.q), sm.own_idx, [&](int i) { return lay.q(b, i, h); }, dh, sm.own0, ld);
  stage_rows_bf16(static_cast<const bf16*>(q.gout), sm.own_idx, [&](int i) { return lay.dq(b, i, h); }, dh, sm.own1,
                  ld);
  const Runs keys = keys_for_queries(pat, p.k_len, i0, i0 + nq);
  for (int64_t o0 = 0; o0 < keys.count(); o0 += kTile) {
    const int64_t nk = min(int64_t(kTile), keys.count() - o0);
    __syncthreads();
    if (threadIdx.x < kTile) sm.walk_idx[threadIdx.x] = threadIdx.x < nk ? int(keys.at(o0 + threadIdx.x)) : -1;
    __syncthreads();
    stage_rows_bf16(static_cast<const bf16*>(p.k), sm.walk_idx, [&](int j) { return lay.k(b, j, h); }, dh, sm.walk0,
                    ld);
    stage_rows_bf16(static_cast<const bf16*>(p.v), sm.walk_idx, [&](int j) { return lay.v(b, j, h); }, dh, sm.walk1,
                    ld);
    __syncthreads();
    tc_xyt(sm.own0, sm.walk0, ld, dh, sm.S, TcBwdSmem::kLdS);   // S = Q K^T
    tc_xyt(sm.own1, sm.walk1, ld, dh, sm.dP, TcBwdSmem::kLdS);  // dP = dO V^T
    __syncthreads();
    for (int e = threadIdx.x; e < kTile * kTile; e += blockDim.x) {
      const int ii = e / kTile, jj = e % kTile;
      float ds = 0;
      if (ii < nq && sm.walk_idx[jj] >= 0 && sm.lse_s[ii] != -INFINITY &&
          pat.visible(pat.q_pos0 + i0 + ii, pat.k_pos0 + sm.walk_idx[jj])) {
        const float pr = exp(sm.S[ii * TcBwdSmem::kLdS + jj] * scale - sm.lse_s[ii]);
        ds = pr * (sm.dP[ii * TcBwdSmem::kLdS + jj] - sm.delta_s[ii]);
      }
      sm.dS[ii * TcBwdSmem::kLdP + jj] = __float2bfloat16(ds);
    }
    __syncthreads();
    tc_acc_ab<false>(sm.acc0, ld_acc, sm.dS, TcBwdSmem::kLdP, sm.walk0, ld, dh);  // dQ += dS K
  }
  __syncthreads();
  bf16* gq = static_cast<bf16*>(q.gq);
  for (int64_t e = threadIdx.x; e < nq * dh; e += blockDim.x) {
    const int64_t ii = e / dh, c = e % dh;
    gq[lay.dq(b, i0 + ii, h) + c] = bf16(sm.acc0[ii * ld_acc + c] * scale);
  }
}

// dK and dV on tensor cores, the walk of attn_dkv_kernel: per query tile, S and dP as in the dQ
// kernel, P and dS (bf16), then dV += P^T dO and dK += dS^T Q (wmma); dK takes the scale at the end.
__global__ void __launch_bounds__(kThreads)
    attn_dkv_tc_kernel(AttentionBwdParams q, Layout lay, Pattern pat, const float* __restrict delta) {
  const AttentionParams& p = q.fwd;
  const int64_t dh = p.head_dim, b = blockIdx.y / p.heads, h = blockIdx.y % p.heads;
  const int64_t j0 = int64_t(blockIdx.x) * kTile, nk = min(int64_t(kTile), p.k_len - j0);
  extern __shared__ __align__(32) unsigned char smem_raw[];
  const TcBwdSmem sm(smem_raw, dh, true);
  const int64_t ld = sm.ld_qkv, ld_acc = sm.ld_acc;
  const float scale = static_cast<float>(p.scale);
  const float* lse = static_cast<const float*>(p.lse);
  if (threadIdx.x < kTile) sm.own_idx[threadIdx.x] = threadIdx.x < nk ? int(j0 + threadIdx.x) : -1;
  for (int64_t e = threadIdx.x; e < kTile * ld_acc; e += blockDim.x) sm.acc0[e] = sm.acc1[e] = 0;
  __syncthreads();
  stage_rows_bf16(static_cast<const bf16*>(p.k), sm.own_idx, [&](int j) { return lay.k(b, j, h); }, dh, sm.own0, ld);
  stage_rows_bf16(static_cast<const bf16*>(p.v), sm.own_idx, [&](int j) { return lay.v(b, j, h); }, dh, sm.own1, ld);
  const Runs queries = queries_for_keys(pat, p.q_len, j0, j0 + nk);
  for (int64_t o0 = 0; o0 < queries.count(); o0 += kTile) {
    const int64_t nq = min(int64_t(kTile), queries.count() - o0);
    __syncthreads();
    if (threadIdx.x < kTile) {
      const int ii = threadIdx.x;
      const int i = ii < nq ? int(queries.at(o0 + ii)) : -1;
      sm.walk_idx[ii] = i;
      sm.lse_s[ii] = i >= 0 ? lse[lay.stat(b, h, i)] : -INFINITY;
      sm.delta_s[ii] = i >= 0 ? delta[lay.stat(b, h, i)] : 0.0f;
    }
    __syncthreads();
    stage_rows_bf16(static_cast<const bf16*>(p.q), sm.walk_idx, [&](int i) { return lay.q(b, i, h); }, dh, sm.walk0,
                    ld);
    stage_rows_bf16(static_cast<const bf16*>(q.gout), sm.walk_idx, [&](int i) { return lay.dq(b, i, h); }, dh,
                    sm.walk1, ld);
    __syncthreads();
    tc_xyt(sm.walk0, sm.own0, ld, dh, sm.S, TcBwdSmem::kLdS);   // S = Q K^T [query][key]
    tc_xyt(sm.walk1, sm.own1, ld, dh, sm.dP, TcBwdSmem::kLdS);  // dP = dO V^T
    __syncthreads();
    for (int e = threadIdx.x; e < kTile * kTile; e += blockDim.x) {
      const int ii = e / kTile, jj = e % kTile;
      float pr = 0, ds = 0;
      if (sm.own_idx[jj] >= 0 && sm.walk_idx[ii] >= 0 && sm.lse_s[ii] != -INFINITY &&
          pat.visible(pat.q_pos0 + sm.walk_idx[ii], pat.k_pos0 + sm.own_idx[jj])) {
        pr = exp(sm.S[ii * TcBwdSmem::kLdS + jj] * scale - sm.lse_s[ii]);
        ds = pr * (sm.dP[ii * TcBwdSmem::kLdS + jj] - sm.delta_s[ii]);
      }
      sm.P[ii * TcBwdSmem::kLdP + jj] = __float2bfloat16(pr);
      sm.dS[ii * TcBwdSmem::kLdP + jj] = __float2bfloat16(ds);
    }
    __syncthreads();
    tc_acc_ab<true>(sm.acc1, ld_acc, sm.P, TcBwdSmem::kLdP, sm.walk1, ld, dh);   // dV += P^T dO
    tc_acc_ab<true>(sm.acc0, ld_acc, sm.dS, TcBwdSmem::kLdP, sm.walk0, ld, dh);  // dK += dS^T Q
  }
  __syncthreads();
  bf16* gk = static_cast<bf16*>(q.gk);
  bf16* gv = static_cast<bf16*>(q.gv);
  for (int64_t e = threadIdx.x; e < nk * dh; e += blockDim.x) {
    const int64_t jj = e / dh, c = e % dh;
    gk[lay.dk(b, j0 + jj, h) + c] = bf16(sm.acc0[jj * ld_acc + c] * scale);
    gv[lay.dk(b, j0 + jj, h) + c] = bf16(sm.acc1[jj * ld_acc + c]);
  }
}
}  // namespace

namespace attention_tc {

void forward(const AttentionParams& p) {
  const dim3 grid(static_cast<unsigned>((p.q_len + kTile - 1) / kTile), static_cast<unsigned>(p.batch * p.heads));
  const size_t smem = static_cast<size_t>(TcFwdSmem(nullptr, p.head_dim).end);
  allow_dynamic_smem(attn_fwd_tc_kernel, smem, "attention");
  attn_fwd_tc_kernel<<<grid, kThreads, smem, as_stream(p.stream)>>>(
      p, layout_of(p), Pattern{p.window, p.global_stride, p.q_pos0, p.k_pos0});
  HYDRA_CUDA_LAUNCH_CHECK();
}

void backward(const AttentionBwdParams& q, const float* delta) {
  const AttentionParams& p = q.fwd;
  const Layout lay = layout_of(p);
  const Pattern pat{p.window, p.global_stride, p.q_pos0, p.k_pos0};
  const unsigned bh = static_cast<unsigned>(p.batch * p.heads);
  cudaStream_t s = as_stream(p.stream);
  if (p.q_len > 0) {
    const size_t smem = static_cast<size_t>(TcBwdSmem(nullptr, p.head_dim, false).end);
    allow_dynamic_smem(attn_dq_tc_kernel, smem, "attention_backward");
    attn_dq_tc_kernel<<<dim3(static_cast<unsigned>((p.q_len + kTile - 1) / kTile), bh), kThreads, smem, s>>>(
        q, lay, pat, delta);
    HYDRA_CUDA_LAUNCH_CHECK();
  }
  if (p.k_len > 0) {
    const size_t smem = static_cast<size_t>(TcBwdSmem(nullptr, p.head_dim, true).end);
    allow_dynamic_smem(attn_dkv_tc_kernel, smem, "attention_backward");
    attn_dkv_tc_kernel<<<dim3(static_cast<unsigned>((p.k_len + kTile - 1) / kTile), bh), kThreads, smem, s>>>(
        q, lay, pat, delta);
    HYDRA_CUDA_LAUNCH_CHECK();
  }
}

}  // namespace attention_tc
}  // namespace hydra::kernels::cuda
