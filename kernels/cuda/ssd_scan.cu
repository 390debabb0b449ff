// CUDA SSD scan (kernels/ssd_scan.h): the CPU kernel's three phases (kernels/cpu/ssd_scan.cpp gives
// the sums), a block of 256 threads per (chunk, sequence) with every head inside it (B and C, and
// so C B^T, are shared by the heads; gB and gC sum over them without atomics), or per (sequence,
// head) for the passes between chunks. The chunk's tiles live in shared memory in f32 (rows padded
// to 65 floats: the products read columns across a warp); the products are 64 x 64 tiles of which
// a thread computes 4 x 4, the causal half skipped where rows allow. Sizes: chunk_len and head_dim
// at most 64, state at most 16, f32 or bf16 storage (f32 arithmetic); other sizes run the composed
// form (autograd/ops_ssd.cpp).
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/ssd_scan.h"

namespace hydra::kernels::cuda {
namespace {

constexpr int kQ = 64, kP = 64, kN = 16, kThreads = 256;

size_t align256(size_t b) { return (b + 255) / 256 * 256; }
constexpr int kS = 65;       // row stride of the 64-wide tiles
constexpr int kSN = kN + 1;  // row stride of the [Q, N] tiles

struct Dims {
  int64_t Bz, L, H, P, N, Q, nc, Dm;
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

// The output's gradient before the gate: gy SiLU(z) (gy where there is no gate); `gz`, when
// given, gets gy pre SiLU'(z).
template <class T>
__device__ __forceinline__ float ungate(const SsdScanBwdParams& q, int64_t row, int64_t col,
                                        T* gz) {
  const SsdScanParams& p = q.fwd;
  const float g = load(static_cast<const T*>(q.gy), row * p.heads * p.head_dim + col);
  if (p.z == nullptr) return g;
  const float zt = load(static_cast<const T*>(p.z), row * p.z_row + col);
  const float sg = 1.f / (1.f + __expf(-zt));
  if (gz != nullptr) {
    const int64_t at = row * p.heads * p.head_dim + col;
    store(gz, at, g * static_cast<const float*>(p.pre)[at] * sg * (1.f + zt * (1.f - sg)));
  }
  return g * zt * sg;
}

// [Q, N] rows of B or C at steps t0 .. t0 + q (zeros after q).
template <class T>
__device__ void load_qn(const T* src, int64_t row, int q, int N, float* dst) {
  for (int i = threadIdx.x; i < kQ * kN; i += kThreads) {
    const int t = i / kN, n = i % kN;
    dst[t * kSN + n] = t < q && n < N ? load(src, t * row + n) : 0.f;
  }
}

// ---- forward ----

// 1: each chunk's state from zero, S[n, p] = sum_s exp(T - cs_s) dl_s B_s[n] x_s[p], into states.
template <class T>
__global__ void __launch_bounds__(kThreads)
    chunk_state_kernel(SsdScanParams p, Dims d, float* totals) {
  __shared__ float Bs[kQ * kSN], xs[kQ * kS], w[kQ], cs[kQ];
  const int64_t c = blockIdx.x, b = blockIdx.y, t0 = c * d.Q;
  const int q = static_cast<int>(std::min<int64_t>(d.Q, d.L - t0));
  const T* X = static_cast<const T*>(p.x);
  const float* dl = static_cast<const float*>(p.dl) + (b * d.L + t0) * d.H;
  load_qn(static_cast<const T*>(p.B) + (b * d.L + t0) * p.B_row, p.B_row, q, int(d.N), Bs);
  for (int64_t h = 0; h < d.H; ++h) {
    const float A = static_cast<const float*>(p.A)[h];
    chunk_cumsum(dl + h, d.H, A, q, cs);
    for (int i = threadIdx.x; i < kQ * kP; i += kThreads) {
      const int t = i / kP, j = i % kP;
      xs[t * kS + j] = t < q && j < d.P ? load(X, (b * d.L + t0 + t) * p.x_row + h * d.P + j) : 0.f;
    }
    __syncthreads();
    if (threadIdx.x < kQ) {
      const int t = threadIdx.x;
      w[t] = t < q ? __expf(cs[q - 1] - cs[t]) * dl[t * d.H + h] : 0.f;
      if (t == 0) totals[(b * d.H + h) * d.nc + c] = cs[q - 1];
    }
    __syncthreads();
    float* S = static_cast<float*>(p.states) + ((b * d.H + h) * d.nc + c) * d.N * d.P;
    for (int i = threadIdx.x; i < d.N * d.P; i += kThreads) {
      const int n = i / int(d.P), j = i % int(d.P);
      float acc = 0.f;
      for (int t = 0; t < q; ++t) acc += Bs[t * kSN + n] * w[t] * xs[t * kS + j];
      S[i] = acc;
    }
    __syncthreads();
  }
}

// 2: the states between chunks, a thread per state element (a block per 64 of a (sequence, head)'s
// N P): states[c] becomes the state entering chunk c; h_last the last one. The loads of later
// chunks do not wait on the recurrence, so unrolling keeps several in flight.
constexpr int kPassThreads = 64;

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
#pragma unroll 8
  for (int64_t c = 0; c < d.nc; ++c) {
    const float s = S[c * NP], e = __expf(tot[c]);
    S[c * NP] = cur;
    cur = e * cur + s;
  }
  static_cast<float*>(p.h_last)[(b * d.Dm + h * d.P + j) * d.N + n] = cur;
}

// Shared memory of the output kernel, in floats.
constexpr int kOutSmem = 2 * kQ * kSN + 2 * kQ * kS + kQ * kS + kN * kS + kQ;

// 3: y_t = sum_{s <= t} exp(cs_t - cs_s) (C_t . B_s) dl_s x_s + exp(cs_t) H^T C_t.
template <class T>
__global__ void __launch_bounds__(kThreads) chunk_out_kernel(SsdScanParams p, Dims d) {
  extern __shared__ float sm[];
  float *Bs = sm, *Cs = Bs + kQ * kSN, *G = Cs + kQ * kSN, *M = G + kQ * kS, *xd = M + kQ * kS,
        *Hs = xd + kQ * kS, *cs = Hs + kN * kS;
  const int64_t c = blockIdx.x, b = blockIdx.y, t0 = c * d.Q;
  const int q = static_cast<int>(std::min<int64_t>(d.Q, d.L - t0));
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const T* X = static_cast<const T*>(p.x);
  const float* dl = static_cast<const float*>(p.dl) + (b * d.L + t0) * d.H;
  load_qn(static_cast<const T*>(p.B) + (b * d.L + t0) * p.B_row, p.B_row, q, int(d.N), Bs);
  load_qn(static_cast<const T*>(p.C) + (b * d.L + t0) * p.C_row, p.C_row, q, int(d.N), Cs);
  __syncthreads();
  for (int i = threadIdx.x; i < kQ * kQ; i += kThreads) {  // G = C B^T, causal
    const int t = i / kQ, s = i % kQ;
    float g = 0.f;
    if (s <= t)
      for (int n = 0; n < d.N; ++n) g += Cs[t * kSN + n] * Bs[s * kSN + n];
    G[t * kS + s] = g;
  }
  T* y = static_cast<T*>(p.y);
  const T* Dv = static_cast<const T*>(p.D);
  const T* Z = static_cast<const T*>(p.z);
  float* pre_out = static_cast<float*>(p.pre);
  for (int64_t h = 0; h < d.H; ++h) {
    const float A = static_cast<const float*>(p.A)[h];
    chunk_cumsum(dl + h, d.H, A, q, cs);
    for (int i = threadIdx.x; i < kQ * kP; i += kThreads) {
      const int t = i / kP, j = i % kP;
      xd[t * kS + j] = t < q && j < d.P
                           ? dl[t * d.H + h] * load(X, (b * d.L + t0 + t) * p.x_row + h * d.P + j)
                           : 0.f;
    }
    const float* Hin = static_cast<const float*>(p.states) + ((b * d.H + h) * d.nc + c) * d.N * d.P;
    for (int i = threadIdx.x; i < kN * kP; i += kThreads) {
      const int n = i / kP, j = i % kP;
      Hs[n * kS + j] = n < d.N && j < d.P ? Hin[n * d.P + j] : 0.f;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kQ * kQ; i += kThreads) {
      const int t = i / kQ, s = i % kQ;
      M[t * kS + s] = s <= t && t < q ? G[t * kS + s] * __expf(cs[t] - cs[s]) : 0.f;
    }
    __syncthreads();
    float acc[4][4] = {}, off[4][4] = {};
    const int s_end = std::min(ty * 4 + 4, q);
    for (int s = 0; s < s_end; ++s) {
      float m[4], xv[4];
      for (int i = 0; i < 4; ++i) m[i] = M[(ty * 4 + i) * kS + s];
      for (int j = 0; j < 4; ++j) xv[j] = xd[s * kS + tx * 4 + j];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] += m[i] * xv[j];
    }
    for (int n = 0; n < d.N; ++n) {
      float cv[4], hv[4];
      for (int i = 0; i < 4; ++i) cv[i] = Cs[(ty * 4 + i) * kSN + n];
      for (int j = 0; j < 4; ++j) hv[j] = Hs[n * kS + tx * 4 + j];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) off[i][j] += cv[i] * hv[j];
    }
    for (int i = 0; i < 4; ++i) {
      const int t = ty * 4 + i;
      if (t >= q) break;
      const float et = __expf(cs[t]);
      for (int j = 0; j < 4; ++j) {
        const int col = tx * 4 + j;
        if (col >= d.P) continue;
        const int64_t row = b * d.L + t0 + t, at = row * d.Dm + h * d.P + col;
        float pre = acc[i][j] + et * off[i][j];
        if (Dv) pre += load(Dv, h * d.P + col) * load(X, row * p.x_row + h * d.P + col);
        if (pre_out) pre_out[at] = pre;
        if (Z) {
          const float zt = load(Z, row * p.z_row + h * d.P + col);
          pre *= zt / (1.f + __expf(-zt));
        }
        store(y, at, pre);
      }
    }
    __syncthreads();
  }
}

