// CRC32C (Castagnoli), software table: checkpoint checksums and TensorBoard's TFRecord framing.
#pragma once

#include <cstddef>
#include <cstdint>

namespace hydra::trainer {

uint32_t crc32c(const void* data, std::size_t size, uint32_t crc = 0);
// TFRecord's masked form: ((c >> 15) | (c << 17)) + 0xa282ead8.
inline uint32_t masked_crc32c(const void* data, std::size_t size) {
  const uint32_t c = crc32c(data, size);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

}  // namespace hydra::trainer
