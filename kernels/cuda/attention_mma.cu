// Sparse attention on tensor cores for bf16, in the manner of FlashAttention-2: each warp owns 16
// rows (queries in the forward and dQ, keys in dK/dV) and keeps its scores, probabilities and
// output sums in registers, as mma.sync m16n8k16 fragments (bf16 inputs, fp32 accumulation). The
// walked rows (keys and values, or queries and output gradients) go through shared memory in
// double-buffered tiles loaded with cp.async while the previous tile is computed; fragments come
// from shared memory with ldmatrix. A tile's probabilities become the next product's A operand
// without leaving registers.
//
// The walks and the pattern are those of attention_common.cuh; with a window and global positions
// the global rows get blocks of their own (OwnRows). The pattern is tested element by element only
// in tiles that straddle its edges (the diagonal, the window's far edge, partial tiles). Softmax
// runs in base 2 (scores times scale * log2(e)); sums run in a fixed order, so results are
// bit-reproducible. Head sizes: multiples of 16 up to 128, compiled for 32, 64 and 128 columns.
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kernels/attention.h"
#include "kernels/cuda/async_copy.cuh"
#include "kernels/cuda/attention_common.cuh"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/rows.cuh"

namespace hydra::kernels::cuda {
namespace {

constexpr int kMmaThreads = 128;  // 4 warps
constexpr int kOwnRows = 64;      // rows a block owns: 16 per warp
// A block of global rows walks at most this many rows (keys or queries) when its walk is longer
// than two of them: the rest go to more blocks (segments), whose partial results are combined after
// the kernel.
constexpr int kSegRows = 1024;
constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;

// ---- PTX wrappers
// --------------------------------------------------------------------------------

// Four 8 x 8 bf16 matrices; lanes 8m..8m+7 give the row addresses of matrix m.
__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], const __nv_bfloat16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(unsigned (&r)[4], const __nv_bfloat16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
// d += a b for a 16 x 16 (row-major) and b 16 x 8 (column-major), bf16 in, fp32 out.
__device__ __forceinline__ void mma16816(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                         unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const unsigned*>(&v);
}

// ---- Fragments
// ----------------------------------------------------------------------------------- Lane l holds,
// of a 16 x 8 accumulator block, rows l/4 and l/4 + 8 and columns 2 (l%4) + {0, 1}: c[0], c[1] on
// the first row, c[2], c[3] on the second. Tiles are bf16 [rows][kPitch] in shared memory; 16 bytes
// of padding per row keep the 8 rows of an ldmatrix on distinct banks.

template <int D>
struct Geo {
  static constexpr int kPitch = D + 8;
  static constexpr int kWalk = D > 64 ? 32 : 64;  // walked rows per backward step (registers)
  static constexpr int kFwdWalk = 64;             // keys per forward step
};

// A operand (16 x 16) from rows r0.. and columns c0.. of a row-major tile.
template <int kPitch>
__device__ __forceinline__ void load_a(unsigned (&a)[4], const __nv_bfloat16* tile, int r0,
                                       int c0) {
  const int lane = threadIdx.x & 31;
  ldsm_x4(a, tile + (r0 + (lane & 15)) * kPitch + c0 + (lane >> 4) * 8);
}
// B operands of X Y^T for two 8-column blocks: Y's rows n0..n0+15 (the output columns), Y's columns
// c0..c0+15 (the reduced index). b[0], b[1] for rows n0..n0+7; b[2], b[3] for n0+8..n0+15.
template <int kPitch>
__device__ __forceinline__ void load_b_xyt(unsigned (&b)[4], const __nv_bfloat16* tile, int n0,
                                           int c0) {
  const int lane = threadIdx.x & 31;
  ldsm_x4(b, tile + (n0 + (lane & 7) + (lane >> 4) * 8) * kPitch + c0 + ((lane >> 3) & 1) * 8);
}
// B operands of A Y for two 8-column blocks of Y: Y's rows k0..k0+15 (the reduced index), columns
// n0..n0+15. b[0], b[1] for columns n0..n0+7; b[2], b[3] for n0+8..n0+15.
template <int kPitch>
__device__ __forceinline__ void load_b_ay(unsigned (&b)[4], const __nv_bfloat16* tile, int k0,
                                          int n0) {
  const int lane = threadIdx.x & 31;
  ldsm_x4_trans(b,
                tile + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * kPitch + n0 + (lane >> 4) * 8);
}

// acc[kN / 8] (16 x kN) = X Y^T over D columns (zeros past the head size): X's 16 rows from x_row0
// of tile X, Y's kN rows.
template <int D, int kN>
__device__ __forceinline__ void mma_xyt(float (&acc)[kN / 8][4], const __nv_bfloat16* X, int x_row0,
                                        const __nv_bfloat16* Y) {
  constexpr int P = Geo<D>::kPitch;
#pragma unroll
  for (int n = 0; n < kN / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    unsigned a[4];
    load_a<P>(a, X, x_row0, kk * 16);
#pragma unroll
    for (int np = 0; np < kN / 16; ++np) {
      unsigned b[4];
      load_b_xyt<P>(b, Y, np * 16, kk * 16);
      mma16816(acc[2 * np], a, b[0], b[1]);
      mma16816(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// out[D / 8] (16 x D) += A Y with A (16 x kN) given as accumulator-layout values `pa` (rounded to
// bf16 here) and Y a [kN][D] tile.
template <int D, int kN>
__device__ __forceinline__ void mma_ay(float (&out)[D / 8][4], const float (&pa)[kN / 8][4],
                                       const __nv_bfloat16* Y) {
  constexpr int P = Geo<D>::kPitch;
#pragma unroll
  for (int kt = 0; kt < kN / 16; ++kt) {
    const unsigned a[4] = {pack_bf16(pa[2 * kt][0], pa[2 * kt][1]),
                           pack_bf16(pa[2 * kt][2], pa[2 * kt][3]),
                           pack_bf16(pa[2 * kt + 1][0], pa[2 * kt + 1][1]),
                           pack_bf16(pa[2 * kt + 1][2], pa[2 * kt + 1][3])};
#pragma unroll
    for (int np = 0; np < D / 16; ++np) {
      unsigned b[4];
      load_b_ay<P>(b, Y, kt * 16, np * 16);
      mma16816(out[2 * np], a, b[0], b[1]);
      mma16816(out[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// Rows of one (batch, head) of a bf16 tensor: row r starts at base + r * stride.
struct RowSrc {
  const bf16* base;
  int64_t stride;
};
// This thread's share of staging a tile of D columns: 16-byte chunk `col` (in elements) of rows r0,
// r0 + kStep, ...; chunks past the head size are zero-filled, so products may run over all D
// columns.
template <int D>
struct StageSlot {
  static constexpr int kChunks = D / 8, kStep = kMmaThreads / kChunks;
  int r0, col;
  bool live;
  __device__ explicit StageSlot(int dh)
      : r0(threadIdx.x / kChunks),
        col((threadIdx.x % kChunks) * 8),
        live((threadIdx.x % kChunks) * 8 < dh) {}
};
// Rows idx(r) (r < kRows; negative: zeros) of one or two sources into tiles [kRows][kPitch] with
// 16-byte cp.async; the row index is computed once for both.
template <int kRows, int kPitch, int D, class Idx>
__device__ __forceinline__ void stage_rows(const StageSlot<D>& sl, Idx idx, __nv_bfloat16* t0,
                                           const RowSrc& s0, __nv_bfloat16* t1 = nullptr,
                                           const RowSrc& s1 = RowSrc{}) {
  static_assert(kRows % StageSlot<D>::kStep == 0);
#pragma unroll
  for (int k = 0; k < kRows / StageSlot<D>::kStep; ++k) {
    const int r = sl.r0 + k * StageSlot<D>::kStep;
    const int j = idx(r);
    const bool valid = sl.live && j >= 0;
    const int off = r * kPitch + sl.col;
    cp_async16(t0 + off, valid ? s0.base + j * s0.stride + sl.col : s0.base, valid);
    if (t1) cp_async16(t1 + off, valid ? s1.base + j * s1.stride + sl.col : s1.base, valid);
  }
}

// A walk (attention_common.cuh's Runs) in 32 bits: lengths are below 2^31 (check_sizes).
struct Walk {
  int start0, step0, n0, start1, step1, count;
  __device__ explicit Walk(const Runs& r)
      : start0(static_cast<int>(r.start0)),
        step0(static_cast<int>(r.step0)),
        n0(static_cast<int>(r.n0)),
        start1(static_cast<int>(r.start1)),
        step1(static_cast<int>(r.step1)),
        count(static_cast<int>(r.count())) {}
  // Entry o, or -1 past the end.
  __device__ int at(int o) const {
    return o >= count ? -1 : o < n0 ? start0 + o * step0 : start1 + (o - n0) * step1;
  }
};

// A lane's two rows for the pattern test: d = tq - tk is base[r] - j for a key column j (rows are
// queries) or base[r] + i for a query column i (rows are keys); a row past the end has a base so
// low that it sees nothing.
struct RowInfo {
  int64_t base[2];
  bool glob[2];
};
constexpr int64_t kNoRow = INT64_MIN / 4;
// Which of this lane's four pairs of accumulator block n are visible (bit c for element c): the
// rows in ri, the columns col, col + 1 of the tile's index list `idx` (negative: none) and global
// flags `glob`. Two shared loads, no branches.
template <bool kColIsKey>
__device__ __forceinline__ unsigned visible_bits(const Pattern& pat, const RowInfo& ri,
                                                 const int* idx, const unsigned char* glob,
                                                 int col) {
  const int2 j = *reinterpret_cast<const int2*>(idx + col);
  const uchar2 g = *reinterpret_cast<const uchar2*>(glob + col);
  unsigned bits = 0;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const int r = c >> 1, jc = (c & 1) ? j.y : j.x;
    const int64_t d = kColIsKey ? ri.base[r] - jc : ri.base[r] + jc;
    const bool gc = (c & 1) ? g.y : g.x;
    const bool vis =
        (jc >= 0) & (d >= 0) & ((pat.window <= 0) | (d < pat.window) | ri.glob[r] | gc);
    bits |= static_cast<unsigned>(vis) << c;
  }
  return bits;
}

// A lane's two rows (OwnRows::lane_row) as queries (the forward and dQ) or as keys (dK/dV).
__device__ __forceinline__ RowInfo query_rows(const Pattern& pat, const int64_t (&rows)[2]) {
  RowInfo ri;
  for (int r = 0; r < 2; ++r) {
    const int64_t i = rows[r];
    ri.base[r] = i >= 0 ? pat.q_pos0 + i - pat.k_pos0 : kNoRow;
    ri.glob[r] = i >= 0 && pat.global(pat.q_pos0 + i);
  }
  return ri;
}
__device__ __forceinline__ RowInfo key_rows(const Pattern& pat, const int64_t (&rows)[2]) {
  RowInfo ri;
  for (int r = 0; r < 2; ++r) {
    const int64_t j = rows[r];
    ri.base[r] = j >= 0 ? pat.q_pos0 - pat.k_pos0 - j : kNoRow;
    ri.glob[r] = j >= 0 && pat.global(pat.k_pos0 + j);
  }
  return ri;
}

// Stages key tile t of a walk (the forward's and dQ's) into buffer buf of a layout with k, v, kidx
// and kglob: the keys' rows of K and V, their indices and global flags.
template <int W, int P, int D, class Smem>
__device__ __forceinline__ void stage_key_tile(const Smem& sm, const Walk& keys, const Pattern& pat,
                                               const StageSlot<D>& slot, const RowSrc& k_src,
                                               const RowSrc& v_src, int t, int buf) {
  auto idx = [&](int r) { return keys.at(t * W + r); };
  if (threadIdx.x < W) {
    const int j = idx(threadIdx.x);
    sm.kidx[buf * W + threadIdx.x] = j;
    sm.kglob[buf * W + threadIdx.x] = j >= 0 && pat.global(pat.k_pos0 + j);
  }
  stage_rows<W, P>(slot, idx, sm.k + buf * W * P, k_src, sm.v + buf * W * P, v_src);
}

// Whether every (query, key) pair of a tile is visible: queries tq_min..tq_max, keys tk_min..tk_max
// (all present), `all_global` when every key or every query of the tile is a global position.
__device__ __forceinline__ bool tile_all_visible(const Pattern& pat, int64_t tq_min, int64_t tq_max,
                                                 int64_t tk_min, int64_t tk_max, bool all_global) {
  return tk_max <= tq_min && (pat.window <= 0 || tq_max - tk_min < pat.window || all_global);
}

// A block's place: its (batch, head), the rows it owns (queries in the forward and dQ, keys in
// dK/dV: row(r), r < count) and the thread's lane, warp and lane-in-quad.
//   Unsplit: (batch, head) from blockIdx.y and kOwnRows consecutive rows of `len` from blockIdx.x.
//   Split (a window and global positions; the host's split_global): the grid's first blocks, in
//   linear order, own the global rows, kOwnRows of them `stride` apart, and walk every row the
//   causal order lets them see; the others own consecutive rows and walk only the window band and
//   the global positions, and leave their global rows to the first blocks. No block then walks a
//   whole sequence for the sake of one global row among its 64, and the long walks start first.
struct OwnRows {
  int64_t b = 0, h = 0;
  int first = 0, count = 0, step = 1;  // lengths are below 2^31 (check_sizes)
  bool global_rows = false, skip_global = false;
  // Blocks of global rows whose walks are cut into `segs` segments (Segments): this block's
  // segment, and where its rows' partial results go ([segs][batch * heads * global rows][...]).
  int seg = 0, segs = 1;
  int64_t part_first = 0;
  int lane, warp, tg;
  __device__ OwnRows(const Pattern& pat, int64_t heads, int64_t len, int64_t pos0, bool split,
                     int n_segs)
      : lane(static_cast<int>(threadIdx.x & 31)),
        warp(static_cast<int>(threadIdx.x >> 5)),
        tg(lane & 3) {
    int64_t bh = blockIdx.y, tile = blockIdx.x;
    if (split) {
      const int64_t n_glob = count_global(pos0, len, pat.stride),
                    glob_tiles = (n_glob + kOwnRows - 1) / kOwnRows,
                    lin = blockIdx.x + int64_t(blockIdx.y) * gridDim.x;
      if (lin < glob_tiles * n_segs * gridDim.y) {
        bh = lin / (glob_tiles * n_segs);
        tile = lin % (glob_tiles * n_segs) / n_segs;
        segs = n_segs;
        seg = static_cast<int>(lin % n_segs);
        part_first = (seg * int64_t(gridDim.y) + bh) * n_glob + tile * kOwnRows;
        global_rows = true;
        step = static_cast<int>(pat.stride);
        first = static_cast<int>(first_global_index(pos0, pat.stride) + tile * kOwnRows * step);
        count = static_cast<int>(min(int64_t(kOwnRows), n_glob - tile * kOwnRows));
      } else {
        const int64_t band_tiles = gridDim.x - glob_tiles * n_segs,
                      l = lin - glob_tiles * n_segs * gridDim.y;
        bh = l / band_tiles;
        tile = l % band_tiles;
        skip_global = true;
      }
    }
    if (!global_rows) {
      first = static_cast<int>(tile * kOwnRows);
      count = static_cast<int>(min(int64_t(kOwnRows), len - first));
    }
    b = bh / heads;
    h = bh % heads;
  }
  __device__ int row(int r) const { return first + r * step; }
  __device__ int last() const { return row(count - 1); }
  // This lane's rows of the warp's 16 (k = 0, 1: 8 apart), or -1 past the block's rows.
  __device__ int64_t lane_row(int k) const {
    const int r = warp * 16 + (lane >> 2) + 8 * k;
    return r < count ? row(r) : -1;
  }
  __device__ WalkMode walk() const {
    return global_rows ? WalkMode::kFull : skip_global ? WalkMode::kBand : WalkMode::kAuto;
  }
  // Whether this block writes its row i (a lane_row) at position pos0 + i.
  __device__ bool writes(const Pattern& pat, int64_t i, int64_t pos0) const {
    return i >= 0 && !(skip_global && pat.global(pos0 + i));
  }
  // Row index r for the staging of its rows (-1: none).
  __device__ int stage_index(int r) const { return r < count ? row(r) : -1; }
  // Whether the rows' results are a segment's partials, and the k-th lane row's place among them.
  __device__ bool partial() const { return segs > 1; }
  __device__ int64_t part_row(int k) const { return part_first + warp * 16 + (lane >> 2) + 8 * k; }
  // The tiles [t0, t1) of a walk of `tiles` tiles of W rows that this block takes.
  template <int W>
  __device__ int2 tile_range(int tiles) const {
    if (!partial()) return make_int2(0, tiles);
    constexpr int kPer = kSegRows / W;
    return make_int2(min(tiles, seg * kPer), min(tiles, (seg + 1) * kPer));
  }
};

// The blocks along x for `len` rows at pos0: a tile of kOwnRows each, and with the split as many
// more as the global rows need, times their segments.
unsigned own_tiles(int64_t len, int64_t pos0, int64_t stride, bool split, int segs) {
  const int64_t band = (len + kOwnRows - 1) / kOwnRows;
  return static_cast<unsigned>(
      band + (split ? (count_global(pos0, len, stride) + kOwnRows - 1) / kOwnRows * segs : 0));
}

// Where the segments of the blocks of global rows leave their partial rows (fp32; segs > 1):
// part (and part2: dV) [segs][batch * heads * global rows][head_dim], part_lse (the forward)
// [segs][batch * heads * global rows].
struct Segments {
  int segs = 1;
  float* part = nullptr;
  float* part2 = nullptr;
  float* part_lse = nullptr;
};

// Whether key tile o0.. of a walk is whole and every pair of it with the block's kOwnRows queries
// is visible (the forward's and dQ's walks; keys ascend along a walk).
template <int W>
__device__ __forceinline__ bool key_tile_all_visible(const Pattern& pat, const Walk& keys, int o0,
                                                     const OwnRows& own) {
  return own.count == kOwnRows && o0 + W <= keys.count &&
         tile_all_visible(pat, pat.q_pos0 + own.first, pat.q_pos0 + own.last(),
                          pat.k_pos0 + keys.at(o0), pat.k_pos0 + keys.at(o0 + W - 1),
                          o0 + W <= keys.n0 || own.global_rows);
}
// The same for query tile o0.. of a dK/dV walk and the block's kOwnRows keys.
template <int W>
__device__ __forceinline__ bool query_tile_all_visible(const Pattern& pat, const Walk& queries,
                                                       int o0, const OwnRows& own) {
  return own.count == kOwnRows && o0 + W <= queries.count &&
         tile_all_visible(pat, pat.q_pos0 + queries.at(o0), pat.q_pos0 + queries.at(o0 + W - 1),
                          pat.k_pos0 + own.first, pat.k_pos0 + own.last(),
                          o0 >= queries.n0 || own.global_rows);
}

// Double-buffered tiles: stages tile t + 1, if any, into the other buffer, then waits for tile t.
template <class Stage>
__device__ __forceinline__ void next_tile(int t, int tiles, Stage&& stage) {
  if (t + 1 < tiles) stage(t + 1, (t & 1) ^ 1);
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();
}

// Two adjacent columns of a row: bf16 (the results) or fp32 (a segment's partial rows).
__device__ __forceinline__ void store_pair(bf16* dst, float lo, float hi) {
  *reinterpret_cast<unsigned*>(dst) = pack_bf16(lo, hi);
}
__device__ __forceinline__ void store_pair(float* dst, float lo, float hi) {
  *reinterpret_cast<float2*>(dst) = make_float2(lo, hi);
}

// This lane's part of row r (0: lane_row, 1: lane_row + 8) of a 16 x D accumulator, times scale,
// into dst (the row's first column); columns from dh on are padding and are not written.
template <int D, class T>
__device__ __forceinline__ void store_row(T* dst, const float (&acc)[D / 8][4], int r, float scale,
                                          int dh, int tg) {
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    if (n * 8 >= dh) break;
    store_pair(dst + n * 8 + tg * 2, acc[n][2 * r] * scale, acc[n][2 * r + 1] * scale);
  }
}

// ---- Forward ------------------------------------------------------------------------------------

template <int D>
struct FwdLayout {
  static constexpr int P = Geo<D>::kPitch, W = Geo<D>::kFwdWalk;
  __nv_bfloat16 *q, *k, *v;  // [kOwnRows][P], [2][W][P], [2][W][P]
  int* kidx;                 // [2][W]: the keys (-1: none)
  unsigned char* kglob;      // [2][W]: whether each is a global position
  __host__ __device__ explicit FwdLayout(unsigned char* base) {
    q = reinterpret_cast<__nv_bfloat16*>(base);
    k = q + kOwnRows * P;
    v = k + 2 * W * P;
    kidx = reinterpret_cast<int*>(v + 2 * W * P);
    kglob = reinterpret_cast<unsigned char*>(kidx + 2 * W);
  }
  static constexpr size_t bytes() {
    return sizeof(__nv_bfloat16) * (kOwnRows + 4 * W) * P +
           (sizeof(int) + sizeof(unsigned char)) * 2 * W;
  }
};

// Four blocks per SM (16 warps) for head sizes up to 64 (registers capped at 128), three in the
// backward kernels (168).
template <int D>
__global__ void __launch_bounds__(kMmaThreads, D <= 64 ? 4 : 2)
    attn_fwd_mma_kernel(AttentionParams p, Layout lay, Pattern pat, bool split, Segments sg) {
  constexpr int P = Geo<D>::kPitch, W = Geo<D>::kFwdWalk;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const FwdLayout<D> sm(smem_raw);
  const int dh = static_cast<int>(p.head_dim);
  const OwnRows own(pat, p.heads, p.q_len, pat.q_pos0, split, sg.segs);
  const int64_t b = own.b, h = own.h;
  const int warp = own.warp, tg = own.tg;
  const bf16* q = static_cast<const bf16*>(p.q);
  const bf16* k = static_cast<const bf16*>(p.k);
  const bf16* v = static_cast<const bf16*>(p.v);

  const StageSlot<D> slot(dh);
  const RowSrc k_src{k + lay.k(b, 0, h), p.k_row}, v_src{v + lay.v(b, 0, h), p.v_row};
  stage_rows<kOwnRows, P>(
      slot, [&](int r) { return own.stage_index(r); }, sm.q, RowSrc{q + lay.q(b, 0, h), p.q_row});
  const Walk keys(keys_for_queries(pat, p.k_len, own.first, own.last() + 1, own.walk()));
  const int2 range = own.tile_range<W>((keys.count + W - 1) / W);
  const int t0 = range.x, tiles = range.y - range.x;  // this block's tiles of the walk: t0 + u
  auto stage_keys = [&](int u, int buf) {
    stage_key_tile<W, P>(sm, keys, pat, slot, k_src, v_src, t0 + u, buf);
  };
  if (tiles > 0) stage_keys(0, 0);
  cp_async_commit();

  const float sl2 = static_cast<float>(p.scale) * kLog2e;
  const int64_t rows[2] = {own.lane_row(0), own.lane_row(1)};  // this lane's queries
  const RowInfo ri = query_rows(pat, rows);
  float o[D / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // l: this lane's share of the row sum
  for (int u = 0; u < tiles; ++u) {
    const int buf = u & 1;
    next_tile(u, tiles, stage_keys);
    float s[W / 8][4];
    mma_xyt<D, W>(s, sm.q, warp * 16, sm.k + buf * W * P);

    const int o0 = (t0 + u) * W;
    const bool all = key_tile_all_visible<W>(pat, keys, o0, own);
#pragma unroll
    for (int n = 0; n < W / 8; ++n) {
      const unsigned vis =
          all ? 0xfu : visible_bits<true>(pat, ri, sm.kidx, sm.kglob, buf * W + n * 8 + tg * 2);
#pragma unroll
      for (int c = 0; c < 4; ++c) s[n][c] = (vis >> c) & 1 ? s[n][c] * sl2 : -INFINITY;
    }
#pragma unroll
    for (int r = 0; r < 2;
         ++r) {  // online softmax of this lane's two rows (a row spans a lane quad)
      float mx = m[r];
#pragma unroll
      for (int n = 0; n < W / 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float base = mx == -INFINITY ? 0.0f : mx;
      const float corr = exp2_approx(m[r] - base);
      m[r] = mx;
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < W / 8; ++n) {
        s[n][2 * r] = exp2_approx(s[n][2 * r] - base);
        s[n][2 * r + 1] = exp2_approx(s[n][2 * r + 1] - base);
        sum += s[n][2 * r] + s[n][2 * r + 1];
      }
      l[r] = l[r] * corr + sum;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        o[n][2 * r] *= corr;
        o[n][2 * r + 1] *= corr;
      }
    }
    mma_ay<D, W>(o, s, sm.v + buf * W * P);  // O += P V, P rounded to bf16
    __syncthreads();                         // the next step overwrites this buffer
  }
  cp_async_wait<0>();

  bf16* out = static_cast<bf16*>(p.out);
  float* lse = static_cast<float*>(p.lse);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = l[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int64_t i = own.lane_row(r);
    if (!own.writes(pat, i, pat.q_pos0)) continue;
    const float row_lse = sum > 0.0f ? m[r] * kLn2 + logf(sum) : -INFINITY;
    if (own.partial()) {  // a segment's part of the row, merged by attn_combine_kernel
      const int64_t pr = own.part_row(r);
      store_row<D>(sg.part + pr * dh, o, r, sum > 0.0f ? 1.0f / sum : 0.0f, dh, tg);
      if (tg == 0) sg.part_lse[pr] = row_lse;
      continue;
    }
    store_row<D>(out + lay.dq(b, i, h), o, r, sum > 0.0f ? 1.0f / sum : 0.0f, dh, tg);
    if (tg == 0) lse[lay.stat(b, h, i)] = row_lse;
  }
}

// ---- Backward -----------------------------------------------------------------------------------
// lse in base 2 for the probabilities P = 2^(S sl2 - lse2); a query that sees no key (lse = -inf)
// gets +inf, so its P is 0 wherever it is evaluated.
__device__ __forceinline__ float lse_base2(float lse) {
  return lse == -INFINITY ? INFINITY : lse * kLog2e;
}

// dQ: a block per 64 queries walks their keys. Per step: S = Q K^T, dP = dO V^T, dS = P (dP -
// delta), dQ += dS K.
template <int D>
struct DqLayout {
  static constexpr int P = Geo<D>::kPitch, W = Geo<D>::kWalk;
  __nv_bfloat16 *q, *go, *k, *v;  // [kOwnRows][P] x 2, [2][W][P] x 2
  int* kidx;                      // [2][W] (-1: none)
  unsigned char* kglob;           // [2][W]
  __host__ __device__ explicit DqLayout(unsigned char* base) {
    q = reinterpret_cast<__nv_bfloat16*>(base);
    go = q + kOwnRows * P;
    k = go + kOwnRows * P;
    v = k + 2 * W * P;
    kidx = reinterpret_cast<int*>(v + 2 * W * P);
    kglob = reinterpret_cast<unsigned char*>(kidx + 2 * W);
  }
  static constexpr size_t bytes() {
    return sizeof(__nv_bfloat16) * (2 * kOwnRows + 4 * W) * P +
           (sizeof(int) + sizeof(unsigned char)) * 2 * W;
  }
};

template <int D>
__global__ void __launch_bounds__(kMmaThreads, D <= 64 ? 3 : 2)
    attn_dq_mma_kernel(AttentionBwdParams g, Layout lay, Pattern pat, bool split, Segments sg,
                       const float* __restrict delta) {
  constexpr int P = Geo<D>::kPitch, W = Geo<D>::kWalk;
  const AttentionParams& p = g.fwd;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const DqLayout<D> sm(smem_raw);
  const int dh = static_cast<int>(p.head_dim);
  const OwnRows own(pat, p.heads, p.q_len, pat.q_pos0, split, sg.segs);
  const int64_t b = own.b, h = own.h;
  const int warp = own.warp, tg = own.tg;
  const bf16* k = static_cast<const bf16*>(p.k);
  const bf16* v = static_cast<const bf16*>(p.v);

  const StageSlot<D> slot(dh);
  const RowSrc k_src{k + lay.k(b, 0, h), p.k_row}, v_src{v + lay.v(b, 0, h), p.v_row};
  stage_rows<kOwnRows, P>(
      slot, [&](int r) { return own.stage_index(r); }, sm.q,
      RowSrc{static_cast<const bf16*>(p.q) + lay.q(b, 0, h), p.q_row}, sm.go,
      RowSrc{static_cast<const bf16*>(g.gout) + lay.dq(b, 0, h), p.heads * p.head_dim});
  const Walk keys(keys_for_queries(pat, p.k_len, own.first, own.last() + 1, own.walk()));
  const int2 range = own.tile_range<W>((keys.count + W - 1) / W);
  const int t0 = range.x, tiles = range.y - range.x;  // this block's tiles of the walk: t0 + u
  auto stage_keys = [&](int u, int buf) {
    stage_key_tile<W, P>(sm, keys, pat, slot, k_src, v_src, t0 + u, buf);
  };
  if (tiles > 0) stage_keys(0, 0);
  cp_async_commit();

  const float sl2 = static_cast<float>(p.scale) * kLog2e;
  const int64_t rows[2] = {own.lane_row(0), own.lane_row(1)};
  const RowInfo ri = query_rows(pat, rows);
  float lse2[2], dlt[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = rows[r];
    lse2[r] = i >= 0 ? lse_base2(static_cast<const float*>(p.lse)[lay.stat(b, h, i)]) : INFINITY;
    dlt[r] = i >= 0 ? delta[lay.stat(b, h, i)] : 0.0f;
  }
  float dq[D / 8][4] = {};
  for (int u = 0; u < tiles; ++u) {
    const int buf = u & 1;
    next_tile(u, tiles, stage_keys);
    float s[W / 8][4], dp[W / 8][4];
    mma_xyt<D, W>(s, sm.q, warp * 16, sm.k + buf * W * P);
    mma_xyt<D, W>(dp, sm.go, warp * 16, sm.v + buf * W * P);
    const int o0 = (t0 + u) * W;
    const bool all = key_tile_all_visible<W>(pat, keys, o0, own);
#pragma unroll
    for (int n = 0; n < W / 8; ++n) {
      const unsigned vis =
          all ? 0xfu : visible_bits<true>(pat, ri, sm.kidx, sm.kglob, buf * W + n * 8 + tg * 2);
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int r = c >> 1;
        const float pr = (vis >> c) & 1 ? exp2_approx(s[n][c] * sl2 - lse2[r]) : 0.0f;
        s[n][c] = pr * (dp[n][c] - dlt[r]);  // dS
      }
    }
    mma_ay<D, W>(dq, s, sm.k + buf * W * P);  // dQ += dS K
    __syncthreads();
  }
  cp_async_wait<0>();

  bf16* gq = static_cast<bf16*>(g.gq);
  const float scale = static_cast<float>(p.scale);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = own.lane_row(r);
    if (!own.writes(pat, i, pat.q_pos0)) continue;
    if (own.partial()) {
      store_row<D>(sg.part + own.part_row(r) * dh, dq, r, scale, dh, tg);
    } else {
      store_row<D>(gq + lay.dq(b, i, h), dq, r, scale, dh, tg);
    }
  }
}

// dK and dV: a block per 64 keys walks the queries that see them. Per step, transposed (keys as
// rows): S^T = K Q^T, dP^T = V dO^T, P^T and dS^T = P^T (dP^T - delta), then dV += P^T dO and dK +=
// dS^T Q.
template <int D>
struct DkvLayout {
  static constexpr int P = Geo<D>::kPitch, W = Geo<D>::kWalk;
  __nv_bfloat16 *k, *v, *q, *go;  // [kOwnRows][P] x 2, [2][W][P] x 2
  float *lse2, *delta;            // [2][W]
  int* qidx;                      // [2][W] (-1: none)
  unsigned char* qglob;           // [2][W]
  __host__ __device__ explicit DkvLayout(unsigned char* base) {
    k = reinterpret_cast<__nv_bfloat16*>(base);
    v = k + kOwnRows * P;
    q = v + kOwnRows * P;
    go = q + 2 * W * P;
    lse2 = reinterpret_cast<float*>(go + 2 * W * P);
    delta = lse2 + 2 * W;
    qidx = reinterpret_cast<int*>(delta + 2 * W);
    qglob = reinterpret_cast<unsigned char*>(qidx + 2 * W);
  }
  static constexpr size_t bytes() {
    return sizeof(__nv_bfloat16) * (2 * kOwnRows + 4 * W) * P +
           (2 * sizeof(float) + sizeof(int) + sizeof(unsigned char)) * 2 * W;
  }
};

template <int D>
__global__ void __launch_bounds__(kMmaThreads, D <= 64 ? 3 : 2)
    attn_dkv_mma_kernel(AttentionBwdParams g, Layout lay, Pattern pat, bool split, Segments sg,
                        const float* __restrict delta) {
  constexpr int P = Geo<D>::kPitch, W = Geo<D>::kWalk;
  const AttentionParams& p = g.fwd;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const DkvLayout<D> sm(smem_raw);
  const int dh = static_cast<int>(p.head_dim);
  const OwnRows own(pat, p.heads, p.k_len, pat.k_pos0, split, sg.segs);
  const int64_t b = own.b, h = own.h;
  const int warp = own.warp, tg = own.tg;
  const bf16* q = static_cast<const bf16*>(p.q);
  const bf16* go = static_cast<const bf16*>(g.gout);
  const float* lse = static_cast<const float*>(p.lse);

  const StageSlot<D> slot(dh);
  const RowSrc q_src{q + lay.q(b, 0, h), p.q_row},
      go_src{go + lay.dq(b, 0, h), p.heads * p.head_dim};
  stage_rows<kOwnRows, P>(
      slot, [&](int r) { return own.stage_index(r); }, sm.k,
      RowSrc{static_cast<const bf16*>(p.k) + lay.k(b, 0, h), p.k_row}, sm.v,
      RowSrc{static_cast<const bf16*>(p.v) + lay.v(b, 0, h), p.v_row});
  const Walk queries(queries_for_keys(pat, p.q_len, own.first, own.last() + 1, own.walk()));
  const int2 range = own.tile_range<W>((queries.count + W - 1) / W);
  const int t0 = range.x, tiles = range.y - range.x;  // this block's tiles of the walk: t0 + u
  auto stage_queries = [&](int u, int buf) {
    auto idx = [&](int r) { return queries.at((t0 + u) * W + r); };
    if (threadIdx.x < W) {
      const int i = idx(threadIdx.x);
      sm.qidx[buf * W + threadIdx.x] = i;
      sm.qglob[buf * W + threadIdx.x] = i >= 0 && pat.global(pat.q_pos0 + i);
      sm.lse2[buf * W + threadIdx.x] = i >= 0 ? lse_base2(lse[lay.stat(b, h, i)]) : INFINITY;
      sm.delta[buf * W + threadIdx.x] = i >= 0 ? delta[lay.stat(b, h, i)] : 0.0f;
    }
    stage_rows<W, P>(slot, idx, sm.q + buf * W * P, q_src, sm.go + buf * W * P, go_src);
  };
  if (tiles > 0) stage_queries(0, 0);
  cp_async_commit();

  const float sl2 = static_cast<float>(p.scale) * kLog2e;
  const int64_t rows[2] = {own.lane_row(0), own.lane_row(1)};  // this lane's keys
  const RowInfo ri = key_rows(pat, rows);
  float dk[D / 8][4] = {}, dv[D / 8][4] = {};
  for (int u = 0; u < tiles; ++u) {
    const int buf = u & 1;
    next_tile(u, tiles, stage_queries);
    float s[W / 8][4], dp[W / 8][4];
    mma_xyt<D, W>(s, sm.k, warp * 16, sm.q + buf * W * P);    // S^T [key][query]
    mma_xyt<D, W>(dp, sm.v, warp * 16, sm.go + buf * W * P);  // dP^T
    const bool all = query_tile_all_visible<W>(pat, queries, (t0 + u) * W, own);
#pragma unroll
    for (int n = 0; n < W / 8; ++n) {
      const unsigned vis =
          all ? 0xfu : visible_bits<false>(pat, ri, sm.qidx, sm.qglob, buf * W + n * 8 + tg * 2);
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int col = buf * W + n * 8 + tg * 2 + (c & 1);
        const float pr = (vis >> c) & 1 ? exp2_approx(s[n][c] * sl2 - sm.lse2[col]) : 0.0f;
        dp[n][c] = pr * (dp[n][c] - sm.delta[col]);  // dS^T
        s[n][c] = pr;                                // P^T
      }
    }
    mma_ay<D, W>(dv, s, sm.go + buf * W * P);  // dV += P^T dO
    mma_ay<D, W>(dk, dp, sm.q + buf * W * P);  // dK += dS^T Q
    __syncthreads();
  }
  cp_async_wait<0>();

  bf16* gk = static_cast<bf16*>(g.gk);
  bf16* gv = static_cast<bf16*>(g.gv);
  const float scale = static_cast<float>(p.scale);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t j = own.lane_row(r);
    if (!own.writes(pat, j, pat.k_pos0)) continue;
    if (own.partial()) {
      const int64_t pr = own.part_row(r);
      store_row<D>(sg.part + pr * dh, dk, r, scale, dh, tg);
      store_row<D>(sg.part2 + pr * dh, dv, r, 1.0f, dh, tg);
      continue;
    }
    store_row<D>(gk + lay.dk(b, j, h), dk, r, scale, dh, tg);
    store_row<D>(gv + lay.dk(b, j, h), dv, r, 1.0f, dh, tg);
  }
}

// The kernel compiled for the smallest of 32, 64 and 128 columns that holds head_dim.
template <class F>
void dispatch_dim(int64_t dh, F&& fn) {
  if (dh <= 32) return fn(std::integral_constant<int, 32>{});
  if (dh <= 64) return fn(std::integral_constant<int, 64>{});
  return fn(std::integral_constant<int, 128>{});
}

// The segments' partial rows combined (segs > 1): per global row, the partials summed (dQ; dK and
// dV: part, part2) or merged by their log-sum-exps (the forward: part_lse), in segment order, and
// written as bf16 at the row's place in [B, len, H, dh] (the forward's log-sum-exp in [B, H, len]).
// A warp per row.
struct Combine {
  Segments sg;
  int64_t rows = 0;  // a segment's rows: batch * heads * n_glob
  int64_t n_glob = 0, g0 = 0, stride = 0, heads = 0, len = 0;
  int dh = 0;
  bf16* out = nullptr;
  bf16* out2 = nullptr;
  float* lse = nullptr;
};

__global__ void attn_combine_kernel(Combine c) {
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int64_t warps = int64_t(gridDim.x) * blockDim.x / 32;
  const float* part_lse = c.sg.part_lse;
  for (int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; row < c.rows;
       row += warps) {
    const int64_t bh = row / c.n_glob, i = c.g0 + row % c.n_glob * c.stride;
    const int64_t at = ((bh / c.heads * c.len + i) * c.heads + bh % c.heads) * c.dh;
    float total = 0.0f;  // the forward: the row's log-sum-exp over the segments
    if (part_lse) {
      float mx = -INFINITY;
      for (int s = 0; s < c.sg.segs; ++s) mx = fmaxf(mx, part_lse[s * c.rows + row]);
      float sum = 0.0f;
      for (int s = 0; s < c.sg.segs && mx != -INFINITY; ++s)
        sum += expf(part_lse[s * c.rows + row] - mx);
      total = mx == -INFINITY ? -INFINITY : mx + logf(sum);
      if (lane == 0) c.lse[bh * c.len + i] = total;
    }
    for (int col = lane; col < c.dh; col += 32) {
      float acc = 0.0f, acc2 = 0.0f;
      for (int s = 0; s < c.sg.segs; ++s) {
        const int64_t e = (s * c.rows + row) * c.dh + col;
        float w = 1.0f;
        if (part_lse) {
          const float ls = part_lse[s * c.rows + row];
          w = ls == -INFINITY ? 0.0f : expf(ls - total);
        }
        acc += w * c.sg.part[e];
        if (c.out2) acc2 += c.sg.part2[e];
      }
      c.out[at + col] = bf16(acc);
      if (c.out2) c.out2[at + col] = bf16(acc2);
    }
  }
}

// Whether the global rows get blocks of their own (OwnRows): with a window and global positions.
// Without a window every block walks every earlier row anyway.
bool split_global(const AttentionParams& p) { return p.window > 0 && p.global_stride > 0; }

// Walks up to two segments long stay whole: at 2K cutting them in two cost 2-3% (the combine's
// launch and the partials' traffic against one block's walk of 32 tiles).
int segments_for(int64_t walk) {
  return walk > 2 * kSegRows ? static_cast<int>((walk + kSegRows - 1) / kSegRows) : 1;
}
// The segments of the blocks of global queries (the forward, dQ) and of global keys (dK/dV): their
// longest walk in pieces of kSegRows. The last block of global queries sees the most keys; the
// first block of global keys is seen by the most queries.
int query_segments(const AttentionParams& p) {
  if (!split_global(p)) return 1;
  const int64_t n = count_global(p.q_pos0, p.q_len, p.global_stride);
  if (n == 0) return 1;
  const int64_t last =
      p.q_pos0 + first_global_index(p.q_pos0, p.global_stride) + (n - 1) * p.global_stride;
  return segments_for(std::min(p.k_len, last - p.k_pos0 + 1));
}
int key_segments(const AttentionParams& p) {
  if (!split_global(p)) return 1;
  const int64_t n = count_global(p.k_pos0, p.k_len, p.global_stride);
  if (n == 0) return 1;
  const int64_t first = p.k_pos0 + first_global_index(p.k_pos0, p.global_stride);
  return segments_for(p.q_len - std::max<int64_t>(0, first - p.q_pos0));
}

size_t round256(size_t bytes) { return (bytes + 255) / 256 * 256; }
// The partial rows' bytes: segs x batch x heads x the global rows at pos0 of len, dh floats each
// (times `arrays`), plus one float each for a log-sum-exp.
size_t part_bytes(const AttentionParams& p, int segs, int64_t pos0, int64_t len, int arrays,
                  bool with_lse) {
  if (segs == 1) return 0;
  const auto rows =
      static_cast<size_t>(segs * p.batch * p.heads * count_global(pos0, len, p.global_stride));
  return arrays * round256(sizeof(float) * rows * p.head_dim) +
         (with_lse ? round256(sizeof(float) * rows) : 0);
}

// Carves the partial rows out of `ws` (part_bytes' order) and returns where the next ones go.
unsigned char* carve_segments(Segments& sg, unsigned char* ws, const AttentionParams& p,
                              int64_t pos0, int64_t len, bool two, bool with_lse) {
  if (sg.segs == 1) return ws;
  HYDRA_CHECK(ws != nullptr) << "attention (CUDA): workspace required for the global rows' "
                                "segments (attention_fwd_workspace / attention_bwd_workspace)";
  const auto rows =
      static_cast<size_t>(sg.segs * p.batch * p.heads * count_global(pos0, len, p.global_stride));
  const size_t bytes = round256(sizeof(float) * rows * p.head_dim);
  sg.part = reinterpret_cast<float*>(ws);
  ws += bytes;
  if (two) {
    sg.part2 = reinterpret_cast<float*>(ws);
    ws += bytes;
  }
  if (with_lse) {
    sg.part_lse = reinterpret_cast<float*>(ws);
    ws += round256(sizeof(float) * rows);
  }
  return ws;
}

// Launches the combine of the segments' partial rows into out (out2, lse).
void combine_segments(const Segments& sg, const AttentionParams& p, int64_t pos0, int64_t len,
                      void* out, void* out2, void* lse, cudaStream_t s) {
  if (sg.segs == 1) return;
  Combine c;
  c.sg = sg;
  c.n_glob = count_global(pos0, len, p.global_stride);
  c.rows = p.batch * p.heads * c.n_glob;
  c.g0 = first_global_index(pos0, p.global_stride);
  c.stride = p.global_stride;
  c.heads = p.heads;
  c.len = len;
  c.dh = static_cast<int>(p.head_dim);
  c.out = static_cast<bf16*>(out);
  c.out2 = static_cast<bf16*>(out2);
  c.lse = static_cast<float*>(lse);
  if (c.rows == 0) return;
  attn_combine_kernel<<<blocks_for(c.rows * 32, 256), 256, 0, s>>>(c);
  HYDRA_CUDA_LAUNCH_CHECK();
}

}  // namespace

namespace attention_mma {

bool applies(const AttentionParams& p) {
  return p.dtype == DType::kBF16 && p.head_dim % 16 == 0 && p.head_dim <= 128 && p.q_row % 8 == 0 &&
         p.k_row % 8 == 0 && p.v_row % 8 == 0 && aligned16(p.q) && aligned16(p.k) &&
         aligned16(p.v) && aligned16(p.out);
}

bool applies(const AttentionBwdParams& q) {
  return applies(q.fwd) && aligned16(q.gout) && aligned16(q.gq) && aligned16(q.gk) &&
         aligned16(q.gv);
}

size_t forward_workspace(const AttentionParams& p) {
  return part_bytes(p, query_segments(p), p.q_pos0, p.q_len, 1, true);
}

size_t backward_workspace(const AttentionParams& p) {
  return part_bytes(p, query_segments(p), p.q_pos0, p.q_len, 1, false) +
         part_bytes(p, key_segments(p), p.k_pos0, p.k_len, 2, false);
}

void forward(const AttentionParams& p) {
  const bool split = split_global(p);
  Segments sg;
  sg.segs = query_segments(p);
  carve_segments(sg, static_cast<unsigned char*>(p.workspace), p, p.q_pos0, p.q_len, false, true);
  const dim3 grid(own_tiles(p.q_len, p.q_pos0, p.global_stride, split, sg.segs),
                  static_cast<unsigned>(p.batch * p.heads));
  cudaStream_t s = as_stream(p.stream);
  dispatch_dim(p.head_dim, [&](auto d) {
    constexpr int D = decltype(d)::value;
    const size_t smem = FwdLayout<D>::bytes();
    allow_dynamic_smem(attn_fwd_mma_kernel<D>, smem, "attention");
    attn_fwd_mma_kernel<D>
        <<<grid, kMmaThreads, smem, s>>>(p, layout_of(p), pattern_of(p), split, sg);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
  combine_segments(sg, p, p.q_pos0, p.q_len, p.out, nullptr, p.lse, s);
}

void backward(const AttentionBwdParams& q, const float* delta, void* parts) {
  const AttentionParams& p = q.fwd;
  const Layout lay = layout_of(p);
  const Pattern pat = pattern_of(p);
  const unsigned bh = static_cast<unsigned>(p.batch * p.heads);
  const bool split = split_global(p);
  Segments sq, sk;
  sq.segs = query_segments(p);
  sk.segs = key_segments(p);
  unsigned char* ws =
      carve_segments(sq, static_cast<unsigned char*>(parts), p, p.q_pos0, p.q_len, false, false);
  carve_segments(sk, ws, p, p.k_pos0, p.k_len, true, false);
  cudaStream_t s = as_stream(p.stream);
  dispatch_dim(p.head_dim, [&](auto d) {
    constexpr int D = decltype(d)::value;
    if (p.q_len > 0) {
      const size_t smem = DqLayout<D>::bytes();
      allow_dynamic_smem(attn_dq_mma_kernel<D>, smem, "attention_backward");
      attn_dq_mma_kernel<D>
          <<<dim3(own_tiles(p.q_len, p.q_pos0, p.global_stride, split, sq.segs), bh), kMmaThreads,
             smem, s>>>(q, lay, pat, split, sq, delta);
      HYDRA_CUDA_LAUNCH_CHECK();
      combine_segments(sq, p, p.q_pos0, p.q_len, q.gq, nullptr, nullptr, s);
    }
    if (p.k_len > 0) {
      const size_t smem = DkvLayout<D>::bytes();
      allow_dynamic_smem(attn_dkv_mma_kernel<D>, smem, "attention_backward");
      attn_dkv_mma_kernel<D>
          <<<dim3(own_tiles(p.k_len, p.k_pos0, p.global_stride, split, sk.segs), bh), kMmaThreads,
             smem, s>>>(q, lay, pat, split, sk, delta);
      HYDRA_CUDA_LAUNCH_CHECK();
      combine_segments(sk, p, p.k_pos0, p.k_len, q.gk, q.gv, nullptr, s);
    }
  });
}

}  // namespace attention_mma
}  // namespace hydra::kernels::cuda