// ---- backward ----

// Workspace: E [B, H, nc, N, P] (first U, then the end states' gradients), the chunks' totals
// [B, H, nc], the gA partials [B * nc, H], the gD partials [B * nc, H * P].
struct BwdBuffers {
  float *E, *totals, *gA_part, *gD_part;
};
BwdBuffers carve(void* ws, const Dims& d) {
  auto* base = static_cast<unsigned char*>(ws);
  const size_t e = align256(size_t(d.Bz * d.H * d.nc * d.N * d.P) * 4),
               t = align256(size_t(d.Bz * d.H * d.nc) * 4);
  return {reinterpret_cast<float*>(base), reinterpret_cast<float*>(base + e),
          reinterpret_cast<float*>(base + e + t), reinterpret_cast<float*>(base + e + 2 * t)};
}

// 1: U_c[n, p] = sum_t exp(cs_t) C_t[n] gy_t[p], into E.
template <class T>
__global__ void __launch_bounds__(kThreads)
    chunk_u_kernel(SsdScanBwdParams q, Dims d, float* E, float* totals) {
  __shared__ float Cs[kQ * kSN], gys[kQ * kS], e[kQ], cs[kQ];
  const SsdScanParams& p = q.fwd;
  const int64_t c = blockIdx.x, b = blockIdx.y, t0 = c * d.Q;
  const int len = static_cast<int>(std::min<int64_t>(d.Q, d.L - t0));
  const float* dl = static_cast<const float*>(p.dl) + (b * d.L + t0) * d.H;
  load_qn(static_cast<const T*>(p.C) + (b * d.L + t0) * p.C_row, p.C_row, len, int(d.N), Cs);
  for (int64_t h = 0; h < d.H; ++h) {
    chunk_cumsum(dl + h, d.H, static_cast<const float*>(p.A)[h], len, cs);
    for (int i = threadIdx.x; i < kQ * kP; i += kThreads) {
      const int t = i / kP, j = i % kP;
      gys[t * kS + j] = t < len && j < d.P
                            ? ungate<T>(q, b * d.L + t0 + t, h * d.P + j, static_cast<T*>(nullptr))
                            : 0.f;
    }
    __syncthreads();
    if (threadIdx.x < kQ) e[threadIdx.x] = threadIdx.x < len ? __expf(cs[threadIdx.x]) : 0.f;
    if (threadIdx.x == 0) totals[(b * d.H + h) * d.nc + c] = cs[len - 1];
    __syncthreads();
    float* U = E + ((b * d.H + h) * d.nc + c) * d.N * d.P;
    for (int i = threadIdx.x; i < d.N * d.P; i += kThreads) {
      const int n = i / int(d.P), j = i % int(d.P);
      float acc = 0.f;
      for (int t = 0; t < len; ++t) acc += e[t] * Cs[t * kSN + n] * gys[t * kS + j];
      U[i] = acc;
    }
    __syncthreads();
  }
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
#pragma unroll 8
  for (int64_t c = d.nc - 1; c >= 0; --c) {
    const float u = Ec[c * NP], e = __expf(tot[c]);
    Ec[c * NP] = g;
    g = e * g + u;
  }
  float* gh0 = static_cast<float*>(q.gh0);
  if (gh0) gh0[(b * d.Dm + h * d.P + j) * d.N + n] = g;
}

