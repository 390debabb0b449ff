// Row gather / scatter-add (embedding) and gather / scatter-add along an axis (the PKM's embedding
// bag: pkm.cu). The row scatter-add sorts the indices (a stable radix sort: equal rows keep their
// order) and sums each run of equal rows in that order, a tile of sorted positions per warp and
// then the tiles' sums in order: deterministic. With hydra::deterministic() off it uses atomics
// instead (f32, f64).
#include <algorithm>
#include <cub/cub.cuh>

#include "base/determinism.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/rows.cuh"
#include "kernels/cuda/sorted_rows.cuh"
#include "kernels/index.h"

namespace hydra::kernels::cuda {
namespace {

using namespace sorted_rows;

template <class T, class I>
__global__ void gather_rows_kernel(const T* __restrict table, const I* __restrict index,
                                   T* __restrict out, int64_t n, int64_t cols) {
  const int64_t total = n * cols;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e / cols, c = e % cols;
    out[e] = table[static_cast<int64_t>(index[i]) * cols + c];
  }
}

// 16 bytes per thread: rows whose length is a multiple of the pack, with aligned bases.
template <class T, class I>
__global__ void gather_rows_vec_kernel(const T* __restrict table, const I* __restrict index,
                                       T* __restrict out, int64_t n, int64_t cols) {
  const int64_t packs = cols / RowPack<T>::kN, total = n * packs;
  const auto* src = reinterpret_cast<const RowPack<T>*>(table);
  auto* dst = reinterpret_cast<RowPack<T>*>(out);
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e / packs, c = e % packs;
    dst[e] = src[static_cast<int64_t>(index[i]) * packs + c];
  }
}

// A thread per output element (or 16-byte pack, VEC): its sources' values are loaded together,
// then added in k order.
template <class T, bool VEC>
__global__ void gather_sum_rows_kernel(const T* __restrict src, const int64_t* __restrict inverse,
                                       T* __restrict out, int64_t rows, int64_t K, int64_t cols,
                                       bool accumulate) {
  using C = compute_t<T>;
  constexpr int kN = VEC ? RowPack<T>::kN : 1;
  const int64_t units = cols / kN, total = rows * units;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = e / units, c = e % units;
    C acc[kN];
    if constexpr (VEC) {
      const RowPack<T> o = accumulate ? reinterpret_cast<const RowPack<T>*>(out)[e] : RowPack<T>{};
#pragma unroll
      for (int j = 0; j < kN; ++j) acc[j] = accumulate ? convert<C>(o.v[j]) : C(0);
    } else {
      acc[0] = accumulate ? load(out, e) : C(0);
    }
    for (int64_t k = 0; k < K; ++k) {
      const int64_t i = inverse[r * K + k];
      if (i < 0) continue;
      if constexpr (VEC) {
        const RowPack<T> v = reinterpret_cast<const RowPack<T>*>(src)[i * units + c];
#pragma unroll
        for (int j = 0; j < kN; ++j) acc[j] += convert<C>(v.v[j]);
      } else {
        acc[0] += load(src, i * cols + c);
      }
    }
    if constexpr (VEC) {
      RowPack<T> o;
#pragma unroll
      for (int j = 0; j < kN; ++j) o.v[j] = convert<T>(acc[j]);
      reinterpret_cast<RowPack<T>*>(out)[e] = o;
    } else {
      out[e] = convert<T>(acc[0]);
    }
  }
}

// Sorted positions per tile of the segmented sum. A run of equal keys is summed a tile at a time,
// so a frequent row (a common token's embedding gradient: thousands of entries) is summed by many
// warps side by side instead of one walking it alone (that took 1 ms a step on the toy).
constexpr int64_t kSegTile = 128;

