// The product-key memory's kernels: the embedding bag (a weighted sum of table rows per token,
// forward and both gradients) and the product-key indices. The bag's table gradient sorts the
// lookups stably by row (sorted_rows.cuh) and sums each row's run in (token, lookup) order:
// deterministic.
#include <algorithm>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/rows.cuh"
#include "kernels/cuda/sorted_rows.cuh"
#include "kernels/matmul.h"
#include "kernels/pkm.h"

namespace hydra::kernels::cuda {
namespace {

using namespace sorted_rows;

template <class T, class I>
__global__ void embedding_bag_fwd_kernel(const T* __restrict table, const I* __restrict index,
                                         const T* __restrict w, T* __restrict out, int64_t m,
                                         int64_t cols) {
  using C = compute_t<T>;
  const int64_t t = blockIdx.x;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    C acc = 0;
    for (int64_t k = 0; k < m; ++k)
      acc += load(w, t * m + k) * load(table, static_cast<int64_t>(index[t * m + k]) * cols + c);
    out[t * cols + c] = convert<T>(acc);
  }
}

// A warp per lookup e = (t, k): gw[e] = gout[t] . table[index[e]], lanes over the columns (no block
// barriers: one block per bag with a block reduction per lookup was latency-bound).
template <class T, class I>
__global__ void embedding_bag_bwd_weights_kernel(const T* __restrict table,
                                                 const I* __restrict index,
                                                 const T* __restrict gout, T* __restrict gw,
                                                 int64_t lookups, int64_t m, int64_t cols) {
  using C = compute_t<T>;
  const int64_t e = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (e >= lookups) return;  // whole warps
  const T* g = gout + (e / m) * cols;
  const T* row = table + static_cast<int64_t>(index[e]) * cols;
  C dot = 0;
  for (int64_t c = lane; c < cols; c += 32) dot += load(g, c) * load(row, c);
  dot = warp_sum(dot);
  if (lane == 0) gw[e] = convert<T>(dot);
}

__global__ void product_key_kernel(ProductKeyParams p) {
  const int64_t total = p.rows * p.count;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = e / p.count, c = p.cells ? p.cells[p.pick[e]] : p.pick[e];
    p.out[e] = p.a[r * p.k + c / p.k] * p.n_keys + p.b[r * p.k + c % p.k];
  }
}

// The first sorted position whose key is >= key.
__device__ int64_t lower_bound(const int64_t* __restrict keys, int64_t n, int64_t key) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (keys[mid] < key)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// Block r sums table row r's lookups, found as a run of the stably sorted keys, in (t, k) order.
// The lookups' weights and gout rows are read once per block into shared memory, kBagChunk at a
// time (each thread computing them for itself cost a 64-bit division per lookup and column); each
// thread keeps the sums of its kBagCols columns in registers.
constexpr int kBagChunk = 256, kBagCols = 8;

template <class T>
__global__ void embedding_bag_table_kernel(const int64_t* __restrict keys,
                                           const int32_t* __restrict pos, const T* __restrict w,
                                           const T* __restrict gout, T* __restrict gtable,
                                           int32_t* __restrict hits, int64_t total, int64_t m,
                                           int64_t cols) {
  using C = compute_t<T>;
  __shared__ C w_s[kBagChunk];
  __shared__ int64_t off_s[kBagChunk];
  const int64_t r = blockIdx.x;
  const int64_t lo = lower_bound(keys, total, r), hi = lower_bound(keys, total, r + 1);
  C acc[kBagCols];
#pragma unroll
  for (int u = 0; u < kBagCols; ++u) acc[u] = 0;
  for (int64_t base = lo; base < hi; base += kBagChunk) {
    const int64_t n = min(int64_t(kBagChunk), hi - base);
    __syncthreads();  // the previous chunk is used up
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const int64_t e = pos[base + i];
      w_s[i] = load(w, e);
      off_s[i] = (e / m) * cols;
    }
    __syncthreads();
    for (int64_t i = 0; i < n; ++i) {
      const C we = w_s[i];
      const T* g = gout + off_s[i];
#pragma unroll
      for (int u = 0; u < kBagCols; ++u) {
        const int64_t c = threadIdx.x + int64_t(u) * blockDim.x;
        if (c < cols) acc[u] += we * load(g, c);
      }
    }
  }
