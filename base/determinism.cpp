#include "base/determinism.h"

#include <atomic>

namespace hydra {
namespace {
std::atomic<bool> g_deterministic{true};
}  // namespace

bool deterministic() { return g_deterministic.load(std::memory_order_relaxed); }
void set_deterministic(bool on) { g_deterministic.store(on, std::memory_order_relaxed); }

}  // namespace hydra
