// Strided copies (with dtype conversion). The launcher first merges dimensions that are contiguous
// in both tensors and drops size-1 ones; then
//   - one contiguous run of one dtype: cudaMemcpyAsync;
//   - rows (the last dimension contiguous in both, 32 to 16384 long; longer ones split into equal
//     pieces): a warp per row, the row's offsets computed once per row, 16-byte vectors when the
//     dtypes agree and the rows are aligned (the slices of splits and concatenations, the weights'
//     compute copies);
//   - anything else: a thread per element with the offsets from its index.
#include "kernels/copy.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/multi_tensor.cuh"
#include "kernels/cuda/rows.cuh"

namespace hydra::kernels::cuda {
namespace {

struct CopyGeometry {
  int ndim;
  int64_t shape[kMaxDims];
  int64_t src_strides[kMaxDims];
  int64_t dst_strides[kMaxDims];
};

template <class S, class D>
__global__ void strided_copy_kernel(const S* __restrict__ src, D* __restrict__ dst, CopyGeometry g,
                                    int64_t n) {
  wait_for_previous_grid();  // launched with launch_after_previous
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t rem = i, so = 0, dof = 0;
    for (int d = g.ndim - 1; d >= 0; --d) {
      const int64_t k = rem % g.shape[d];
      rem /= g.shape[d];
      so += k * g.src_strides[d];
      dof += k * g.dst_strides[d];
    }
    dst[dof] = convert<D>(src[so]);
  }
}

// A warp per row of `cols` elements; g holds the outer dimensions (ndim - 1 of them) and their
// strides.
template <class S, class D, bool VEC>
__global__ void copy_rows_kernel(const S* __restrict__ src, D* __restrict__ dst, CopyGeometry g,
                                 int64_t rows, int64_t cols) {
  wait_for_previous_grid();
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t r = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5; r < rows; r += warps) {
    int64_t rem = r, so = 0, dof = 0;
    for (int d = g.ndim - 1; d >= 0; --d) {
      const int64_t k = rem % g.shape[d];
      rem /= g.shape[d];
      so += k * g.src_strides[d];
      dof += k * g.dst_strides[d];
    }
    if constexpr (VEC) {
      const auto* s = reinterpret_cast<const RowPack<S>*>(src + so);
      auto* o = reinterpret_cast<RowPack<D>*>(dst + dof);
      for (int64_t c = lane; c < cols / RowPack<S>::kN; c += 32) o[c] = s[c];
    } else {
      for (int64_t c = lane; c < cols; c += 32) dst[dof + c] = convert<D>(src[so + c]);
    }
  }
}

// A fill writes 16-byte packs from a 16-byte aligned dst (the elements past the last whole pack one
// at a time): one 2-byte store a thread reached 0.6 TB/s on a bf16 gradient of toy's (41 us for
// 25 MB; HYDRA_TRACE, docs/PERF.md session 36).
template <class T>
__global__ void fill_kernel(T* __restrict__ dst, int64_t n, T value, bool packed) {
  wait_for_previous_grid();
  const int64_t first = blockIdx.x * int64_t(blockDim.x) + threadIdx.x,
                stride = int64_t(gridDim.x) * blockDim.x;
  int64_t done = 0;
  if (packed) {
    constexpr int E = pack_width<T>();
    RowPack<T> pack;
#pragma unroll
    for (int j = 0; j < E; ++j) pack.v[j] = value;
    const int64_t packs = n / E;
    auto* out = reinterpret_cast<RowPack<T>*>(dst);
    for (int64_t i = first; i < packs; i += stride) out[i] = pack;
    done = packs * E;
  }
  for (int64_t i = done + first; i < n; i += stride) dst[i] = value;
}

}  // namespace

// multi_copy: blocks of kMultiCopyChunk elements, tensor by tensor; first[i] is tensor i's first
// block (a binary search finds a block's tensor).
constexpr int64_t kMultiCopyChunk = 8192;
struct MultiCopyLayout {
  int count;
  const void* src[MultiCopyParams::kMax];
  void* dst[MultiCopyParams::kMax];
  int64_t n[MultiCopyParams::kMax];
  int32_t first[MultiCopyParams::kMax + 1];
};

