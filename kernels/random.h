// Random fills from Philox4x32-10: element i takes lane i%4 of block (offset + i/4) under key
// `seed`.
#pragma once

#include "kernels/base/kernel.h"

namespace hydra::kernels {

enum class RandomDist : uint8_t {
  kUniform,  // a + (b - a) * u with u in [0, 1) (24 bits; 32 for integral dtypes, which take the
             // floor: [a, b))
  kNormal,   // mean a, standard deviation b (Box-Muller on lane pairs)
};

struct RandomParams {
  DType dtype = DType::kF32;
  RandomDist dist = RandomDist::kUniform;
  void* dst = nullptr;
  int64_t n = 0;
  uint64_t seed = 0;
  uint64_t offset = 0;  // in Philox blocks of 4 values
  double a = 0, b = 1;
  void* stream = nullptr;
};

HYDRA_DECLARE_KERNEL(fill_random, RandomParams)

}  // namespace hydra::kernels
