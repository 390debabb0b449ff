// What the row scatter-add (index.cu) and the embedding bag's table gradient (pkm.cu) share: the
// indices sorted stably with their positions (cub's radix sort over the bits the row count needs),
// and the workspace that holds them.
#pragma once

#include <cub/cub.cuh>

#include "kernels/cuda/common.cuh"

namespace hydra::kernels::cuda::sorted_rows {

template <class I>
__global__ void sort_input_kernel(const I* __restrict index, int64_t* __restrict keys,
                                  int32_t* __restrict pos, int64_t n) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < n) {
    keys[i] = static_cast<int64_t>(index[i]);
    pos[i] = static_cast<int32_t>(i);
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

inline size_t align256(size_t b) { return (b + 255) / 256 * 256; }

inline int key_bits(int64_t num_rows) {
  int bits = 1;
  while ((int64_t{1} << bits) < num_rows) ++bits;
  return bits;
}

inline size_t sort_temp_bytes(int64_t n, int64_t num_rows) {
  size_t temp = 0;
  HYDRA_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, temp, static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), n, 0,
      key_bits(num_rows)));
  return temp;
}

inline SortBuffers carve(void* ws, int64_t n, int64_t num_rows) {
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

}  // namespace hydra::kernels::cuda::sorted_rows