// Pass 1: a warp per piece, the part of a run of equal sorted keys inside one tile; a piece starts
// where its run or its tile starts. A piece that is its whole run is added into the table; a run
// that crosses tiles leaves its pieces in `parts` for pass 2: slot 0 of a tile holds the piece at
// the tile's start, slot 1 the piece that starts inside the tile and leaves it. A lane per column
// walks the piece 8 entries at a time (their keys, positions and values loaded together, then added
// in order). The pieces and their order depend on the keys alone: deterministic.
template <class T>
__global__ void segment_add_kernel(const int64_t* __restrict keys, const int32_t* __restrict pos,
                                   const T* __restrict src, T* __restrict table,
                                   compute_t<T>* __restrict parts, int64_t n, int64_t cols) {
  using C = compute_t<T>;
  constexpr int kBatch = 8;
  const int64_t j = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;
  if (j >= n) return;
  const bool run_start = j == 0 || keys[j] != keys[j - 1], tile_start = j % kSegTile == 0;
  if (!run_start && !tile_start) return;
  const int64_t row = keys[j], tile = j / kSegTile, end = min(n, (tile + 1) * kSegTile);
  const bool whole = run_start && (end == n || keys[end] != row);
  C* part = parts + (tile * 2 + (tile_start ? 0 : 1)) * cols;
  for (int64_t c = threadIdx.x & 31; c < cols; c += 32) {
    C acc = 0;
    for (int64_t k = j;; k += kBatch) {
      bool in[kBatch];
      C v[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int64_t e = k + u;
        in[u] = e < end && keys[e] == row;  // keys are sorted: once out of the run, out for good
        v[u] = in[u] ? load(src, static_cast<int64_t>(pos[e]) * cols + c) : C(0);
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
        if (in[u]) acc += v[u];
      if (!in[kBatch - 1]) break;
    }
    if (whole)
      table[row * cols + c] = convert<T>(load(table, row * cols + c) + acc);
    else
      part[c] = acc;
  }
}

// Pass 2: a warp per run that crosses tiles adds its pieces, in tile order, into the table.
template <class T>
__global__ void segment_finish_kernel(const int64_t* __restrict keys,
                                      const compute_t<T>* __restrict parts, T* __restrict table,
                                      int64_t n, int64_t cols) {
  using C = compute_t<T>;
  const int64_t j = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;
  if (j >= n || (j > 0 && keys[j] == keys[j - 1])) return;
  const int64_t row = keys[j], tile = j / kSegTile, end = min(n, (tile + 1) * kSegTile);
  if (end == n || keys[end] != row) return;  // the run is one piece, added in pass 1
  for (int64_t c = threadIdx.x & 31; c < cols; c += 32) {
    C acc = parts[(tile * 2 + (j % kSegTile == 0 ? 0 : 1)) * cols + c];
    for (int64_t t = tile + 1; t * kSegTile < n && keys[t * kSegTile] == row; ++t)
      acc += parts[t * 2 * cols + c];
    table[row * cols + c] = convert<T>(load(table, row * cols + c) + acc);
  }
}

template <class T, class I>
__global__ void atomic_scatter_kernel(const T* __restrict src, const I* __restrict index, T* table,
                                      int64_t n, int64_t cols) {
  const int64_t total = n * cols;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e / cols, c = e % cols;
    atomicAdd(table + static_cast<int64_t>(index[i]) * cols + c, src[e]);
  }
}

template <class T, class I>
__global__ void axis_gather_kernel(const T* __restrict x, const I* __restrict index,
                                   T* __restrict out, int64_t outer, int64_t axis, int64_t count,
                                   int64_t inner) {
  const int64_t total = outer * count * inner;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = e % inner, o = e / (count * inner);
    out[e] = x[(o * axis + static_cast<int64_t>(index[e])) * inner + j];
  }
}

// A thread per (outer, inner) column walks the count axis in order: deterministic.
template <class T, class I>
__global__ void axis_scatter_kernel(const T* __restrict src, const I* __restrict index,
                                    T* __restrict x, int64_t outer, int64_t axis, int64_t count,
                                    int64_t inner) {
  const int64_t col = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (col >= outer * inner) return;
  const int64_t o = col / inner, j = col % inner;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t k = (o * count + i) * inner + j;
    T* dst = x + (o * axis + static_cast<int64_t>(index[k])) * inner + j;
    *dst = convert<T>(load(dst, 0) + load(src, k));
  }
}

}  // namespace

void gather_rows(const GatherRowsParams& p) {
  if (p.n == 0 || p.cols == 0) return;
  dispatch_all(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_index(p.index_dtype, "gather_rows", [&](auto itag) {
      using I = typename decltype(itag)::type;
      if (p.cols % RowPack<T>::kN == 0 && aligned16(p.table) && aligned16(p.out)) {
        gather_rows_vec_kernel<T, I>
            <<<blocks_for(p.n * p.cols / RowPack<T>::kN, 256), 256, 0, as_stream(p.stream)>>>(
                static_cast<const T*>(p.table), static_cast<const I*>(p.index),
                static_cast<T*>(p.out), p.n, p.cols);
        HYDRA_CUDA_LAUNCH_CHECK();
        return;
      }
      gather_rows_kernel<T, I><<<blocks_for(p.n * p.cols, 256), 256, 0, as_stream(p.stream)>>>(
          static_cast<const T*>(p.table), static_cast<const I*>(p.index), static_cast<T*>(p.out),
          p.n, p.cols);
      HYDRA_CUDA_LAUNCH_CHECK();
    });
  });
}

