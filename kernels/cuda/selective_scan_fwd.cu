// CUDA selective scan, forward (the passes: selective_scan_common.cuh).
#include <atomic>
#include <cfloat>

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

// The lanes form: one pass, each decay evaluated once (docs/PERF.md, sessions 42 and 43). A warp
// takes one (batch entry, channel) through the whole sequence in segments of kSeg steps, each lane
// kSteps consecutive steps of the segment. Per segment, the block (kWarps channels) stages its
// inputs once: delta = softplus(raw + bias), delta * u, D * u and the gate for each (step,
// channel), and B and C for each (step, state), in the accumulate type in shared memory. Then per
// state (a loop not unrolled: the code stays small), each lane composes its steps' (decay, input)
// pairs into one, the warp combines the lanes' pairs with a Kogge-Stone scan of shuffles, and each
// lane walks its steps again from the state entering them, reusing the decays it kept in
// registers, and adds C h into its outputs. The state carried from segment to segment stays in
// shared memory. A chunk's entering state (what the backward needs) is written by the lane whose
// first step begins the chunk, so chunks must be a multiple of kSteps.
namespace lanes {
constexpr int kWarps = 8, kSteps = 8, kSeg = 32 * kSteps, kThreads = 32 * kWarps, kMaxState = 16;
// Rows of the per-channel arrays: 4 floats of padding put the 8 channels of 4 consecutive steps
// (what a warp writes when staging) in different banks.
constexpr int kRow = kSeg + 4;
static_assert(kRow % 4 == 0 && kSeg % 4 == 0, "float4 reads of the rows need 16-byte offsets");
struct Smem {
  float dl[kWarps][kRow];   // delta; the segment's outputs C h once the warp has read it
  float dlu[kWarps][kRow];  // delta * u
  float du[kWarps][kRow];   // D * u
  float zg[kWarps][kRow];   // z * sigmoid(z), or 1
  float B[kMaxState][kRow], C[kMaxState][kRow];  // padded: the staging's stores spread over banks
  float A2[kWarps][kMaxState];                   // decay rates in base 2
  float carry[kWarps][kMaxState];                // the state entering the segment
};

template <class T>
__global__ void __launch_bounds__(kThreads, 2)
    scan_fwd_lanes_kernel(SelectiveScanParams p, int64_t nchunks) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  const int tx = threadIdx.x, warp = tx >> 5, lane = tx & 31, N = static_cast<int>(p.state);
  const int64_t b = blockIdx.y, D = p.dim, L = p.len, d0 = int64_t(blockIdx.x) * kWarps;
  const int64_t d = d0 + warp;
  const int width = static_cast<int>(min(int64_t(kWarps), D - d0));
  const bool live = warp < width;
  const T* A_log = static_cast<const T*>(p.A_log);
  const float* h0 = static_cast<const float*>(p.h0);
  float* chunk_states = static_cast<float*>(p.chunk_states);
  if (lane < N) {
    // Finite even for an absurd A_log: a padding step's 0 * A2 must stay 0 (decay exactly 1).
    sm.A2[warp][lane] =
        live ? fmaxf(-expf(load(A_log, d * N + lane)) * float(kLog2e), -FLT_MAX) : 0.0f;
    sm.carry[warp][lane] = live && h0 ? h0[(b * D + d) * N + lane] : 0.0f;
  }
  // Staging: thread tx takes channel c = tx % kWarps of steps tx / kWarps, + 32, ...
  const int c = tx % kWarps;
  const bool clive = c < width;
  const float bias = clive && p.dt_bias ? load(static_cast<const T*>(p.dt_bias), d0 + c) : 0.0f;
  const float Dd = clive && p.D ? load(static_cast<const T*>(p.D), d0 + c) : 0.0f;
  const T *delta = static_cast<const T*>(p.delta), *u = static_cast<const T*>(p.u),
          *z = static_cast<const T*>(p.z), *Bg = static_cast<const T*>(p.B),
          *Cg = static_cast<const T*>(p.C);
  for (int64_t s0 = 0; s0 < L; s0 += kSeg) {
    const int steps = static_cast<int>(min(int64_t(kSeg), L - s0));
    __syncthreads();  // every warp is done with the previous segment's arrays
    for (int t = tx / kWarps; t < kSeg; t += kThreads / kWarps) {
      float dl = 0.0f, dlu = 0.0f, du = 0.0f, zg = 1.0f;  // past the end: decay 1, input 0
      if (t < steps && clive) {
        const int64_t r = b * L + s0 + t;
        const float ut = load(u, r * p.u_row + d0 + c);
        dl = softplus(load(delta, r * p.delta_row + d0 + c) + bias);
        dlu = dl * ut;
        du = Dd * ut;
        if (z) {
          const float zt = load(z, r * p.z_row + d0 + c);
          zg = zt * sigmoid(zt);
        }
      }
      sm.dl[c][t] = dl;
      sm.dlu[c][t] = dlu;
      sm.du[c][t] = du;
      sm.zg[c][t] = zg;
    }
    // B and C: consecutive threads take consecutive states of a step, so that a warp reads two
    // rows' contiguous bytes (a row per thread made each warp load touch 32 sectors).
#pragma unroll 2  // 80 registers (unrolled 4 or whole: 90, and 2 blocks an SM instead of 3)
    for (int e = tx; e < kSeg * kMaxState; e += kThreads) {
      const int t = e / kMaxState, n = e % kMaxState;
      if (n >= N) continue;
      const int64_t r = b * L + s0 + t;
      sm.B[n][t] = t < steps ? load(Bg, r * p.B_row + n) : 0.0f;
      sm.C[n][t] = t < steps ? load(Cg, r * p.C_row + n) : 0.0f;
    }
    __syncthreads();
    if (live) {
      const int k0 = lane * kSteps;
      float dl[kSteps], dlu[kSteps], acc[kSteps];
#pragma unroll
      for (int k = 0; k < kSteps; k += 4) {
        const float4 a = *reinterpret_cast<const float4*>(&sm.dl[warp][k0 + k]);
        const float4 e = *reinterpret_cast<const float4*>(&sm.dlu[warp][k0 + k]);
        dl[k] = a.x, dl[k + 1] = a.y, dl[k + 2] = a.z, dl[k + 3] = a.w;
        dlu[k] = e.x, dlu[k + 1] = e.y, dlu[k + 2] = e.z, dlu[k + 3] = e.w;
        acc[k] = acc[k + 1] = acc[k + 2] = acc[k + 3] = 0.0f;
      }
      // The lane whose first step begins a chunk writes the chunk's entering states.
      const int64_t t0 = s0 + k0;
      float* cs = chunk_states && t0 < L && t0 % p.chunk_len == 0
                      ? chunk_states + ((b * nchunks + t0 / p.chunk_len) * D + d) * N
                      : nullptr;
#pragma unroll 1
      for (int n = 0; n < N; ++n) {
        const float A2 = sm.A2[warp][n];
        float a[kSteps], x[kSteps], P = 1.0f, S = 0.0f;
#pragma unroll
        for (int k = 0; k < kSteps; k += 4) {
          const float4 Bv = *reinterpret_cast<const float4*>(&sm.B[n][k0 + k]);
          const float bv[4] = {Bv.x, Bv.y, Bv.z, Bv.w};
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            a[k + j] = exp2_ftz(dl[k + j] * A2);
            x[k + j] = dlu[k + j] * bv[j];
            P *= a[k + j];
            S = fmaf(a[k + j], S, x[k + j]);
          }
        }
        // Inclusive scan of the lanes' maps h -> P h + S (earlier lanes applied first).
#pragma unroll
        for (int o = 1; o < 32; o *= 2) {
          const float Pp = __shfl_up_sync(0xffffffffu, P, o),
                      Sp = __shfl_up_sync(0xffffffffu, S, o);
          if (lane >= o) {
            S = fmaf(P, Sp, S);
            P *= Pp;
          }
        }
        float Pe = __shfl_up_sync(0xffffffffu, P, 1), Se = __shfl_up_sync(0xffffffffu, S, 1);
        if (lane == 0) Pe = 1.0f, Se = 0.0f;
        float h = fmaf(Pe, sm.carry[warp][n], Se);  // the state entering the lane's steps
        if (cs) cs[n] = h;
#pragma unroll
        for (int k = 0; k < kSteps; k += 4) {
          const float4 Cv = *reinterpret_cast<const float4*>(&sm.C[n][k0 + k]);
          const float cv[4] = {Cv.x, Cv.y, Cv.z, Cv.w};
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            h = fmaf(a[k + j], h, x[k + j]);
            acc[k + j] = fmaf(cv[j], h, acc[k + j]);
          }
        }
        const float next = __shfl_sync(0xffffffffu, h, 31);
        __syncwarp();  // every lane's read of the carry above is ordered before its overwrite
        if (lane == 0) sm.carry[warp][n] = next;
      }
#pragma unroll
      for (int k = 0; k < kSteps; k += 4)  // into the warp's own delta row, read above
        *reinterpret_cast<float4*>(&sm.dl[warp][k0 + k]) =
            make_float4(acc[k], acc[k + 1], acc[k + 2], acc[k + 3]);
    }
    __syncthreads();
    T* y = static_cast<T*>(p.y);
    for (int t = tx / kWarps; t < steps; t += kThreads / kWarps)
      if (clive)
        y[(b * L + s0 + t) * D + d0 + c] = convert<T>((sm.dl[c][t] + sm.du[c][t]) * sm.zg[c][t]);
  }
  if (live && lane < N && p.h_last)
    static_cast<float*>(p.h_last)[(b * D + d) * N + lane] = sm.carry[warp][lane];
}
}  // namespace lanes

