// Row gather / scatter-add (embedding), gather / scatter-add along an axis, and weighted row bags (PKM).
// The row scatter-add sorts the indices (a stable radix sort: equal rows keep their order) and lets one
// block sum each run of equal rows in that order: deterministic. With kernels::deterministic() off it
// uses atomics instead (f32, f64).
#include <cub/cub.cuh>

#include "kernels/base/scratch.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/rows.cuh"
#include "kernels/index.h"

namespace hydra::kernels::cuda {
namespace {

template <class T, class I>
__global__ void row_gather_kernel(const T* __restrict table, const I* __restrict index, T* __restrict out, int64_t n,
                                  int64_t cols) {
  const int64_t total = n * cols;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e / cols, c = e % cols;
    out[e] = table[static_cast<int64_t>(index[i]) * cols + c];
  }
}

// 16 bytes per thread: rows whose length is a multiple of the pack, with aligned bases.
template <class T, class I>
__global__ void row_gather_vec_kernel(const T* __restrict table, const I* __restrict index, T* __restrict out,
                                      int64_t n, int64_t cols) {
  const int64_t packs = cols / RowPack<T>::kN, total = n * packs;
  const auto* src = reinterpret_cast<const RowPack<T>*>(table);
  auto* dst = reinterpret_cast<RowPack<T>*>(out);
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e / packs, c = e % packs;
    dst[e] = src[static_cast<int64_t>(index[i]) * packs + c];
  }
}

template <class I>
__global__ void sort_input_kernel(const I* __restrict index, int64_t* __restrict keys, int32_t* __restrict pos,
                                  int64_t n) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < n) {
    keys[i] = static_cast<int64_t>(index[i]);
    pos[i] = static_cast<int32_t>(i);
  }
}

// Block j handles the run of equal keys that starts at sorted position j (other blocks return). A
// thread per column walks the run 8 entries at a time: their keys, positions and values are loaded
// together, then added in run order (the same sums, bit for bit, as one entry at a time). One entry at
// a time made a frequent row (a common token's embedding) a chain of dependent loads as long as its run.
template <class T>
__global__ void segment_add_kernel(const int64_t* __restrict keys, const int32_t* __restrict pos,
                                   const T* __restrict src, T* __restrict table, int64_t n, int64_t cols) {
  using C = compute_t<T>;
  constexpr int kBatch = 8;
  const int64_t j = blockIdx.x;
  if (j > 0 && keys[j] == keys[j - 1]) return;
  const int64_t row = keys[j];
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    C acc = 0;
    for (int64_t k = j;; k += kBatch) {
      bool in[kBatch];
      C v[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int64_t e = k + u;
        in[u] = e < n && keys[e] == row;  // keys are sorted: once out of the run, out for good
        v[u] = in[u] ? load(src, static_cast<int64_t>(pos[e]) * cols + c) : C(0);
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
        if (in[u]) acc += v[u];
      if (!in[kBatch - 1]) break;
    }
    table[row * cols + c] = convert<T>(load(table, row * cols + c) + acc);
  }
}

template <class T, class I>
__global__ void atomic_scatter_kernel(const T* __restrict src, const I* __restrict index, T* table, int64_t n,
                                      int64_t cols) {
  const int64_t total = n * cols;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e / cols, c = e % cols;
    atomicAdd(table + static_cast<int64_t>(index[i]) * cols + c, src[e]);
  }
}

struct SortBuffers {
  int64_t* keys_in;
  int64_t* keys_out;
  int32_t* pos_in;
  int32_t* pos_out;
  void* temp;
  size_t temp_bytes;
};

size_t align256(size_t b) { return (b + 255) / 256 * 256; }

int key_bits(int64_t num_rows) {
  int bits = 1;
  while ((int64_t{1} << bits) < num_rows) ++bits;
  return bits;
}

size_t sort_temp_bytes(int64_t n, int64_t num_rows) {
  size_t temp = 0;
  HYDRA_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp, static_cast<const int64_t*>(nullptr),
                                                   static_cast<int64_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                                   static_cast<int32_t*>(nullptr), n, 0, key_bits(num_rows)));
  return temp;
}

SortBuffers carve(void* ws, int64_t n, int64_t num_rows) {
  char* p = static_cast<char*>(ws);
  SortBuffers b{};
  b.keys_in = reinterpret_cast<int64_t*>(p);
  p += align256(n * 8);
  b.keys_out = reinterpret_cast<int64_t*>(p);
  p += align256(n * 8);
  b.pos_in = reinterpret_cast<int32_t*>(p);
  p += align256(n * 4);
  b.pos_out = reinterpret_cast<int32_t*>(p);
  p += align256(n * 4);
  b.temp = p;
  b.temp_bytes = sort_temp_bytes(n, num_rows);
  return b;
}

template <class T, class I>
__global__ void axis_gather_kernel(const T* __restrict x, const I* __restrict index, T* __restrict out, int64_t outer,
                                   int64_t axis, int64_t count, int64_t inner) {
  const int64_t total = outer * count * inner;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = e % inner, o = e / (count * inner);
    out[e] = x[(o * axis + static_cast<int64_t>(index[e])) * inner + j];
  }
}

