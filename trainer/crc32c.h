// CRC32C (Castagnoli): checkpoint checksums and TensorBoard's TFRecord framing. The CPU's crc32
// instruction where it has one (x86-64 with SSE4.2), else a table.
#pragma once

#include <cstddef>
#include <cstdint>

namespace hydra::trainer {

uint32_t crc32c(const void* data, std::size_t size, uint32_t crc = 0);
// The table alone (the reference the instruction's path is tested against).
uint32_t crc32c_table(const void* data, std::size_t size, uint32_t crc = 0);
// TFRecord's masked form: ((c >> 15) | (c << 17)) + 0xa282ead8.
inline uint32_t masked_crc32c(const void* data, std::size_t size) {
  const uint32_t c = crc32c(data, size);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

}  // namespace hydra::trainer