// Shared memory of the chunk-gradient kernel, in floats.
constexpr int kGradSmem = 4 * kQ * kSN    // Bs, Cs, gCa, gBa
                          + 4 * kQ * kS   // G, gG, R, M
                          + 2 * kQ * kS   // xd, gys
                          + 2 * kN * kS   // Hs, Es
                          + 2 * kQ * kSN  // hgc, exb
                          + 5 * kQ;       // cs, gcs, gdx, e, e2

// 3: each chunk's gradients (the CPU kernel's phase 3), every head in turn; gB and gC after them.
template <class T>
__global__ void __launch_bounds__(kThreads)
    chunk_grad_kernel(SsdScanBwdParams q, Dims d, const float* E, float* gA_part, float* gD_part) {
  extern __shared__ float sm[];
  __shared__ float red[kThreads / 32], gDs[kThreads];
  float *Bs = sm, *Cs = Bs + kQ * kSN, *gCa = Cs + kQ * kSN, *gBa = gCa + kQ * kSN,
        *G = gBa + kQ * kSN, *gG = G + kQ * kS, *R = gG + kQ * kS, *M = R + kQ * kS,
        *xd = M + kQ * kS, *gys = xd + kQ * kS, *Hs = gys + kQ * kS, *Es = Hs + kN * kS,
        *hgc = Es + kN * kS, *exb = hgc + kQ * kSN, *cs = exb + kQ * kSN, *gcs = cs + kQ,
        *gdx = gcs + kQ, *e1 = gdx + kQ, *e2 = e1 + kQ;
  const SsdScanParams& p = q.fwd;
  const int64_t c = blockIdx.x, b = blockIdx.y, t0 = c * d.Q;
  const int len = static_cast<int>(std::min<int64_t>(d.Q, d.L - t0));
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const T* X = static_cast<const T*>(p.x);
  const float* dl = static_cast<const float*>(p.dl) + (b * d.L + t0) * d.H;
  T* gz = static_cast<T*>(q.gz);
  load_qn(static_cast<const T*>(p.B) + (b * d.L + t0) * p.B_row, p.B_row, len, int(d.N), Bs);
  load_qn(static_cast<const T*>(p.C) + (b * d.L + t0) * p.C_row, p.C_row, len, int(d.N), Cs);
  for (int i = threadIdx.x; i < kQ * kSN; i += kThreads) gCa[i] = gBa[i] = 0.f;
  __syncthreads();
  for (int i = threadIdx.x; i < kQ * kQ; i += kThreads) {
    const int t = i / kQ, s = i % kQ;
    float g = 0.f;
    if (s <= t)
      for (int n = 0; n < d.N; ++n) g += Cs[t * kSN + n] * Bs[s * kSN + n];
    G[t * kS + s] = g;
    gG[t * kS + s] = 0.f;
  }
  for (int64_t h = 0; h < d.H; ++h) {
    const float A = static_cast<const float*>(p.A)[h];
    chunk_cumsum(dl + h, d.H, A, len, cs);
    // a thread keeps one column j = threadIdx.x % 64 (kThreads is a multiple of kP): its part of
    // gD_j = sum_t x_tj gy_tj SiLU(z_tj) over the chunk
    float gd_col = 0.f;
    for (int i = threadIdx.x; i < kQ * kP; i += kThreads) {
      const int t = i / kP, j = i % kP;
      const bool in = t < len && j < d.P;
      const float xv = in ? load(X, (b * d.L + t0 + t) * p.x_row + h * d.P + j) : 0.f;
      const float g = in ? ungate<T>(q, b * d.L + t0 + t, h * d.P + j, gz) : 0.f;
      xd[t * kS + j] = in ? dl[t * d.H + h] * xv : 0.f;
      gys[t * kS + j] = g;
      gd_col += xv * g;
    }
    if (gD_part != nullptr) {
      gDs[threadIdx.x] = gd_col;
      __syncthreads();
      if (threadIdx.x < kP && threadIdx.x < d.P) {
        float sum = 0.f;
        for (int k = threadIdx.x; k < kThreads; k += kP) sum += gDs[k];
        gD_part[(b * d.nc + c) * d.Dm + h * d.P + threadIdx.x] = sum;
      }
    }
    const int64_t off = ((b * d.H + h) * d.nc + c) * d.N * d.P;
    for (int i = threadIdx.x; i < kN * kP; i += kThreads) {
      const int n = i / kP, j = i % kP;
      const bool in = n < d.N && j < d.P;
      Hs[n * kS + j] = in ? static_cast<const float*>(p.states)[off + n * d.P + j] : 0.f;
      Es[n * kS + j] = in ? E[off + n * d.P + j] : 0.f;
    }
    __syncthreads();
    // g T from the end state: exp(T) <E, H> (d H_{c+1} / d T = exp(T) H_c + the chunk's own part,
    // whose share is added in D)
    float dot = 0.f;
    for (int i = threadIdx.x; i < kN * kP; i += kThreads) {
      const int n = i / kP, j = i % kP;
      dot += Es[n * kS + j] * Hs[n * kS + j];
    }
    const float gT = __expf(cs[len - 1]) * block_sum(dot, red);
    if (threadIdx.x < kQ) {
      const int t = threadIdx.x;
      e1[t] = t < len ? __expf(cs[t]) : 0.f;
      e2[t] = t < len ? __expf(cs[len - 1] - cs[t]) : 0.f;
    }
    // A: gM_ts = gy_t . xd_s (s <= t); R = M o gM, gG += W o gM
    {
      float acc[4][4] = {};
      if (ty * 4 < len && tx * 4 <= ty * 4 + 3)
        for (int j = 0; j < d.P; ++j) {
          float gv[4], xv[4];
          for (int i = 0; i < 4; ++i) gv[i] = gys[(ty * 4 + i) * kS + j];
          for (int k = 0; k < 4; ++k) xv[k] = xd[(tx * 4 + k) * kS + j];
          for (int i = 0; i < 4; ++i)
            for (int k = 0; k < 4; ++k) acc[i][k] += gv[i] * xv[k];
        }
      for (int i = 0; i < 4; ++i)
        for (int k = 0; k < 4; ++k) {
          const int t = ty * 4 + i, s = tx * 4 + k;
          const bool in = s <= t && t < len;
          const float w = in ? __expf(cs[t] - cs[s]) : 0.f, m = w * G[t * kS + s];
          M[t * kS + s] = m;
          R[t * kS + s] = m * acc[i][k];
          gG[t * kS + s] += w * acc[i][k];
        }
    }
    __syncthreads();
    // B: g xd_s = sum_{t >= s} M_ts gy_t + exp(T - cs_s) E^T B_s; gx, and x . g xd for gdl
    {
      float acc[4][4] = {};
      for (int t = ty * 4; t < len; ++t) {
        float m[4], gv[4];
        for (int i = 0; i < 4; ++i) m[i] = M[t * kS + ty * 4 + i];
        for (int j = 0; j < 4; ++j) gv[j] = gys[t * kS + tx * 4 + j];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) acc[i][j] += m[i] * gv[j];
      }
      for (int n = 0; n < d.N; ++n) {
        float bv[4], ev[4];
        for (int i = 0; i < 4; ++i) bv[i] = e2[ty * 4 + i] * Bs[(ty * 4 + i) * kSN + n];
        for (int j = 0; j < 4; ++j) ev[j] = Es[n * kS + tx * 4 + j];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) acc[i][j] += bv[i] * ev[j];
      }
      T* gx = static_cast<T*>(q.gx);
      for (int i = 0; i < 4; ++i) {
        const int s = ty * 4 + i;
        float part = 0.f;
        if (s < len) {
          const float dls = dl[s * d.H + h];
          for (int j = 0; j < 4; ++j) {
            const int col = tx * 4 + j;
            if (col < d.P) {
              const int64_t at = (b * d.L + t0 + s) * d.Dm + h * d.P + col;
              const float skip =
                  p.D ? load(static_cast<const T*>(p.D), h * d.P + col) * gys[s * kS + col] : 0.f;
              store(gx, at, dls * acc[i][j] + skip);
              part += load(X, (b * d.L + t0 + s) * p.x_row + h * d.P + col) * acc[i][j];
            }
          }
        }
        for (int o = 8; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
        if (tx == 0) gdx[s] = part;  // x_s . g xd_s
      }
    }
    // C: H gy_t and E xd_s per state: gC's and gB's entering/end parts and their cs terms
    for (int i = threadIdx.x; i < kQ * kN; i += kThreads) {
      const int t = i / kN, n = i % kN;
      float hg = 0.f, ex = 0.f;
      if (t < len && n < d.N)
        for (int j = 0; j < d.P; ++j) {
          hg += Hs[n * kS + j] * gys[t * kS + j];
          ex += Es[n * kS + j] * xd[t * kS + j];
        }
      gCa[t * kSN + n] += e1[t] * hg;
      gBa[t * kSN + n] += e2[t] * ex;
      hgc[t * kSN + n] = Cs[t * kSN + n] * hg;
      exb[t * kSN + n] = Bs[t * kSN + n] * ex;
    }
    __syncthreads();
    // D: g cs, then g a by a reverse cumulative sum, gdl and gA's partial
    if (threadIdx.x < kQ) {
      const int t = threadIdx.x;
      float g = 0.f;
      if (t < len) {
        for (int s = 0; s <= t; ++s) g += R[t * kS + s];
        for (int u = t; u < len; ++u) g -= R[u * kS + t];
        float hsum = 0.f, esum = 0.f;
        for (int n = 0; n < d.N; ++n) hsum += hgc[t * kSN + n], esum += exb[t * kSN + n];
        g += e1[t] * hsum - e2[t] * esum;
        R[t * kS + kQ] = e2[t] * esum;  // the column past the tile: this step's end-state term
      }
      gcs[t] = g;
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      const int lane = threadIdx.x;
      if (lane == 0 && len > 0) {
        float extra = gT;
        for (int s = 0; s < len; ++s) extra += R[s * kS + kQ];
        gcs[len - 1] += extra;
      }
      __syncwarp();
      // suffix sums over t < len: lane takes steps 63 - 2 lane and 62 - 2 lane
      const int t1 = kQ - 1 - 2 * lane, t0s = t1 - 1;
      const float a1 = t1 < len ? gcs[t1] : 0.f, a0 = t0s < len ? gcs[t0s] : 0.f;
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
        const float dlt = dl[t1 * d.H + h];
        gdl[(b * d.L + t0 + t1) * d.H + h] = gdx[t1] + A * ga1;
        part += dlt * ga1;
      }
      if (t0s < len) {
        const float dlt = dl[t0s * d.H + h];
        gdl[(b * d.L + t0 + t0s) * d.H + h] = gdx[t0s] + A * ga0;
        part += dlt * ga0;
      }
      part = warp_sum(part);
      if (lane == 0) gA_part[(b * d.nc + c) * d.H + h] = part;
    }
    __syncthreads();
  }
  // gC_t = gCa_t + sum_{s <= t} gG_ts B_s, gB_s = gBa_s + sum_{t >= s} gG_ts C_t
  T* gB = static_cast<T*>(q.gB);
  T* gC = static_cast<T*>(q.gC);
  for (int i = threadIdx.x; i < kQ * kN; i += kThreads) {
    const int t = i / kN, n = i % kN;
    if (t >= len || n >= d.N) continue;
    float sc = gCa[t * kSN + n], sb = gBa[t * kSN + n];
    for (int s = 0; s <= t; ++s) sc += gG[t * kS + s] * Bs[s * kSN + n];
    for (int u = t; u < len; ++u) sb += gG[u * kS + t] * Cs[u * kSN + n];
    store(gC, (b * d.L + t0 + t) * d.N + n, sc);
    store(gB, (b * d.L + t0 + t) * d.N + n, sb);
  }
}