template <class S, class D>
__global__ void __launch_bounds__(256)
    multi_copy_kernel(const __grid_constant__ MultiCopyLayout l) {
  const int32_t blk = blockIdx.x;
  const int lo = multi_tensor_of(l.first, l.count, blk);
  const S* src = static_cast<const S*>(l.src[lo]);
  D* dst = static_cast<D*>(l.dst[lo]);
  const int64_t begin = int64_t(blk - l.first[lo]) * kMultiCopyChunk,
                end = min(l.n[lo], begin + kMultiCopyChunk);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) dst[i] = convert<D>(load(src, i));
}

void strided_copy(const StridedCopyParams& p) {
  int64_t n = 1;
  CopyGeometry g{};
  for (int d = 0; d < p.ndim; ++d) {
    n *= p.shape[d];
    if (p.shape[d] == 1) continue;
    if (g.ndim > 0 && g.src_strides[g.ndim - 1] == p.src_strides[d] * p.shape[d] &&
        g.dst_strides[g.ndim - 1] ==
            p.dst_strides[d] * p.shape[d]) {  // merge into the previous dimension
      g.shape[g.ndim - 1] *= p.shape[d];
      g.src_strides[g.ndim - 1] = p.src_strides[d];
      g.dst_strides[g.ndim - 1] = p.dst_strides[d];
      continue;
    }
    g.shape[g.ndim] = p.shape[d];
    g.src_strides[g.ndim] = p.src_strides[d];
    g.dst_strides[g.ndim] = p.dst_strides[d];
    ++g.ndim;
  }
  if (n == 0) return;
  cudaStream_t stream = as_stream(p.stream);
  if (g.ndim == 0) {  // one element
    g.ndim = 1;
    g.shape[0] = 1;
    g.src_strides[0] = g.dst_strides[0] = 1;
  }
  const bool inner_contiguous = g.src_strides[g.ndim - 1] == 1 && g.dst_strides[g.ndim - 1] == 1;
  if (g.ndim == 1 && inner_contiguous && p.src_dtype == p.dst_dtype) {
    HYDRA_CUDA_CHECK(cudaMemcpyAsync(p.dst, p.src, static_cast<size_t>(n) * dtype_size(p.src_dtype),
                                     cudaMemcpyDeviceToDevice, stream));
    return;
  }
  // Rows longer than the row kernel takes are split into equal pieces (the permutations of the
  // workspace's chunks, [4, 128, 64 x 384] -> [128, 4, 64 x 384]: 99 us a copy on the per-element
  // path, 25 MB), and so are long rows too few to give each SM's warps a row (96 rows of 16K
  // elements ran in 12 blocks at 0.25 TB/s, 12.7 us; ncu, session 36): pieces of at least 256
  // elements, a multiple of 8 (whole 16-byte packs), until there are about 4096 rows.
  const int64_t whole_rows = g.ndim >= 2 ? n / g.shape[g.ndim - 1] : 1;
  if (inner_contiguous && g.ndim >= 2 && g.ndim < kMaxDims &&
      (g.shape[g.ndim - 1] > 16384 || (whole_rows < 4096 && g.shape[g.ndim - 1] >= 512))) {
    const int64_t len = g.shape[g.ndim - 1];
    const int64_t want = (4096 + whole_rows - 1) / whole_rows;  // pieces a row for ~4096 rows
    const int64_t top = std::min<int64_t>(16384, std::max<int64_t>(256, len / want)) / 8 * 8;
    int64_t piece = 0;
    for (int64_t b = top; b >= 256 && piece == 0; b -= 8)
      if (len % b == 0) piece = b;
    if (piece == len) piece = 0;  // no split: one piece is the row itself
    if (piece > 0) {
      g.shape[g.ndim - 1] = len / piece;
      g.src_strides[g.ndim - 1] = g.dst_strides[g.ndim - 1] = piece;
      g.shape[g.ndim] = piece;
      g.src_strides[g.ndim] = g.dst_strides[g.ndim] = 1;
      ++g.ndim;
    }
  }
  const int64_t cols = g.shape[g.ndim - 1], rows = n / cols;
  // A warp per row pays off for rows of tens to thousands of elements, and enough of them.
  if (inner_contiguous && g.ndim >= 2 && cols >= 32 && cols <= 16384 && rows >= 64) {
    CopyGeometry outer = g;
    outer.ndim = g.ndim - 1;
    dispatch_all(p.src_dtype, [&](auto st) {
      using S = typename decltype(st)::type;
      dispatch_all(p.dst_dtype, [&](auto dt) {
        using D = typename decltype(dt)::type;
        const auto blocks = blocks_for(rows * 32, 256);
        bool vec = false;
        if constexpr (std::is_same_v<S, D>) {
          vec = aligned16(p.src) && aligned16(p.dst) && cols % RowPack<S>::kN == 0;
          for (int d = 0; d < outer.ndim && vec; ++d)
            vec = outer.src_strides[d] % RowPack<S>::kN == 0 &&
                  outer.dst_strides[d] % RowPack<S>::kN == 0;
          if (vec)
            launch_after_previous(copy_rows_kernel<S, D, true>, dim3(blocks), dim3(256), 0, stream,
                                  static_cast<const S*>(p.src), static_cast<D*>(p.dst), outer, rows,
                                  cols);
        }
        if (!vec) {
          launch_after_previous(copy_rows_kernel<S, D, false>, dim3(blocks), dim3(256), 0, stream,
                                static_cast<const S*>(p.src), static_cast<D*>(p.dst), outer, rows,
                                cols);
        }
        HYDRA_CUDA_LAUNCH_CHECK();
      });
    });
    return;
  }
  dispatch_all(p.src_dtype, [&](auto st) {
    using S = typename decltype(st)::type;
    dispatch_all(p.dst_dtype, [&](auto dt) {
      using D = typename decltype(dt)::type;
      launch_after_previous(strided_copy_kernel<S, D>, dim3(blocks_for(n, 256)), dim3(256), 0,
                            as_stream(p.stream), static_cast<const S*>(p.src),
                            static_cast<D*>(p.dst), g, n);
      HYDRA_CUDA_LAUNCH_CHECK();
    });
  });
}

