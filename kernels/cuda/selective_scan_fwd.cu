// CUDA selective scan, forward (the passes: selective_scan_common.cuh).
#include "kernels/cuda/selective_scan_common.cuh"

namespace hydra::kernels::cuda {
namespace {

using namespace ssm;

// Forward passes 1 (FINAL false: from a zero state, the chunk's end state into `states` and its
// summed delta into `dsums`) and 3 (FINAL true: from the entering state in `states`, y).
template <class T, int NMAX, bool FULL, bool FINAL>
__global__ void __launch_bounds__(kThreads)
    scan_fwd_chunk_kernel(SelectiveScanParams p, int64_t nchunks, compute_t<T>* __restrict states,
                          compute_t<T>* __restrict dsums) {
  using A = compute_t<T>;
  __shared__ __align__(16) A Bs[kSteps][NMAX];
  __shared__ __align__(16) A Cs[FINAL ? kSteps : 1][NMAX];
  const ScanIn<T> in{p};
  const ChunkThread th = chunk_thread(p, 0);
  const int64_t b = th.b, d = th.d, D = p.dim, L = p.len;
  const int N = states_of<NMAX, FULL>(p);
  const bool live = th.live;
  const int64_t slot = (b * nchunks + th.c) * D + d;
  A Ad[NMAX], h[NMAX];
  load_decay_rates<T, NMAX, FULL>(p, d, live, Ad);
#pragma unroll
  for (int n = 0; n < NMAX; ++n) h[n] = FINAL && live && n < N ? states[slot * N + n] : A(0);
  const A bias = live && p.dt_bias ? load(static_cast<const T*>(p.dt_bias), d) : A(0);
  const A Dd = live && p.D ? load(static_cast<const T*>(p.D), d) : A(0);
  A dsum = 0;
  for (int64_t t0 = th.cs; t0 < th.ce; t0 += kSteps) {
    const int steps = static_cast<int>(min(int64_t(kSteps), th.ce - t0));
    __syncthreads();
    for (int e = threadIdx.x; e < steps * N; e += blockDim.x) {
      const int s = e / N, n = e % N;
      Bs[s][n] = in.B(b * L + t0 + s, n);
      if constexpr (FINAL) Cs[s][n] = in.C(b * L + t0 + s, n);
    }
    __syncthreads();
    if (!live) continue;
    // The next step's inputs are loaded before this step's y is stored (a store to y may alias
    // them, so the compiler would not move them up): their latency overlaps this step's work.
    A raw_next = 0, u_next = 0, z_next = 0;
    auto load_step = [&](int s) {
      const int64_t r = b * L + t0 + s;
      raw_next = in.raw(r, d, bias);
      u_next = in.u(r, d);
      if (FINAL && p.z) z_next = in.z(r, d);
    };
    load_step(0);
    for (int s = 0; s < steps; ++s) {
      const int64_t r = b * L + t0 + s;
      const A raw = raw_next, ut = u_next, zt = z_next;
      if (s + 1 < steps) load_step(s + 1);
      const A dl = softplus(raw), dlu = dl * ut;
      A acc = 0;
#pragma unroll
      for (int n = 0; n < NMAX; ++n) {
        if (n < N) {
          h[n] = exp2_scaled(dl * Ad[n]) * h[n] + dlu * Bs[s][n];
          if constexpr (FINAL) acc += Cs[s][n] * h[n];
        }
      }
      if constexpr (FINAL) {
        acc += Dd * ut;
        if (p.z) acc *= zt * sigmoid(zt);
        static_cast<T*>(p.y)[r * D + d] = convert<T>(acc);
      } else {
        dsum += dl;
      }
    }
  }
  if constexpr (!FINAL) {
    if (!live) return;
#pragma unroll
    for (int n = 0; n < NMAX; ++n)
      if (n < N) states[slot * N + n] = h[n];
    dsums[slot] = dsum;
  }
}

}  // namespace

size_t selective_scan_fwd_workspace(const SelectiveScanParams& p) {
  const int64_t bcd = p.batch * ssm_num_chunks(p.len, p.chunk_len) * p.dim;
  const size_t a = p.dtype == DType::kF64 ? 8 : 4;
  return a * static_cast<size_t>(bcd + (p.chunk_states ? 0 : bcd * p.state)) + 256;
}

void selective_scan_fwd(const SelectiveScanParams& p) {
  if (p.batch * p.dim * p.len == 0) return;
  check_grid(p);
  HYDRA_CHECK(p.workspace != nullptr) << "selective_scan: workspace required";
  const ScanGrids grids = scan_grids(p);
  const int64_t nc = grids.chunks;
  const dim3 chunk_grid = grids.chunk, carry_grid = grids.carry;
  cudaStream_t s = as_stream(p.stream);
  dispatch_float(p.dtype, "selective_scan", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = compute_t<T>;
    A* dsums = static_cast<A*>(p.workspace);
    A* states = p.chunk_states ? static_cast<A*>(p.chunk_states) : dsums + p.batch * nc * p.dim;
    dispatch_state(p.state, [&](auto nmax, auto full) {
      constexpr int NMAX = decltype(nmax)::value;
      constexpr bool FULL = decltype(full)::value;
      scan_fwd_chunk_kernel<T, NMAX, FULL, false>
          <<<chunk_grid, kThreads, 0, s>>>(p, nc, states, dsums);
      HYDRA_CUDA_LAUNCH_CHECK();
      scan_carry_kernel<T, false><<<carry_grid, kThreads, 0, s>>>(
          static_cast<const T*>(p.A_log), p.dim, p.state, nc, states, dsums,
          static_cast<const A*>(p.h0), static_cast<A*>(p.h_last));
      HYDRA_CUDA_LAUNCH_CHECK();
      scan_fwd_chunk_kernel<T, NMAX, FULL, true>
          <<<chunk_grid, kThreads, 0, s>>>(p, nc, states, dsums);
      HYDRA_CUDA_LAUNCH_CHECK();
    });
  });
}

}  // namespace hydra::kernels::cuda
