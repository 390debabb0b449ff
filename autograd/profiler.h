// Kernel profile: with HYDRA_PROFILE=1 in the environment, every kernel launched through
// HYDRA_LAUNCH is timed (CUDA events on its stream around the launch; wall-clock on the CPU) and
// summed by kernel family. kernel_profile_report() prints the table (the trainer does at the end of
// a run). Off, a launch pays one branch on a cached flag.
#pragma once

#include <ostream>
#include <string>

#include "autograd/device.h"

namespace hydra {

bool kernel_profile_enabled();
// HYDRA_PROFILE=2: also rows per GEMM shape ("gemm 32768x1536x384 bf16 NT b1"), beside the
// families, and "host before <kernel>" rows: the host's time since the previous launch, charged to
// the next one (where the device waits for the host). Rows whose name starts with "host" are host
// wall-clock time (waits for copies to the host, copies from pageable memory), not kernels.
bool kernel_profile_detailed();
// HYDRA_PROFILE=ops: also a row per autograd op and direction ("op fwd mul", "op bwd mul",
// "op bwd (gradient sums)", "op (outside autograd)"): where fusing ops would pay. A forward launch
// is charged to the next node created on its thread (the op's backward node, made after its
// kernels); launches under no_grad or in the optimizer have no node and land in "(outside
// autograd)".
bool kernel_profile_ops();
// Marks the launches since the last node as the forward of `op` (Node's constructor calls it).
void kernel_profile_node_created(const std::string& op);
// The backward of `op` runs on this thread while the scope lives (the engine puts one around each
// node's apply and its gradient sums).
class KernelProfileBackwardScope {
 public:
  explicit KernelProfileBackwardScope(const std::string& op);
  ~KernelProfileBackwardScope();
  KernelProfileBackwardScope(const KernelProfileBackwardScope&) = delete;
  KernelProfileBackwardScope& operator=(const KernelProfileBackwardScope&) = delete;

 private:
  const std::string* previous_ = nullptr;
};

class KernelProfileScope {
 public:
  KernelProfileScope(Device device, const char* name) {
    if (kernel_profile_enabled()) begin(device, name);
  }
  // A row of its own name (detailed profiles); nothing when profiling is off.
  KernelProfileScope(Device device, const std::string& name) {
    if (kernel_profile_enabled()) begin(device, name.c_str());
  }
  ~KernelProfileScope() {
    if (active_) end();
  }
  KernelProfileScope(const KernelProfileScope&) = delete;
  KernelProfileScope& operator=(const KernelProfileScope&) = delete;

 private:
  void begin(Device device, const char* name);
  void end();
  bool active_ = false;
  int slot_ = -1;
};

// "n0xn1x..." of `n` sizes (names of detailed rows).
template <class I>
std::string profile_dims(const I* sizes, int n) {
  std::string s;
  for (int i = 0; i < n; ++i) {
    if (i > 0) s += 'x';
    s += std::to_string(sizes[i]);
  }
  return s;
}

// The kernels' total time, launches and share, longest first; resets the sums. `steps` > 0: also
// per step (the steps the sums cover).
void kernel_profile_report(std::ostream& os, int64_t steps = 0);
// Drops the sums so far (waiting for the launches in flight): the trainer calls it after the first
// step, whose one-time costs (module loading, first allocations, GEMM heuristics) would blur the
// rest.
void kernel_profile_reset();

}  // namespace hydra