void fill(const FillParams& p) {
  if (p.n == 0) return;
  dispatch_all(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T v = convert<T>(p.value);
    const bool packed = aligned16(p.dst);
    const int64_t per_thread = packed ? pack_width<T>() : 1;
    launch_after_previous(fill_kernel<T>,
                          dim3(blocks_for((p.n + per_thread - 1) / per_thread, 256)), dim3(256), 0,
                          as_stream(p.stream), static_cast<T*>(p.dst), p.n, v, packed);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

void multi_copy(const MultiCopyParams& p) {
  HYDRA_CHECK(p.count >= 0 && p.count <= MultiCopyParams::kMax) << "multi_copy: count " << p.count;
  MultiCopyLayout l{};
  l.count = p.count;
  for (int i = 0; i < p.count; ++i) {
    l.src[i] = p.src[i];
    l.dst[i] = p.dst[i];
    l.n[i] = p.n[i];
    const int64_t blocks = l.first[i] + (p.n[i] + kMultiCopyChunk - 1) / kMultiCopyChunk;
    HYDRA_CHECK(blocks < (int64_t{1} << 31)) << "multi_copy: too many elements in one launch";
    l.first[i + 1] = static_cast<int32_t>(blocks);
  }
  const int32_t blocks = l.first[p.count];
  if (blocks == 0) return;
  dispatch_all(p.src_dtype, [&](auto st) {
    using S = typename decltype(st)::type;
    dispatch_all(p.dst_dtype, [&](auto dt) {
      using D = typename decltype(dt)::type;
      multi_copy_kernel<S, D><<<blocks, 256, 0, as_stream(p.stream)>>>(l);
      HYDRA_CUDA_LAUNCH_CHECK();
    });
  });
}

}  // namespace hydra::kernels::cuda
