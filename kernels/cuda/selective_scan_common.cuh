// CUDA selective scan: what the forward (selective_scan_fwd.cu) and the backward
// (selective_scan_bwd.cu) share. Parallel over (batch, channel, chunk of chunk_len steps); each
// thread keeps its N states in registers (N is a template bound: 1, 8, 16, 32 or 64). Forward,
// three passes (spec/algorithms.md section 1: the recurrence is linear in h):
//   1. each chunk from a zero state: its end state and its summed delta (the chunk's decay is
//      exp(A * sum delta));
//   2. per (batch, channel, state), chunk to chunk: the true state entering each chunk, and h_last;
//   3. each chunk again from its entering state, writing y.
// Backward, the same for the adjoint G_t = C_t gy_t + a_{t+1} G_{t+1} (section 2), which is linear
// in G too: each chunk's G from a zero end, then a pass from the last chunk to the first for the
// true G entering each chunk, then each chunk walks its steps backward, recomputing its states from
// the saved chunk-start state: checkpoints every few steps in scratch, the steps between them in
// shared memory. Sums over channels (gB, gC) are warp shuffles, then the warps of a block in shared
// memory, into per-block partials; sums over batch and chunks (gA_log, gD, gdt_bias) are
// per-(batch, chunk) partials; later kernels add both in a fixed order, so results are
// bit-reproducible without atomics.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/async_copy.cuh"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/rows.cuh"
#include "kernels/selective_scan.h"