#pragma unroll
  for (int u = 0; u < kBagCols; ++u) {
    const int64_t c = threadIdx.x + int64_t(u) * blockDim.x;
    if (c < cols) gtable[r * cols + c] = convert<T>(acc[u]);
  }
  if (hits && threadIdx.x == 0) hits[r] = hi > lo ? 1 : 0;
}

// ---- weighted sums of rows, 16-byte loads
// ------------------------------------------------------------
//
// Block r writes out row r = sum over its items i of w_i * rows[off_i .. off_i + cols). The items'
// weights and row offsets are staged kBagChunk at a time into shared memory (`Items::stage(i)`
// computes them); warp q takes items q, q + 8, ... of each chunk, its lanes ITEMS packs of 16 bytes
// each; the eight warps' sums are then added in warp order through shared memory. The order is
// fixed: deterministic. The embedding bag's forward (items: a token's lookups, rows: the table) and
// its table gradient (items: a table row's lookups, found as a run of the sorted keys; rows: gout)
// are both this.
constexpr int kSumThreads = 256;

struct ItemRange {
  int64_t lo, count;
};
template <class C>
struct StagedItem {
  C w;
  int64_t off;
};

template <class T, int ITEMS, class Items>
__global__ void __launch_bounds__(kSumThreads)
    weighted_rows_kernel(Items items, const T* __restrict rows, T* __restrict out, int64_t packs) {
  using C = compute_t<T>;
  constexpr int kN = RowPack<T>::kN;
  __shared__ C w_s[kBagChunk];
  __shared__ int64_t off_s[kBagChunk];
  extern __shared__ __align__(16) unsigned char sum_raw[];
  C* sum_s = reinterpret_cast<C*>(sum_raw);  // [packs * kN]
  const int64_t r = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  constexpr int kWarps = kSumThreads / 32;
  constexpr int kAhead = Items::ahead(ITEMS);  // items whose loads are in flight together
  const auto [lo, count] = items.range(r);
  C acc[ITEMS][kN];
#pragma unroll
  for (int k = 0; k < ITEMS; ++k)
#pragma unroll
    for (int j = 0; j < kN; ++j) acc[k][j] = 0;
  for (int64_t base = 0; base < count; base += kBagChunk) {
    const int n = static_cast<int>(min(int64_t(kBagChunk), count - base));
    __syncthreads();  // the previous chunk is used up
    for (int i = threadIdx.x; i < n; i += kSumThreads) {
      const auto [w, off] = items.stage(lo + base + i);
      w_s[i] = w;
      off_s[i] = off;
    }
    __syncthreads();
    // kAhead of the warp's items at a time: their rows' loads are all issued before the first is
    // added (a warp's loads in flight, not one item's), then added in item order as before.
    int i = warp;
    for (; i + (kAhead - 1) * kWarps < n; i += kAhead * kWarps) {
      RowPack<T> v[kAhead][ITEMS];
#pragma unroll
      for (int a = 0; a < kAhead; ++a) {
        const auto* src = reinterpret_cast<const RowPack<T>*>(rows + off_s[i + a * kWarps]);
#pragma unroll
        for (int k = 0; k < ITEMS; ++k)
          if (lane + k * 32 < packs) v[a][k] = src[lane + k * 32];
      }
#pragma unroll
      for (int a = 0; a < kAhead; ++a) {
        const C w = w_s[i + a * kWarps];
#pragma unroll
        for (int k = 0; k < ITEMS; ++k)
          if (lane + k * 32 < packs)
#pragma unroll
            for (int j = 0; j < kN; ++j) acc[k][j] += w * convert<C>(v[a][k].v[j]);
      }
    }
    for (; i < n; i += kWarps) {
      const C w = w_s[i];
      const auto* src = reinterpret_cast<const RowPack<T>*>(rows + off_s[i]);
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) {
        const int64_t c = lane + k * 32;
        if (c < packs) {
          const RowPack<T> v = src[c];
#pragma unroll
          for (int j = 0; j < kN; ++j) acc[k][j] += w * convert<C>(v.v[j]);
        }
      }
    }
  }
  for (int q = 0; q < kWarps; ++q) {
    if (warp == q) {
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) {
        const int64_t c = lane + k * 32;
        if (c < packs)
#pragma unroll
          for (int j = 0; j < kN; ++j)
            sum_s[c * kN + j] = q == 0 ? acc[k][j] : sum_s[c * kN + j] + acc[k][j];
      }
    }
    __syncthreads();
  }
  auto* dst = reinterpret_cast<RowPack<T>*>(out + r * packs * kN);
  for (int64_t c = threadIdx.x; c < packs; c += kSumThreads) {
    RowPack<T> v;
#pragma unroll
    for (int j = 0; j < kN; ++j) v.v[j] = convert<T>(sum_s[c * kN + j]);
    dst[c] = v;
  }
  items.finish(r, count);
}

