// CUDA selective scan, backward (the passes: selective_scan_common.cuh).
#include "kernels/cuda/selective_scan_common.cuh"

namespace hydra::kernels::cuda {
namespace {

using namespace ssm;

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

// Scratch of the backward, in accumulate-type elements.
// Blocks per SM the backward asks the compiler to fit: up to 16 states in single precision, 4 (at
// most 128 registers, no spills; H200, toy shapes, forward + backward: 1.95 ms against 2.04 with
// 3 blocks of 168 registers and 1.98 with 5 of 96, which spill); more states, or double precision
// (tests), leave the compiler free.
constexpr int scan_bwd_blocks(int nmax, int acc_bytes) {
  return acc_bytes == 4 && nmax <= 16 ? 4 : 1;
}
// Steps per sub-chunk of the backward's recomputation, whose states sit in shared memory (kSub
// slots of NMAX states for each of kThreads threads) beside the staged inputs (two buffers of
// kSub steps of delta, u, gy and z, and of B and C, and the warps' gB and gC sums): the largest
// power of two within 50 KB when 4 blocks share an SM (64 KB otherwise). Single precision states,
// bf16 inputs: 4 steps at 8 and 16 states, 16 at 1.
constexpr int scan_bwd_sub_steps(int nmax, int acc_bytes, int in_bytes) {
  const int per_step = nmax * kThreads * acc_bytes + 2 * 4 * kThreads * in_bytes +
                       2 * nmax * (2 * in_bytes + acc_bytes) +
                       2 * (kThreads / 32) * nmax * acc_bytes;
  const int budget = (scan_bwd_blocks(nmax, acc_bytes) == 4 ? 50 : 64) * 1024;
  int steps = 1;
  while (2 * steps * per_step <= budget) steps *= 2;
  return steps;
}
constexpr size_t scan_bwd_smem(int nmax, int acc_bytes, int in_bytes) {
  return size_t(scan_bwd_sub_steps(nmax, acc_bytes, in_bytes)) * nmax * kThreads * acc_bytes;
}

struct BwdScratch {
  int64_t hs;              // checkpoints of one batch slice: sub-chunks * NMAX * slice * chunks * D
  int64_t g_in, dsums;     // G entering each chunk [B][chunks][D][N]; summed delta [B][chunks][D]
  int64_t part_bc;         // per-block partials of gB (and of gC)
  int64_t part_a, part_d;  // per-(batch, chunk) partials of gA (and of gD, gdt_bias)
  int64_t blocks, slice;   // channel blocks; batch entries per launch (bounds the scratch)
};

// The checkpoints of one launch stay below this (larger batches run in slices).
constexpr int64_t kStateScratchBytes = int64_t{1} << 30;

BwdScratch scratch_of(const SelectiveScanParams& p) {
  const int64_t blocks = (p.dim + kThreads - 1) / kThreads;
  const int64_t cl = std::min(p.chunk_len, p.len), nc = ssm_num_chunks(p.len, p.chunk_len);
  const int64_t a = p.dtype == DType::kF64 ? 8 : 4, in = dtype_size(p.dtype);
  const int64_t sub =
      scan_bwd_sub_steps(state_bound(p.state), static_cast<int>(a), static_cast<int>(in));
  const int64_t subs = (cl + sub - 1) / sub;
  const int64_t per_batch = subs * state_bound(p.state) * nc * p.dim;
  const int64_t slice =
      std::clamp<int64_t>(kStateScratchBytes / (a * std::max<int64_t>(per_batch, 1)), 1, p.batch);
  const int64_t bcd = p.batch * nc * p.dim;
  return {per_batch * slice, bcd * p.state, bcd,    blocks * p.batch * p.len * p.state,
          bcd * p.state,     bcd,           blocks, slice};
}

// Backward pass 1: each chunk's G from a zero end (into g_in) and its summed delta. The inputs
// come in tiles of S steps from the chunk's end (stage_tile), the next while this one is worked
// on; C is converted to the accumulate type once per tile. Up to 16 states, bounded to 8 blocks
// per SM (64 registers).
template <class T, int NMAX, bool FULL>
__global__ void __launch_bounds__(kThreads, (sizeof(compute_t<T>) == 4 && NMAX <= 16 ? 8 : 1))
    scan_bwd_chunk_kernel(SelectiveScanBwdParams q, int64_t nchunks, compute_t<T>* __restrict g_in,
                          compute_t<T>* __restrict dsums, StageMode mode) {
  using A = compute_t<T>;
  constexpr int S = tile_steps<T>();
  __shared__ __align__(16) T xs[2][3][S][kThreads];  // delta, gy, z
  __shared__ __align__(16) T Cx[2][S][NMAX];
  __shared__ __align__(16) A Cs[S][NMAX];
  const SelectiveScanParams& p = q.fwd;
  const ChunkThread th = chunk_thread(p, 0);
  const int64_t b = th.b, d = th.d, D = p.dim, L = p.len, slot = (b * nchunks + th.c) * D + d;
  const int64_t d0 = d - threadIdx.x;
  const int N = states_of<NMAX, FULL>(p), cols = static_cast<int>(min(int64_t(kThreads), D - d0));
  const bool live = th.live, gate = p.z != nullptr;
  A Ad[NMAX], G[NMAX];
  load_decay_rates<T, NMAX, FULL>(p, d, live, Ad);
#pragma unroll
  for (int n = 0; n < NMAX; ++n) G[n] = 0;
  const A bias = live && p.dt_bias ? load(static_cast<const T*>(p.dt_bias), d) : A(0);
  const int64_t tiles = (th.ce - th.cs + S - 1) / S;
  // Tile i covers [t0, t1), i tiles from the chunk's end.
  auto span = [&](int64_t i, int64_t* t0) {
    const int64_t t1 = th.ce - i * S;
    *t0 = max(th.cs, t1 - S);
    return static_cast<int>(t1 - *t0);
  };
  auto issue = [&](int64_t i) {
    if (i >= tiles) return;
    const int buf = static_cast<int>(i & 1);
    int64_t t0 = 0;
    const int steps = span(i, &t0);
    const int64_t r0 = b * L + t0;
    stage_tile(&xs[buf][0][0][0], kThreads, S,
               static_cast<const T*>(p.delta) + r0 * p.delta_row + d0, p.delta_row, steps, cols,
               mode.channels);
    stage_tile(&xs[buf][1][0][0], kThreads, S, static_cast<const T*>(q.gy) + r0 * D + d0, D, steps,
               cols, mode.channels);
    if (gate)
      stage_tile(&xs[buf][2][0][0], kThreads, S, static_cast<const T*>(p.z) + r0 * p.z_row + d0,
                 p.z_row, steps, cols, mode.channels);
    stage_tile(&Cx[buf][0][0], NMAX, S, static_cast<const T*>(p.C) + r0 * p.C_row, p.C_row, steps,
               N, mode.states);
    cp_async_commit();
  };
  A dsum = 0;
  issue(0);
  for (int64_t i = 0; i < tiles; ++i) {
    const int buf = static_cast<int>(i & 1);
    int64_t t0 = 0;
    const int steps = span(i, &t0);
    cp_async_wait<0>();
    __syncthreads();  // tile i is in; every thread is done with tile i - 1 (its buffer, Cs)
    issue(i + 1);
    for (int e = threadIdx.x; e < steps * N; e += blockDim.x)
      Cs[e / N][e % N] = convert<A>(Cx[buf][e / N][e % N]);
    __syncthreads();
    if (!live) continue;
    const int tx = threadIdx.x;
    for (int s = steps - 1; s >= 0; --s) {
      const A dl = softplus(convert<A>(xs[buf][0][s][tx]) + bias);
      A g = convert<A>(xs[buf][1][s][tx]);
      dsum += dl;
      if (gate) {
        const A zt = convert<A>(xs[buf][2][s][tx]);
        g *= zt * sigmoid(zt);
      }
#pragma unroll
      for (int n = 0; n < NMAX; ++n)
        if (n < N) G[n] = exp2_scaled(dl * Ad[n]) * (G[n] + Cs[s][n] * g);
    }
  }
  if (!live) return;
#pragma unroll
  for (int n = 0; n < NMAX; ++n)
    if (n < N) g_in[slot * N + n] = G[n];
  dsums[slot] = dsum;
}

// Backward pass 3, batch entries b0.. of a slice. A thread walks its chunk's steps backward from
// the G entering it; the states it needs (before each step; the one after it is the previous
// step's, kept in registers) are recomputed a sub-chunk of kSub steps at a time into shared memory,
// from checkpoints: a first pass over the chunk stores the state entering each sub-chunk in the
// scratch ([sub-chunk][state pack][thread column]). Shared memory is the thread's own
// ([slot][state][thread]: no bank conflicts, no barriers); the scratch holds 1 state per kSub
// steps instead of every step's (toy shapes: 0.4 GB instead of 1.6 GB written and read again).
// One kernel of about 200 lines on purpose: the checkpoint pass, the recomputation and the
// backward walk share the thread's states in registers and its shared memory; its lambdas
// (issue, stage, recompute) name the parts.
template <class T, int NMAX, bool FULL>
__global__ void __launch_bounds__(kThreads, (scan_bwd_blocks(NMAX, sizeof(compute_t<T>))))
    scan_bwd_kernel(SelectiveScanBwdParams q, int64_t nchunks, int64_t b0, BwdScratch sc,
                    compute_t<T>* __restrict ws, StageMode mode) {
  using A = compute_t<T>;
  constexpr int kSub = scan_bwd_sub_steps(NMAX, sizeof(A), sizeof(T));
  extern __shared__ unsigned char smem_raw[];
  A* hsm = reinterpret_cast<A*>(
      smem_raw);  // [kSub][NMAX][kThreads]: the state before each step of the sub-chunk
  auto at = [&](int slot, int n) -> A& { return hsm[(slot * NMAX + n) * kThreads + threadIdx.x]; };
  // The sub-chunks' inputs as staged (two buffers: the next sub-chunk's arrive during this one's
  // work), and this sub-chunk's B and C in the accumulate type (one 16-byte load per four states).
  enum { kDelta, kU, kGy, kZ };
  __shared__ __align__(16) T xs[2][4][kSub][kThreads];
  __shared__ __align__(16) T Bx[2][kSub][NMAX];
  __shared__ __align__(16) T Cx[2][kSub][NMAX];
  __shared__ __align__(16) A Bt[kSub][NMAX];
  __shared__ __align__(16) A Ct[kSub][NMAX];
  // gB and gC of the sub-chunk's steps, per warp (its channels' sums), added over the block's warps
  // after the sub-chunk: one partial per block instead of per warp goes to the scratch.
  constexpr int kWarps = kThreads / 32;
  __shared__ A red[kSub][2][kWarps][NMAX];
  const SelectiveScanParams& p = q.fwd;
  const ChunkThread th = chunk_thread(p, b0);
  const int64_t b = th.b, d = th.d, D = p.dim, L = p.len, cs = th.cs, ce = th.ce;
  const int64_t slot = (b * nchunks + th.c) * D + d, d0 = d - threadIdx.x;
  // The thread's column of the checkpoint scratch, and the scratch's row length.
  const int64_t col = (int64_t(blockIdx.z) * nchunks + th.c) * D + d, cols = sc.slice * nchunks * D;
  const int N = states_of<NMAX, FULL>(p), lane = threadIdx.x & 31, tx = threadIdx.x;
  const int width = static_cast<int>(min(int64_t(kThreads), D - d0));
  const int warp = tx >> 5;
  const bool live = th.live, gate = p.z != nullptr;
  // The checkpoints: the state entering sub-chunk k as [k][NMAX / V][col] packs of V states (16
  // bytes where the bound allows): a thread stores and loads its NMAX states in NMAX / V accesses,
  // a warp's coalesced, from one 64-bit address a sub-chunk (a 64-bit address per state cost about
  // 150 integer instructions a sub-chunk, 4% of the kernel's time; docs/PERF.md, session 38).
  constexpr int V = sizeof(A) == 4 && NMAX % 4 == 0 ? 4 : sizeof(A) == 8 && NMAX % 2 == 0 ? 2 : 1;
  struct alignas(V * sizeof(A)) Pack {
    A v[V];
  };
  Pack* ckpt = reinterpret_cast<Pack*>(ws);
  auto ck_at = [&](int64_t k) { return ckpt + k * (NMAX / V) * cols + col; };
  A* g_in = ws + sc.hs;
  A* gB_part = g_in + sc.g_in + sc.dsums;
  A* gC_part = gB_part + sc.part_bc;
  A* gA_part = gC_part + sc.part_bc;
  A* gD_part = gA_part + sc.part_a;
  A* gbias_part = gD_part + sc.part_d;
  const A* chunk_states = static_cast<const A*>(p.chunk_states);

  A Ad[NMAX], G[NMAX], gA[NMAX];  // Ad in base 2 (load_decay_rates)
  load_decay_rates<T, NMAX, FULL>(p, d, live, Ad);
#pragma unroll
  for (int n = 0; n < NMAX; ++n) {
    G[n] = live && n < N ? g_in[slot * N + n] : A(0);
    gA[n] = 0;
  }
  const A bias = live && p.dt_bias ? load(static_cast<const T*>(p.dt_bias), d) : A(0);
  const A Dd = live && p.D ? load(static_cast<const T*>(p.D), d) : A(0);
  A gD = 0, gbias = 0;
  // The sub-chunks' tiles come in a fixed sequence: the checkpoint pass's sub-chunks 0 .. subs - 2
  // (delta, u, B), then the backward's subs - 1 .. 0 (also gy, z and C). Tile i + 1 is issued as
  // soon as tile i is in shared memory, so that its copy overlaps a sub-chunk of work. Threads past
  // the channels get zeros (stage_tile): all their values stay zero and finite, so the loops below
  // need no per-state branch.
  const int64_t subs = (ce - cs + kSub - 1) / kSub, tiles = 2 * subs - 1;
  auto tile_sub = [&](int64_t i) { return i < subs - 1 ? i : 2 * subs - 2 - i; };
  auto issue = [&](int64_t i) {
    if (i >= tiles) return;
    const int buf = static_cast<int>(i & 1);
    const int64_t t0 = cs + tile_sub(i) * kSub, r0 = b * L + t0;
    const int steps = static_cast<int>(min(ce, t0 + kSub) - t0);
    const bool walk = i >= subs - 1;
    stage_tile(&xs[buf][kDelta][0][0], kThreads, kSub,
               static_cast<const T*>(p.delta) + r0 * p.delta_row + d0, p.delta_row, steps, width,
               mode.channels);
    stage_tile(&xs[buf][kU][0][0], kThreads, kSub, static_cast<const T*>(p.u) + r0 * p.u_row + d0,
               p.u_row, steps, width, mode.channels);
    stage_tile(&Bx[buf][0][0], NMAX, kSub, static_cast<const T*>(p.B) + r0 * p.B_row, p.B_row,
               steps, N, mode.states);
    if (walk) {
      stage_tile(&xs[buf][kGy][0][0], kThreads, kSub, static_cast<const T*>(q.gy) + r0 * D + d0, D,
                 steps, width, mode.channels);
      if (gate)
        stage_tile(&xs[buf][kZ][0][0], kThreads, kSub,
                   static_cast<const T*>(p.z) + r0 * p.z_row + d0, p.z_row, steps, width,
                   mode.channels);
      stage_tile(&Cx[buf][0][0], NMAX, kSub, static_cast<const T*>(p.C) + r0 * p.C_row, p.C_row,
                 steps, N, mode.states);
    }
    cp_async_commit();
  };
  int cur = 0;                   // the buffer of the tile being worked on
  auto stage = [&](int64_t i) {  // waits for tile i, issues tile i + 1
    const int64_t t0 = cs + tile_sub(i) * kSub;
    const int steps = static_cast<int>(min(ce, t0 + kSub) - t0);
    cur = static_cast<int>(i & 1);
    cp_async_wait<0>();
    __syncthreads();  // tile i is in; every thread is done with tile i - 1 (its buffer, Bt, Ct)
    issue(i + 1);
    for (int e = threadIdx.x; e < steps * N; e += blockDim.x) {
      Bt[e / N][e % N] = convert<A>(Bx[cur][e / N][e % N]);
      if (i >= subs - 1) Ct[e / N][e % N] = convert<A>(Cx[cur][e / N][e % N]);
    }
    __syncthreads();
  };
  auto input = [&](int which, int sidx) { return convert<A>(xs[cur][which][sidx][tx]); };
  // Runs the recurrence from h over the staged steps [0, steps), calling visit(s, h) with the
  // state before step s.
  auto recompute = [&](A(&h)[NMAX], int steps, auto&& visit) {
    for (int sidx = 0; sidx < steps; ++sidx) {
      const A dl = softplus(input(kDelta, sidx) + bias), dlu = dl * input(kU, sidx);
      visit(sidx, h);
#pragma unroll
      for (int n = 0; n < NMAX; ++n)
        if (n < N) h[n] = exp2_scaled(dl * Ad[n]) * h[n] + dlu * Bt[sidx][n];
    }
  };
  issue(0);
  A h[NMAX];
  // The checkpoints: the state entering each sub-chunk (the last sub-chunk's end is not needed).
#pragma unroll
  for (int n = 0; n < NMAX; ++n) h[n] = live && n < N ? chunk_states[slot * N + n] : A(0);
  for (int64_t k = 0; k < subs; ++k) {
    const int64_t t0 = cs + k * kSub, t1 = min(ce, t0 + kSub);
    if (live) {
      Pack* ck = ck_at(k);
#pragma unroll
      for (int j = 0; j < NMAX / V; ++j) {
        Pack pk;
#pragma unroll
        for (int i = 0; i < V; ++i) pk.v[i] = h[j * V + i];
        ck[j * cols] = pk;
      }
    }
    if (k + 1 == subs) break;
    stage(k);
    recompute(h, static_cast<int>(t1 - t0), [](int, const A(&)[NMAX]) {});
  }
  for (int64_t k = subs - 1; k >= 0; --k) {
    const int64_t t0 = cs + k * kSub, t1 = min(ce, t0 + kSub);
    stage(2 * subs - 2 - k);
    // at(s) = the state before step t0 + s; h ends as the state after the sub-chunk's last step.
    const Pack* ck = ck_at(k);
#pragma unroll
    for (int j = 0; j < NMAX / V; ++j) {
      const Pack pk = live ? ck[j * cols] : Pack{};
#pragma unroll
      for (int i = 0; i < V; ++i) h[j * V + i] = pk.v[i];
    }
    recompute(h, static_cast<int>(t1 - t0), [&](int sidx, const A(&hv)[NMAX]) {
#pragma unroll
      for (int n = 0; n < NMAX; ++n) at(sidx, n) = hv[n];
    });
    for (int64_t t = t1 - 1; t >= t0; --t) {
      const int64_t r = b * L + t;
      const int sidx = static_cast<int>(t - t0);
      A g = input(kGy, sidx), dsig = 0;
      const A ut = input(kU, sidx);
      const A dl = softplus_and_sigmoid(input(kDelta, sidx) + bias, &dsig);
      if (gate) {
        const A zt = input(kZ, sidx);
        A y_pre = Dd * ut;  // h: the state after this step
#pragma unroll
        for (int n = 0; n < NMAX; ++n)
          if (n < N) y_pre += Ct[sidx][n] * h[n];
        const A sg = sigmoid(zt);
        if (live)
          static_cast<T*>(q.gz)[r * D + d] = convert<T>(g * y_pre * sg * (A(1) + zt * (A(1) - sg)));
        g *= zt * sg;
      }
      gD += g * ut;
      // Per state, with G' = G + C g and X = G' a h_prev: gB = G' dl u, gC = g h, gA += dl X,
      // and the state's shares of gu and gdelta, summed over states first (GB = sum G' B,
      // XA = sum A2 X): gu = D g + dl GB, gdelta_pre = u GB + ln2 XA.
      const A dlu = dl * ut;
      A GB = 0, XA = 0;
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
          if (n < N) {
            const A Bn = Bt[sidx][n], Cn = Ct[sidx][n];
            const A an = exp2_scaled(dl * Ad[n]), Gn = G[n] + Cn * g;
            const A hp = at(sidx, n), X = Gn * an * hp;  // hp: the state before this step
            gc[j] = g * h[n];
            h[n] = hp;  // the previous step's state after it
            gb[j] = Gn * dlu;
            GB += Gn * Bn;
            XA += Ad[n] * X;
            gA[n] += dl * X;
            G[n] = an * Gn;
          }
        }
        if (n0 >= N) continue;  // (uniform)
        warp_transpose_sum<kGroup, 16>(gb, lane);
        warp_transpose_sum<kGroup, 16>(gc, lane);
        const int n = n0 + lane / kShare;
        if (lane % kShare == 0 && n < N) {
          red[sidx][0][warp][n] = gb[0];
          red[sidx][1][warp][n] = gc[0];
        }
      }
      if (live) {
        static_cast<T*>(q.gu)[r * D + d] = convert<T>(Dd * g + dl * GB);
        const A graw = (ut * GB + A(kLn2) * XA) * dsig;
        static_cast<T*>(q.gdelta)[r * D + d] = convert<T>(graw);
        gbias += graw;
      }
    }
    // The block's gB and gC of the sub-chunk's steps: the warps' sums in warp order. (The next
    // sub-chunk's stage() waits for every thread before red is written again.)
    __syncthreads();
    const int steps = static_cast<int>(t1 - t0);
    for (int e = tx; e < steps * 2 * N; e += kThreads) {
      const int sidx = e / (2 * N), which = (e / N) % 2, n = e % N;
      A sum = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += red[sidx][which][w][n];
      A* part = which == 0 ? gB_part : gC_part;
      part[(int64_t(blockIdx.x) * p.batch * L + b * L + t0 + sidx) * N + n] = sum;
    }
  }
  if (!live) return;
#pragma unroll
  for (int n = 0; n < NMAX; ++n)
    if (n < N) gA_part[slot * N + n] = gA[n];
  gD_part[slot] = gD;
  gbias_part[slot] = gbias;
}

