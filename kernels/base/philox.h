// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a
// counter-based generator. Element i of a draw at generator offset o comes from block (o + i/4),
// lane i%4, so results depend on (seed, offset, index) only: the same on every thread count and on
// CPU and GPU.
#pragma once

#include <cstdint>

#include "base/dtype.h"

namespace hydra {

struct Philox4x32 {
  uint32_t v[4];

  HYDRA_HD static Philox4x32 generate(uint64_t seed, uint64_t block, uint64_t stream = 0) {
    uint32_t c[4] = {static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                     static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32)};
    uint32_t k[2] = {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
    for (int r = 0; r < 10; ++r) {
      const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c[0];
      const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c[2];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c[1] ^ k[0];
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c[3] ^ k[1];
      c[0] = n0;
      c[1] = static_cast<uint32_t>(p1);
      c[2] = n2;
      c[3] = static_cast<uint32_t>(p0);
      k[0] += 0x9E3779B9u;
      k[1] += 0xBB67AE85u;
    }
    return {{c[0], c[1], c[2], c[3]}};
  }

  // Uniform in (0, 1]: 24 random bits, never 0 (safe for log in Box-Muller).
  HYDRA_HD static float to_unit(uint32_t x) {
    return (static_cast<float>(x >> 8) + 1.0f) * 5.9604645e-8f;
  }
};

}  // namespace hydra
