// CUDA SSD scan (kernels/ssd_scan.h): the CPU kernel's three phases (kernels/cpu/ssd_scan.cpp gives
// the sums), a block of 256 threads per (chunk, head, sequence), or per (sequence, head) and 64 of
// its state elements for the passes between chunks. A chunk's products (C B^T, M (dl x), the
// states' parts and their gradients: 64 x 64 x 64 at most) run on tensor cores (wmma, TF32 inputs,
// f32 accumulation) from f32 tiles in shared memory; in f32 storage each product is three TF32
// products of split operands (a = hi + lo: near f32's precision, as the tests ask), in bf16 one
// of the operands as they are (TF32 by truncation: 10 bits of mantissa; the inputs carry 8). gB and
// gC sum over heads: each block writes its head's share, and a last kernel adds them in order (no
// atomics). Sizes: chunk_len and head_dim at most 64, state at most 16, f32 or bf16 storage; other
// sizes run the composed form (autograd/ops_ssd.cpp).
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/ssd_scan.h"

namespace hydra::kernels::cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kQ = 64, kP = 64, kN = 16, kThreads = 256, kWarps = kThreads / 32;

size_t align256(size_t b) { return (b + 255) / 256 * 256; }
// Row strides of the tiles in shared memory: multiples of 4 floats (wmma's rule), not of 32
// (banks).
constexpr int kLD = 68;  // 64-wide rows ([Q, P], [Q, Q], [N, P])
constexpr int kLN = 20;  // 16-wide rows ([Q, N])
constexpr int kQP = kQ * kLD, kQN = kQ * kLN, kNP = kN * kLD;

struct Dims {
  int64_t Bz, L, H, P, N, Q, nc, Dm;
  bool vec = false;  // the [*, P] rows move in 16-byte vectors (vec_ok)
};
Dims dims_of(const SsdScanParams& p) {
  return {p.batch,
          p.len,
          p.heads,
          p.head_dim,
          p.state,
          p.chunk_len,
          ssd_num_chunks(p.len, p.chunk_len),
          p.heads * p.head_dim};
}

// ---- block products on tensor cores ----

using Acc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
using Row = wmma::row_major;
using Col = wmma::col_major;

// An operand tile in shared memory at (r0, k0): element (r, k) of a row-major operand is at
// p[r * ld + k], of a column-major one at p[k * ld + r]. (For B operands r is k and k is the
// column.)
template <class Lay>
__device__ __forceinline__ const float* tile_at(const float* p, int ld, int r0, int k0) {
  if constexpr (std::is_same_v<Lay, Row>)
    return p + r0 * ld + k0;
  else
    return p + k0 * ld + r0;
}

template <class Frag>
__device__ __forceinline__ void to_tf32(Frag& hi, Frag* lo) {
#pragma unroll
  for (int i = 0; i < hi.num_elements; ++i) {
    const float v = hi.x[i];
    hi.x[i] = wmma::__float_to_tf32(v);
    lo->x[i] = wmma::__float_to_tf32(v - hi.x[i]);
  }
}

// acc += A[m0 .. m0 + 16, k_begin .. k_end) B[k_begin .. k_end, n0 .. n0 + 16), the k bounds
// multiples of 8. kSplit: the three products hi hi + hi lo + lo hi of the operands split into TF32
// halves; otherwise the operands go in as they are (the tensor cores use their top 19 bits: TF32
// by truncation, a relative error under 2^-10 an operand).
template <bool kSplit, class LA, class LB>
__device__ __forceinline__ void mma_tile(Acc& acc, const float* a, int lda, const float* b, int ldb,
                                         int k_begin, int k_end, int m0, int n0) {
  using FA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, LA>;
  using FB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, LB>;
  for (int k0 = k_begin; k0 < k_end; k0 += 8) {
    FA ah;
    FB bh;
    wmma::load_matrix_sync(ah, tile_at<LA>(a, lda, m0, k0), lda);
    wmma::load_matrix_sync(bh, tile_at<LB>(b, ldb, k0, n0), ldb);
    if constexpr (kSplit) {
      FA al;
      FB bl;
      to_tf32(ah, &al);
      to_tf32(bh, &bl);
      wmma::mma_sync(acc, al, bh, acc);
      wmma::mma_sync(acc, ah, bl, acc);
    }
    wmma::mma_sync(acc, ah, bh, acc);
  }
}

// out[M, N] (row stride ldo) = the products f(acc, m0, n0) adds into each 16 x 16 tile, the tiles
// spread over the block's warps; `init`, when given, is the accumulators' start (row stride ldo;
// each tile's read only by the warp that stores it). Every thread calls it. kAliased: `out` is
// also an operand (or other threads still read it), so the block is synchronised before the
// stores; otherwise each tile is stored when done. kSync: the block is synchronised after them.
template <int M, int N, bool kAliased, bool kSync, class F>
__device__ __forceinline__ void block_mm(float* out, int ldo, const float* init, F&& f) {
  constexpr int kTiles = (M / 16) * (N / 16), kPer = (kTiles + kWarps - 1) / kWarps;
  const int warp = threadIdx.x / 32;
  Acc acc[kAliased ? kPer : 1];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int tile = warp + i * kWarps, m0 = tile / (N / 16) * 16, n0 = tile % (N / 16) * 16;
    if (tile >= kTiles) continue;
    Acc& a = acc[kAliased ? i : 0];
    if (init != nullptr)
      wmma::load_matrix_sync(a, init + m0 * ldo + n0, ldo, wmma::mem_row_major);
    else
      wmma::fill_fragment(a, 0.f);
    f(a, m0, n0);
    if constexpr (!kAliased)
      wmma::store_matrix_sync(out + m0 * ldo + n0, a, ldo, wmma::mem_row_major);
  }
  if constexpr (kAliased) {
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int tile = warp + i * kWarps, m0 = tile / (N / 16) * 16, n0 = tile % (N / 16) * 16;
      if (tile < kTiles)
        wmma::store_matrix_sync(out + m0 * ldo + n0, acc[i], ldo, wmma::mem_row_major);
    }
  }
  if constexpr (kSync) __syncthreads();
}

// ---- tiles ----