// gB and gC: the sum over channel blocks, in block order.
template <class T>
__global__ void scan_bc_finish_kernel(const compute_t<T>* __restrict gB_part,
                                      const compute_t<T>* __restrict gC_part, int64_t parts,
                                      int64_t total, T* __restrict gB, T* __restrict gC) {
  using A = compute_t<T>;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    A sb = 0, sc = 0;
    for (int64_t w = 0; w < parts; ++w) {
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

}  // namespace

size_t selective_scan_bwd_workspace(const SelectiveScanBwdParams& q) {
  const BwdScratch sc = scratch_of(q.fwd);
  const size_t a = q.fwd.dtype == DType::kF64 ? 8 : 4;
  return a * static_cast<size_t>(sc.hs + sc.g_in + sc.dsums + 2 * sc.part_bc + sc.part_a +
                                 2 * sc.part_d) +
         256;
}

void selective_scan_bwd(const SelectiveScanBwdParams& q) {
  const SelectiveScanParams& p = q.fwd;
  if (p.batch * p.dim * p.len == 0) return;
  check_grid(p);
  HYDRA_CHECK(p.chunk_states != nullptr)
      << "selective_scan_bwd needs the chunk states saved by the forward";
  HYDRA_CHECK(q.workspace != nullptr) << "selective_scan_bwd: workspace required";
  const BwdScratch sc = scratch_of(p);
  const ScanGrids grids = scan_grids(p);
  const int64_t nc = grids.chunks;
  const unsigned dim_blocks = grids.dim_blocks;
  const dim3 chunk_grid = grids.chunk, carry_grid = grids.carry;
  cudaStream_t s = as_stream(p.stream);
  dispatch_float(p.dtype, "selective_scan_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = compute_t<T>;
    A* ws = static_cast<A*>(q.workspace);
    A* g_in = ws + sc.hs;
    A* dsums = g_in + sc.g_in;
    dispatch_state(p.state, [&](auto nmax, auto full) {
      constexpr int NMAX = decltype(nmax)::value;
      constexpr bool FULL = decltype(full)::value;
      const StageMode mode = stage_mode<T, NMAX>(p, q.gy);
      scan_bwd_chunk_kernel<T, NMAX, FULL>
          <<<chunk_grid, kThreads, 0, s>>>(q, nc, g_in, dsums, mode);
      HYDRA_CUDA_LAUNCH_CHECK();
      scan_carry_kernel<T, true><<<carry_grid, kThreads, 0, s>>>(
          static_cast<const T*>(p.A_log), p.dim, p.state, nc, g_in, dsums,
          static_cast<const A*>(q.g_hlast), static_cast<A*>(q.gh0));
      HYDRA_CUDA_LAUNCH_CHECK();
      for (int64_t b0 = 0; b0 < p.batch; b0 += sc.slice) {
        const dim3 grid(dim_blocks, static_cast<unsigned>(nc),
                        static_cast<unsigned>(std::min(sc.slice, p.batch - b0)));
        constexpr size_t smem = scan_bwd_smem(NMAX, sizeof(A), sizeof(T));
        allow_dynamic_smem(scan_bwd_kernel<T, NMAX, FULL>, smem, "selective_scan_backward");
        scan_bwd_kernel<T, NMAX, FULL><<<grid, kThreads, smem, s>>>(q, nc, b0, sc, ws, mode);
        HYDRA_CUDA_LAUNCH_CHECK();
      }
    });
    const A* gB_part = dsums + sc.dsums;
    const A* gC_part = gB_part + sc.part_bc;
    const A* gA_part = gC_part + sc.part_bc;
    const int64_t rows = p.batch * p.len * p.state;
    scan_bc_finish_kernel<T><<<blocks_for(rows, 256), 256, 0, s>>>(
        gB_part, gC_part, sc.blocks, rows, static_cast<T*>(q.gB), static_cast<T*>(q.gC));
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
