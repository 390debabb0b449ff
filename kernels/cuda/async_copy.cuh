// cp.async (Ampere and later): 16-byte copies from global to shared memory that complete in the
// background, in commit groups the thread waits for.
#pragma once

#include <cstdint>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/rows.cuh"

namespace hydra::kernels::cuda {

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
// 16 bytes global -> shared, asynchronously; zeros when !valid (nothing is read then).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most kPending of the thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Tiles of [steps][columns] rows (the selective scan's inputs, the conv's) staged by a block, in
// cp.async 16-byte chunks when the rows, their stride and their width hold whole aligned chunks
// (chunk_rows), otherwise element by element.
// Whether rows of `width` elements, `row` elements apart from `base`, are whole 16-byte chunks.
template <class T>
inline bool chunk_rows(const void* base, int64_t row, int64_t width, int64_t pitch) {
  constexpr int64_t E = pack_width<T>();
  return base != nullptr && aligned16(base) && row % E == 0 && width % E == 0 && pitch % E == 0;
}

// Copies `steps` rows of `cols` elements (row s at src + s * row) into dst (row pitch `pitch`,
// `rows` rows), by the whole block; elements past steps or cols are zero, so that a thread past the
// channels computes on zeros. Asynchronous: the caller commits and waits (cp_async_commit/wait).
template <class T>
__device__ __forceinline__ void stage_tile(T* dst, int pitch, int rows, const T* src, int64_t row,
                                           int steps, int cols, bool async) {
  if (async) {
    constexpr int E = pack_width<T>();
    const int chunks = pitch / E;
    for (int e = threadIdx.x; e < rows * chunks; e += blockDim.x) {
      const int s = e / chunks, c = (e % chunks) * E;
      const bool valid = s < steps && c < cols;
      cp_async16(dst + s * pitch + c, valid ? src + s * row + c : src, valid);
    }
  } else {
    for (int e = threadIdx.x; e < rows * pitch; e += blockDim.x) {
      const int s = e / pitch, c = e % pitch;
      dst[e] = s < steps && c < cols ? src[s * row + c] : convert<T>(compute_t<T>(0));
    }
  }
}

}  // namespace hydra::kernels::cuda