// cs[t] = sum_{i <= t} dl_i A for the chunk's steps (t < q; later entries repeat the total), by
// warp 0 (two steps a lane). dl points at dl[b, t0, h]; consecutive steps are H apart.
__device__ void chunk_cumsum(const float* dl, int64_t H, float A, int q, float* cs) {
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x, t0 = 2 * lane, t1 = t0 + 1;
  const float a0 = t0 < q ? dl[t0 * H] * A : 0.f, a1 = t1 < q ? dl[t1 * H] * A : 0.f;
  const float pair = a0 + a1;
  float incl = pair;
  for (int o = 1; o < 32; o <<= 1) {
    const float v = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += v;
  }
  cs[t0] = incl - pair + a0;
  cs[t1] = incl;
}

// [Q, N] rows of B or C at steps 0 .. q (zeros past q and N), row stride kLN.
template <class T>
__device__ void load_qn(const T* src, int64_t row, int q, int N, float* dst) {
  for (int i = threadIdx.x; i < kQ * kN; i += kThreads) {
    const int t = i / kN, n = i % kN;
    dst[t * kLN + n] = t < q && n < N ? load(src, t * row + n) : 0.f;
  }
}

// [N, P] f32 state block (P-contiguous, `src` null for zeros) into a [kN, kLD] tile, zero-padded.
__device__ void load_np(const float* src, int N, int P, float* dst) {
  for (int i = threadIdx.x; i < kN * kP; i += kThreads) {
    const int n = i / kP, j = i % kP;
    dst[n * kLD + j] = src != nullptr && n < N && j < P ? src[n * P + j] : 0.f;
  }
}

// A [N, P] f32 state block fetched as one float4 a thread (when N and P are the full kN and kP
// and the block is 16-byte aligned: the loads can then be issued before other work and stored
// into the tile after it), else element by element at the store.
struct NpFetch {
  float4 v;
  bool fast;
};
static_assert(kN * kP == 4 * kThreads);
__device__ __forceinline__ NpFetch np_fetch(const float* src, int N, int P) {
  const bool fast = N == kN && P == kP && reinterpret_cast<uintptr_t>(src) % 16 == 0;
  return {fast ? reinterpret_cast<const float4*>(src)[threadIdx.x] : make_float4(0, 0, 0, 0), fast};
}
__device__ __forceinline__ void np_store(const NpFetch& f, const float* src, int N, int P,
                                         float* dst) {
  if (!f.fast) return load_np(src, N, P, dst);
  float* at = dst + threadIdx.x / (kP / 4) * kLD + threadIdx.x % (kP / 4) * 4;
  at[0] = f.v.x, at[1] = f.v.y, at[2] = f.v.z, at[3] = f.v.w;
}

// A block's chunk, head and sequence.
struct Task {
  int64_t c, h, b, t0;
  int q;  // steps in the chunk
};
__device__ Task task_of(const Dims& d) {
  const int64_t c = blockIdx.x, h = blockIdx.y, b = blockIdx.z, t0 = c * d.Q;
  return {c, h, b, t0, static_cast<int>(std::min<int64_t>(d.Q, d.L - t0))};
}

// ---- [Q, P] rows in vectors ----
// A block's [Q, P] tile is kCount slots of V elements a thread (16 bytes of T): slot k covers row
// t(k), columns j(k) .. j(k) + V (the same columns in every slot). Where the rows allow (Dims::vec:
// P a multiple of V, rows and pointers 16-byte aligned) a slot moves in one 16-byte access, else
// element by element.
template <class T>
struct Slots {
  static constexpr int V = 16 / sizeof(T), kPerRow = kP / V, kCount = kQ * kPerRow / kThreads;
  static __device__ __forceinline__ int t(int k) { return (threadIdx.x + k * kThreads) / kPerRow; }
  static __device__ __forceinline__ int j(int k) {
    return (threadIdx.x + k * kThreads) % kPerRow * V;
  }
};

