// CUDA selective scan, forward (the passes: selective_scan_common.cuh).
#include "kernels/cuda/selective_scan_common.cuh"

namespace hydra::kernels::cuda {
namespace {

using namespace ssm;

// Forward passes 1 (FINAL false: from a zero state, the chunk's end state into `states` and its
// summed delta into `dsums`) and 3 (FINAL true: from the entering state in `states`, y). The inputs
// come in tiles of S steps (stage_tile), the next while this one is worked on; B and C are
// converted to the accumulate type once per tile (one 16-byte load per four states in the loop).
template <class T, int NMAX, bool FULL, bool FINAL>
__global__ void __launch_bounds__(kThreads)
    scan_fwd_chunk_kernel(SelectiveScanParams p, int64_t nchunks, compute_t<T>* __restrict states,
                          compute_t<T>* __restrict dsums, StageMode mode) {
  using A = compute_t<T>;
  constexpr int S = tile_steps<T>(), kIn = FINAL ? 3 : 2;  // delta, u (, z)
  __shared__ __align__(16) T xs[2][kIn][S][kThreads];
  __shared__ __align__(16) T Bx[2][S][NMAX];
  __shared__ __align__(16) T Cx[2][FINAL ? S : 1][NMAX];
  __shared__ __align__(16) A Bs[S][NMAX];
  __shared__ __align__(16) A Cs[FINAL ? S : 1][NMAX];
  const ChunkThread th = chunk_thread(p, 0);
  const int64_t b = th.b, d = th.d, D = p.dim, L = p.len, d0 = d - threadIdx.x;
  const int N = states_of<NMAX, FULL>(p), cols = static_cast<int>(min(int64_t(kThreads), D - d0));
  const bool live = th.live;
  const int64_t slot = (b * nchunks + th.c) * D + d;
  A Ad[NMAX], h[NMAX];
  load_decay_rates<T, NMAX, FULL>(p, d, live, Ad);
#pragma unroll
  for (int n = 0; n < NMAX; ++n) h[n] = FINAL && live && n < N ? states[slot * N + n] : A(0);
  const A bias = live && p.dt_bias ? load(static_cast<const T*>(p.dt_bias), d) : A(0);
  const A Dd = live && p.D ? load(static_cast<const T*>(p.D), d) : A(0);
  const bool gate = FINAL && p.z != nullptr;
  const int64_t tiles = (th.ce - th.cs + S - 1) / S;
  auto issue = [&](int64_t i) {  // tile i into buffer i % 2
    if (i >= tiles) return;
    const int buf = static_cast<int>(i & 1);
    const int64_t t0 = th.cs + i * S, r0 = b * L + t0;
    const int steps = static_cast<int>(min(int64_t(S), th.ce - t0));
    stage_tile(&xs[buf][0][0][0], kThreads, S,
               static_cast<const T*>(p.delta) + r0 * p.delta_row + d0, p.delta_row, steps, cols,
               mode.channels);
    stage_tile(&xs[buf][1][0][0], kThreads, S, static_cast<const T*>(p.u) + r0 * p.u_row + d0,
               p.u_row, steps, cols, mode.channels);
    if (gate)
      stage_tile(&xs[buf][kIn - 1][0][0], kThreads, S,
                 static_cast<const T*>(p.z) + r0 * p.z_row + d0, p.z_row, steps, cols,
                 mode.channels);
    stage_tile(&Bx[buf][0][0], NMAX, S, static_cast<const T*>(p.B) + r0 * p.B_row, p.B_row, steps,
               N, mode.states);
    if constexpr (FINAL)
      stage_tile(&Cx[buf][0][0], NMAX, S, static_cast<const T*>(p.C) + r0 * p.C_row, p.C_row, steps,
                 N, mode.states);
    cp_async_commit();
  };
  A dsum = 0;
  issue(0);
  for (int64_t i = 0; i < tiles; ++i) {
    const int buf = static_cast<int>(i & 1);
    const int64_t t0 = th.cs + i * S;
    const int steps = static_cast<int>(min(int64_t(S), th.ce - t0));
    cp_async_wait<0>();
    __syncthreads();  // tile i is in; every thread is done with tile i - 1 (its buffer, Bs, Cs)
    issue(i + 1);
    for (int e = threadIdx.x; e < steps * N; e += blockDim.x) {
      const int s = e / N, n = e % N;
      Bs[s][n] = convert<A>(Bx[buf][s][n]);
      if constexpr (FINAL) Cs[s][n] = convert<A>(Cx[buf][s][n]);
    }
    __syncthreads();
    if (!live) continue;
    const int tx = threadIdx.x;
    for (int s = 0; s < steps; ++s) {
      const A raw = convert<A>(xs[buf][0][s][tx]) + bias, ut = convert<A>(xs[buf][1][s][tx]);
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
        if (gate) {
          const A zt = convert<A>(xs[buf][kIn - 1][s][tx]);
          acc *= zt * sigmoid(zt);
        }
        static_cast<T*>(p.y)[(b * L + t0 + s) * D + d] = convert<T>(acc);
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
      const StageMode mode = stage_mode<T, NMAX>(p, nullptr);
      scan_fwd_chunk_kernel<T, NMAX, FULL, false>
          <<<chunk_grid, kThreads, 0, s>>>(p, nc, states, dsums, mode);
      HYDRA_CUDA_LAUNCH_CHECK();
      scan_carry_kernel<T, false><<<carry_grid, kThreads, 0, s>>>(
          static_cast<const T*>(p.A_log), p.dim, p.state, nc, states, dsums,
          static_cast<const A*>(p.h0), static_cast<A*>(p.h_last));
      HYDRA_CUDA_LAUNCH_CHECK();
      scan_fwd_chunk_kernel<T, NMAX, FULL, true>
          <<<chunk_grid, kThreads, 0, s>>>(p, nc, states, dsums, mode);
      HYDRA_CUDA_LAUNCH_CHECK();
    });
  });
}

}  // namespace hydra::kernels::cuda
