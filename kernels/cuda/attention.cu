// CUDA flash-style sparse causal attention (SIMT cores; fp32 arithmetic for f32 and bf16, fp64 for
// f64). A block owns 32 queries of one (batch, head) and walks the keys its pattern reaches in
// tiles of 32, staged in shared memory: the global keys before the window band (a strided run) and
// the band (a contiguous run), the same sets as the CPU kernel; pairs the pattern masks inside a
// tile get -inf. Softmax is online (running max and sum per query). The backward recomputes
// probabilities from the saved log-sum-exp in two kernels without atomics: dQ walks a query tile's
// keys, dK and dV walk a key tile's queries (the mirror sets: the band after the tile plus the
// global queries beyond it). Every sum runs in a fixed order, so results are bit-reproducible.
// For bf16 with head sizes that are multiples of 16, the same walks run their products on tensor cores
// (wmma 16 x 16 x 16, fp32 accumulation; P and dS rounded to bf16 as they enter a product), with the
// softmax and masks still on the SIMT cores.
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "kernels/attention.h"
#include "kernels/cuda/common.cuh"

namespace hydra::kernels::cuda {
namespace {

constexpr int kTile =
    32;  // queries per block and keys per step (dK/dV: keys per block, queries per step)
constexpr int kThreads = 128;

struct Pattern {
  int64_t window, stride, q_pos0, k_pos0;
  __device__ bool global(int64_t pos) const { return stride > 0 && pos % stride == 0; }
  __device__ bool visible(int64_t tq, int64_t tk) const {
    return tk <= tq && (window <= 0 || tq - tk < window || global(tk) || global(tq));
  }
};

// An ordered index list made of two arithmetic runs: start0 + o * step0 (o < n0), then start1 + o *
// step1.
struct Runs {
  int64_t start0 = 0, step0 = 1, n0 = 0, start1 = 0, step1 = 1, n1 = 0;
  __device__ int64_t count() const { return n0 + n1; }
  __device__ int64_t at(int64_t o) const {
    return o < n0 ? start0 + o * step0 : start1 + (o - n0) * step1;
  }
};

__device__ int64_t first_multiple_at_or_after(int64_t pos, int64_t stride) {
  return pos <= 0 ? 0 : (pos + stride - 1) / stride * stride;
}

// Keys that queries [i0, i1) may see: the global keys before the window band, then the band; every
// earlier key when a query is global or the window is unlimited.
__device__ Runs keys_for_queries(const Pattern& pat, int64_t k_len, int64_t i0, int64_t i1) {
  Runs r;
  const int64_t tq_min = pat.q_pos0 + i0, tq_max = pat.q_pos0 + i1 - 1;
  const int64_t j_end = min(k_len, tq_max - pat.k_pos0 + 1);
  if (j_end <= 0) return r;
  bool full = pat.window <= 0;
  for (int64_t i = i0; i < i1 && !full; ++i) full = pat.global(pat.q_pos0 + i);
  int64_t j_band = 0;
  if (!full) {
    j_band = max(int64_t(0), min(j_end, tq_min - pat.window + 1 - pat.k_pos0));
    if (pat.stride > 0 && j_band > 0) {
      const int64_t g0 = first_multiple_at_or_after(pat.k_pos0, pat.stride),
                    limit = pat.k_pos0 + j_band;
      r.start0 = g0 - pat.k_pos0;
      r.step0 = pat.stride;
      r.n0 = g0 < limit ? (limit - 1 - g0) / pat.stride + 1 : 0;
    }
  }
  r.start1 = j_band;
  r.n1 = j_end - j_band;
  return r;
}

// Queries that may see keys [j0, j1): the band from the first key on, then the global queries after
// it; every later query when a key is global or the window is unlimited.
__device__ Runs queries_for_keys(const Pattern& pat, int64_t q_len, int64_t j0, int64_t j1) {
  Runs r;
  const int64_t tk_min = pat.k_pos0 + j0, tk_max = pat.k_pos0 + j1 - 1;
  const int64_t i_start = max(int64_t(0), tk_min - pat.q_pos0);
  if (i_start >= q_len) return r;
  bool full = pat.window <= 0;
  for (int64_t j = j0; j < j1 && !full; ++j) full = pat.global(pat.k_pos0 + j);
  r.start0 = i_start;
  if (full) {
    r.n0 = q_len - i_start;
    return r;
  }
  const int64_t i_band_end = max(i_start, min(q_len, tk_max + pat.window - pat.q_pos0));
  r.n0 = i_band_end - i_start;
  if (pat.stride > 0) {
    const int64_t g0 = first_multiple_at_or_after(pat.q_pos0 + i_band_end, pat.stride),
                  limit = pat.q_pos0 + q_len;
    r.start1 = g0 - pat.q_pos0;
    r.step1 = pat.stride;
    r.n1 = g0 < limit ? (limit - 1 - g0) / pat.stride + 1 : 0;
  }
  return r;
}

// Element offsets of a token's head in q/k/v ([B, L, H, dh] with tokens *_row apart) and in the
// contiguous outputs and gradients.
struct Layout {
  int64_t heads, q_len, k_len, dh, q_row, k_row, v_row;
  __device__ int64_t q(int64_t b, int64_t i, int64_t h) const {
    return (b * q_len + i) * q_row + h * dh;
  }
  __device__ int64_t k(int64_t b, int64_t j, int64_t h) const {
    return (b * k_len + j) * k_row + h * dh;
  }
  __device__ int64_t v(int64_t b, int64_t j, int64_t h) const {
    return (b * k_len + j) * v_row + h * dh;
  }
  __device__ int64_t dq(int64_t b, int64_t i, int64_t h) const {
    return ((b * q_len + i) * heads + h) * dh;
  }
  __device__ int64_t dk(int64_t b, int64_t j, int64_t h) const {
    return ((b * k_len + j) * heads + h) * dh;
  }
  __device__ int64_t stat(int64_t b, int64_t h, int64_t i) const {
    return (b * heads + h) * q_len + i;
  }
};

Layout layout_of(const AttentionParams& p) {
  return {p.heads, p.q_len, p.k_len, p.head_dim, p.q_row, p.k_row, p.v_row};
}

// Each kernel's dynamic shared memory, carved into arrays in order. The host runs the same carving
// from address 0 to get the size to launch with, so the two cannot disagree.
class Carve {
 public:
  __host__ __device__ explicit Carve(unsigned char* base)
      : at_(reinterpret_cast<uintptr_t>(base)) {}
  template <class E>
  __host__ __device__ E* take(int64_t n) {
    E* p = reinterpret_cast<E*>(at_);
    at_ += static_cast<uintptr_t>(n) * sizeof(E);
    return p;
  }
  // As take, starting at a multiple of 32 bytes (what tensor-core fragment loads need).
  template <class E>
  __host__ __device__ E* take_aligned(int64_t n) {
    at_ = (at_ + 31) / 32 * 32;
    return take<E>(n);
  }
  __host__ __device__ uintptr_t end() const { return at_; }