// A thread per (outer, inner) column walks the count axis in order: deterministic.
template <class T, class I>
__global__ void axis_scatter_kernel(const T* __restrict src, const I* __restrict index, T* __restrict x, int64_t outer,
                                    int64_t axis, int64_t count, int64_t inner) {
  const int64_t col = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (col >= outer * inner) return;
  const int64_t o = col / inner, j = col % inner;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t k = (o * count + i) * inner + j;
    T* dst = x + (o * axis + static_cast<int64_t>(index[k])) * inner + j;
    *dst = convert<T>(load(dst, 0) + load(src, k));
  }
}

template <class T, class I>
__global__ void bag_fwd_kernel(const T* __restrict table, const I* __restrict index, const T* __restrict w,
                               T* __restrict out, int64_t m, int64_t cols) {
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
__global__ void bag_bwd_weights_kernel(const T* __restrict table, const I* __restrict index, const T* __restrict gout,
                                       T* __restrict gw, int64_t lookups, int64_t m, int64_t cols) {
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
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = e / p.count, c = p.pick[e];
    p.out[e] = p.a[r * p.k + c / p.k] * p.n_keys + p.b[r * p.k + c % p.k];
  }
}

// The first sorted position whose key is >= key.
__device__ int64_t lower_bound(const int64_t* __restrict keys, int64_t n, int64_t key) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (keys[mid] < key) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// Block r sums table row r's lookups, found as a run of the stably sorted keys, in (t, k) order. The
// lookups' weights and gout rows are read once per block into shared memory, kBagChunk at a time (each
// thread computing them for itself cost a 64-bit division per lookup and column); each thread keeps
// the sums of its kBagCols columns in registers.
constexpr int kBagChunk = 256, kBagCols = 8;

template <class T>
__global__ void bag_table_kernel(const int64_t* __restrict keys, const int32_t* __restrict pos, const T* __restrict w,
                                 const T* __restrict gout, T* __restrict gtable, int32_t* __restrict hits,
                                 int64_t total, int64_t m, int64_t cols) {
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

}  // namespace

void row_gather(const RowGatherParams& p) {
  if (p.n == 0 || p.cols == 0) return;
  dispatch_all(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_index(p.index_dtype, "row_gather", [&](auto itag) {
      using I = typename decltype(itag)::type;
      if (p.cols % RowPack<T>::kN == 0 && aligned16(p.table) && aligned16(p.out)) {
        row_gather_vec_kernel<T, I><<<blocks_for(p.n * p.cols / RowPack<T>::kN, 256), 256, 0, as_stream(p.stream)>>>(
            static_cast<const T*>(p.table), static_cast<const I*>(p.index), static_cast<T*>(p.out), p.n, p.cols);
        HYDRA_CUDA_LAUNCH_CHECK();
        return;
      }
      row_gather_kernel<T, I><<<blocks_for(p.n * p.cols, 256), 256, 0, as_stream(p.stream)>>>(
          static_cast<const T*>(p.table), static_cast<const I*>(p.index), static_cast<T*>(p.out), p.n, p.cols);
      HYDRA_CUDA_LAUNCH_CHECK();
    });
  });
}

size_t row_scatter_add_workspace(const RowScatterAddParams& p) {
  if (p.n == 0) return 0;
  return 2 * align256(p.n * 8) + 2 * align256(p.n * 4) + sort_temp_bytes(p.n, p.num_rows);
}

void row_scatter_add(const RowScatterAddParams& p) {
  if (p.n == 0 || p.cols == 0) return;
  cudaStream_t s = as_stream(p.stream);
  dispatch_float(p.dtype, "row_scatter_add", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_index(p.index_dtype, "row_scatter_add", [&](auto itag) {
      using I = typename decltype(itag)::type;
      if constexpr (!std::is_same_v<T, bf16>) {
        if (!deterministic()) {
          atomic_scatter_kernel<T, I><<<blocks_for(p.n * p.cols, 256), 256, 0, s>>>(
              static_cast<const T*>(p.src), static_cast<const I*>(p.index), static_cast<T*>(p.table), p.n, p.cols);
          HYDRA_CUDA_LAUNCH_CHECK();
          return;
        }
      }
      HYDRA_CHECK(p.workspace != nullptr) << "row_scatter_add: workspace required";
      SortBuffers b = carve(p.workspace, p.n, p.num_rows);
      sort_input_kernel<I><<<blocks_for(p.n, 256), 256, 0, s>>>(static_cast<const I*>(p.index), b.keys_in, b.pos_in, p.n);
      HYDRA_CUDA_LAUNCH_CHECK();
      HYDRA_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(b.temp, b.temp_bytes, b.keys_in, b.keys_out, b.pos_in, b.pos_out,
                                                       p.n, 0, key_bits(p.num_rows), s));
      segment_add_kernel<T><<<p.n, row_threads(p.cols, 4), 0, s>>>(b.keys_out, b.pos_out, static_cast<const T*>(p.src),
                                                                   static_cast<T*>(p.table), p.n, p.cols);
      HYDRA_CUDA_LAUNCH_CHECK();
    });
  });
}

