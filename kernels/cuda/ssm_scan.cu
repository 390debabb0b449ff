// CUDA selective scan, parallel over (batch, channel, chunk of chunk_len steps); each thread keeps
// its N states in registers (N is a template bound: 8, 16, 32 or 64). Forward, three passes
// (spec/algorithms.md section 1: the recurrence is linear in h):
//   1. each chunk from a zero state: its end state and its summed delta (the chunk's decay is
//      exp(A * sum delta));
//   2. per (batch, channel, state), chunk to chunk: the true state entering each chunk, and h_last;
//   3. each chunk again from its entering state, writing y.
// Backward, the same for the adjoint G_t = C_t gy_t + a_{t+1} G_{t+1} (section 2), which is linear
// in G too: each chunk's G from a zero end, then a pass from the last chunk to the first for the
// true G entering each chunk, then each chunk walks its steps backward, recomputing its states from
// the saved chunk-start state: checkpoints every few steps in scratch, the steps between them in
// shared memory. Sums over channels (gB, gC) are warp shuffles into per-warp partials; sums over
// batch and chunks (gA_log, gD, gdt_bias) are per-(batch, chunk) partials; later kernels add both
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

// Sums K values (v[0..K)) over the 32 lanes of a warp with 31 exchanges instead of 5 per value: at
// offset O each lane sends the half of its values its partner keeps and adds the half it keeps, so
// each level halves the values a lane holds (lanes with bit O set keep the upper half). When one
// value is left, the remaining levels add it plainly. Afterwards lane l holds, in v[0..max(K / 32,
// 1)), the sums of values l * K / 32 + j (K >= 32), or value l / (32 / K) (K < 32; 32 / K lanes
// hold each). The order of the additions is fixed, so results do not depend on timing.
template <int K, int O, class A>
__device__ __forceinline__ void warp_transpose_sum(A* v, int lane) {
  if constexpr (O > 0) {
    if constexpr (K > 1) {
      constexpr int H = K / 2;
      const bool up = (lane & O) != 0;
#pragma unroll
      for (int i = 0; i < H; ++i) {
        const A send = up ? v[i] : v[i + H], keep = up ? v[i + H] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
      }
      warp_transpose_sum<H, O / 2>(v, lane);
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], O);
      warp_transpose_sum<1, O / 2>(v, lane);
    }
  }
}

// The thread's place: channel d, chunk c (blockIdx.y) of batch b (b0 + blockIdx.z), steps [cs, ce).
struct ChunkThread {
  int64_t b, c, d, cs, ce;
  bool live;
};

__device__ ChunkThread chunk_thread(const SsmScanParams& p, int64_t b0) {
  ChunkThread t;
  t.b = b0 + blockIdx.z;
  t.c = blockIdx.y;
  t.d = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  t.cs = t.c * p.chunk_len;
  t.ce = min(p.len, t.cs + p.chunk_len);
  t.live = t.d < p.dim;
  return t;
}

template <class T, int NMAX>
__device__ void load_decay_rates(const SsmScanParams& p, int64_t d, bool live,
                                 compute_t<T> (&Ad)[NMAX]) {
  const int N = static_cast<int>(p.state);
#pragma unroll
  for (int n = 0; n < NMAX; ++n)
    Ad[n] = live && n < N ? -exp(load(static_cast<const T*>(p.A_log), d * N + n)) : compute_t<T>(0);
}