// The forward's form: HYDRA_SCAN_FWD=chunked (or unset) or lanes forces one (lanes only where it
// applies); auto picks lanes where it applies and it has at least two blocks for every SM (a full
// wave at two blocks an SM; it has no parallelism over time, so a few long sequences leave SMs
// idle). The default stays chunked
// until the lanes form has been measured faster in the step (written in session 43 without a GPU).
enum class FwdForm { kChunked, kAuto, kLanes };
FwdForm fwd_form() { return FwdForm(env_choice("HYDRA_SCAN_FWD", {"chunked", "auto", "lanes"})); }

std::atomic<int64_t> g_lanes_calls{0};

bool use_lanes(const SelectiveScanParams& p) {
  const FwdForm form = fwd_form();
  const bool applies = p.dtype != DType::kF64 && p.state >= 1 && p.state <= lanes::kMaxState &&
                       (p.chunk_states == nullptr || p.chunk_len % lanes::kSteps == 0);
  if (!applies || form == FwdForm::kChunked) return false;
  if (form == FwdForm::kLanes) return true;
  static const int sms = [] {
    int dev = 0, v = 0;
    HYDRA_CUDA_CHECK(cudaGetDevice(&dev));
    HYDRA_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
    return v;
  }();
  return (p.dim + lanes::kWarps - 1) / lanes::kWarps * p.batch >= 2 * int64_t(sms);
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
  cudaStream_t s = as_stream(p.stream);
  if (use_lanes(p)) {
    dispatch_float(p.dtype, "selective_scan", [&](auto tag) {
      using T = typename decltype(tag)::type;
      if constexpr (sizeof(compute_t<T>) != 4) {
        HYDRA_FAIL() << "selective_scan: the lanes form takes f32 or bf16 (use_lanes)";
      } else {
        const dim3 grid(static_cast<unsigned>((p.dim + lanes::kWarps - 1) / lanes::kWarps),
                        static_cast<unsigned>(p.batch));
        constexpr size_t smem = sizeof(lanes::Smem);
        allow_dynamic_smem(lanes::scan_fwd_lanes_kernel<T>, smem, "selective_scan");
        lanes::scan_fwd_lanes_kernel<T>
            <<<grid, lanes::kThreads, smem, s>>>(p, ssm_num_chunks(p.len, p.chunk_len));
        HYDRA_CUDA_LAUNCH_CHECK();
        g_lanes_calls.fetch_add(1, std::memory_order_relaxed);
      }
    });
    return;
  }
  HYDRA_CHECK(p.workspace != nullptr) << "selective_scan: workspace required";
  const ScanGrids grids = scan_grids(p);
  const int64_t nc = grids.chunks;
  const dim3 chunk_grid = grids.chunk, carry_grid = grids.carry;
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

int64_t selective_scan_fwd_lanes_calls() { return g_lanes_calls.load(std::memory_order_relaxed); }

}  // namespace hydra::kernels::cuda
