// CUDA selective scan: a thread per (batch, channel) walks time with its N states in registers (N
// is a template bound: 8, 16, 32 or 64), and a block's 128 channels share each step's B_t and C_t
// through shared memory. The backward walks chunks last to first: it recomputes the chunk's states
// from the saved chunk-start state into a per-thread scratch (laid out [step][state][channel], so a
// warp's accesses coalesce), then runs the adjoint recursion G_t = C_t gy_t + a_{t+1} G_{t+1}
// (spec/algorithms.md section 2). Sums over channels (gB, gC) are warp shuffles into per-warp
// partials; sums over batch (gA_log, gD, gdt_bias) are per-batch partials; second kernels add both
// in a fixed order, so results are bit-reproducible without atomics.
#include <algorithm>
#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/ssm_scan.h"

namespace hydra::kernels::cuda {
namespace {

constexpr int kThreads = 128;  // channels per block
constexpr int kSteps = 32;     // time steps of B and C staged in shared memory at once (forward)

template <class T>
struct ScanIn {
  const SsmScanParams& p;
  __device__ compute_t<T> u(int64_t r, int64_t d) const {
    return load(static_cast<const T*>(p.u), r * p.u_row + d);
  }
  __device__ compute_t<T> raw(int64_t r, int64_t d, compute_t<T> bias) const {
    return load(static_cast<const T*>(p.delta), r * p.delta_row + d) + bias;
  }
  __device__ compute_t<T> z(int64_t r, int64_t d) const {
    return load(static_cast<const T*>(p.z), r * p.z_row + d);
  }
  __device__ compute_t<T> B(int64_t r, int64_t n) const {
    return load(static_cast<const T*>(p.B), r * p.B_row + n);
  }
  __device__ compute_t<T> C(int64_t r, int64_t n) const {
    return load(static_cast<const T*>(p.C), r * p.C_row + n);
  }
};

template <class A>
__device__ A softplus(A raw) {
  return raw > A(20) ? raw : log1p(exp(raw));
}
template <class A>
__device__ A sigmoid(A v) {
  return A(1) / (A(1) + exp(-v));
}

template <class T, int NMAX>
__global__ void __launch_bounds__(kThreads) scan_fwd_kernel(SsmScanParams p, int64_t nchunks) {
  using A = compute_t<T>;
  __shared__ A Bs[kSteps][NMAX], Cs[kSteps][NMAX];
  const ScanIn<T> in{p};
  const int64_t b = blockIdx.y, d = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, D = p.dim,
                L = p.len;
  const int N = static_cast<int>(p.state);
  const bool live = d < D;
  A Ad[NMAX], h[NMAX];
#pragma unroll
  for (int n = 0; n < NMAX; ++n) {
    Ad[n] = live && n < N ? -exp(load(static_cast<const T*>(p.A_log), d * N + n)) : A(0);
    h[n] = live && n < N && p.h0 ? static_cast<const A*>(p.h0)[(b * D + d) * N + n] : A(0);
  }
  const A bias = live && p.dt_bias ? load(static_cast<const T*>(p.dt_bias), d) : A(0);
  const A Dd = live && p.D ? load(static_cast<const T*>(p.D), d) : A(0);
  A* chunk_states = static_cast<A*>(p.chunk_states);
  for (int64_t t0 = 0; t0 < L; t0 += kSteps) {
    const int steps = static_cast<int>(min(int64_t(kSteps), L - t0));
    __syncthreads();
    for (int e = threadIdx.x; e < steps * N; e += blockDim.x) {
      const int s = e / N, n = e % N;
      Bs[s][n] = in.B(b * L + t0 + s, n);
      Cs[s][n] = in.C(b * L + t0 + s, n);
    }
    __syncthreads();
    if (!live) continue;
    for (int s = 0; s < steps; ++s) {
      const int64_t t = t0 + s, r = b * L + t;
      if (chunk_states && t % p.chunk_len == 0) {
        A* cs = chunk_states + ((b * nchunks + t / p.chunk_len) * D + d) * N;
#pragma unroll
        for (int n = 0; n < NMAX; ++n)
          if (n < N) cs[n] = h[n];
      }
      const A dl = softplus(in.raw(r, d, bias)), ut = in.u(r, d), dlu = dl * ut;
      A acc = 0;
#pragma unroll
      for (int n = 0; n < NMAX; ++n) {
        if (n < N) {
          h[n] = fast_exp(dl * Ad[n]) * h[n] + dlu * Bs[s][n];
          acc += Cs[s][n] * h[n];
        }
      }
      acc += Dd * ut;
      if (p.z) {
        const A zt = in.z(r, d);
        acc *= zt * sigmoid(zt);
      }
      static_cast<T*>(p.y)[r * D + d] = convert<T>(acc);
    }
  }
  if (live && p.h_last) {
#pragma unroll
    for (int n = 0; n < NMAX; ++n)
      if (n < N) static_cast<A*>(p.h_last)[(b * D + d) * N + n] = h[n];
  }
}

// Scratch of the backward, in accumulate-type elements.
struct BwdScratch {
  int64_t hs, part_bc, part_a, part_d;  // element counts
  int64_t warps;                        // channel warps: per-warp partials of gB and gC
};

BwdScratch scratch_of(const SsmScanParams& p) {
  const int64_t blocks = (p.dim + kThreads - 1) / kThreads, warps = blocks * (kThreads / 32);
  const int64_t cl = std::min(p.chunk_len, p.len);
  return {(cl + 1) * p.state * p.batch * p.dim, warps * p.batch * p.len * p.state,
          p.batch * p.dim * p.state, p.batch * p.dim, warps};
}

template <class T, int NMAX>
__global__ void __launch_bounds__(kThreads)
    scan_bwd_kernel(SsmScanBwdParams q, int64_t nchunks, BwdScratch sc,
                    compute_t<T>* __restrict ws) {
  using A = compute_t<T>;
  const SsmScanParams& p = q.fwd;
  const ScanIn<T> in{p};
  const int64_t b = blockIdx.y, d = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, D = p.dim,
                L = p.len;
  const int64_t BD = p.batch * D, bd = b * D + d, CL = p.chunk_len;
  const int N = static_cast<int>(p.state), lane = threadIdx.x & 31;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const bool live = d < D;
  A* hs = ws;  // [s][n][b * D + d]
  A* gB_part = hs + sc.hs;
  A* gC_part = gB_part + sc.part_bc;
  A* gA_part = gC_part + sc.part_bc;
  A* gD_part = gA_part + sc.part_a;
  A* gbias_part = gD_part + sc.part_d;
  const A* chunk_states = static_cast<const A*>(p.chunk_states);

  A Ad[NMAX], G[NMAX], gA[NMAX];
#pragma unroll
  for (int n = 0; n < NMAX; ++n) {
    Ad[n] = live && n < N ? -exp(load(static_cast<const T*>(p.A_log), d * N + n)) : A(0);
    G[n] = live && n < N && q.g_hlast ? static_cast<const A*>(q.g_hlast)[bd * N + n] : A(0);
    gA[n] = 0;
  }
  const A bias = live && p.dt_bias ? load(static_cast<const T*>(p.dt_bias), d) : A(0);
  const A Dd = live && p.D ? load(static_cast<const T*>(p.D), d) : A(0);
  A gD = 0, gbias = 0;
  for (int64_t c = nchunks - 1; c >= 0; --c) {
    const int64_t cs = c * CL, ce = min(L, cs + CL);
    if (live) {  // hs[s] = the state before step cs + s
      A h[NMAX];
#pragma unroll
      for (int n = 0; n < NMAX; ++n) {
        h[n] = n < N ? chunk_states[((b * nchunks + c) * D + d) * N + n] : A(0);
        if (n < N) hs[int64_t(n) * BD + bd] = h[n];
      }
      for (int64_t t = cs; t < ce; ++t) {
        const int64_t r = b * L + t, s = t - cs + 1;
        const A dl = softplus(in.raw(r, d, bias)), dlu = dl * in.u(r, d);
#pragma unroll
        for (int n = 0; n < NMAX; ++n)
          if (n < N) {
            h[n] = fast_exp(dl * Ad[n]) * h[n] + dlu * in.B(r, n);
            hs[(s * N + n) * BD + bd] = h[n];
          }
      }
    }
    for (int64_t t = ce - 1; t >= cs; --t) {
      const int64_t r = b * L + t, s = t - cs;
      A g = 0, ut = 0, dl = 0, dsig = 0;
      if (live) {
        const A raw = in.raw(r, d, bias);
        dl = softplus(raw);
        dsig = raw > A(20) ? A(1) : sigmoid(raw);
        ut = in.u(r, d);
        g = load(static_cast<const T*>(q.gy), r * D + d);
        if (p.z) {
          A y_pre = Dd * ut;
#pragma unroll
          for (int n = 0; n < NMAX; ++n)
            if (n < N) y_pre += in.C(r, n) * hs[((s + 1) * N + n) * BD + bd];
          const A zt = in.z(r, d), sg = sigmoid(zt);
          static_cast<T*>(q.gz)[r * D + d] = convert<T>(g * y_pre * sg * (A(1) + zt * (A(1) - sg)));
          g *= zt * sg;
        }
      }
      gD += g * ut;
      A gut = Dd * g, gdl = 0;
#pragma unroll
      for (int n = 0; n < NMAX; ++n) {
        if (n >= N) continue;
        A gb = 0, gc = 0;
        if (live) {
          const A Bn = in.B(r, n), Cn = in.C(r, n);
          const A hp = hs[(s * N + n) * BD + bd], hn = hs[((s + 1) * N + n) * BD + bd];
          const A an = fast_exp(dl * Ad[n]), Gn = G[n] + Cn * g;
          gc = g * hn;
          gb = Gn * dl * ut;
          gut += Gn * dl * Bn;
          gdl += Gn * (Ad[n] * an * hp + Bn * ut);
          gA[n] += Gn * dl * an * hp;
          G[n] = an * Gn;
        }
        gb = warp_sum(gb);
        gc = warp_sum(gc);
        if (lane == (n & 31)) {
          gB_part[(warp * p.batch * L + r) * N + n] = gb;
          gC_part[(warp * p.batch * L + r) * N + n] = gc;
        }
      }
      if (live) {
        static_cast<T*>(q.gu)[r * D + d] = convert<T>(gut);
        const A graw = gdl * dsig;
        static_cast<T*>(q.gdelta)[r * D + d] = convert<T>(graw);
        gbias += graw;
      }
    }
  }
  if (!live) return;
#pragma unroll
  for (int n = 0; n < NMAX; ++n)
    if (n < N) {
      gA_part[bd * N + n] = gA[n];
      if (q.gh0) static_cast<A*>(q.gh0)[bd * N + n] = G[n];
    }
  gD_part[bd] = gD;
  gbias_part[bd] = gbias;
}

// gB and gC: the sum over channel warps, in warp order.
template <class T>
__global__ void scan_bc_finish_kernel(const compute_t<T>* __restrict gB_part,
                                      const compute_t<T>* __restrict gC_part, int64_t warps,
                                      int64_t total, T* __restrict gB, T* __restrict gC) {
  using A = compute_t<T>;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    A sb = 0, sc = 0;
    for (int64_t w = 0; w < warps; ++w) {
      sb += gB_part[w * total + e];
      sc += gC_part[w * total + e];
    }
    gB[e] = convert<T>(sb);
    gC[e] = convert<T>(sc);
  }
}

// gA_log = A * sum over batch (dA/dA_log = A), gD and gdt_bias: sums over batch in order.
template <class T>
__global__ void scan_param_finish_kernel(SsmScanBwdParams q, const compute_t<T>* __restrict gA_part,
                                         const compute_t<T>* __restrict gD_part,
                                         const compute_t<T>* __restrict gbias_part) {
  using A = compute_t<T>;
  const SsmScanParams& p = q.fwd;
  const int64_t DN = p.dim * p.state;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < DN + p.dim;
       e += int64_t(gridDim.x) * blockDim.x) {
    if (e < DN) {
      A s = 0;
      for (int64_t b = 0; b < p.batch; ++b) s += gA_part[b * DN + e];
      static_cast<T*>(q.gA_log)[e] = convert<T>(s * -exp(load(static_cast<const T*>(p.A_log), e)));
    } else {
      const int64_t d = e - DN;
      A sd = 0, sbias = 0;
      for (int64_t b = 0; b < p.batch; ++b) {
        sd += gD_part[b * p.dim + d];
        sbias += gbias_part[b * p.dim + d];
      }
      if (q.gD) static_cast<T*>(q.gD)[d] = convert<T>(sd);
      if (q.gdt_bias) static_cast<T*>(q.gdt_bias)[d] = convert<T>(sbias);
    }
  }
}