// Forward passes 1 (FINAL false: from a zero state, the chunk's end state into `states` and its
// summed delta into `dsums`) and 3 (FINAL true: from the entering state in `states`, y).
template <class T, int NMAX, bool FINAL>
__global__ void __launch_bounds__(kThreads)
    scan_fwd_chunk_kernel(SsmScanParams p, int64_t nchunks, compute_t<T>* __restrict states,
                          compute_t<T>* __restrict dsums) {
  using A = compute_t<T>;
  __shared__ A Bs[kSteps][NMAX], Cs[FINAL ? kSteps : 1][NMAX];
  const ScanIn<T> in{p};
  const ChunkThread th = chunk_thread(p, 0);
  const int64_t b = th.b, d = th.d, D = p.dim, L = p.len;
  const int N = static_cast<int>(p.state);
  const bool live = th.live;
  const int64_t slot = (b * nchunks + th.c) * D + d;
  A Ad[NMAX], h[NMAX];
  load_decay_rates<T, NMAX>(p, d, live, Ad);
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
          h[n] = fast_exp(dl * Ad[n]) * h[n] + dlu * Bs[s][n];
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

// Scratch of the backward, in accumulate-type elements.
// Steps per sub-chunk of the backward's recomputation, whose states sit in shared memory (kSub + 1
// slots of NMAX states for each of kThreads threads): the largest power of two within 72 KB (3
// blocks per SM fit), at least one step. 4-byte types: 8 steps at 16 states (72 KB), 16 at 8.
constexpr int scan_bwd_sub_steps(int nmax, int acc_bytes) {
  const int slot = nmax * kThreads * acc_bytes;
  int steps = 1;
  while ((2 * steps + 1) * slot <= 72 * 1024) steps *= 2;
  return steps;
}
constexpr size_t scan_bwd_smem(int nmax, int acc_bytes) {
  return size_t(scan_bwd_sub_steps(nmax, acc_bytes) + 1) * nmax * kThreads * acc_bytes;
}

// The template bound of the states (dispatch_state's choice).
constexpr int state_bound(int64_t state) {
  return state <= 8 ? 8 : state <= 16 ? 16 : state <= 32 ? 32 : 64;
}

struct BwdScratch {
  int64_t hs;              // checkpoints of one batch slice: sub-chunks * N * slice * chunks * D
  int64_t g_in, dsums;     // G entering each chunk [B][chunks][D][N]; summed delta [B][chunks][D]
  int64_t part_bc;         // per-warp partials of gB (and of gC)
  int64_t part_a, part_d;  // per-(batch, chunk) partials of gA (and of gD, gdt_bias)
  int64_t warps, slice;    // channel warps; batch entries per launch (bounds the scratch)
};

// The checkpoints of one launch stay below this (larger batches run in slices).
constexpr int64_t kStateScratchBytes = int64_t{1} << 30;

BwdScratch scratch_of(const SsmScanParams& p) {
  const int64_t blocks = (p.dim + kThreads - 1) / kThreads, warps = blocks * (kThreads / 32);
  const int64_t cl = std::min(p.chunk_len, p.len), nc = ssm_num_chunks(p.len, p.chunk_len);
  const int64_t a = p.dtype == DType::kF64 ? 8 : 4;
  const int64_t subs = (cl + scan_bwd_sub_steps(state_bound(p.state), static_cast<int>(a)) - 1) /
                       scan_bwd_sub_steps(state_bound(p.state), static_cast<int>(a));
  const int64_t per_batch = subs * p.state * nc * p.dim;
  const int64_t slice =
      std::clamp<int64_t>(kStateScratchBytes / (a * std::max<int64_t>(per_batch, 1)), 1, p.batch);
  const int64_t bcd = p.batch * nc * p.dim;
  return {per_batch * slice, bcd * p.state, bcd,   warps * p.batch * p.len * p.state,
          bcd * p.state,     bcd,           warps, slice};
}

// Backward pass 1: each chunk's G from a zero end (into g_in) and its summed delta. Up to 16
// states, bounded to 8 blocks per SM (64 registers; 68 unbounded).
template <class T, int NMAX>
__global__ void __launch_bounds__(kThreads, (sizeof(compute_t<T>) == 4 && NMAX <= 16 ? 8 : 1))
    scan_bwd_chunk_kernel(SsmScanBwdParams q, int64_t nchunks, compute_t<T>* __restrict g_in,
                          compute_t<T>* __restrict dsums) {
  using A = compute_t<T>;
  const SsmScanParams& p = q.fwd;
  const ScanIn<T> in{p};
  const ChunkThread th = chunk_thread(p, 0);
  if (!th.live) return;
  const int64_t b = th.b, d = th.d, D = p.dim, L = p.len, slot = (b * nchunks + th.c) * D + d;
  const int N = static_cast<int>(p.state);
  A Ad[NMAX], G[NMAX];
  load_decay_rates<T, NMAX>(p, d, true, Ad);
#pragma unroll
  for (int n = 0; n < NMAX; ++n) G[n] = 0;
  const A bias = p.dt_bias ? load(static_cast<const T*>(p.dt_bias), d) : A(0);
  A dsum = 0;
  // Each step's own inputs are loaded a step ahead, so that their latency overlaps the previous
  // step (C, the same for every channel, mostly hits L1; holding it ahead cost occupancy: 95
  // registers).
  A raw_next = 0, g_next = 0, z_next = 0;
  auto load_step = [&](int64_t t) {
    const int64_t r = b * L + t;
    raw_next = in.raw(r, d, bias);
    g_next = load(static_cast<const T*>(q.gy), r * D + d);
    if (p.z) z_next = in.z(r, d);
  };
  if (th.ce > th.cs) load_step(th.ce - 1);
  for (int64_t t = th.ce - 1; t >= th.cs; --t) {
    const int64_t r = b * L + t;
    const A raw = raw_next, zt = z_next;
    A g = g_next;
    if (t > th.cs) load_step(t - 1);
    const A dl = softplus(raw);
    dsum += dl;
    if (p.z) g *= zt * sigmoid(zt);
#pragma unroll
    for (int n = 0; n < NMAX; ++n)
      if (n < N) G[n] = fast_exp(dl * Ad[n]) * (G[n] + in.C(r, n) * g);
  }
#pragma unroll
  for (int n = 0; n < NMAX; ++n)
    if (n < N) g_in[slot * N + n] = G[n];
  dsums[slot] = dsum;
}

// Backward pass 3, batch entries b0.. of a slice. A thread walks its chunk's steps backward from
// the G entering it; the states it needs (before and after each step) are recomputed a sub-chunk of
// kSub steps at a time into shared memory, from checkpoints: a first pass over the chunk stores the
// state entering each sub-chunk in the scratch ([sub-chunk][state][thread column]). Shared memory
// is the thread's own ([slot][state][thread]: no bank conflicts, no barriers); the scratch holds 1
// state per kSub steps instead of every step's (toy shapes: 0.2 GB instead of 1.6 GB written and
// read again). Blocks per SM the backward asks the compiler to fit: up to 16 states, 3 (at most 168
// registers, no spills; 1.3x faster than the 184 registers and 2 blocks it takes unbounded, H200);
// 4 for up to 8. Double precision (tests) leaves the compiler free.
template <class T, int NMAX>
constexpr int scan_bwd_min_blocks() {
  return sizeof(compute_t<T>) > 4 ? 1 : NMAX <= 8 ? 4 : NMAX <= 16 ? 3 : 1;
}

template <class T, int NMAX>
__global__ void __launch_bounds__(kThreads, (scan_bwd_min_blocks<T, NMAX>()))
    scan_bwd_kernel(SsmScanBwdParams q, int64_t nchunks, int64_t b0, BwdScratch sc,
                    compute_t<T>* __restrict ws) {
  using A = compute_t<T>;
  constexpr int kSub = scan_bwd_sub_steps(NMAX, sizeof(A));
  extern __shared__ unsigned char smem_raw[];
  A* hsm = reinterpret_cast<A*>(
      smem_raw);  // [kSub + 1][NMAX][kThreads]: states before each step, and after
  auto at = [&](int slot, int n) -> A& { return hsm[(slot * NMAX + n) * kThreads + threadIdx.x]; };
  const SsmScanParams& p = q.fwd;
  const ScanIn<T> in{p};
  const ChunkThread th = chunk_thread(p, b0);
  const int64_t b = th.b, d = th.d, D = p.dim, L = p.len, cs = th.cs, ce = th.ce;
  const int64_t slot = (b * nchunks + th.c) * D + d;
  // The thread's column of the checkpoint scratch, and the scratch's row length.
  const int64_t col = (int64_t(blockIdx.z) * nchunks + th.c) * D + d, cols = sc.slice * nchunks * D;
  const int N = static_cast<int>(p.state), lane = threadIdx.x & 31;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const bool live = th.live;
  A* ckpt = ws;  // [k][n][col]: the state entering sub-chunk k
  A* g_in = ckpt + sc.hs;
  A* gB_part = g_in + sc.g_in + sc.dsums;
  A* gC_part = gB_part + sc.part_bc;
  A* gA_part = gC_part + sc.part_bc;
  A* gD_part = gA_part + sc.part_a;
  A* gbias_part = gD_part + sc.part_d;
  const A* chunk_states = static_cast<const A*>(p.chunk_states);

  A Ad[NMAX], G[NMAX], gA[NMAX];
  load_decay_rates<T, NMAX>(p, d, live, Ad);
#pragma unroll
  for (int n = 0; n < NMAX; ++n) {
    G[n] = live && n < N ? g_in[slot * N + n] : A(0);
    gA[n] = 0;
  }
  const A bias = live && p.dt_bias ? load(static_cast<const T*>(p.dt_bias), d) : A(0);
  const A Dd = live && p.D ? load(static_cast<const T*>(p.D), d) : A(0);
  A gD = 0, gbias = 0;
  // Up to 16 states, each step's loads are issued together ahead of its stores, and a recomputation
  // loads the next step's inputs before storing this step's states: a load the compiler cannot move
  // above a store to memory that may alias it waits a memory latency of its own.
  constexpr bool kHoist = NMAX <= 16;
  // Runs the recurrence from h over steps [t0, t1), calling visit(s, h) with the state before step
  // t0 + s.
  auto recompute = [&](A(&h)[NMAX], int64_t t0, int64_t t1, auto&& visit) {
    A raw_next = 0, u_next = 0;
    [[maybe_unused]] A B_next[kHoist ? NMAX : 1];
    auto load_step = [&](int64_t t) {
      const int64_t r = b * L + t;
      raw_next = in.raw(r, d, bias);
      u_next = in.u(r, d);
      if constexpr (kHoist)
#pragma unroll
        for (int n = 0; n < NMAX; ++n) B_next[n] = n < N ? in.B(r, n) : A(0);
    };
    if (t0 < t1) load_step(t0);
    for (int64_t t = t0; t < t1; ++t) {
      [[maybe_unused]] const int64_t r = b * L + t;
      const A dl = softplus(raw_next), dlu = dl * u_next;
      [[maybe_unused]] A Bt[kHoist ? NMAX : 1];
      if constexpr (kHoist) {
#pragma unroll
        for (int n = 0; n < NMAX; ++n) Bt[n] = B_next[n];
      }
      if (t + 1 < t1) load_step(t + 1);
      visit(t - t0, h);
#pragma unroll
      for (int n = 0; n < NMAX; ++n)
        if (n < N) {
          A Bn;
          if constexpr (kHoist)
            Bn = Bt[n];
          else
            Bn = in.B(r, n);
          h[n] = fast_exp(dl * Ad[n]) * h[n] + dlu * Bn;
        }
    }
  };
  const int64_t subs = (ce - cs + kSub - 1) / kSub;
  A h[NMAX];
  if (live) {  // the checkpoints: the state entering each sub-chunk
#pragma unroll
    for (int n = 0; n < NMAX; ++n) h[n] = n < N ? chunk_states[slot * N + n] : A(0);
    recompute(h, cs, ce, [&](int64_t s, const A(&hv)[NMAX]) {
      if (s % kSub != 0) return;
#pragma unroll
      for (int n = 0; n < NMAX; ++n)
        if (n < N) ckpt[((s / kSub) * N + n) * cols + col] = hv[n];
    });
  }
  for (int64_t k = subs - 1; k >= 0; --k) {
    const int64_t t0 = cs + k * kSub, t1 = min(ce, t0 + kSub);
    if (live) {  // at(s) = the state before step t0 + s, for s = 0 .. t1 - t0 (the last: after step
                 // t1 - 1)
#pragma unroll
      for (int n = 0; n < NMAX; ++n) h[n] = n < N ? ckpt[(k * N + n) * cols + col] : A(0);
      recompute(h, t0, t1, [&](int64_t s, const A(&hv)[NMAX]) {
#pragma unroll
        for (int n = 0; n < NMAX; ++n) at(static_cast<int>(s), n) = hv[n];
      });
#pragma unroll
      for (int n = 0; n < NMAX; ++n) at(static_cast<int>(t1 - t0), n) = h[n];
    }
    for (int64_t t = t1 - 1; t >= t0; --t) {
      const int64_t r = b * L + t;
      const int s = static_cast<int>(t - t0);
      A g = 0, ut = 0, dl = 0, dsig = 0, raw = 0, zt = 0;
      // The step's B and C (kHoist), loaded with its other inputs.
      A Bh[kHoist ? NMAX : 1], Ch[kHoist ? NMAX : 1];
      if (live) {
        raw = in.raw(r, d, bias);
        ut = in.u(r, d);
        g = load(static_cast<const T*>(q.gy), r * D + d);
        if (p.z) zt = in.z(r, d);
        if constexpr (kHoist)
#pragma unroll
          for (int n = 0; n < NMAX; ++n) {
            Bh[n] = n < N ? in.B(r, n) : A(0);
            Ch[n] = n < N ? in.C(r, n) : A(0);
          }
      }
      auto B_of = [&](int n) {
        if constexpr (kHoist)
          return Bh[n];
        else
          return in.B(r, n);
      };
      auto C_of = [&](int n) {
        if constexpr (kHoist)
          return Ch[n];
        else
          return in.C(r, n);
      };
      if (live) {
        dl = softplus(raw);
        dsig = raw > A(20) ? A(1) : sigmoid(raw);
        if (p.z) {
          A y_pre = Dd * ut;
#pragma unroll
          for (int n = 0; n < NMAX; ++n)
            if (n < N) y_pre += C_of(n) * at(s + 1, n);
          const A sg = sigmoid(zt);
          static_cast<T*>(q.gz)[r * D + d] = convert<T>(g * y_pre * sg * (A(1) + zt * (A(1) - sg)));
          g *= zt * sg;
        }
      }
      gD += g * ut;
      A gut = Dd * g, gdl = 0;
      // gB and gC: the warp's sums over its channels, kGroup states at a time (warp_transpose_sum;
      // a group bounds the registers the partial sums take).
      constexpr int kGroup = NMAX < 8 ? NMAX : 8, kShare = 32 / kGroup;
#pragma unroll
      for (int n0 = 0; n0 < NMAX; n0 += kGroup) {
        A gb[kGroup], gc[kGroup];
#pragma unroll
        for (int j = 0; j < kGroup; ++j) {
          const int n = n0 + j;
          gb[j] = gc[j] = 0;
          if (live && n < N) {
            const A Bn = B_of(n), Cn = C_of(n), hp = at(s, n), hn = at(s + 1, n);
            const A an = fast_exp(dl * Ad[n]), Gn = G[n] + Cn * g;
            gc[j] = g * hn;
            gb[j] = Gn * dl * ut;
            gut += Gn * dl * Bn;
            gdl += Gn * (Ad[n] * an * hp + Bn * ut);
            gA[n] += Gn * dl * an * hp;
            G[n] = an * Gn;
          }
        }
        if (n0 >= N) continue;  // (uniform)
        warp_transpose_sum<kGroup, 16>(gb, lane);
        warp_transpose_sum<kGroup, 16>(gc, lane);
        const int n = n0 + lane / kShare;
        if (lane % kShare == 0 && n < N) {
          gB_part[(warp * p.batch * L + r) * N + n] = gb[0];
          gC_part[(warp * p.batch * L + r) * N + n] = gc[0];
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
    if (n < N) gA_part[slot * N + n] = gA[n];
  gD_part[slot] = gD;
  gbias_part[slot] = gbias;
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

// gA_log = A * (the sum over batch and chunks of gA), as dA/dA_log = A: column_sum's epilogue.
template <class T>
struct GradALogStore {
  T* out;
  const T* A_log;
  __device__ void operator()(int64_t e, compute_t<T> v) const {
    out[e] = convert<T>(v * -exp(load(A_log, e)));
  }
};

// Calls fn(std::integral_constant<int, NMAX>) with the smallest supported bound >= state.
template <class F>
void dispatch_state(int64_t state, F&& fn) {
  HYDRA_CHECK(state >= 1 && state <= 64)
      << "ssm_scan (CUDA): d_state " << state << " is not supported (1..64)";
  switch (state_bound(state)) {
    case 8:
      return fn(std::integral_constant<int, 8>{});
    case 16:
      return fn(std::integral_constant<int, 16>{});
    case 32:
      return fn(std::integral_constant<int, 32>{});
    default:
      return fn(std::integral_constant<int, 64>{});
  }
}

void check_grid(const SsmScanParams& p) {
  HYDRA_CHECK(p.batch < 65536) << "ssm_scan (CUDA): batch " << p.batch << " must be below 65536";
  HYDRA_CHECK(p.chunk_len >= 1) << "ssm_scan: chunk_len must be positive, got " << p.chunk_len;
  HYDRA_CHECK(ssm_num_chunks(p.len, p.chunk_len) < 65536)
      << "ssm_scan (CUDA): " << ssm_num_chunks(p.len, p.chunk_len) << " chunks of " << p.chunk_len
      << " steps; at most 65535 (raise the scan chunk)";
}

}  // namespace

size_t ssm_scan_fwd_workspace(const SsmScanParams& p) {
  const int64_t bcd = p.batch * ssm_num_chunks(p.len, p.chunk_len) * p.dim;
  const size_t a = p.dtype == DType::kF64 ? 8 : 4;
  return a * static_cast<size_t>(bcd + (p.chunk_states ? 0 : bcd * p.state)) + 256;
}

void ssm_scan_fwd(const SsmScanParams& p) {
  if (p.batch * p.dim * p.len == 0) return;
  check_grid(p);
  HYDRA_CHECK(p.workspace != nullptr) << "ssm_scan: workspace required";
  const int64_t nc = ssm_num_chunks(p.len, p.chunk_len);
  const unsigned dim_blocks = static_cast<unsigned>((p.dim + kThreads - 1) / kThreads);
  const dim3 chunk_grid(dim_blocks, static_cast<unsigned>(nc), static_cast<unsigned>(p.batch)),
      carry_grid(static_cast<unsigned>((p.dim * p.state + kThreads - 1) / kThreads),
                 static_cast<unsigned>(p.batch));
  cudaStream_t s = as_stream(p.stream);
  dispatch_float(p.dtype, "ssm_scan", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = compute_t<T>;
    A* dsums = static_cast<A*>(p.workspace);
    A* states = p.chunk_states ? static_cast<A*>(p.chunk_states) : dsums + p.batch * nc * p.dim;
    dispatch_state(p.state, [&](auto nmax) {
      constexpr int NMAX = decltype(nmax)::value;
      scan_fwd_chunk_kernel<T, NMAX, false><<<chunk_grid, kThreads, 0, s>>>(p, nc, states, dsums);
      HYDRA_CUDA_LAUNCH_CHECK();
      scan_carry_kernel<T, false><<<carry_grid, kThreads, 0, s>>>(
          static_cast<const T*>(p.A_log), p.dim, p.state, nc, states, dsums,
          static_cast<const A*>(p.h0), static_cast<A*>(p.h_last));
      HYDRA_CUDA_LAUNCH_CHECK();
      scan_fwd_chunk_kernel<T, NMAX, true><<<chunk_grid, kThreads, 0, s>>>(p, nc, states, dsums);
      HYDRA_CUDA_LAUNCH_CHECK();
    });
  });
}

size_t ssm_scan_bwd_workspace(const SsmScanBwdParams& q) {
  const BwdScratch sc = scratch_of(q.fwd);
  const size_t a = q.fwd.dtype == DType::kF64 ? 8 : 4;
  return a * static_cast<size_t>(sc.hs + sc.g_in + sc.dsums + 2 * sc.part_bc + sc.part_a +
                                 2 * sc.part_d) +
         256;
}

void ssm_scan_bwd(const SsmScanBwdParams& q) {
  const SsmScanParams& p = q.fwd;
  if (p.batch * p.dim * p.len == 0) return;
  check_grid(p);
  HYDRA_CHECK(p.chunk_states != nullptr)
      << "ssm_scan_bwd needs the chunk states saved by the forward";
  HYDRA_CHECK(q.workspace != nullptr) << "ssm_scan_bwd: workspace required";
  const BwdScratch sc = scratch_of(p);
  const int64_t nc = ssm_num_chunks(p.len, p.chunk_len);
  const unsigned dim_blocks = static_cast<unsigned>((p.dim + kThreads - 1) / kThreads);
  const dim3 chunk_grid(dim_blocks, static_cast<unsigned>(nc), static_cast<unsigned>(p.batch)),
      carry_grid(static_cast<unsigned>((p.dim * p.state + kThreads - 1) / kThreads),
                 static_cast<unsigned>(p.batch));
  cudaStream_t s = as_stream(p.stream);
  dispatch_float(p.dtype, "ssm_scan_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = compute_t<T>;
    A* ws = static_cast<A*>(q.workspace);
    A* g_in = ws + sc.hs;
    A* dsums = g_in + sc.g_in;
    dispatch_state(p.state, [&](auto nmax) {
      constexpr int NMAX = decltype(nmax)::value;
      scan_bwd_chunk_kernel<T, NMAX><<<chunk_grid, kThreads, 0, s>>>(q, nc, g_in, dsums);
      HYDRA_CUDA_LAUNCH_CHECK();
      scan_carry_kernel<T, true><<<carry_grid, kThreads, 0, s>>>(
          static_cast<const T*>(p.A_log), p.dim, p.state, nc, g_in, dsums,
          static_cast<const A*>(q.g_hlast), static_cast<A*>(q.gh0));
      HYDRA_CUDA_LAUNCH_CHECK();
      for (int64_t b0 = 0; b0 < p.batch; b0 += sc.slice) {
        const dim3 grid(dim_blocks, static_cast<unsigned>(nc),
                        static_cast<unsigned>(std::min(sc.slice, p.batch - b0)));
        constexpr size_t smem = scan_bwd_smem(NMAX, sizeof(A));
        allow_dynamic_smem(scan_bwd_kernel<T, NMAX>, smem, "ssm_scan_backward");
        scan_bwd_kernel<T, NMAX><<<grid, kThreads, smem, s>>>(q, nc, b0, sc, ws);
        HYDRA_CUDA_LAUNCH_CHECK();
      }
    });
    const A* gB_part = dsums + sc.dsums;
    const A* gC_part = gB_part + sc.part_bc;
    const A* gA_part = gC_part + sc.part_bc;
    const int64_t rows = p.batch * p.len * p.state;
    scan_bc_finish_kernel<T><<<blocks_for(rows, 256), 256, 0, s>>>(
        gB_part, gC_part, sc.warps, rows, static_cast<T*>(q.gB), static_cast<T*>(q.gC));
    HYDRA_CUDA_LAUNCH_CHECK();
    // gA_log, gD and gdt_bias: sums over the (batch, chunk) partials, in a fixed order.
    const int64_t parts = p.batch * nc;
    column_sum_to(gA_part, parts, p.dim * p.state,
                  GradALogStore<T>{static_cast<T*>(q.gA_log), static_cast<const T*>(p.A_log)}, s);
    HYDRA_CUDA_LAUNCH_CHECK();
    if (q.gD) {
      column_sum(gA_part + sc.part_a, parts, p.dim, static_cast<T*>(q.gD), A(1), s);
      HYDRA_CUDA_LAUNCH_CHECK();
    }
    if (q.gdt_bias) {
      column_sum(gA_part + sc.part_a + sc.part_d, parts, p.dim, static_cast<T*>(q.gdt_bias), A(1),
                 s);
      HYDRA_CUDA_LAUNCH_CHECK();
    }
  });
}

}  // namespace hydra::kernels::cuda