// v[0 .. V) = p[0 .. V) as floats (zeros past `valid`).
template <class T, int V>
__device__ __forceinline__ void load_v(const T* p, bool vec, int valid, float (&v)[V]) {
  static_assert(V * sizeof(T) == 16);
  if (vec) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int u = 0; u < V; ++u) v[u] = convert<float>(e[u]);
  } else {
#pragma unroll
    for (int u = 0; u < V; ++u) v[u] = u < valid ? load(p, u) : 0.f;
  }
}
// V floats from f32 storage (16-byte aligned when vec).
template <int V>
__device__ __forceinline__ void load_f(const float* p, bool vec, int valid, float (&v)[V]) {
  if (vec) {
#pragma unroll
    for (int u = 0; u < V; u += 4) {
      const float4 f = *reinterpret_cast<const float4*>(p + u);
      v[u] = f.x, v[u + 1] = f.y, v[u + 2] = f.z, v[u + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int u = 0; u < V; ++u) v[u] = u < valid ? p[u] : 0.f;
  }
}
template <class T, int V>
__device__ __forceinline__ void store_v(T* p, bool vec, int valid, const float (&v)[V]) {
  if constexpr (std::is_same_v<T, float>) {
    if (vec) {
#pragma unroll
      for (int u = 0; u < V; u += 4)
        *reinterpret_cast<float4*>(p + u) = make_float4(v[u], v[u + 1], v[u + 2], v[u + 3]);
      return;
    }
  } else {
    if (vec && V * sizeof(T) % 16 == 0) {
#pragma unroll
      for (int u = 0; u < V; u += 16 / int(sizeof(T))) {
        uint4 raw;
        T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
        for (int i = 0; i < 16 / int(sizeof(T)); ++i) e[i] = convert<T>(v[u + i]);
        *reinterpret_cast<uint4*>(p + u) = raw;
      }
      return;
    }
  }
#pragma unroll
  for (int u = 0; u < V; ++u)
    if (u < valid) store(p, u, v[u]);
}

// The [Q, P] tile of x (rows `row` apart) at dst[t * kLD + j], times scale[t * scale_step] where
// scale is given; zeros past q and P.
template <class T>
__device__ void load_x_tile(const T* src, int64_t row, int q, int P, bool vec, const float* scale,
                            int64_t scale_step, float* dst) {
  using S = Slots<T>;
  float v[S::kCount][S::V] = {};
#pragma unroll
  for (int k = 0; k < S::kCount; ++k)  // every load first, then the stores
    if (S::t(k) < q && S::j(k) < P) load_v(src + S::t(k) * row + S::j(k), vec, P - S::j(k), v[k]);
#pragma unroll
  for (int k = 0; k < S::kCount; ++k) {
    const int t = S::t(k), j = S::j(k);
    const bool in = t < q && j < P;
    const float f = in ? (scale != nullptr ? scale[t * scale_step] : 1.f) : 0.f;
#pragma unroll
    for (int u = 0; u < S::V; ++u) dst[t * kLD + j + u] = f * v[k][u];
  }
}

// The output's gradient before the gate for a slot's V columns (row `row`, column `col` of the
// [B, L, H P] tensors; `valid` of them inside P): gy SiLU(z), or gy where there is no gate; `gz`,
// when given, gets gy pre SiLU'(z).
template <class T, int V>
__device__ __forceinline__ void ungate_v(const SsdScanBwdParams& q, int64_t row, int64_t col,
                                         bool vec, int valid, T* gz, float (&g)[V]) {
  const SsdScanParams& p = q.fwd;
  const int64_t Dm = p.heads * p.head_dim, at = row * Dm + col;
  load_v(static_cast<const T*>(q.gy) + at, vec, valid, g);
  if (p.z == nullptr) return;
  float z[V], pre[V] = {};
  load_v(static_cast<const T*>(p.z) + row * p.z_row + col, vec, valid, z);
  if (gz != nullptr) load_f(static_cast<const float*>(p.pre) + at, vec, valid, pre);
  float gzv[V];
#pragma unroll
  for (int u = 0; u < V; ++u) {
    const float sg = 1.f / (1.f + __expf(-z[u]));
    gzv[u] = g[u] * pre[u] * sg * (1.f + z[u] * (1.f - sg));
    g[u] *= z[u] * sg;
  }
  if (gz != nullptr) store_v(gz + at, vec, valid, gzv);
}

// ---- forward ----

// 1: each chunk's state from zero, S[n, p] = sum_s exp(T - cs_s) dl_s B_s[n] x_s[p], into states;
// the chunk's total log-decay T into totals.
template <class T>
__global__ void __launch_bounds__(kThreads)
    chunk_state_kernel(SsdScanParams p, Dims d, float* totals) {
  constexpr bool kSplit = std::is_same_v<T, float>;
  __shared__ __align__(32) float Bw[kQN], xs[kQP], S[kNP];
  __shared__ float cs[kQ], w[kQ];
  const Task k = task_of(d);
  const int64_t r0 = k.b * d.L + k.t0;
  const T* X = static_cast<const T*>(p.x);
  const float* dl = static_cast<const float*>(p.dl) + r0 * d.H + k.h;  // step t at dl[t * H]
  load_qn(static_cast<const T*>(p.B) + r0 * p.B_row, p.B_row, k.q, int(d.N), Bw);
  load_x_tile(X + r0 * p.x_row + k.h * d.P, p.x_row, k.q, int(d.P), d.vec, nullptr, 0, xs);
  chunk_cumsum(dl, d.H, static_cast<const float*>(p.A)[k.h], k.q, cs);
  __syncthreads();
  if (threadIdx.x < kQ) {
    const int t = threadIdx.x;
    w[t] = t < k.q ? __expf(cs[k.q - 1] - cs[t]) * dl[t * d.H] : 0.f;
    if (t == 0) totals[(k.b * d.H + k.h) * d.nc + k.c] = cs[k.q - 1];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kQ * kN; i += kThreads) Bw[i / kN * kLN + i % kN] *= w[i / kN];
  __syncthreads();
  block_mm<kN, kP, false, true>(S, kLD, nullptr, [&](Acc& acc, int m0, int n0) {
    mma_tile<kSplit, Col, Row>(acc, Bw, kLN, xs, kLD, 0, kQ, m0, n0);  // (B o w)^T x
  });
  float* out = static_cast<float*>(p.states) + ((k.b * d.H + k.h) * d.nc + k.c) * d.N * d.P;
  for (int i = threadIdx.x; i < d.N * d.P; i += kThreads)
    out[i] = S[i / int(d.P) * kLD + i % int(d.P)];
}

// 2: the states between chunks, a thread per state element (a block per 64 of a (sequence, head)'s
// N P): states[c] becomes the state entering chunk c; h_last the last one. The loads of later
// chunks do not wait on the recurrence: a batch of them is issued before its steps.
constexpr int kPassThreads = 64, kPassBatch = 16;

__global__ void __launch_bounds__(kPassThreads)
    state_pass_kernel(SsdScanParams p, Dims d, const float* totals) {
  const int NP = int(d.N * d.P), parts = (NP + kPassThreads - 1) / kPassThreads;
  const int64_t bh = blockIdx.x / parts, b = bh / d.H, h = bh % d.H;
  const int i = (blockIdx.x % parts) * kPassThreads + threadIdx.x;
  if (i >= NP) return;
  const int n = i / int(d.P), j = i % int(d.P);
  const float* h0 = static_cast<const float*>(p.h0);
  float cur = h0 ? h0[(b * d.Dm + h * d.P + j) * d.N + n] : 0.f;
  float* S = static_cast<float*>(p.states) + bh * d.nc * NP + i;
  const float* tot = totals + bh * d.nc;
  for (int64_t c0 = 0; c0 < d.nc; c0 += kPassBatch) {  // a batch's loads in flight together
    float s[kPassBatch], e[kPassBatch];
#pragma unroll
    for (int u = 0; u < kPassBatch; ++u)
      if (c0 + u < d.nc) s[u] = S[(c0 + u) * NP], e[u] = __expf(tot[c0 + u]);
#pragma unroll
    for (int u = 0; u < kPassBatch; ++u)
      if (c0 + u < d.nc) {
        S[(c0 + u) * NP] = cur;
        cur = e[u] * cur + s[u];
      }
  }
  static_cast<float*>(p.h_last)[(b * d.Dm + h * d.P + j) * d.N + n] = cur;
}

// Shared memory of the output kernel, in floats.
constexpr int kOutSmem = 2 * kQN + 2 * kQP + kNP + kQ;

// 3: y_t = sum_{s <= t} exp(cs_t - cs_s) (C_t . B_s) dl_s x_s + exp(cs_t) H^T C_t, then the skip
// term and the gate.
template <class T>
__global__ void __launch_bounds__(kThreads) chunk_out_kernel(SsdScanParams p, Dims d) {
  constexpr bool kSplit = std::is_same_v<T, float>;
  extern __shared__ __align__(128) float sm[];
  float *Bs = sm, *Cs = Bs + kQN, *M = Cs + kQN, *xd = M + kQP, *Hs = xd + kQP, *cs = Hs + kNP;
  const Task k = task_of(d);
  const int64_t r0 = k.b * d.L + k.t0;
  const T* X = static_cast<const T*>(p.x);
  const float* dl = static_cast<const float*>(p.dl) + r0 * d.H + k.h;
  load_qn(static_cast<const T*>(p.B) + r0 * p.B_row, p.B_row, k.q, int(d.N), Bs);
  load_qn(static_cast<const T*>(p.C) + r0 * p.C_row, p.C_row, k.q, int(d.N), Cs);
  chunk_cumsum(dl, d.H, static_cast<const float*>(p.A)[k.h], k.q, cs);
  const float* Hin =
      static_cast<const float*>(p.states) + ((k.b * d.H + k.h) * d.nc + k.c) * d.N * d.P;
  const NpFetch hf = np_fetch(Hin, int(d.N), int(d.P));
  load_x_tile(X + r0 * p.x_row + k.h * d.P, p.x_row, k.q, int(d.P), d.vec, dl, d.H, xd);
  np_store(hf, Hin, int(d.N), int(d.P), Hs);
  __syncthreads();
  block_mm<kQ, kQ, false, true>(M, kLD, nullptr, [&](Acc& acc, int m0, int n0) {  // G = C B^T
    if (n0 <= m0) mma_tile<kSplit, Row, Col>(acc, Cs, kLN, Bs, kLN, 0, kN, m0, n0);
  });
  // M = W o G (s <= t < q); C's rows times exp(cs_t) for the entering state's part
  for (int i = threadIdx.x; i < kQ * kQ; i += kThreads) {
    const int t = i / kQ, s = i % kQ;
    float& m = M[t * kLD + s];
    m = s <= t && t < k.q ? m * __expf(cs[t] - cs[s]) : 0.f;
  }
  for (int i = threadIdx.x; i < kQ * kN; i += kThreads) {
    const int t = i / kN;
    Cs[t * kLN + i % kN] *= t < k.q ? __expf(cs[t]) : 0.f;
  }
  __syncthreads();
  block_mm<kQ, kP, true, true>(M, kLD, nullptr, [&](Acc& acc, int m0, int n0) {  // Y = M xd + e C H
    mma_tile<kSplit, Row, Row>(acc, M, kLD, xd, kLD, 0, m0 + 16, m0, n0);
    mma_tile<kSplit, Row, Row>(acc, Cs, kLN, Hs, kLD, 0, kN, m0, n0);
  });
  T* y = static_cast<T*>(p.y);
  const T* Dv = static_cast<const T*>(p.D);
  const T* Z = static_cast<const T*>(p.z);
  float* pre_out = static_cast<float*>(p.pre);
  using S = Slots<T>;
#pragma unroll
  for (int s = 0; s < S::kCount; ++s) {
    const int t = S::t(s), j = S::j(s), valid = int(d.P) - j;
    if (t >= k.q || valid <= 0) continue;
    const int64_t row = r0 + t, col = k.h * d.P + j, at = row * d.Dm + col;
    float v[S::V], dv[S::V], xv[S::V], zv[S::V];
    if (Dv) {
      load_v(Dv + col, d.vec, valid, dv);
      load_v(X + row * p.x_row + col, d.vec, valid, xv);
    }
    if (Z) load_v(Z + row * p.z_row + col, d.vec, valid, zv);
#pragma unroll
    for (int u = 0; u < S::V; ++u) v[u] = M[t * kLD + j + u] + (Dv ? dv[u] * xv[u] : 0.f);
    if (pre_out) store_v(pre_out + at, d.vec, valid, v);
    if (Z)
#pragma unroll
      for (int u = 0; u < S::V; ++u) v[u] *= zv[u] / (1.f + __expf(-zv[u]));
    store_v(y + at, d.vec, valid, v);
  }
}

// ---- backward ----

// Workspace: E [B, H, nc, N, P] (first U, then the end states' gradients), the chunks' totals
// [B, H, nc], the gA partials [B * nc, H], the gD partials [B * nc, H * P], each head's share of
// gB and of gC [B, L, H, N].
struct BwdBuffers {
  float *E, *totals, *gA_part, *gD_part, *gB_part, *gC_part;
};
struct BwdSizes {
  size_t E, totals, gA, gD, bc;
};
BwdSizes bwd_sizes(const Dims& d) {
  return {align256(size_t(d.Bz * d.H * d.nc * d.N * d.P) * 4),
          align256(size_t(d.Bz * d.H * d.nc) * 4), align256(size_t(d.Bz * d.nc * d.H) * 4),
          align256(size_t(d.Bz * d.nc * d.Dm) * 4), align256(size_t(d.Bz * d.L * d.H * d.N) * 4)};
}
BwdBuffers carve(void* ws, const Dims& d) {
  const BwdSizes z = bwd_sizes(d);
  auto* at = static_cast<unsigned char*>(ws);
  BwdBuffers w{};
  float** slots[] = {&w.E, &w.totals, &w.gA_part, &w.gD_part, &w.gB_part, &w.gC_part};
  const size_t sizes[] = {z.E, z.totals, z.gA, z.gD, z.bc, z.bc};
  for (int i = 0; i < 6; ++i) {
    *slots[i] = reinterpret_cast<float*>(at);
    at += sizes[i];
  }
  return w;
}

// 1: U_c[n, p] = sum_t exp(cs_t) C_t[n] gy_t[p], into E; the chunks' totals.
template <class T>
__global__ void __launch_bounds__(kThreads)
    chunk_u_kernel(SsdScanBwdParams q, Dims d, float* E, float* totals) {
  constexpr bool kSplit = std::is_same_v<T, float>;
  __shared__ __align__(32) float Ce[kQN], gys[kQP], U[kNP];
  __shared__ float cs[kQ];
  const SsdScanParams& p = q.fwd;
  const Task k = task_of(d);
  const int64_t r0 = k.b * d.L + k.t0;
  const float* dl = static_cast<const float*>(p.dl) + r0 * d.H + k.h;
  load_qn(static_cast<const T*>(p.C) + r0 * p.C_row, p.C_row, k.q, int(d.N), Ce);
  chunk_cumsum(dl, d.H, static_cast<const float*>(p.A)[k.h], k.q, cs);
  using S = Slots<T>;
#pragma unroll
  for (int s = 0; s < S::kCount; ++s) {
    const int t = S::t(s), j = S::j(s);
    float g[S::V] = {};
    if (t < k.q && j < d.P)
      ungate_v(q, r0 + t, k.h * d.P + j, d.vec, int(d.P) - j, static_cast<T*>(nullptr), g);
#pragma unroll
    for (int u = 0; u < S::V; ++u) gys[t * kLD + j + u] = g[u];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kQ * kN; i += kThreads) {
    const int t = i / kN;
    Ce[t * kLN + i % kN] *= t < k.q ? __expf(cs[t]) : 0.f;
  }
  if (threadIdx.x == 0) totals[(k.b * d.H + k.h) * d.nc + k.c] = cs[k.q - 1];
  __syncthreads();
  block_mm<kN, kP, false, true>(U, kLD, nullptr, [&](Acc& acc, int m0, int n0) {
    mma_tile<kSplit, Col, Row>(acc, Ce, kLN, gys, kLD, 0, kQ, m0, n0);  // (e o C)^T gy
  });
  float* out = E + ((k.b * d.H + k.h) * d.nc + k.c) * d.N * d.P;
  for (int i = threadIdx.x; i < d.N * d.P; i += kThreads)
    out[i] = U[i / int(d.P) * kLD + i % int(d.P)];
}

// 2: E_c (the gradient on chunk c's end state), last chunk to first, replacing U_c; gh0. A thread
// per state element, as the forward's pass.
__global__ void __launch_bounds__(kPassThreads)
    reverse_pass_kernel(SsdScanBwdParams q, Dims d, float* E, const float* totals) {
  const int NP = int(d.N * d.P), parts = (NP + kPassThreads - 1) / kPassThreads;
  const int64_t bh = blockIdx.x / parts, b = bh / d.H, h = bh % d.H;
  const int i = (blockIdx.x % parts) * kPassThreads + threadIdx.x;
  if (i >= NP) return;
  const int n = i / int(d.P), j = i % int(d.P);
  const float* g_hlast = static_cast<const float*>(q.g_hlast);
  float g = g_hlast ? g_hlast[(b * d.Dm + h * d.P + j) * d.N + n] : 0.f;
  float* Ec = E + bh * d.nc * NP + i;
  const float* tot = totals + bh * d.nc;
  for (int64_t c0 = d.nc - 1; c0 >= 0; c0 -= kPassBatch) {  // from the last chunk
    float uu[kPassBatch], e[kPassBatch];
#pragma unroll
    for (int v = 0; v < kPassBatch; ++v)
      if (c0 - v >= 0) uu[v] = Ec[(c0 - v) * NP], e[v] = __expf(tot[c0 - v]);
#pragma unroll
    for (int v = 0; v < kPassBatch; ++v)
      if (c0 - v >= 0) {
        Ec[(c0 - v) * NP] = g;
        g = e[v] * g + uu[v];
      }
  }
  float* gh0 = static_cast<float*>(q.gh0);
  if (gh0) gh0[(b * d.Dm + h * d.P + j) * d.N + n] = g;
}

// Shared memory of the chunk-gradient kernel, in floats: [Q, N] tiles B, C, e2 o B, H gy, E xd;
// [Q, P] / [Q, Q] tiles xd (later R, then g xd), gy, G (then M), gM (then gG); [N, P] tiles H, E;
// vectors of Q; the gD column sums; block_sum's 32.
constexpr int kGradSmem = 5 * kQN + 4 * kQP + 2 * kNP + 8 * kQ + kWarps * kP + 32;

// 3: each chunk's gradients for one head (the CPU kernel's phase 3): gx, gz, gdl, and partials of
// gA, gD, and this head's share of gB and gC.
template <class T>
__global__ void __launch_bounds__(kThreads, 2)
    chunk_grad_kernel(SsdScanBwdParams q, Dims d, const float* E, BwdBuffers w) {
  constexpr bool kSplit = std::is_same_v<T, float>;
  extern __shared__ __align__(128) float sm[];
  float *Bs = sm, *Cs = Bs + kQN, *Be = Cs + kQN, *HG = Be + kQN, *EX = HG + kQN, *xd = EX + kQN,
        *gys = xd + kQP, *X1 = gys + kQP, *X2 = X1 + kQP, *Hs = X2 + kQP, *Es = Hs + kNP,
        *cs = Es + kNP, *e1 = cs + kQ, *e2 = e1 + kQ, *hsum = e2 + kQ, *esum = hsum + kQ,
        *rowR = esum + kQ, *colR = rowR + kQ, *gdx = colR + kQ, *gDs = gdx + kQ,
        *red = gDs + kWarps * kP;
  const SsdScanParams& p = q.fwd;
  const Task k = task_of(d);
  const int len = k.q, tid = threadIdx.x;
  const int64_t r0 = k.b * d.L + k.t0, hP = k.h * d.P;
  const T* X = static_cast<const T*>(p.x);
  const float* dl = static_cast<const float*>(p.dl) + r0 * d.H + k.h;
  const float A = static_cast<const float*>(p.A)[k.h];
  load_qn(static_cast<const T*>(p.B) + r0 * p.B_row, p.B_row, len, int(d.N), Bs);
  load_qn(static_cast<const T*>(p.C) + r0 * p.C_row, p.C_row, len, int(d.N), Cs);
  chunk_cumsum(dl, d.H, A, len, cs);
  const int64_t off = ((k.b * d.H + k.h) * d.nc + k.c) * d.N * d.P;
  const float* Hin = static_cast<const float*>(p.states) + off;
  const NpFetch hf = np_fetch(Hin, int(d.N), int(d.P)), ef = np_fetch(E + off, int(d.N), int(d.P));
  // xd = dl x, gy before the gate (gz written), and the thread's part of gD_j = sum_t x_tj gy_tj
  // SiLU(z_tj) for its slots' columns (the same columns in every slot)
  using S = Slots<T>;
  float gd[S::V] = {};
#pragma unroll
  for (int s = 0; s < S::kCount; ++s) {
    const int t = S::t(s), j = S::j(s);
    float xv[S::V] = {}, g[S::V] = {};
    if (t < len && j < d.P) {
      load_v(X + (r0 + t) * p.x_row + hP + j, d.vec, int(d.P) - j, xv);
      ungate_v(q, r0 + t, hP + j, d.vec, int(d.P) - j, static_cast<T*>(q.gz), g);
    }
    const float dlt = t < len ? dl[t * d.H] : 0.f;
#pragma unroll
    for (int u = 0; u < S::V; ++u) {
      xd[t * kLD + j + u] = dlt * xv[u];
      gys[t * kLD + j + u] = g[u];
      gd[u] += xv[u] * g[u];
    }
  }
  // the lanes of a warp with the same columns summed; the warps' sums into gDs [warps][kP]
#pragma unroll
  for (int u = 0; u < S::V; ++u)
    for (int o = S::kPerRow; o < 32; o <<= 1) gd[u] += __shfl_xor_sync(0xffffffffu, gd[u], o);
  if ((tid & 31) < S::kPerRow)
#pragma unroll
    for (int u = 0; u < S::V; ++u) gDs[(tid >> 5) * kP + S::j(0) + u] = gd[u];
  np_store(hf, Hin, int(d.N), int(d.P), Hs);
  np_store(ef, E + off, int(d.N), int(d.P), Es);
  __syncthreads();
  if (w.gD_part != nullptr && tid < d.P) {
    float sum = 0.f;
    for (int wi = 0; wi < kWarps; ++wi) sum += gDs[wi * kP + tid];
    w.gD_part[(k.b * d.nc + k.c) * d.Dm + hP + tid] = sum;
  }
  if (tid < kQ) {
    e1[tid] = tid < len ? __expf(cs[tid]) : 0.f;
    e2[tid] = tid < len ? __expf(cs[len - 1] - cs[tid]) : 0.f;
  }
  // g T from the end state: exp(T) <E, H> (d H_{c+1} / d T = exp(T) H_c + the chunk's own part,
  // whose share is added with the steps' terms below)
  float dot = 0.f;
  for (int i = tid; i < kN * kP; i += kThreads)
    dot += Es[i / kP * kLD + i % kP] * Hs[i / kP * kLD + i % kP];
  const float gT = __expf(cs[len - 1]) * block_sum(dot, red);
  // HG[t, n] = gy_t . H_n, EX[t, n] = xd_t . E_n, G = C B^T (X1), gM = gy xd^T (X2): causal tiles
  block_mm<kQ, kN, false, false>(HG, kLN, nullptr, [&](Acc& acc, int m0, int n0) {
    mma_tile<kSplit, Row, Col>(acc, gys, kLD, Hs, kLD, 0, kP, m0, n0);
  });
  block_mm<kQ, kN, false, false>(EX, kLN, nullptr, [&](Acc& acc, int m0, int n0) {
    mma_tile<kSplit, Row, Col>(acc, xd, kLD, Es, kLD, 0, kP, m0, n0);
  });
  block_mm<kQ, kQ, false, false>(X1, kLD, nullptr, [&](Acc& acc, int m0, int n0) {
    if (n0 <= m0) mma_tile<kSplit, Row, Col>(acc, Cs, kLN, Bs, kLN, 0, kN, m0, n0);
  });
  block_mm<kQ, kQ, false, true>(X2, kLD, nullptr, [&](Acc& acc, int m0, int n0) {
    if (n0 <= m0) mma_tile<kSplit, Row, Col>(acc, gys, kLD, xd, kLD, 0, kP, m0, n0);
  });
  // M = W o G (X1), gG = W o gM (X2), R = M o gM (into xd, no longer needed)
  for (int i = tid; i < kQ * kQ; i += kThreads) {
    const int t = i / kQ, s = i % kQ, at = t * kLD + s;
    const float wts = s <= t && t < len ? __expf(cs[t] - cs[s]) : 0.f;
    const float gm = X2[at], m = wts * X1[at];
    X1[at] = m;
    X2[at] = wts * gm;
    xd[at] = m * gm;
  }
  // per step: C_t . H gy_t and B_t . E xd_t; then gC's entering part e1 HG and gB's end part e2 EX
  // in place, and e2 o B for g xd
  if (tid < kQ) {
    const int t = tid;
    float hs = 0.f, es = 0.f;
    for (int n = 0; n < kN; ++n) {
      hs += Cs[t * kLN + n] * HG[t * kLN + n];
      es += Bs[t * kLN + n] * EX[t * kLN + n];
    }
    hsum[t] = hs;
    esum[t] = es;
    for (int n = 0; n < kN; ++n) {
      HG[t * kLN + n] *= e1[t];
      EX[t * kLN + n] *= e2[t];
      Be[t * kLN + n] = e2[t] * Bs[t * kLN + n];
    }
  }
  __syncthreads();
  {  // R's row sums (over s <= t) and column sums (over t' >= t), four threads a row or column
    const int r = tid / 4, part = tid % 4;
    float rs = 0.f, cl = 0.f;
    for (int j = part; j < kQ; j += 4) {
      rs += xd[r * kLD + j];
      cl += xd[j * kLD + r];
    }
    for (int o = 1; o < 4; o <<= 1) {
      rs += __shfl_xor_sync(0xffffffffu, rs, o);
      cl += __shfl_xor_sync(0xffffffffu, cl, o);
    }
    if (part == 0) rowR[r] = rs, colR[r] = cl;
  }
  // g xd = M^T gy + (e2 o B) E, into xd (block_mm synchronises before its stores)
  block_mm<kQ, kP, true, true>(xd, kLD, nullptr, [&](Acc& acc, int m0, int n0) {
    mma_tile<kSplit, Col, Row>(acc, X1, kLD, gys, kLD, m0, kQ, m0, n0);
    mma_tile<kSplit, Row, Row>(acc, Be, kLN, Es, kLD, 0, kN, m0, n0);
  });
  {  // gx = dl g xd + D gy; gdx_s = x_s . g xd_s (the lanes of a row summed)
    T* gx = static_cast<T*>(q.gx);
    const T* Dv = static_cast<const T*>(p.D);
#pragma unroll
    for (int s = 0; s < S::kCount; ++s) {
      const int t = S::t(s), j = S::j(s), valid = int(d.P) - j;
      float part = 0.f;
      if (t < len && valid > 0) {
        float xv[S::V], dv[S::V] = {}, v[S::V];
        load_v(X + (r0 + t) * p.x_row + hP + j, d.vec, valid, xv);
        if (Dv) load_v(Dv + hP + j, d.vec, valid, dv);
        const float dlt = dl[t * d.H];
#pragma unroll
        for (int u = 0; u < S::V; ++u) {
          const float g = xd[t * kLD + j + u];
          v[u] = dlt * g + dv[u] * gys[t * kLD + j + u];
          part += xv[u] * g;
        }
        store_v(gx + (r0 + t) * d.Dm + hP + j, d.vec, valid, v);
      }
      for (int o = 1; o < S::kPerRow; o <<= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
      if (j == 0) gdx[t] = part;
    }
  }
  // this head's gC = e1 o HG + gG B and gB = e2 o EX + gG^T C, in place
  block_mm<kQ, kN, false, false>(HG, kLN, HG, [&](Acc& acc, int m0, int n0) {
    mma_tile<kSplit, Row, Row>(acc, X2, kLD, Bs, kLN, 0, m0 + 16, m0, n0);
  });
  block_mm<kQ, kN, false, true>(EX, kLN, EX, [&](Acc& acc, int m0, int n0) {
    mma_tile<kSplit, Col, Row>(acc, X2, kLD, Cs, kLN, m0, kQ, m0, n0);
  });
  for (int i = tid; i < kQ * kN; i += kThreads) {
    const int t = i / kN, n = i % kN;
    if (t >= len || n >= d.N) continue;
    const int64_t at = ((r0 + t) * d.H + k.h) * d.N + n;
    w.gC_part[at] = HG[t * kLN + n];
    w.gB_part[at] = EX[t * kLN + n];
  }
  // g cs, then g a by a reverse cumulative sum, gdl and gA's partial (warp 0; its lane takes
  // steps 63 - 2 lane and 62 - 2 lane). The last step's g cs also gets g T and the steps'
  // end-state terms.
  if (tid < 32) {
    const int lane = tid, t1 = kQ - 1 - 2 * lane, t0s = t1 - 1;
    auto gcs = [&](int t) {
      return t < len ? rowR[t] - colR[t] + e1[t] * hsum[t] - e2[t] * esum[t] : 0.f;
    };
    const float ends =
        warp_sum((t1 < len ? e2[t1] * esum[t1] : 0.f) + (t0s < len ? e2[t0s] * esum[t0s] : 0.f)) +
        gT;
    const float a1 = gcs(t1) + (t1 == len - 1 ? ends : 0.f),
                a0 = gcs(t0s) + (t0s == len - 1 ? ends : 0.f);
    const float pair = a0 + a1;
    float incl = pair;
    for (int o = 1; o < 32; o <<= 1) {
      const float v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    const float ga1 = incl - pair + a1, ga0 = incl;  // g a at t1 and t0s
    float* gdl = static_cast<float*>(q.gdl);
    float part = 0.f;
    if (t1 < len) {
      gdl[(r0 + t1) * d.H + k.h] = gdx[t1] + A * ga1;
      part += dl[t1 * d.H] * ga1;
    }
    if (t0s < len) {
      gdl[(r0 + t0s) * d.H + k.h] = gdx[t0s] + A * ga0;
      part += dl[t0s * d.H] * ga0;
    }
    part = warp_sum(part);
    if (lane == 0) w.gA_part[(k.b * d.nc + k.c) * d.H + k.h] = part;
  }
}

// gB and gC: the heads' shares added in order.
template <class T>
__global__ void head_sum_kernel(const float* gB_part, const float* gC_part, int64_t rows, int64_t H,
                                int64_t N, T* gB, T* gC) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < rows * N;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t base = i / N * H * N + i % N;
    float sb = 0.f, sc = 0.f;
    for (int64_t h = 0; h < H; ++h) {
      sb += gB_part[base + h * N];
      sc += gC_part[base + h * N];
    }
    store(gB, i, sb);
    store(gC, i, sc);
  }
}

// out[k] = sum_r part[r * cols + k] over the (sequence, chunk) rows: a block per 32 columns, its 8
// warps taking every 8th row (coalesced 128-byte rows), then the 8 partial sums added in warp
// order. The order is fixed, so the result does not depend on timing.
template <class T>
__global__ void __launch_bounds__(256)
    column_sum_kernel(const float* part, int64_t rows, int64_t cols, T* out) {
  __shared__ float sums[8][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t k = blockIdx.x * int64_t(32) + lane;
  float s = 0.f;
  if (k < cols)
#pragma unroll 4
    for (int64_t r = warp; r < rows; r += 8) s += part[r * cols + k];
  sums[warp][lane] = s;
  __syncthreads();
  if (warp == 0 && k < cols) {
    float t = 0.f;
    for (int w = 0; w < 8; ++w) t += sums[w][lane];
    store(out, k, t);
  }
}

// Whether the [*, P] rows move in 16-byte vectors: P a multiple of a vector's elements, the row
// strides too, and every such tensor 16-byte aligned.
bool vec_ok(const SsdScanParams& p, std::initializer_list<const void*> more) {
  const int64_t v = 16 / static_cast<int64_t>(dtype_size(p.dtype));
  auto aligned = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  bool ok = p.head_dim % v == 0 && p.x_row % v == 0 && (p.z == nullptr || p.z_row % v == 0);
  for (const void* q : std::initializer_list<const void*>{p.x, p.z, p.y, p.pre, p.D})
    ok = ok && aligned(q);
  for (const void* q : more) ok = ok && aligned(q);
  return ok;
}

}  // namespace

bool ssd_scan_supported(const SsdScanParams& p) {
  return (p.dtype == DType::kF32 || p.dtype == DType::kBF16) && p.chunk_len >= 1 &&
         p.chunk_len <= kQ && p.head_dim >= 1 && p.head_dim <= kP && p.state >= 1 &&
         p.state <= kN && p.heads >= 1 && p.heads <= 65535 && p.batch <= 65535;
}

size_t ssd_scan_fwd_workspace(const SsdScanParams& p) {
  const Dims d = dims_of(p);
  return align256(size_t(d.Bz * d.H * d.nc) * 4) + 256;
}

size_t ssd_scan_bwd_workspace(const SsdScanBwdParams& q) {
  const BwdSizes z = bwd_sizes(dims_of(q.fwd));
  return z.E + z.totals + z.gA + z.gD + 2 * z.bc + 256;
}

void ssd_scan_fwd(const SsdScanParams& p) {
  HYDRA_CHECK(ssd_scan_supported(p)) << "ssd_scan (CUDA): sizes not supported";
  Dims d = dims_of(p);
  if (d.Bz * d.L * d.H == 0) return;
  HYDRA_CHECK(p.workspace != nullptr) << "ssd_scan: workspace required";
  d.vec = vec_ok(p, {});
  cudaStream_t s = as_stream(p.stream);
  float* totals = reinterpret_cast<float*>(align256(reinterpret_cast<uintptr_t>(p.workspace)));
  const unsigned pass_blocks =
      static_cast<unsigned>(d.Bz * d.H * ((d.N * d.P + kPassThreads - 1) / kPassThreads));
  const dim3 tasks(static_cast<unsigned>(d.nc), static_cast<unsigned>(d.H),
                   static_cast<unsigned>(d.Bz));
  dispatch_float(p.dtype, "ssd_scan", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (!std::is_same_v<T, double>) {
      chunk_state_kernel<T><<<tasks, kThreads, 0, s>>>(p, d, totals);
      HYDRA_CUDA_LAUNCH_CHECK();
      state_pass_kernel<<<pass_blocks, kPassThreads, 0, s>>>(p, d, totals);
      HYDRA_CUDA_LAUNCH_CHECK();
      const size_t bytes = kOutSmem * sizeof(float);
      allow_dynamic_smem(chunk_out_kernel<T>, bytes, "ssd_scan");
      chunk_out_kernel<T><<<tasks, kThreads, bytes, s>>>(p, d);
      HYDRA_CUDA_LAUNCH_CHECK();
    }
  });
}