// gD[k] = the partials summed over (sequence, chunk) in order.
template <class T>
__global__ void gD_kernel(const float* part, int64_t rows, int64_t Dm, T* gD) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < Dm;
       k += int64_t(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int64_t r = 0; r < rows; ++r) s += part[r * Dm + k];
    store(gD, k, s);
  }
}

// gA[h] = the partials summed over (sequence, chunk) in order.
__global__ void gA_kernel(const float* part, int64_t rows, int64_t H, float* gA) {
  for (int64_t h = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; h < H;
       h += int64_t(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int64_t r = 0; r < rows; ++r) s += part[r * H + h];
    gA[h] = s;
  }
}

}  // namespace

bool ssd_scan_supported(const SsdScanParams& p) {
  return (p.dtype == DType::kF32 || p.dtype == DType::kBF16) && p.chunk_len >= 1 &&
         p.chunk_len <= kQ && p.head_dim >= 1 && p.head_dim <= kP && p.state >= 1 &&
         p.state <= kN && p.heads >= 1 && p.batch <= 65535;
}

size_t ssd_scan_fwd_workspace(const SsdScanParams& p) {
  const Dims d = dims_of(p);
  return align256(size_t(d.Bz * d.H * d.nc) * 4) + 256;
}

size_t ssd_scan_bwd_workspace(const SsdScanBwdParams& q) {
  const Dims d = dims_of(q.fwd);
  return align256(size_t(d.Bz * d.H * d.nc * d.N * d.P) * 4) +
         2 * align256(size_t(d.Bz * d.H * d.nc) * 4) + align256(size_t(d.Bz * d.nc * d.Dm) * 4) +
         256;
}