namespace hydra::kernels::cuda::ssm {

constexpr int kThreads = 128;  // channels per block

// delta = softplus(raw) and its derivative sigmoid(raw). Double precision (tests) uses the libm
// functions. Single precision runs on the special-function units (ex2, lg2, rcp: about 14
// instructions instead of log1pf's and expf's 40; each (step, channel) evaluates it up to six
// times over the scan's passes): softplus(x) = max(x, 0) + log1p(e), e = exp(-|x|) in (0, 1],
// with log1p(e) = lg2(1 + e) ln2 for e >= 1/32 and e - e^2/2 + e^3/3 - e^4/4 below, where 1 + e
// would round e's low bits away (the series' error is under e^5/5: 2e-7 relative at 1/32). Errors
// are about 1e-7 of the result, far below the bf16 inputs' 4e-3.
template <class A>
__device__ A softplus(A raw) {
  return raw > A(20) ? raw : log1p(exp(raw));
}
template <class A>
__device__ A sigmoid(A v) {
  return A(1) / (A(1) + exp(-v));
}
template <class A>
__device__ A softplus_and_sigmoid(A raw, A* sig) {
  *sig = raw > A(20) ? A(1) : sigmoid(raw);
  return softplus(raw);
}
__device__ __forceinline__ float softplus_and_sigmoid(float x, float* sig) {
  const float e = exp2_ftz(-fabsf(x) * 1.4426950408889634f), one_e = 1.0f + e;
  const float series = e * (1.0f + e * (-0.5f + e * (1.0f / 3.0f - 0.25f * e)));
  const float log1p_e = e < 0.03125f ? series : __log2f(one_e) * 0.6931471805599453f;
  const float r = __fdividef(1.0f, one_e);
  *sig = x >= 0.0f ? r : e * r;
  return fmaxf(x, 0.0f) + log1p_e;
}
__device__ __forceinline__ float softplus(float x) {
  float unused;
  return softplus_and_sigmoid(x, &unused);
}
__device__ __forceinline__ float sigmoid(float v) {
  return __fdividef(1.0f, 1.0f + exp2_ftz(-v * 1.4426950408889634f));
}

// The passes' inputs come into shared memory a tile of steps at a time, the next tile while the
// block works on this one (two buffers): loads issued a step ahead left the passes waiting on
// global memory for about half their cycles (ncu, docs/PERF.md, session 33). Per-channel inputs are
// tiles of [steps][kThreads] (the block's channels), B and C tiles of [steps][NMAX].
// Steps of a tile of the forward's and the backward's chunk passes: 32 bytes of each input per
// channel.
template <class T>
constexpr int tile_steps() {
  return static_cast<int>(32 / sizeof(T));
}

// How a tile is copied: asynchronously (cp.async, 16-byte chunks) when the rows, their stride and
// their width hold whole aligned chunks (stage_mode), otherwise element by element.
struct StageMode {
  bool channels = false, states = false;  // the [B, L, D] inputs; B and C
};

// The staging modes of a call's inputs (gy: the backward's, or null).
template <class T, int NMAX>
StageMode stage_mode(const SelectiveScanParams& p, const void* gy) {
  StageMode m;
  m.channels = chunk_rows<T>(p.delta, p.delta_row, p.dim, kThreads) &&
               chunk_rows<T>(p.u, p.u_row, p.dim, kThreads) &&
               (p.z == nullptr || chunk_rows<T>(p.z, p.z_row, p.dim, kThreads)) &&
               (gy == nullptr || chunk_rows<T>(gy, p.dim, p.dim, kThreads));
  m.states =
      chunk_rows<T>(p.B, p.B_row, p.state, NMAX) && chunk_rows<T>(p.C, p.C_row, p.state, NMAX);
  return m;
}

// The thread's place: channel d, chunk c (blockIdx.y) of batch b (b0 + blockIdx.z), steps [cs, ce).
struct ChunkThread {
  int64_t b, c, d, cs, ce;
  bool live;
};

inline __device__ ChunkThread chunk_thread(const SelectiveScanParams& p, int64_t b0) {
  ChunkThread t;
  t.b = b0 + blockIdx.z;
  t.c = blockIdx.y;
  t.d = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  t.cs = t.c * p.chunk_len;
  t.ce = min(p.len, t.cs + p.chunk_len);
  t.live = t.d < p.dim;
  return t;
}

// The decay rates in base 2, A2 = A * log2(e) with A = -exp(A_log), so that a step's decay
// exp(delta * A) is one multiply and one ex2 (exp2_scaled).
constexpr double kLog2e = 1.4426950408889634, kLn2 = 0.6931471805599453;
__device__ __forceinline__ float exp2_scaled(float x) { return exp2_ftz(x); }
__device__ __forceinline__ double exp2_scaled(double x) { return exp2(x); }

// The states of a channel: NMAX itself when the bound is exact (FULL: then the per-state checks
// and the divisions by N are decided at compile time; docs/PERF.md, session 26, counts the
// backward's integer and control instructions), otherwise the run's d_state.
template <int NMAX, bool FULL>
__device__ __forceinline__ int states_of(const SelectiveScanParams& p) {
  return FULL ? NMAX : static_cast<int>(p.state);
}

template <class T, int NMAX, bool FULL>
__device__ void load_decay_rates(const SelectiveScanParams& p, int64_t d, bool live,
                                 compute_t<T> (&Ad)[NMAX]) {
  using A = compute_t<T>;
  const int N = states_of<NMAX, FULL>(p);
#pragma unroll
  for (int n = 0; n < NMAX; ++n)
    Ad[n] =
        live && n < N ? -exp(load(static_cast<const T*>(p.A_log), d * N + n)) * A(kLog2e) : A(0);
}

// Pass 2 of both directions, a thread per (batch, channel, state): the value carried into each
// chunk replaces the chunk's own (computed from zero) in `vals`, walking the chunks in order
// (forward: the states entering them) or from the last (backward: the adjoint G entering them from
// the right); carried = exp(A * the chunk's summed delta) * carried + the chunk's own. `init` is
// the value entering the first chunk walked (h0, g_hlast; null: zero), `last` receives the value
// after the last one (h_last, gh0). A group of 8 chunks is loaded before any is stored (the stores
// may alias later loads), so a walk over 32 chunks waits 4 memory latencies, not 32; a thread per
// state makes the accesses coalesce.
template <class T, bool REVERSE>
__global__ void __launch_bounds__(kThreads)
    scan_carry_kernel(const T* __restrict A_log, int64_t D, int64_t N, int64_t nchunks,
                      compute_t<T>* __restrict vals, const compute_t<T>* __restrict dsums,
                      const compute_t<T>* __restrict init, compute_t<T>* __restrict last) {
  using A = compute_t<T>;
  const int64_t b = blockIdx.y,
                i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // i = d * N + n
  if (i >= D * N) return;
  const int64_t d = i / N;
  const A Ad = -exp(load(A_log, i));
  A carried = init ? init[b * D * N + i] : A(0);
  constexpr int kGroup = 8;
  for (int64_t k0 = 0; k0 < nchunks; k0 += kGroup) {
    A own[kGroup], ds[kGroup];
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      const int64_t k = k0 + j, c = REVERSE ? nchunks - 1 - k : k;
      own[j] = ds[j] = 0;
      if (k < nchunks) {
        own[j] = vals[(b * nchunks + c) * D * N + i];
        ds[j] = dsums[(b * nchunks + c) * D + d];
      }
    }
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      const int64_t k = k0 + j, c = REVERSE ? nchunks - 1 - k : k;
      if (k < nchunks) {
        vals[(b * nchunks + c) * D * N + i] = carried;
        carried = exp(ds[j] * Ad) * carried + own[j];
      }
    }
  }
  if (last) last[b * D * N + i] = carried;
}