void ssd_scan_bwd(const SsdScanBwdParams& q) {
  const SsdScanParams& p = q.fwd;
  HYDRA_CHECK(ssd_scan_supported(p)) << "ssd_scan backward (CUDA): sizes not supported";
  Dims d = dims_of(p);
  if (d.Bz * d.L * d.H == 0) return;
  HYDRA_CHECK(q.workspace != nullptr) << "ssd_scan backward: workspace required";
  HYDRA_CHECK(p.z == nullptr || p.pre != nullptr)
      << "ssd_scan backward: the forward kept no pre-gate output";
  d.vec = vec_ok(p, {q.gy, q.gx, q.gz});
  cudaStream_t s = as_stream(p.stream);
  const auto at = reinterpret_cast<uintptr_t>(q.workspace);
  BwdBuffers w = carve(reinterpret_cast<void*>(align256(at)), d);
  if (q.gD == nullptr) w.gD_part = nullptr;
  const dim3 tasks(static_cast<unsigned>(d.nc), static_cast<unsigned>(d.H),
                   static_cast<unsigned>(d.Bz));
  dispatch_float(p.dtype, "ssd_scan_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (!std::is_same_v<T, double>) {
      chunk_u_kernel<T><<<tasks, kThreads, 0, s>>>(q, d, w.E, w.totals);
      HYDRA_CUDA_LAUNCH_CHECK();
      const unsigned pass_blocks =
          static_cast<unsigned>(d.Bz * d.H * ((d.N * d.P + kPassThreads - 1) / kPassThreads));
      reverse_pass_kernel<<<pass_blocks, kPassThreads, 0, s>>>(q, d, w.E, w.totals);
      HYDRA_CUDA_LAUNCH_CHECK();
      const size_t bytes = kGradSmem * sizeof(float);
      allow_dynamic_smem(chunk_grad_kernel<T>, bytes, "ssd_scan backward");
      chunk_grad_kernel<T><<<tasks, kThreads, bytes, s>>>(q, d, w.E, w);
      HYDRA_CUDA_LAUNCH_CHECK();
      head_sum_kernel<T><<<blocks_for(d.Bz * d.L * d.N, 256), 256, 0, s>>>(
          w.gB_part, w.gC_part, d.Bz * d.L, d.H, d.N, static_cast<T*>(q.gB), static_cast<T*>(q.gC));
      HYDRA_CUDA_LAUNCH_CHECK();
      const int64_t rows = d.Bz * d.nc;
      if (q.gD) {
        column_sum_kernel<T><<<static_cast<unsigned>((d.Dm + 31) / 32), 256, 0, s>>>(
            w.gD_part, rows, d.Dm, static_cast<T*>(q.gD));
        HYDRA_CUDA_LAUNCH_CHECK();
      }
      column_sum_kernel<float><<<static_cast<unsigned>((d.H + 31) / 32), 256, 0, s>>>(
          w.gA_part, rows, d.H, static_cast<float*>(q.gA));
      HYDRA_CUDA_LAUNCH_CHECK();
    }
  });
}

}  // namespace hydra::kernels::cuda