void ssd_scan_fwd(const SsdScanParams& p) {
  HYDRA_CHECK(ssd_scan_supported(p)) << "ssd_scan (CUDA): sizes not supported";
  const Dims d = dims_of(p);
  if (d.Bz * d.L * d.H == 0) return;
  HYDRA_CHECK(p.workspace != nullptr) << "ssd_scan: workspace required";
  cudaStream_t s = as_stream(p.stream);
  float* totals = reinterpret_cast<float*>(align256(reinterpret_cast<uintptr_t>(p.workspace)));
  const unsigned pass_blocks =
      static_cast<unsigned>(d.Bz * d.H * ((d.N * d.P + kPassThreads - 1) / kPassThreads));
  dispatch_float(p.dtype, "ssd_scan", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (!std::is_same_v<T, double>) {
      const dim3 chunks(static_cast<unsigned>(d.nc), static_cast<unsigned>(d.Bz));
      chunk_state_kernel<T><<<chunks, kThreads, 0, s>>>(p, d, totals);
      HYDRA_CUDA_LAUNCH_CHECK();
      state_pass_kernel<<<pass_blocks, kPassThreads, 0, s>>>(p, d, totals);
      HYDRA_CUDA_LAUNCH_CHECK();
      const size_t bytes = kOutSmem * sizeof(float);
      allow_dynamic_smem(chunk_out_kernel<T>, bytes, "ssd_scan");
      chunk_out_kernel<T><<<chunks, kThreads, bytes, s>>>(p, d);
      HYDRA_CUDA_LAUNCH_CHECK();
    }
  });
}

