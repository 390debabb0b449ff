// What the fuzz tests share: a seeded generator and a case budget that the environment can change
// (HYDRA_FUZZ_SEED, HYDRA_FUZZ_CASES: CI runs the defaults, a longer hunt runs others), and the
// byte-level damage done to a binary file (HDF5 shards, checkpoint manifests and rank files).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <string>

namespace hydra::testing {

class Fuzzer {
 public:
  // `seed` and `cases` are CI's; the environment overrides both.
  Fuzzer(uint64_t seed, int cases) {
    const char* s = std::getenv("HYDRA_FUZZ_SEED");
    const char* c = std::getenv("HYDRA_FUZZ_CASES");
    rng_.seed(s != nullptr ? std::strtoull(s, nullptr, 10) : seed);
    cases_ = c != nullptr ? std::atoi(c) : cases;
  }

  int cases() const { return cases_; }
  uint64_t next() { return rng_(); }
  // Uniform in [0, n); 0 when n is 0.
  std::size_t pick(std::size_t n) { return n == 0 ? 0 : static_cast<std::size_t>(rng_() % n); }

  // 1-4 byte-level mutations: a byte replaced, a run of up to 16 bytes zeroed, a bit flipped, a
  // byte inserted, or the file cut short. Half land in the first `head` bytes, where a format keeps
  // most of its structure (an HDF5 superblock and object headers; a protobuf's leading fields).
  std::string damage(std::string bytes, std::size_t head) {
    for (int m = 1 + static_cast<int>(pick(4)); m > 0 && !bytes.empty(); --m) {
      const std::size_t at = pick(2) == 0 ? pick(std::min(bytes.size(), head)) : pick(bytes.size());
      switch (pick(5)) {
        case 0:
          bytes[at] = static_cast<char>(next());
          break;
        case 1:
          std::fill_n(bytes.begin() + static_cast<std::ptrdiff_t>(at),
                      std::min<std::size_t>(1 + pick(16), bytes.size() - at), '\0');
          break;
        case 2:
          bytes[at] = static_cast<char>(bytes[at] ^ (1 << pick(8)));
          break;
        case 3:
          bytes.insert(at, 1, static_cast<char>(next()));
          break;
        default:
          bytes.resize(at);
      }
    }
    return bytes;
  }

 private:
  std::mt19937_64 rng_;
  int cases_ = 0;
};

}  // namespace hydra::testing