void axis_gather(const AxisIndexParams& p) {
  const int64_t total = p.outer * p.count * p.inner;
  if (total == 0) return;
  dispatch_float(p.dtype, "gather", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_index(p.index_dtype, "gather", [&](auto itag) {
      using I = typename decltype(itag)::type;
      axis_gather_kernel<T, I><<<blocks_for(total, 256), 256, 0, as_stream(p.stream)>>>(
          static_cast<const T*>(p.src), static_cast<const I*>(p.index), static_cast<T*>(p.dst), p.outer, p.axis,
          p.count, p.inner);
      HYDRA_CUDA_LAUNCH_CHECK();
    });
  });
}

void axis_scatter_add(const AxisIndexParams& p) {
  const int64_t cols = p.outer * p.inner;
  if (cols == 0 || p.count == 0) return;
  dispatch_float(p.dtype, "scatter_add", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_index(p.index_dtype, "scatter_add", [&](auto itag) {
      using I = typename decltype(itag)::type;
      axis_scatter_kernel<T, I><<<(cols + 127) / 128, 128, 0, as_stream(p.stream)>>>(
          static_cast<const T*>(p.src), static_cast<const I*>(p.index), static_cast<T*>(p.dst), p.outer, p.axis,
          p.count, p.inner);
      HYDRA_CUDA_LAUNCH_CHECK();
    });
  });
}

void bag_fwd(const BagParams& p) {
  if (p.n == 0) return;
  dispatch_float(p.dtype, "embedding_bag", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_index(p.index_dtype, "embedding_bag", [&](auto itag) {
      using I = typename decltype(itag)::type;
      bag_fwd_kernel<T, I><<<p.n, row_threads(p.cols), 0, as_stream(p.stream)>>>(
          static_cast<const T*>(p.table), static_cast<const I*>(p.index), static_cast<const T*>(p.weights),
          static_cast<T*>(p.out), p.m, p.cols);
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

size_t bag_bwd_workspace(const BagBwdParams& q) {
  const int64_t total = q.fwd.n * q.fwd.m;
  if (q.gtable == nullptr || total == 0) return 0;
  return 2 * align256(total * 8) + 2 * align256(total * 4) + sort_temp_bytes(total, q.fwd.num_rows);
}

void bag_bwd(const BagBwdParams& q) {
  const BagParams& p = q.fwd;
  cudaStream_t s = as_stream(p.stream);
  const int64_t total = p.n * p.m;
  HYDRA_CHECK(total < (int64_t{1} << 31)) << "embedding_bag backward: " << total << " lookups; at most 2^31";
  dispatch_float(p.dtype, "embedding_bag_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_index(p.index_dtype, "embedding_bag_backward", [&](auto itag) {
      using I = typename decltype(itag)::type;
      const I* index = static_cast<const I*>(p.index);
      if (q.gweights && p.n > 0) {
        bag_bwd_weights_kernel<T, I><<<blocks_for(total * 32, 256, int64_t(1) << 31), 256, 0, s>>>(
            static_cast<const T*>(p.table), index, static_cast<const T*>(q.gout), static_cast<T*>(q.gweights), total,
            p.m, p.cols);
        HYDRA_CUDA_LAUNCH_CHECK();
      }
      if (q.gtable == nullptr || p.num_rows == 0) return;
      HYDRA_CHECK(total == 0 || q.workspace != nullptr) << "embedding_bag backward: workspace required";
      SortBuffers b{};
      if (total > 0) {
        b = carve(q.workspace, total, p.num_rows);
        sort_input_kernel<I><<<blocks_for(total, 256), 256, 0, s>>>(index, b.keys_in, b.pos_in, total);
        HYDRA_CUDA_LAUNCH_CHECK();
        HYDRA_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(b.temp, b.temp_bytes, b.keys_in, b.keys_out, b.pos_in,
                                                         b.pos_out, total, 0, key_bits(p.num_rows), s));
      }
      HYDRA_CHECK(p.num_rows <= 0x7fffffff)
          << "embedding_bag backward: " << p.num_rows << " table rows; at most 2^31 - 1";
      HYDRA_CHECK(p.cols <= int64_t{kBagCols} * 1024)
          << "embedding_bag backward: rows of " << p.cols << " columns; at most " << kBagCols * 1024 << " on CUDA";
      bag_table_kernel<T><<<static_cast<unsigned>(p.num_rows), row_threads(p.cols), 0, s>>>(
          b.keys_out, b.pos_out, static_cast<const T*>(p.weights), static_cast<const T*>(q.gout),
          static_cast<T*>(q.gtable), static_cast<int32_t*>(q.hits), total, p.m, p.cols);
      HYDRA_CUDA_LAUNCH_CHECK();
    });
  });
}

}  // namespace hydra::kernels::cuda