// The pieces of runs that cross tiles (segment_add_kernel): two rows of cols sums per tile.
size_t segment_parts_bytes(int64_t n, int64_t cols) {
  return align256(static_cast<size_t>((n + kSegTile - 1) / kSegTile) * 2 * cols * sizeof(double));
}

size_t scatter_add_rows_workspace(const ScatterAddRowsParams& p) {
  if (p.n == 0) return 0;
  return 2 * align256(p.n * 8) + 2 * align256(p.n * 4) + sort_temp_bytes(p.n, p.num_rows) + 256 +
         segment_parts_bytes(p.n, p.cols);
}

void scatter_add_rows(const ScatterAddRowsParams& p) {
  if (p.n == 0 || p.cols == 0) return;
  cudaStream_t s = as_stream(p.stream);
  dispatch_float(p.dtype, "scatter_add_rows", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_index(p.index_dtype, "scatter_add_rows", [&](auto itag) {
      using I = typename decltype(itag)::type;
      if constexpr (!std::is_same_v<T, bf16>) {
        if (!deterministic()) {
          atomic_scatter_kernel<T, I><<<blocks_for(p.n * p.cols, 256), 256, 0, s>>>(
              static_cast<const T*>(p.src), static_cast<const I*>(p.index),
              static_cast<T*>(p.table), p.n, p.cols);
          HYDRA_CUDA_LAUNCH_CHECK();
          return;
        }
      }
      HYDRA_CHECK(p.workspace != nullptr) << "scatter_add_rows: workspace required";
      SortBuffers b = carve(p.workspace, p.n, p.num_rows);
      sort_input_kernel<I><<<blocks_for(p.n, 256), 256, 0, s>>>(static_cast<const I*>(p.index),
                                                                b.keys_in, b.pos_in, p.n);
      HYDRA_CUDA_LAUNCH_CHECK();
      HYDRA_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(b.temp, b.temp_bytes, b.keys_in, b.keys_out,
                                                       b.pos_in, b.pos_out, p.n, 0,
                                                       key_bits(p.num_rows), s));
      auto* parts = reinterpret_cast<compute_t<T>*>(
          (reinterpret_cast<uintptr_t>(b.temp) + b.temp_bytes + 255) & ~uintptr_t{255});
      segment_add_kernel<T><<<static_cast<unsigned>((p.n + 7) / 8), 256, 0, s>>>(
          b.keys_out, b.pos_out, static_cast<const T*>(p.src), static_cast<T*>(p.table), parts, p.n,
          p.cols);
      HYDRA_CUDA_LAUNCH_CHECK();
      if (p.n > kSegTile) {
        segment_finish_kernel<T><<<static_cast<unsigned>((p.n + 7) / 8), 256, 0, s>>>(
            b.keys_out, parts, static_cast<T*>(p.table), p.n, p.cols);
        HYDRA_CUDA_LAUNCH_CHECK();
      }
    });
  });
}

void gather_sum_rows(const GatherSumRowsParams& p) {
  if (p.rows == 0 || p.cols == 0) return;
  cudaStream_t s = as_stream(p.stream);
  dispatch_float(p.dtype, "gather_sum_rows", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto* src = static_cast<const T*>(p.src);
    auto* out = static_cast<T*>(p.out);
    if (p.cols % RowPack<T>::kN == 0 && aligned16(src) && aligned16(out)) {
      gather_sum_rows_kernel<T, true>
          <<<blocks_for(p.rows * p.cols / RowPack<T>::kN, 256), 256, 0, s>>>(
              src, p.inverse, out, p.rows, p.K, p.cols, p.accumulate);
    } else {
      gather_sum_rows_kernel<T, false><<<blocks_for(p.rows * p.cols, 256), 256, 0, s>>>(
          src, p.inverse, out, p.rows, p.K, p.cols, p.accumulate);
    }
    HYDRA_CUDA_LAUNCH_CHECK();
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
          static_cast<const T*>(p.src), static_cast<const I*>(p.index), static_cast<T*>(p.dst),
          p.outer, p.axis, p.count, p.inner);
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
          static_cast<const T*>(p.src), static_cast<const I*>(p.index), static_cast<T*>(p.dst),
          p.outer, p.axis, p.count, p.inner);
      HYDRA_CUDA_LAUNCH_CHECK();
    });
  });
}

}  // namespace hydra::kernels::cuda