// A token's m lookups: weights w[t, k], rows index[t, k] of the table.
template <class T, class I>
struct BagLookups {
  const I* index;
  const T* w;
  int64_t m, cols;
  // One item at a time: a token's few lookups leave little to overlap, and more in flight slowed
  // the forward (0.53 -> 0.73 ms a call on the H200, session 30).
  static constexpr int ahead(int) { return 1; }
  __device__ ItemRange range(int64_t t) const { return {t * m, m}; }
  __device__ StagedItem<compute_t<T>> stage(int64_t e) const {
    return {load(w, e), static_cast<int64_t>(index[e]) * cols};
  }
  __device__ void finish(int64_t, int64_t) const {}
};

// A table row's lookups: the run of the sorted keys equal to the row; weights w[e], rows gout[e /
// m].
template <class T>
struct RowLookups {
  const int64_t* keys;
  const int32_t* pos;
  const T* w;
  int32_t* hits;
  int64_t total, m, cols;
  // A row's many lookups: several items' loads in flight (bag backward 2.19 -> 1.63 ms, session
  // 30).
  static constexpr int ahead(int items) { return items <= 2 ? 4 : 2; }
  __device__ ItemRange range(int64_t r) const {
    const int64_t lo = lower_bound(keys, total, r);
    return {lo, lower_bound(keys, total, r + 1) - lo};
  }
  __device__ StagedItem<compute_t<T>> stage(int64_t i) const {
    const int64_t e = pos[i];
    return {load(w, e), (e / m) * cols};
  }
  __device__ void finish(int64_t r, int64_t count) const {
    if (hits && threadIdx.x == 0) hits[r] = count > 0 ? 1 : 0;
  }
};

// gw[t, k] = <gout[t], table[index[t, k]]> with 16-byte loads: a warp per token keeps gout[t] in
// registers (ITEMS packs per lane) and walks the token's m lookups four at a time (their rows'
// loads in flight together), one warp reduction per lookup.
template <class T, class I, int ITEMS>
__global__ void __launch_bounds__(kSumThreads)
    embedding_bag_weights_packed_kernel(const T* __restrict table, const I* __restrict index,
                                        const T* __restrict gout, T* __restrict gw, int64_t n,
                                        int64_t m, int64_t packs) {
  using C = compute_t<T>;
  constexpr int kN = RowPack<T>::kN, kAhead = 4;
  const int64_t t = (int64_t(blockIdx.x) * kSumThreads + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (t >= n) return;  // whole warps
  const auto* g = reinterpret_cast<const RowPack<T>*>(gout) + t * packs;
  C gv[ITEMS][kN];
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int64_t c = lane + k * 32;
    RowPack<T> v{};
    if (c < packs) v = g[c];
#pragma unroll
    for (int j = 0; j < kN; ++j) gv[k][j] = c < packs ? convert<C>(v.v[j]) : C(0);
  }
  const auto* rows = reinterpret_cast<const RowPack<T>*>(table);
  for (int64_t k0 = 0; k0 < m; k0 += kAhead) {
    C dot[kAhead];
#pragma unroll
    for (int a = 0; a < kAhead; ++a) {
      dot[a] = 0;
      if (k0 + a >= m) continue;
      const auto* row = rows + static_cast<int64_t>(index[t * m + k0 + a]) * packs;
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) {
        const int64_t c = lane + k * 32;
        if (c < packs) {
          const RowPack<T> v = row[c];
#pragma unroll
          for (int j = 0; j < kN; ++j) dot[a] += gv[k][j] * convert<C>(v.v[j]);
        }
      }
    }
#pragma unroll
    for (int a = 0; a < kAhead; ++a) {
      const C d = warp_sum(dot[a]);
      if (lane == 0 && k0 + a < m) gw[t * m + k0 + a] = convert<T>(d);
    }
  }
}