 private:
  uintptr_t at_;
};

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

size_t accumulate_size(DType t) { return t == DType::kF64 ? 8 : 4; }

void check_sizes(const AttentionParams& p) {
  HYDRA_CHECK(p.q_len < (int64_t(1) << 31) && p.k_len < (int64_t(1) << 31) &&
              p.batch * p.heads < 65536)
      << "attention (CUDA): q_len " << p.q_len << ", k_len " << p.k_len << " or batch*heads "
      << p.batch * p.heads << " out of range (lengths < 2^31, batch*heads < 65536)";
}

}  // namespace

void attention_fwd(const AttentionParams& p) {
  if (p.batch * p.heads * p.q_len == 0) return;
  check_sizes(p);
  const Pattern pat{p.window, p.global_stride, p.q_pos0, p.k_pos0};
  const dim3 grid(static_cast<unsigned>((p.q_len + kTile - 1) / kTile), static_cast<unsigned>(p.batch * p.heads));
  if (p.dtype == DType::kBF16 && p.head_dim % 16 == 0) {  // tensor cores
    const size_t smem = static_cast<size_t>(TcFwdSmem(nullptr, p.head_dim).end);
    allow_dynamic_smem(attn_fwd_tc_kernel, smem, "attention");
    attn_fwd_tc_kernel<<<grid, kThreads, smem, as_stream(p.stream)>>>(p, layout_of(p), pat);
    HYDRA_CUDA_LAUNCH_CHECK();
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

size_t attention_bwd_workspace(const AttentionBwdParams& q) {
  const AttentionParams& p = q.fwd;
  return accumulate_size(p.dtype) * static_cast<size_t>(p.batch * p.heads * p.q_len) + 256;
}

void attention_bwd(const AttentionBwdParams& q) {
  const AttentionParams& p = q.fwd;
  if (p.batch * p.heads == 0 || (p.q_len == 0 && p.k_len == 0)) return;
  check_sizes(p);
  HYDRA_CHECK(q.workspace != nullptr) << "attention_bwd: workspace required";
  cudaStream_t s = as_stream(p.stream);
  dispatch_float(p.dtype, "attention_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    const Layout lay = layout_of(p);
    const Pattern pat{p.window, p.global_stride, p.q_pos0, p.k_pos0};
    C* delta = static_cast<C*>(q.workspace);
    const unsigned bh = static_cast<unsigned>(p.batch * p.heads);
    const size_t dq_bytes = smem_bytes<DqSmem, C>(p.head_dim),
                 dkv_bytes = smem_bytes<DkvSmem, C>(p.head_dim);
    const bool tensor_cores = std::is_same_v<T, bf16> && p.head_dim % 16 == 0;
    if (p.q_len > 0) {
      const int64_t rows = p.batch * p.heads * p.q_len;
      attn_delta_kernel<T>
          <<<blocks_for(rows * 32, 256, int64_t(1) << 31), 256, 0, s>>>(q, lay, delta, rows);
      HYDRA_CUDA_LAUNCH_CHECK();
    }
    if constexpr (std::is_same_v<T, bf16>) {
      if (tensor_cores) {
        const dim3 q_grid(static_cast<unsigned>((p.q_len + kTile - 1) / kTile), bh),
            k_grid(static_cast<unsigned>((p.k_len + kTile - 1) / kTile), bh);
        const size_t tq = static_cast<size_t>(TcBwdSmem(nullptr, p.head_dim, false).end),
                     tkv = static_cast<size_t>(TcBwdSmem(nullptr, p.head_dim, true).end);
        if (p.q_len > 0) {
          allow_dynamic_smem(attn_dq_tc_kernel, tq, "attention_backward");
          attn_dq_tc_kernel<<<q_grid, kThreads, tq, s>>>(q, lay, pat, delta);
          HYDRA_CUDA_LAUNCH_CHECK();
        }
        if (p.k_len > 0) {
          allow_dynamic_smem(attn_dkv_tc_kernel, tkv, "attention_backward");
          attn_dkv_tc_kernel<<<k_grid, kThreads, tkv, s>>>(q, lay, pat, delta);
          HYDRA_CUDA_LAUNCH_CHECK();
        }
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

}  // namespace hydra::kernels::cuda