// The template bound of the states (dispatch_state's choice).
constexpr int state_bound(int64_t state) {
  return state <= 1 ? 1 : state <= 8 ? 8 : state <= 16 ? 16 : state <= 32 ? 32 : 64;
}

// Calls fn(std::integral_constant<int, NMAX>, std::integral_constant<bool, FULL>) with the
// smallest supported bound NMAX >= state, FULL when state is the bound itself (states_of).
template <class F>
void dispatch_state(int64_t state, F&& fn) {
  HYDRA_CHECK(state >= 1 && state <= 64)
      << "selective_scan (CUDA): d_state " << state << " is not supported (1..64)";
  auto with = [&](auto nmax) {
    if (state == decltype(nmax)::value) return fn(nmax, std::true_type{});
    return fn(nmax, std::false_type{});
  };
  switch (state_bound(state)) {
    case 1:  // one state per channel (the paper's form, docs/MODEL.md)
      return fn(std::integral_constant<int, 1>{}, std::true_type{});
    case 8:
      return with(std::integral_constant<int, 8>{});
    case 16:
      return with(std::integral_constant<int, 16>{});
    case 32:
      return with(std::integral_constant<int, 32>{});
    default:
      return with(std::integral_constant<int, 64>{});
  }
}

inline void check_grid(const SelectiveScanParams& p) {
  HYDRA_CHECK(p.batch < 65536) << "selective_scan (CUDA): batch " << p.batch
                               << " must be below 65536";
  HYDRA_CHECK(p.chunk_len >= 1) << "selective_scan: chunk_len must be positive, got "
                                << p.chunk_len;
  HYDRA_CHECK(ssm_num_chunks(p.len, p.chunk_len) < 65536)
      << "selective_scan (CUDA): " << ssm_num_chunks(p.len, p.chunk_len) << " chunks of "
      << p.chunk_len << " steps; at most 65535 (raise the scan chunk)";
}

// The launch grids of both directions: a block of kThreads channels per (channel block, chunk,
// batch entry) for the chunk passes; a thread per (channel, state) and batch entry for the carry.
struct ScanGrids {
  int64_t chunks;
  unsigned dim_blocks;
  dim3 chunk, carry;
};
inline ScanGrids scan_grids(const SelectiveScanParams& p) {
  ScanGrids g;
  g.chunks = ssm_num_chunks(p.len, p.chunk_len);
  g.dim_blocks = static_cast<unsigned>((p.dim + kThreads - 1) / kThreads);
  g.chunk = dim3(g.dim_blocks, static_cast<unsigned>(g.chunks), static_cast<unsigned>(p.batch));
  g.carry = dim3(static_cast<unsigned>((p.dim * p.state + kThreads - 1) / kThreads),
                 static_cast<unsigned>(p.batch));
  return g;
}

}  // namespace hydra::kernels::cuda::ssm