// fn(std::integral_constant<int, K>) for the fewest 16-byte packs per lane, K in {1, 2, 4, 8}, that
// cover `packs` (at most 8 * 32).
template <class F>
void dispatch_packs_per_lane(int64_t packs, F&& fn) {
  if (packs <= 32) return fn(std::integral_constant<int, 1>{});
  if (packs <= 64) return fn(std::integral_constant<int, 2>{});
  if (packs <= 128) return fn(std::integral_constant<int, 4>{});
  return fn(std::integral_constant<int, 8>{});
}

// Runs weighted_rows_kernel over `blocks` output rows when the rows allow 16-byte loads and fit the
// register sums (up to 8 packs per lane: 2048 bf16 or 1024 f32 columns); false otherwise.
template <class T, class Items>
bool launch_weighted_rows(const Items& items, const T* rows, T* out, int64_t blocks, int64_t cols,
                          cudaStream_t s) {
  constexpr int kN = RowPack<T>::kN;
  const int64_t packs = cols / kN;
  if (cols % kN != 0 || !aligned16(rows) || !aligned16(out) || packs > 8 * 32 || blocks == 0)
    return false;
  const size_t smem = static_cast<size_t>(cols) * sizeof(compute_t<T>);
  dispatch_packs_per_lane(packs, [&](auto items_per_lane) {
    constexpr int K = decltype(items_per_lane)::value;
    weighted_rows_kernel<T, K, Items>
        <<<static_cast<unsigned>(blocks), kSumThreads, smem, s>>>(items, rows, out, packs);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
  return true;
}

// ---- the dense form (embedding_bag_dense)
// ------------------------------------------------------------

constexpr int kDenseThreads = 256;
constexpr int64_t kDenseMaxBytes = int64_t{1} << 30;  // S (and gout table^T) at most 1 GiB
constexpr int64_t kDenseRowsPerLookup = 64;           // num_rows <= 64 m

// Rows of S, a warp per token in turn (a persistent grid, no block barriers or shared memory). Lane
// l holds lookups l, l + 32, ... (m <= 256: at most 8). The row is written with zeros (16-byte
// stores), then one value per distinct row the token looks up, by its first lookup: the sum of the
// weights of all the token's lookups of that row in lookup order, found by walking the lookups in
// order, each broadcast from its lane. hits[r] = 1 for every row looked up (hits zeroed before; the
// same value from every writer). At toy shapes a call takes 350 us in the training step (194 us
// alone), S written at 0.8 TB/s; four other forms (a block per token, with shared-memory counts or
// a quadratic search; S zeroed by a memset first; the row put together in shared memory) measured
// the same (docs/PERF.md): what holds it back is not found yet.
template <class T, class I, int J>
__global__ void __launch_bounds__(kDenseThreads)
    bag_matrix_kernel(const I* __restrict index, const T* __restrict w, T* __restrict S,
                      int32_t* __restrict hits, int64_t n, int64_t m, int64_t rows) {
  using C = compute_t<T>;
  constexpr int kN = 16 / sizeof(T);
  const bool packed = rows % kN == 0 && aligned16(S);
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (kDenseThreads / 32);
  for (int64_t t = (int64_t(blockIdx.x) * kDenseThreads + threadIdx.x) >> 5; t < n; t += warps) {
    int64_t r[J];
    C wt[J], sum[J];
    bool first[J];
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int64_t k = lane + 32 * j;
      r[j] = k < m ? static_cast<int64_t>(index[t * m + k]) : -1;
      wt[j] = k < m ? load(w, t * m + k) : C(0);
      sum[j] = wt[j];
      first[j] = k < m;
    }
    T* out = S + t * rows;
    if (packed) {
      for (int64_t i = lane; i < rows / kN; i += 32)
        reinterpret_cast<uint4*>(out)[i] = make_uint4(0, 0, 0, 0);
    } else {
      for (int64_t i = lane; i < rows; i += 32) out[i] = convert<T>(C(0));
    }
#pragma unroll
    for (int jq = 0; jq < J; ++jq) {
      for (int src = 0; src < 32; ++src) {
        const int64_t q = src + 32 * jq;  // the lookup broadcast (uniform over the warp)
        const int64_t rq = __shfl_sync(0xffffffffu, r[jq], src);
        const C wq = __shfl_sync(0xffffffffu, wt[jq], src);
        if (q >= m) break;
#pragma unroll
        for (int j = 0; j < J; ++j) {
          const int64_t k = lane + 32 * j;
          if (rq == r[j]) {
            if (q < k) first[j] = false;
            if (q > k) sum[j] += wq;
          }
        }
      }
    }
    __syncwarp();  // the zeros before the values
#pragma unroll
    for (int j = 0; j < J; ++j)
      if (first[j]) {
        out[r[j]] = convert<T>(sum[j]);
        if (hits != nullptr) hits[r[j]] = 1;
      }
    __syncwarp();
  }
}

// gw[t, k] = G[t, index[t, k]] (G = gout table^T, [n, rows]).
template <class T, class I>
__global__ void bag_pick_kernel(const T* __restrict G, const I* __restrict index, T* __restrict gw,
                                int64_t total, int64_t m, int64_t rows) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x)
    gw[e] = G[(e / m) * rows + static_cast<int64_t>(index[e])];
}