void ssd_scan_bwd(const SsdScanBwdParams& q) {
  const SsdScanParams& p = q.fwd;
  HYDRA_CHECK(ssd_scan_supported(p)) << "ssd_scan backward (CUDA): sizes not supported";
  const Dims d = dims_of(p);
  if (d.Bz * d.L * d.H == 0) return;
  HYDRA_CHECK(q.workspace != nullptr) << "ssd_scan backward: workspace required";
  HYDRA_CHECK(p.z == nullptr || p.pre != nullptr)
      << "ssd_scan backward: the forward kept no pre-gate output";
  cudaStream_t s = as_stream(p.stream);
  const auto at = reinterpret_cast<uintptr_t>(q.workspace);
  const BwdBuffers w = carve(reinterpret_cast<void*>(align256(at)), d);
  dispatch_float(p.dtype, "ssd_scan_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (!std::is_same_v<T, double>) {
      const dim3 chunks(static_cast<unsigned>(d.nc), static_cast<unsigned>(d.Bz));
      chunk_u_kernel<T><<<chunks, kThreads, 0, s>>>(q, d, w.E, w.totals);
      HYDRA_CUDA_LAUNCH_CHECK();
      const unsigned pass_blocks =
          static_cast<unsigned>(d.Bz * d.H * ((d.N * d.P + kPassThreads - 1) / kPassThreads));
      reverse_pass_kernel<<<pass_blocks, kPassThreads, 0, s>>>(q, d, w.E, w.totals);
      HYDRA_CUDA_LAUNCH_CHECK();
      const size_t bytes = kGradSmem * sizeof(float);
      allow_dynamic_smem(chunk_grad_kernel<T>, bytes, "ssd_scan backward");
      chunk_grad_kernel<T>
          <<<chunks, kThreads, bytes, s>>>(q, d, w.E, w.gA_part, q.gD ? w.gD_part : nullptr);
      HYDRA_CUDA_LAUNCH_CHECK();
      if (q.gD) {
        gD_kernel<T><<<blocks_for(d.Dm, 128), 128, 0, s>>>(w.gD_part, d.Bz * d.nc, d.Dm,
                                                           static_cast<T*>(q.gD));
        HYDRA_CUDA_LAUNCH_CHECK();
      }
      gA_kernel<<<blocks_for(d.H, 128), 128, 0, s>>>(w.gA_part, d.Bz * d.nc, d.H,
                                                     static_cast<float*>(q.gA));
      HYDRA_CUDA_LAUNCH_CHECK();
    }
  });
}

}  // namespace hydra::kernels::cuda