// Calls fn(std::integral_constant<int, NMAX>) with the smallest supported bound >= state.
template <class F>
void dispatch_state(int64_t state, F&& fn) {
  HYDRA_CHECK(state >= 1 && state <= 64)
      << "ssm_scan (CUDA): d_state " << state << " is not supported (1..64)";
  if (state <= 8) return fn(std::integral_constant<int, 8>{});
  if (state <= 16) return fn(std::integral_constant<int, 16>{});
  if (state <= 32) return fn(std::integral_constant<int, 32>{});
  return fn(std::integral_constant<int, 64>{});
}

void check_grid(const SsmScanParams& p) {
  HYDRA_CHECK(p.batch < 65536) << "ssm_scan (CUDA): batch " << p.batch << " must be below 65536";
  HYDRA_CHECK(p.chunk_len >= 1) << "ssm_scan: chunk_len must be positive, got " << p.chunk_len;
}

}  // namespace

void ssm_scan_fwd(const SsmScanParams& p) {
  if (p.batch * p.dim * p.len == 0) return;
  check_grid(p);
  const dim3 grid(static_cast<unsigned>((p.dim + kThreads - 1) / kThreads),
                  static_cast<unsigned>(p.batch));
  dispatch_float(p.dtype, "ssm_scan", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_state(p.state, [&](auto nmax) {
      scan_fwd_kernel<T, decltype(nmax)::value>
          <<<grid, kThreads, 0, as_stream(p.stream)>>>(p, ssm_num_chunks(p.len, p.chunk_len));
      HYDRA_CUDA_LAUNCH_CHECK();
    });
  });
}