// The dense form's buffer (S, then G) and the GEMMs' workspace after it.
struct DenseBuffers {
  void* matrix;
  void* gemm;
};
DenseBuffers carve_dense(void* ws, const EmbeddingBagParams& p) {
  auto* b = static_cast<unsigned char*>(ws);
  return {b, b + align256(size_t(p.n * p.num_rows) * dtype_size(p.dtype))};
}

template <class T, class I>
void launch_bag_matrix(const EmbeddingBagParams& p, T* S, int32_t* hits, cudaStream_t s) {
  auto launch = [&](auto jc) {
    constexpr int J = decltype(jc)::value;
    int device = 0, sms = 0, per_sm = 0;
    HYDRA_CUDA_CHECK(cudaGetDevice(&device));
    HYDRA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    HYDRA_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, bag_matrix_kernel<T, I, J>, kDenseThreads, 0));
    const int64_t need = (p.n + kDenseThreads / 32 - 1) / (kDenseThreads / 32);
    const int64_t blocks = std::clamp<int64_t>(int64_t(sms) * per_sm, 1, need);
    bag_matrix_kernel<T, I, J><<<static_cast<unsigned>(blocks), kDenseThreads, 0, s>>>(
        static_cast<const I*>(p.index), static_cast<const T*>(p.weights), S, hits, p.n, p.m,
        p.num_rows);
    HYDRA_CUDA_LAUNCH_CHECK();
  };
  if (p.m <= 32) return launch(std::integral_constant<int, 1>{});
  if (p.m <= 64) return launch(std::integral_constant<int, 2>{});
  if (p.m <= 128) return launch(std::integral_constant<int, 4>{});
  launch(std::integral_constant<int, 8>{});
}

// C = op(A) op(B) (matmul.h's GemmProblem) in the bag's dtype and stream.
void dense_gemm(const EmbeddingBagParams& p, void* workspace, bool trans_a, bool trans_b,
                const GemmProblem& q) {
  GroupedGemmParams shape;
  shape.dtype = p.dtype;
  shape.trans_a = trans_a;
  shape.trans_b = trans_b;
  GemmParams g = gemm_of(shape, q);
  g.workspace = workspace;
  g.stream = p.stream;
  gemm(g);
}

