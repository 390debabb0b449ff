// A small deterministic generator for data (splitmix64), seeded by mixing integers: a sequence's
// content is a pure function of (seed, stream, step, index), independent of threads and ranks.
#pragma once

#include <cstdint>
#include <initializer_list>

namespace hydra::data {

class Rng {
 public:
  explicit Rng(std::initializer_list<uint64_t> keys) {
    for (uint64_t k : keys) state_ = mix(state_ ^ (k + 0x9E3779B97F4A7C15ull));
  }
  uint64_t next() { return mix(state_ += 0x9E3779B97F4A7C15ull); }
  // Uniform in [0, n) (n >= 1).
  int64_t below(int64_t n) {
    return static_cast<int64_t>((static_cast<unsigned __int128>(next()) * uint64_t(n)) >> 64);
  }
  double unit() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

 private:
  static uint64_t mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  uint64_t state_ = 0x243F6A8885A308D3ull;
};

}  // namespace hydra::data