size_t ssm_scan_bwd_workspace(const SsmScanBwdParams& q) {
  const BwdScratch sc = scratch_of(q.fwd);
  const size_t a = q.fwd.dtype == DType::kF64 ? 8 : 4;
  return a * static_cast<size_t>(sc.hs + 2 * sc.part_bc + sc.part_a + 2 * sc.part_d) + 256;
}

void ssm_scan_bwd(const SsmScanBwdParams& q) {
  const SsmScanParams& p = q.fwd;
  if (p.batch * p.dim * p.len == 0) return;
  check_grid(p);
  HYDRA_CHECK(p.chunk_states != nullptr)
      << "ssm_scan_bwd needs the chunk states saved by the forward";
  HYDRA_CHECK(q.workspace != nullptr) << "ssm_scan_bwd: workspace required";
  const BwdScratch sc = scratch_of(p);
  const dim3 grid(static_cast<unsigned>((p.dim + kThreads - 1) / kThreads),
                  static_cast<unsigned>(p.batch));
  cudaStream_t s = as_stream(p.stream);
  dispatch_float(p.dtype, "ssm_scan_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = compute_t<T>;
    A* ws = static_cast<A*>(q.workspace);
    dispatch_state(p.state, [&](auto nmax) {
      scan_bwd_kernel<T, decltype(nmax)::value>
          <<<grid, kThreads, 0, s>>>(q, ssm_num_chunks(p.len, p.chunk_len), sc, ws);
      HYDRA_CUDA_LAUNCH_CHECK();
    });
    const A* gB_part = ws + sc.hs;
    const A* gC_part = gB_part + sc.part_bc;
    const A* gA_part = gC_part + sc.part_bc;
    const int64_t rows = p.batch * p.len * p.state;
    scan_bc_finish_kernel<T><<<blocks_for(rows, 256), 256, 0, s>>>(
        gB_part, gC_part, sc.warps, rows, static_cast<T*>(q.gB), static_cast<T*>(q.gC));
    HYDRA_CUDA_LAUNCH_CHECK();
    scan_param_finish_kernel<T><<<blocks_for(p.dim * (p.state + 1), 256), 256, 0, s>>>(
        q, gA_part, gA_part + sc.part_a, gA_part + sc.part_a + sc.part_d);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace hydra::kernels::cuda