// The table's gradient S^T gout (S rebuilt: 2 bytes a cell to write, against keeping it from the
// forward), then the weights' gradient picked from gout table^T, in the same buffer.
template <class T, class I>
void embedding_bag_bwd_dense(const EmbeddingBagBwdParams& q, cudaStream_t s) {
  const EmbeddingBagParams& p = q.fwd;
  HYDRA_CHECK(q.workspace != nullptr) << "embedding_bag backward: workspace required";
  const DenseBuffers d = carve_dense(q.workspace, p);
  T* M = static_cast<T*>(d.matrix);
  if (q.gtable != nullptr) {
    if (q.hits != nullptr)
      HYDRA_CUDA_CHECK(cudaMemsetAsync(q.hits, 0, size_t(p.num_rows) * sizeof(int32_t), s));
    launch_bag_matrix<T, I>(p, M, static_cast<int32_t*>(q.hits), s);
    dense_gemm(p, d.gemm, true, false,  // gtable = S^T gout
               {p.num_rows, p.cols, p.n, M, p.num_rows, q.gout, p.cols, q.gtable, p.cols});
  }
  if (q.gweights != nullptr) {
    dense_gemm(p, d.gemm, false, true,  // G = gout table^T
               {p.n, p.num_rows, p.cols, q.gout, p.cols, p.table, p.cols, M, p.num_rows});
    const int64_t total = p.n * p.m;
    bag_pick_kernel<T, I><<<blocks_for(total, 256), 256, 0, s>>>(
        M, static_cast<const I*>(p.index), static_cast<T*>(q.gweights), total, p.m, p.num_rows);
    HYDRA_CUDA_LAUNCH_CHECK();
  }
}

}  // namespace

bool embedding_bag_dense(const EmbeddingBagParams& p) {
  return p.n > 0 && p.m > 0 && p.m <= kDenseThreads && p.num_rows > 0 &&
         p.num_rows <= kDenseRowsPerLookup * p.m &&
         p.n * p.num_rows * int64_t(dtype_size(p.dtype)) <= kDenseMaxBytes;
}

size_t embedding_bag_fwd_workspace(const EmbeddingBagParams& p) {
  if (!embedding_bag_dense(p)) return 0;
  return align256(size_t(p.n * p.num_rows) * dtype_size(p.dtype)) + kGemmWorkspace;
}

void embedding_bag_fwd(const EmbeddingBagParams& p) {
  if (p.n == 0) return;
  dispatch_float(p.dtype, "embedding_bag", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_index(p.index_dtype, "embedding_bag", [&](auto itag) {
      using I = typename decltype(itag)::type;
      if (embedding_bag_dense(p)) {  // out = S table
        HYDRA_CHECK(p.workspace != nullptr) << "embedding_bag: workspace required";
        const DenseBuffers d = carve_dense(p.workspace, p);
        T* S = static_cast<T*>(d.matrix);
        launch_bag_matrix<T, I>(p, S, nullptr, as_stream(p.stream));
        dense_gemm(p, d.gemm, false, false,
                   {p.n, p.cols, p.num_rows, S, p.num_rows, p.table, p.cols, p.out, p.cols});
        return;
      }
      const BagLookups<T, I> items{static_cast<const I*>(p.index), static_cast<const T*>(p.weights),
                                   p.m, p.cols};
      if (launch_weighted_rows(items, static_cast<const T*>(p.table), static_cast<T*>(p.out), p.n,
                               p.cols, as_stream(p.stream)))
        return;
      embedding_bag_fwd_kernel<T, I><<<p.n, row_threads(p.cols), 0, as_stream(p.stream)>>>(
          static_cast<const T*>(p.table), static_cast<const I*>(p.index),
          static_cast<const T*>(p.weights), static_cast<T*>(p.out), p.m, p.cols);
      HYDRA_CUDA_LAUNCH_CHECK();
    });
  });
}

void product_key_indices(const ProductKeyParams& p) {
  const int64_t total = p.rows * p.count;
  if (total == 0) return;
  product_key_kernel<<<blocks_for(total, 256), 256, 0, as_stream(p.stream)>>>(p);
  HYDRA_CUDA_LAUNCH_CHECK();
}

size_t embedding_bag_bwd_workspace(const EmbeddingBagBwdParams& q) {
  const int64_t total = q.fwd.n * q.fwd.m;
  if (embedding_bag_dense(q.fwd) && (q.gtable != nullptr || q.gweights != nullptr))
    return embedding_bag_fwd_workspace(q.fwd);
  if (q.gtable == nullptr || total == 0) return 0;
  return 2 * align256(total * 8) + 2 * align256(total * 4) + sort_temp_bytes(total, q.fwd.num_rows);
}

