// Generators for the counter-based Philox stream: a (seed, offset) pair. A draw of n values takes
// ceil(n/4) blocks starting at the offset and advances it, so any draw can be replayed from its
// state.
#pragma once

#include <cstdint>

namespace hydra {

struct GeneratorState {
  uint64_t seed = 0;
  uint64_t offset = 0;
  bool operator==(const GeneratorState&) const = default;
};

class Generator {
 public:
  explicit Generator(uint64_t seed = 0) : state_{seed, 0} {}
  uint64_t seed() const { return state_.seed; }
  // Returns the offset for a draw of n values and advances past it.
  uint64_t reserve(int64_t n) {
    const uint64_t off = state_.offset;
    state_.offset += static_cast<uint64_t>((n + 3) / 4);
    return off;
  }
  GeneratorState state() const { return state_; }
  void set_state(const GeneratorState& s) { state_ = s; }

 private:
  GeneratorState state_;
};

// The process-wide generator used where no generator is passed (seeded by the trainer).
Generator& default_generator();

}  // namespace hydra