void embedding_bag_bwd(const EmbeddingBagBwdParams& q) {
  const EmbeddingBagParams& p = q.fwd;
  cudaStream_t s = as_stream(p.stream);
  const int64_t total = p.n * p.m;
  HYDRA_CHECK(total < (int64_t{1} << 31))
      << "embedding_bag backward: " << total << " lookups; at most 2^31";
  dispatch_float(p.dtype, "embedding_bag_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_index(p.index_dtype, "embedding_bag_backward", [&](auto itag) {
      using I = typename decltype(itag)::type;
      const I* index = static_cast<const I*>(p.index);
      if (embedding_bag_dense(p) && (q.gtable != nullptr || q.gweights != nullptr)) {
        embedding_bag_bwd_dense<T, I>(q, s);
        return;
      }
      constexpr int kN = RowPack<T>::kN;
      const int64_t packs = p.cols / kN;
      const bool packed =
          p.cols % kN == 0 && packs <= 4 * 32 && aligned16(p.table) && aligned16(q.gout);
      if (q.gweights && p.n > 0 && packed) {
        dispatch_packs_per_lane(packs, [&](auto items_per_lane) {  // packs <= 128: K <= 4
          constexpr int K = std::min(decltype(items_per_lane)::value, 4);
          const unsigned blocks = blocks_for(p.n * 32, kSumThreads, int64_t(1) << 31);
          embedding_bag_weights_packed_kernel<T, I, K><<<blocks, kSumThreads, 0, s>>>(
              static_cast<const T*>(p.table), index, static_cast<const T*>(q.gout),
              static_cast<T*>(q.gweights), p.n, p.m, packs);
          HYDRA_CUDA_LAUNCH_CHECK();
        });
      } else if (q.gweights && p.n > 0) {
        embedding_bag_bwd_weights_kernel<T, I>
            <<<blocks_for(total * 32, 256, int64_t(1) << 31), 256, 0, s>>>(
                static_cast<const T*>(p.table), index, static_cast<const T*>(q.gout),
                static_cast<T*>(q.gweights), total, p.m, p.cols);
        HYDRA_CUDA_LAUNCH_CHECK();
      }
      if (q.gtable == nullptr || p.num_rows == 0) return;
      HYDRA_CHECK(total == 0 || q.workspace != nullptr)
          << "embedding_bag backward: workspace required";
      SortBuffers b{};
      if (total > 0) {
        b = carve(q.workspace, total, p.num_rows);
        sort_input_kernel<I>
            <<<blocks_for(total, 256), 256, 0, s>>>(index, b.keys_in, b.pos_in, total);
        HYDRA_CUDA_LAUNCH_CHECK();
        HYDRA_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(b.temp, b.temp_bytes, b.keys_in,
                                                         b.keys_out, b.pos_in, b.pos_out, total, 0,
                                                         key_bits(p.num_rows), s));
      }
      HYDRA_CHECK(p.num_rows <= 0x7fffffff)
          << "embedding_bag backward: " << p.num_rows << " table rows; at most 2^31 - 1";
      HYDRA_CHECK(p.cols <= int64_t{kBagCols} * 1024)
          << "embedding_bag backward: rows of " << p.cols << " columns; at most " << kBagCols * 1024
          << " on CUDA";
      const RowLookups<T> rows{b.keys_out,
                               b.pos_out,
                               static_cast<const T*>(p.weights),
                               static_cast<int32_t*>(q.hits),
                               total,
                               p.m,
                               p.cols};
      if (launch_weighted_rows(rows, static_cast<const T*>(q.gout), static_cast<T*>(q.gtable),
                               p.num_rows, p.cols, s))
        return;
      embedding_bag_table_kernel<T>
          <<<static_cast<unsigned>(p.num_rows), row_threads(p.cols), 0, s>>>(
              b.keys_out, b.pos_out, static_cast<const T*>(p.weights),
              static_cast<const T*>(q.gout), static_cast<T*>(q.gtable),
              static_cast<int32_t*>(q.hits), total, p.m, p.cols);
      HYDRA_CUDA_LAUNCH_CHECK();
    });
  });
}

}  // namespace hydra::kernels::cuda
